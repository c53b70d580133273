"""The Inpaint editor through the API: every file it sends goes through the Studio's safe decoder.

The editor's event is private (the page's own), but anyone can call it: these tests send what an
attacker would, both ways the editor's files arrive (uploaded file references in the event, and the
page's ``accept_blobs`` component call), to an app whose PATH has a fake ``gs`` that leaves a mark
if Pillow ever hands a file to Ghostscript.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines import settings

pytestmark = [pytest.mark.api, pytest.mark.slow]

SIDE = 128
BOX = (40, 40, 72, 88)  # the painted part of the honest brush layer
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 128 128\n%%EndComments\nnewpath 0 0 moveto showpage\n%%EOF\n"


def psd_bytes(width: int, height: int) -> bytes:
    """A valid uncompressed 8-bit RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layer and mask info
    return header + sections + struct.pack(">H", 0) + bytes(range(256)) * (3 * width * height // 256)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ghostscript_mark(tmp_path_factory):
    """A folder with a fake ``gs`` on it, and the file it writes when it runs."""
    folder = tmp_path_factory.mktemp("fake-gs")
    mark = folder / "ghostscript-ran"
    script = folder / "gs"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{mark}"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder, mark


@pytest.fixture(scope="module")
def editor_app(tiny_root, tmp_path_factory, ghostscript_mark):
    from tests.app_server import tiny_app

    folder, _mark = ghostscript_mark
    log_path = tmp_path_factory.mktemp("editor-app") / "app.log"
    environment = {"PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}
    with tiny_app(tiny_root, log_path, environment=environment) as (_, url):
        yield url


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("editor-files")
    grid = np.random.default_rng(4).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    photo = Image.fromarray(grid).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    layer = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), BOX)
    paths = {
        "photo.png": png_bytes(photo),
        "layer.png": png_bytes(layer),
        "image.psd": psd_bytes(SIDE, SIDE),
        "layer.eps": EPS,
    }
    for name, data in paths.items():
        (folder / name).write_bytes(data)
    # 12000 x 12000 = 144 megapixels of black: a 140 kB file that decodes to 432 MB of RGB.
    Image.new("L", (12_000, 12_000), 0).save(folder / "huge.png", compress_level=9)
    return folder


class Page:
    """One visitor's session, speaking the page's own protocol (upload, component call, queued event)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = uuid.uuid4().hex[:11]
        self.http = httpx.Client(base_url=url + "gradio_api/", timeout=120)
        config = httpx.get(url + "config", timeout=30).json()
        self.components = {component["id"]: component for component in config["components"]}
        (self.event,) = [item for item in config["dependencies"] if item.get("api_name") == "inpaint_drawn"]
        self.editor_id = self.event["inputs"][0]

    def upload(self, path) -> dict:
        with open(path, "rb") as handle:
            (server_path,) = self.http.post("upload", files={"files": (path.name, handle)}).json()
        return {"path": server_path, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def send_part(self, edit_id: str, part: str, data: bytes, index: int | None = None) -> httpx.Response:
        """What the editor's page does before the event: one file of an edit through ``accept_blobs``."""
        fields = {
            "component_id": str(self.editor_id),
            "session_hash": self.session,
            "fn_name": "accept_blobs",
            "id": edit_id,
            "type": part,
            "index": "null" if index is None else str(index),
        }
        files = {"file": (f"{part}.png", data)}
        return httpx.post(self.url + "gradio_api/component_server/", data=fields, files=files, timeout=60)

    def inpaint(self, editor: dict, **changes) -> dict:
        """The Inpaint button's event with ``editor`` as the editor's value; returns the final message."""
        values = [self.components[key].get("props", {}).get("value") for key in self.event["inputs"]]
        values[0], values[1] = editor, None  # the editor; no uploaded mask
        names = ["editor", "mask", "prompt", "negative_prompt", "strength", "mask_blur", "paste_back", "model"]
        names += ["seed", "steps", "guidance", "lora", "lora_scale", "memory_mode", "preview_every"]
        for name, value in changes.items():
            values[names.index(name)] = value
        body = {"data": values, "fn_index": self.event["id"], "session_hash": self.session, "event_data": None}
        assert self.http.post("queue/join", json=body).status_code == 200
        with self.http.stream("GET", "queue/data", params={"session_hash": self.session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_completed":
                        return message
        raise AssertionError("the event never completed")


def refusal(message: dict) -> str:
    assert message["success"] is False, message
    sentence = message["output"]["error"]
    assert sentence and "upstream" not in sentence.lower(), message
    return sentence


def test_the_fake_ghostscript_would_see_pillow_open_an_eps(files, ghostscript_mark):
    # Proves the detector: Pillow, left to itself, hands this EPS to the first `gs` on PATH.
    folder, mark = ghostscript_mark
    environment = {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}
    load = f"from PIL import Image\ntry: Image.open({str(files / 'layer.eps')!r}).load()\nexcept Exception: pass"
    subprocess.run([sys.executable, "-c", load], env=environment, check=True, timeout=60)
    assert mark.exists()
    mark.unlink()


def test_a_psd_image_and_an_eps_layer_are_refused_and_ghostscript_never_runs(editor_app, files, ghostscript_mark):
    _folder, mark = ghostscript_mark
    page = Page(editor_app)
    photo, psd, eps = (page.upload(files / name) for name in ("photo.png", "image.psd", "layer.eps"))
    unreadable = "is not an image file this app can read; upload PNG, JPEG, WebP, GIF, BMP or TIFF"

    # As file references in the event (an API client's way) ...
    sentence = refusal(page.inpaint({"background": psd, "layers": [], "composite": psd}))
    assert "'image.psd' " + unreadable in sentence
    sentence = refusal(page.inpaint({"background": photo, "layers": [eps], "composite": eps}))
    assert "'layer.eps' " + unreadable in sentence

    # ... and as the page's own parts, sent ahead through accept_blobs (the browser's way).
    edit = uuid.uuid4().hex[:11]
    assert page.send_part(edit, "background", (files / "image.psd").read_bytes()).status_code == 200
    assert unreadable in refusal(page.inpaint({"id": edit}))
    edit = uuid.uuid4().hex[:11]
    page.send_part(edit, "background", (files / "photo.png").read_bytes())
    page.send_part(edit, "composite", EPS)
    assert page.send_part(edit, "layer", EPS, index=0).status_code == 200
    assert "'brush layer 1' " + unreadable in refusal(page.inpaint({"id": edit}))

    assert not mark.exists(), mark.read_text()  # Ghostscript was never called, for the image, layer or composite


def test_many_layers_of_one_144_megapixel_png_are_refused_before_decoding(editor_app, files):
    page = Page(editor_app)
    photo, huge = page.upload(files / "photo.png"), page.upload(files / "huge.png")
    assert (files / "huge.png").stat().st_size < 200_000
    many = settings.MAX_MASK_LAYERS + 2
    # Time is the point here: on main, six such layers cost 24 s of CPU inside the GPU slot (Gradio decoded
    # each one). Refused by count, then by each header, this takes well under a second; 10 s is generous.
    started = time.monotonic()
    sentence = refusal(page.inpaint({"background": photo, "layers": [huge] * many, "composite": photo}))
    assert (
        f"The editor sent {many} brush layers, more than the {settings.MAX_MASK_LAYERS} read into one mask" in sentence
    )
    sentence = refusal(page.inpaint({"background": photo, "layers": [huge], "composite": huge}))
    assert "'huge.png' is 144.0 megapixels, over the 64 megapixel limit" in sentence
    assert time.monotonic() - started < 10

    # The page's way: a layer index past the cap is refused when it is sent, before anything is stored.
    edit = uuid.uuid4().hex[:11]
    answer = page.send_part(edit, "layer", (files / "huge.png").read_bytes(), index=10**9)
    assert answer.status_code == 400 and "unknown part (layer 1000000000)" in answer.json()["detail"]
    assert "Upload an image into the editor" in refusal(page.inpaint({"id": edit}))  # nothing was kept


def test_an_honest_edit_still_inpaints_inside_the_brushed_box(editor_app, files):
    page = Page(editor_app)
    edit = uuid.uuid4().hex[:11]
    for part, name in (("background", "photo.png"), ("composite", "photo.png"), ("layer", "layer.png")):
        response = page.send_part(edit, part, (files / name).read_bytes(), index=0 if part == "layer" else None)
        assert response.status_code == 200, response.text
    message = page.inpaint({"id": edit}, prompt="a fox", steps="2", seed=3, preview_every=0)
    assert message["success"] is True, message
    details = message["output"]["data"][-1]
    assert details["mode"] == "inpaint" and details["mask_pixels"] == (BOX[2] - BOX[0]) * (BOX[3] - BOX[1])
    assert details["size"] == f"{SIDE}x{SIDE}"
