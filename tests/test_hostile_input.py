"""Hostile input, one table per kind: uploads, text, numbers, paths. A new case is one line.

Each API case goes through the running ``python app.py --tiny`` and checks two things: the
answer is our own sentence (never "The upstream Gradio app has raised an exception"), and the
app then still serves a normal request. Upload and number cases also run through the pipeline
functions in this process.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import resource
import time
import unicodedata
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from pipelines import settings
from pipelines.images import ImageDecodeError, describe_image, load_image
from pipelines.sd3.png_metadata import parse_a1111_parameters, read_png_settings
from pipelines.validation import as_float, as_int, strip_control_characters

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "assets" / "examples" / "coffee.png"
GENERIC = "upstream gradio app has raised an exception"
SECONDS_PER_CASE = 15  # generous for 2 busy cores; a decoded bomb or a hang takes far longer
MEMORY_PER_CASE = 200 * 1024**2  # a decoded 20000x20000 image would take 1.2 GB


# ----------------------------------------------------------------------------- helpers


def refused(client, api_name: str, *args, **kwargs) -> str:
    """Call ``api_name`` expecting a refusal; return the message the user sees."""
    started = time.monotonic()
    with pytest.raises(AppError) as caught:
        client.predict(*args, api_name=api_name, **kwargs)
    assert time.monotonic() - started < SECONDS_PER_CASE
    message = str(caught.value)
    assert GENERIC not in message.lower(), message
    return message


def has_control_characters(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" and char not in "\n\t" for char in text)


def app_pid(url: str) -> int | None:
    """The process serving ``url`` (found by its --port), for its peak memory; None if /proc has no such process."""
    port = url.rstrip("/").rsplit(":", 1)[-1]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"app.py" in arguments and b"--port" in arguments and port.encode() in arguments:
            return int(entry.name)
    return None


def peak_memory_bytes(pid: int) -> int:
    """The process's resident high-water mark (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


class RawApi:
    """The HTTP API without gradio_client, for what the client cannot send: server paths and NaN."""

    def __init__(self, url: str) -> None:
        self.base = url.rstrip("/") + "/gradio_api"
        self.http = httpx.Client(timeout=120)  # one kept-alive connection
        self.info = self.http.get(self.base + "/info").json()["named_endpoints"]
        self.example = file_data(self.upload(EXAMPLE))

    def upload(self, path: Path) -> str:
        with open(path, "rb") as handle:
            response = self.http.post(self.base + "/upload", files={"files": (path.name, handle)})
        response.raise_for_status()
        return response.json()[0]

    def call(self, api_name: str, body: str | None = None, **values) -> tuple[str, str]:
        """(event, data) of one call; ``values`` replace the endpoint's defaults by name.

        ``body`` is sent as it is (JSON with NaN or Infinity, which gradio_client cannot send).
        """
        if body is None:
            parameters = self.info["/" + api_name]["parameters"]
            data = [values.get(p["parameter_name"], p.get("parameter_default")) for p in parameters]
            body = json.dumps({"data": data})
        response = self.http.post(
            f"{self.base}/call/{api_name}", content=body, headers={"content-type": "application/json"}
        )
        response.raise_for_status()
        stream = self.http.get(f"{self.base}/call/{api_name}/{response.json()['event_id']}").text
        events = [line.removeprefix("event: ") for line in stream.splitlines() if line.startswith("event: ")]
        data = [line.removeprefix("data: ") for line in stream.splitlines() if line.startswith("data: ")]
        return events[-1], data[-1]

    def assert_serves(self) -> None:
        """A normal request right after a hostile one is answered in full."""
        event, data = self.call("caption", image=self.example, strategy="greedy", min_new_tokens=1, max_new_tokens=3)
        assert event == "complete", data
        table, _, details = json.loads(data)
        assert len(table["data"]) == 1 and table["data"][0][1] == details["captions"][0]["text"]


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


@pytest.fixture(scope="module")
def raw_api(tiny_app_url) -> RawApi:
    return RawApi(tiny_app_url)


# ----------------------------------------------------------------------------- uploads


def png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8))


@functools.cache
def decompression_bomb() -> bytes:
    """A real 20000x20000 PNG: 400 megapixels of black that compress to about 50 kB."""
    return png_bytes(Image.new("1", (20000, 20000)), optimize=True)


def tiff_16_bit() -> bytes:
    ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "TIFF")
    return buffer.getvalue()


def gif_500_frames() -> bytes:
    frames = [Image.new("P", (32, 32), index % 256) for index in range(500)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


# Pillow would hand an EPS to Ghostscript; uploads are only ever opened as UPLOAD_IMAGE_FORMATS.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n"
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000"><rect/></svg>'


@dataclass(frozen=True)
class Upload:
    name: str  # the file's name as uploaded
    make: object  # () -> bytes
    refused: str = ""  # words of the refusal; empty: the file is accepted...
    accepted: str = ""  # ...and describe_image() of what the model sees


UPLOADS = [
    pytest.param(Upload("empty.png", lambda: b"", refused="is empty (0 bytes)"), id="0-byte"),
    pytest.param(Upload("cut.png", lambda: png_bytes(noise(64, 64))[:300], refused="damaged or incomplete"), id="truncated-png"),
    pytest.param(Upload("cut.jpg", lambda: encoded(noise(64, 64), "JPEG")[:400], refused="damaged or incomplete"), id="truncated-jpeg"),
    pytest.param(Upload("bomb.png", decompression_bomb, refused="400.0 megapixels, over the 64 megapixel limit"), id="bomb-20000x20000"),
    pytest.param(Upload("setup.png", lambda: b"MZ\x90\x00\x03" + bytes(500), refused="not an image file this app can read"), id="exe-renamed-png"),
    pytest.param(Upload("page.png", lambda: b"<html><script>alert(1)</script></html>", refused="not an image file"), id="html-renamed-png"),
    pytest.param(Upload("print.png", lambda: EPS, refused="not an image file this app can read"), id="eps-renamed-png"),
    pytest.param(Upload("old.tga", lambda: encoded(noise(16, 16), "TGA"), refused="not an image file this app can read"), id="tga"),
    pytest.param(Upload("drawing.svg", lambda: SVG, refused="SVG vector drawing, which is not supported"), id="svg"),
    pytest.param(Upload("drawing.png", lambda: SVG, refused="SVG vector drawing"), id="svg-renamed-png"),
    pytest.param(Upload("deep.tif", tiff_16_bit, accepted="64x48 RGB"), id="16-bit-tiff"),
    pytest.param(Upload("many.gif", gif_500_frames, accepted="32x32 RGB"), id="500-frame-gif"),
]  # fmt: skip


@pytest.mark.parametrize("case", UPLOADS)
def test_uploads_through_the_pipeline(case: Upload):
    data = case.make()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.monotonic()
    if case.refused:
        with pytest.raises(ImageDecodeError, match=re.escape(case.refused)):
            load_image(data, name=case.name)
    else:
        assert describe_image(load_image(data, name=case.name)) == case.accepted
    assert time.monotonic() - started < SECONDS_PER_CASE
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before < MEMORY_PER_CASE


@pytest.mark.api
@pytest.mark.parametrize("case", UPLOADS)
def test_uploads_through_the_api(case: Upload, tiny_client, raw_api, tiny_app_url, tmp_path):
    path = tmp_path / case.name
    path.write_bytes(case.make())
    pid = app_pid(tiny_app_url)
    assert pid is not None, "the app's process was not found in /proc"
    peak_before = peak_memory_bytes(pid)
    if case.refused:
        message = refused(tiny_client, "/caption", handle_file(str(path)))
        assert case.refused in message and case.name in message, message
    else:
        _, _, details = tiny_client.predict(handle_file(str(path)), strategy="greedy", api_name="/caption")
        assert details["image"] == case.accepted and details["captions"][0]["text"]
    assert peak_memory_bytes(pid) - peak_before < MEMORY_PER_CASE
    raw_api.assert_serves()


BAD_IMAGE_INPUTS = [
    pytest.param("/match", lambda bad, good: ((bad,), {"texts": "a cat"}), id="match-image"),
    pytest.param("/match", lambda bad, good: ((good,), {"texts": "a cat", "more_images": [bad]}), id="match-more-images"),
    pytest.param("/attention", lambda bad, good: ((bad,), {"caption": "a cat"}), id="attention-image"),
    pytest.param("/roundtrip_image", lambda bad, good: ((bad,), {}), id="roundtrip-image"),
    pytest.param("/img2img", lambda bad, good: ((bad,), {"prompt": "a cat"}), id="img2img-image"),
    pytest.param("/inpaint", lambda bad, good: ((bad,), {"mask": good, "prompt": "a cat"}), id="inpaint-image"),
    pytest.param("/inpaint", lambda bad, good: ((good,), {"mask": bad, "prompt": "a cat"}), id="inpaint-mask"),
    pytest.param("/variations", lambda bad, good: ((bad,), {}), id="variations-image"),
]  # fmt: skip


@pytest.mark.api
@pytest.mark.parametrize(("api_name", "arguments"), BAD_IMAGE_INPUTS)
def test_every_image_input_refuses_a_bomb_with_our_sentence(api_name, arguments, tiny_client, raw_api, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(decompression_bomb())
    args, kwargs = arguments(handle_file(str(bomb)), handle_file(str(EXAMPLE)))
    message = refused(tiny_client, api_name, *args, **kwargs)
    assert "'bomb.png' is 400.0 megapixels, over the 64 megapixel limit" in message, message
    raw_api.assert_serves()


def symlink_member(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16) | 0x10  # a Unix symlink, as `zip --symlinks` stores it
    info.create_system = 3
    return info


ESCAPE = f"escape-{uuid.uuid4().hex}.png"
ZIPS = [
    pytest.param({f"../{ESCAPE}": "photo"}, "points outside the archive (zip-slip)", id="zip-slip-dotdot"),
    pytest.param({f"/tmp/{ESCAPE}": "photo"}, "zip-slip", id="zip-slip-absolute"),
    pytest.param({"zeros.png": b"\0" * 5_000_000}, "refused as a zip bomb", id="zip-bomb"),
    pytest.param({symlink_member("passwd.png", "/etc/passwd"): b"/etc/passwd"}, "not an image", id="symlink-member"),
]


@pytest.mark.api
@pytest.mark.parametrize(("members", "words"), ZIPS)
def test_hostile_zips_are_refused_by_member_and_write_nothing_outside(members, words, tiny_client, raw_api, tmp_path):
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as writer:
        for member, data in members.items():
            writer.writestr(member, EXAMPLE.read_bytes() if data == "photo" else data)
    started = time.monotonic()
    table, _, summary = tiny_client.predict([handle_file(str(archive))], api_name="/caption_batch")
    assert time.monotonic() - started < SECONDS_PER_CASE
    assert re.search(r"\*\*0 of \d images captioned\*\*", summary) and words in summary, summary
    assert all(str(row[2]).startswith("⚠") for row in table["data"])
    assert "root:" not in json.dumps(table)  # the symlink's target was never read
    assert not list(Path("/tmp").glob(f"*/{ESCAPE}")) and not list(Path("/tmp").glob(f"*/*/{ESCAPE}"))
    assert not (Path("/tmp") / ESCAPE).exists()
    raw_api.assert_serves()


# ----------------------------------------------------------------------------- text

LONG = "a cat on a sofa " * 6250  # 100,000 characters
DIRTY = "a\x00 cat\x1b[31m on\x7f a\x07 sofa"
RTL = "\u202eقطة على أريكة\u202c"
RTL_CLEAN = "قطة على أريكة"


def png_prompt(gallery) -> str:
    return parse_a1111_parameters(read_png_settings(gallery[0]["image"])[0])[0]


@dataclass(frozen=True)
class Text:
    api_name: str
    inputs: dict  # the hostile text, by parameter name, plus what the endpoint needs
    refused: str = ""  # words of the refusal; empty: handled, and ``check`` reads the answer
    check: object = None  # answer -> bool: was the text handled as it should be?


SMALL = {"steps": 2}
TEXTS = [
    pytest.param(Text("/generate", {"prompt": LONG, **SMALL}, refused="The prompt has 100,000 characters; keep it under 4,000"), id="generate-long-prompt"),
    pytest.param(Text("/generate", {"prompt": "a cat", "negative_prompt": LONG, **SMALL}, refused="The negative prompt has 100,000 characters"), id="generate-long-negative"),
    pytest.param(Text("/roundtrip", {"prompt": LONG, **SMALL}, refused="The prompt has 100,000 characters"), id="roundtrip-long-prompt"),
    pytest.param(Text("/caption", {"image": "EXAMPLE", "prefix": LONG}, refused="characters; keep it under 300 (a few words"), id="caption-long-prefix"),
    pytest.param(Text("/match", {"image": "EXAMPLE", "texts": LONG}, refused="characters; keep each candidate under 300"), id="match-long-text"),
    pytest.param(Text("/attention", {"image": "EXAMPLE", "caption": LONG}, refused="characters; keep it under 500"), id="attention-long-caption"),
    pytest.param(Text("/caption_batch", {"files": ["EXAMPLE"], "trigger": LONG}, refused="characters; keep"), id="batch-long-trigger"),
    pytest.param(Text("/generate", {"prompt": DIRTY, **SMALL}, check=lambda out: png_prompt(out[0]) == "a cat[31m on a sofa"), id="generate-control-characters"),
    pytest.param(Text("/generate", {"prompt": "a 🐱 on a 🛋️, 👨‍👩‍👧", **SMALL}, check=lambda out: "🐱" in png_prompt(out[0]) and "🛋" in png_prompt(out[0])), id="generate-emoji"),
    pytest.param(Text("/match", {"image": "EXAMPLE", "texts": DIRTY}, check=lambda out: out[3]["texts"] == ["a cat[31m on a sofa"]), id="match-control-characters"),
    pytest.param(Text("/match", {"image": "EXAMPLE", "texts": RTL}, check=lambda out: out[3]["texts"] == [RTL_CLEAN]), id="match-right-to-left"),
    pytest.param(Text("/attention", {"image": "EXAMPLE", "caption": "a\x00cat \x1bsofa"}, check=lambda out: out[4]["caption"] == "acat sofa"), id="attention-nul-escape"),
    pytest.param(Text("/caption", {"image": "EXAMPLE", "prefix": "a\x00 picture\x1b of", "strategy": "greedy"}, check=lambda out: out[0]["data"][0][1].startswith("a picture of")), id="caption-prefix-control"),
    pytest.param(Text("/caption_batch", {"files": ["EXAMPLE"], "trigger": "sks\x00\x1b"}, check=lambda out: not has_control_characters(out[0]["data"][0][2])), id="batch-trigger-control"),
]  # fmt: skip


def _with_files(value):
    if value == "EXAMPLE":
        return handle_file(str(EXAMPLE))
    if isinstance(value, list):
        return [_with_files(item) for item in value]
    return value


@pytest.mark.api
@pytest.mark.parametrize("case", TEXTS)
def test_hostile_text_is_refused_or_cleaned(case: Text, tiny_client, raw_api):
    inputs = {name: _with_files(value) for name, value in case.inputs.items()}
    if case.refused:
        message = refused(tiny_client, case.api_name, **inputs)
        assert case.refused in message, message
    else:
        started = time.monotonic()
        answer = tiny_client.predict(**inputs, api_name=case.api_name)
        assert time.monotonic() - started < SECONDS_PER_CASE
        assert case.check(answer), answer
    raw_api.assert_serves()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DIRTY, "a cat[31m on a sofa"),
        (RTL, RTL_CLEAN),
        ("line one\r\nline two\tend", "line one\r\nline two\tend"),
        ("👨‍👩‍👧 and 🏳️‍🌈", "👨‍👩‍👧 and 🏳️‍🌈"),  # zero-width joiners hold emoji together
        ("\u0085next line, \u009bCSI", "next line, CSI"),  # C1 controls too
        (["a\x00b", "c\u202ed"], ["ab", "cd"]),
        (None, None),
        (42, 42),
    ],
)
def test_strip_control_characters(text, expected):
    assert strip_control_characters(text) == expected


# ----------------------------------------------------------------------------- numbers

MAIN_INPUTS = {  # what each endpoint needs besides the number under test
    "/generate": {"prompt": "a cat"},
    "/caption": {"image": "EXAMPLE"},
    "/attention": {"image": "EXAMPLE", "caption": "a cat"},
    "/system": {},
    "/roundtrip": {"prompt": "a cat", "steps": 2},
    "/roundtrip_image": {"image": "EXAMPLE"},
    "/img2img": {"image": "EXAMPLE", "prompt": "a cat", "steps": 1},
    "/caption_batch": {"files": ["EXAMPLE"]},
    "/evaluate": {"categories": ["counting"], "steps": 1, "side": 64},
}
HUGE = 10**400  # valid JSON; past what a float can hold
NUMBERS = [
    pytest.param("/generate", {"steps": "nan"}, "steps must be a whole number between 1 and 100, not 'nan'", id="generate-steps-nan"),
    pytest.param("/generate", {"steps": HUGE}, "steps must be a whole number between 1 and 100", id="generate-steps-huge"),
    pytest.param("/generate", {"steps": "ten"}, "steps must be a whole number between 1 and 100, not 'ten'", id="generate-steps-string"),
    pytest.param("/generate", {"guidance": "inf"}, "guidance must be a number between 0 and 20", id="generate-guidance-inf"),
    pytest.param("/generate", {"guidance": -1}, "guidance must be between 0 and 20, not -1", id="generate-guidance-negative"),
    pytest.param("/generate", {"width": 10**9}, "width must be between 1 and 100000", id="generate-width-huge"),
    pytest.param("/generate", {"height": -64}, "height must be between 1 and 100000, not -64", id="generate-height-negative"),
    pytest.param("/generate", {"width": "wide"}, "width must be a number", id="generate-width-string"),
    pytest.param("/generate", {"seed": -2}, "seed must be between -1 and 4294967295, not -2", id="generate-seed-negative"),
    pytest.param("/generate", {"seed": 2**64}, "seed must be between -1 and 4294967295", id="generate-seed-huge"),
    pytest.param("/generate", {"seed": "lucky"}, "seed must be a whole number", id="generate-seed-string"),
    pytest.param("/generate", {"num_images": 1000}, "num_images must be between 1 and 4", id="generate-num-images-huge"),
    pytest.param("/generate", {"max_sequence_length": 10**6}, "max_sequence_length must be between 77 and 512", id="generate-t5-huge"),
    pytest.param("/generate", {"preview_every": "often"}, "preview_every must be a whole number", id="generate-preview-string"),
    pytest.param("/caption", {"num_beams": "many"}, "Beams (num_beams) must be a whole number between 1 and 10", id="caption-beams-string"),
    pytest.param("/caption", {"num_beams": HUGE}, "Beams (num_beams) must be a whole number between 1 and 10", id="caption-beams-huge"),
    pytest.param("/caption", {"temperature": "nan"}, "Temperature (temperature) must be a number between 0 and 5", id="caption-temperature-nan"),
    pytest.param("/caption", {"seed": 2**40}, "Seed (seed) must be between -1 and 4294967295", id="caption-seed-huge"),
    pytest.param("/attention", {"layer": -1}, "layer (0 = the mean of all layers) must be between 0 and", id="attention-layer-negative"),
    pytest.param("/attention", {"layer": "top"}, "layer (0 = the mean of all layers) must be a whole number", id="attention-layer-string"),
    pytest.param("/attention", {"head": None}, "head (0 = the mean of all heads) must be a whole number", id="attention-head-none"),
    pytest.param("/system", {"gpu_gb": -5}, "GPU memory (GiB) must be above 0 and at most 2048, not -5", id="system-gpu-negative"),
    pytest.param("/system", {"height": "tall"}, "height must be a whole number", id="system-height-string"),
    pytest.param("/system", {"width": HUGE}, "width must be a whole number between 1 and 100000", id="system-width-huge"),
    pytest.param("/roundtrip", {"seed": "abc"}, "seed must be a whole number", id="roundtrip-seed-string"),
    pytest.param("/roundtrip", {"steps": 10**6}, "steps must be between 1 and 100", id="roundtrip-steps-huge"),
    pytest.param("/roundtrip_image", {"seed": -7}, "seed must be between -1 and 4294967295, not -7", id="roundtrip-image-seed"),
    pytest.param("/img2img", {"strength": "nan"}, "strength must be a number between 0.05 and 1", id="img2img-strength-nan"),
    pytest.param("/img2img", {"strength": HUGE}, "strength must be a number between 0.05 and 1", id="img2img-strength-huge"),
    pytest.param("/caption_batch", {"batch_size": 0}, "batch_size must be between 1 and 64, not 0", id="batch-size-zero"),
    pytest.param("/evaluate", {"seeds": ",".join(map(str, range(11)))}, "11 seeds were given; one evaluation run takes at most 10", id="evaluate-too-many-seeds"),
    pytest.param("/evaluate", {"steps": "../../etc"}, "steps must be a whole number", id="evaluate-steps-path"),
    pytest.param("/evaluate", {"side": 10**6}, "side must be between 16 and 4096", id="evaluate-side-huge"),
]  # fmt: skip


@pytest.mark.api
@pytest.mark.parametrize(("api_name", "values", "words"), NUMBERS)
def test_bad_numbers_are_refused_server_side(api_name, values, words, tiny_client, raw_api):
    inputs = {name: _with_files(value) for name, value in {**MAIN_INPUTS[api_name], **values}.items()}
    message = refused(tiny_client, api_name, **inputs)
    assert words in message, message
    raw_api.assert_serves()


RAW_NUMBERS = [  # JSON that only a hand-written client sends: NaN and Infinity are not standard JSON
    pytest.param("system", '{"data": [NaN, 1024, 1024]}', "GPU memory (GiB) must be a number between 0 and 2048, not nan", id="system-gpu-NaN"),
    pytest.param("system", '{"data": [8, 1024, ' + "9" * 400 + "]}", "width must be a whole number between 1 and 100000", id="system-width-400-digits"),
]  # fmt: skip


@pytest.mark.api
@pytest.mark.parametrize(("api_name", "body", "words"), RAW_NUMBERS)
def test_non_standard_json_numbers_are_refused_with_our_sentence(api_name, body, words, raw_api, tiny_client):
    event, data = raw_api.call(api_name, body=body)
    assert event == "error" and words in json.loads(data)["error"], data
    raw_api.assert_serves()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (float("nan"), "not nan"),
        (float("-inf"), "not -inf"),
        (HUGE, "not 1000000000"),
        pytest.param(10**5000, "not a number too long to print", id="5001-digits"),
        (True, "not True"),
        (None, "not None"),
        ([3], "not [3]"),
        ("3; rm -rf /", "not '3; rm -rf /'"),
        ("x" * 10_000, "..."),
        (2.5, "whole number between 1 and 100, not 2.5"),
    ],
)
def test_as_int_refuses_every_non_number_with_a_short_sentence(value, words):
    with pytest.raises(ValueError) as caught:
        as_int("steps", value, 1, 100)
    message = str(caught.value)
    assert message.startswith("steps must be") and words in message and len(message) < 120, message


def test_numbers_sliders_send_are_accepted_as_they_are():
    assert as_int("steps", 4.0, 1, 100) == 4 and as_int("steps", " 7 ", 1, 100) == 7
    assert as_float("guidance", "3.5", 0, 20) == 3.5 and as_float("guidance", 0, 0, 20) == 0.0


# ----------------------------------------------------------------------------- paths


@pytest.fixture
def secret_file(tmp_path) -> tuple[Path, str]:
    """A file the app must never read or serve, holding a unique marker."""
    marker = f"STUDIO-SECRET-{uuid.uuid4().hex}"
    path = tmp_path / "secret.png"
    path.write_text(marker)
    return path, marker


@pytest.fixture
def symlink_in_upload_folder(raw_api, secret_file, tmp_path):
    """A link inside Gradio's own upload folder that points at the secret file."""
    decoy = tmp_path / "decoy.png"
    decoy.write_bytes(EXAMPLE.read_bytes())
    uploaded = Path(raw_api.upload(decoy))  # <upload folder>/<hash>/decoy.png
    link = uploaded.parent.parent / f"link-{uuid.uuid4().hex}" / "photo.png"
    link.parent.mkdir()
    link.symlink_to(secret_file[0])
    yield str(link)
    link.unlink()
    link.parent.rmdir()


PATH_INPUTS = [
    pytest.param("caption", "image", "{secret}", id="caption-absolute"),
    pytest.param("caption", "image", "../../../../../../..{secret}", id="caption-dotdot"),
    pytest.param("caption", "image", "/etc/passwd", id="caption-etc-passwd"),
    pytest.param("caption", "image", "{root}/pipelines/settings.py", id="caption-app-folder"),
    pytest.param("caption", "image", "{symlink}", id="caption-symlink-in-upload-folder"),
    pytest.param("match", "more_images", ["{secret}"], id="match-more-images"),
    pytest.param("attention", "image", "{symlink}", id="attention-symlink"),
    pytest.param("caption_batch", "files", ["{secret}"], id="batch-files-absolute"),
    pytest.param("caption_batch", "files", ["{symlink}"], id="batch-files-symlink"),
]


@pytest.mark.api
@pytest.mark.parametrize(("api_name", "parameter", "path"), PATH_INPUTS)
def test_no_endpoint_reads_a_file_the_user_did_not_upload(
    api_name, parameter, path, raw_api, secret_file, symlink_in_upload_folder, tiny_client
):
    secret, marker = secret_file

    def fill(template: str) -> dict:
        text = template.format(secret=secret, root=ROOT, symlink=symlink_in_upload_folder)
        return file_data(text)

    value = [fill(item) for item in path] if isinstance(path, list) else fill(path)
    inputs = {"image": raw_api.example} if parameter != "image" and api_name != "caption_batch" else {}
    event, data = raw_api.call(api_name, **inputs, **{parameter: value})
    # Gradio refuses any path outside its upload folder before our code runs; the answer holds nothing of the file.
    assert event == "error", data
    assert marker not in data and "root:" not in data
    raw_api.assert_serves()


FILE_ROUTE = [
    "/etc/passwd",
    "{secret}",
    "app.py",
    "../app.py",
    "{root}/app.py",
    "{root}/assets/examples/coffee.png",
    "{symlink}",
    "%2Fetc%2Fpasswd",
    "..%2F..%2F..%2Fetc%2Fpasswd",
]


@pytest.mark.api
@pytest.mark.parametrize("path", FILE_ROUTE)
def test_the_file_route_serves_nothing_outside_the_upload_cache(path, raw_api, secret_file, symlink_in_upload_folder):
    secret, marker = secret_file
    target = path.format(secret=secret, root=ROOT, symlink=symlink_in_upload_folder)
    response = httpx.get(f"{raw_api.base}/file={target}", timeout=30)
    assert response.status_code in (403, 404), (response.status_code, response.text[:200])
    assert marker not in response.text and "root:" not in response.text


@pytest.mark.api
def test_uploads_past_max_file_size_are_refused_before_they_reach_the_app(raw_api, tiny_app_url, tmp_path):
    config = httpx.get(tiny_app_url + "config", timeout=30).json()
    assert config["max_file_size"] == settings.MAX_UPLOAD_BYTES
    big = tmp_path / "big.png"
    with open(big, "wb") as handle:
        handle.write(EXAMPLE.read_bytes())
        handle.truncate(settings.MAX_UPLOAD_BYTES + 1)
    with open(big, "rb") as handle:
        response = httpx.post(raw_api.base + "/upload", files={"files": ("big.png", handle)}, timeout=120)
    assert response.status_code == 413 and "maximum allowed size" in response.text


@pytest.mark.api
def test_files_the_api_returns_live_in_gradios_cache(raw_api):
    """Every output file is copied into the upload cache: no response names a path in the app's folders."""
    image = file_data(raw_api.upload(EXAMPLE))
    answers = [
        raw_api.call("generate", prompt="a cat", steps=2),
        raw_api.call("attention", image=image, caption="a cat"),
        raw_api.call("caption_batch", files=[image]),
    ]
    cache = Path(image["path"]).parent.parent  # <upload folder>/<hash>/coffee.png
    for event, data in answers:
        assert event == "complete", data
        paths = _file_paths(json.loads(data))
        assert paths, data
        for path in paths:
            assert Path(path).resolve().is_relative_to(cache.resolve()), path
            assert not Path(path).resolve().is_relative_to(ROOT), path


def _file_paths(value) -> list[str]:
    if isinstance(value, dict):
        found = [value["path"]] if value.get("meta", {}).get("_type") == "gradio.FileData" else []
        return found + [path for item in value.values() if isinstance(item, (dict, list)) for path in _file_paths(item)]
    if isinstance(value, list):
        return [path for item in value for path in _file_paths(item)]
    return []


def test_launch_allows_no_extra_paths():
    """app.py's launch() names no allowed_paths, so only Gradio's own cache is ever served."""
    import ast

    tree = ast.parse((ROOT / "app.py").read_text())
    launches = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "launch"
    ]
    assert launches, "app.py calls no launch()"
    for call in launches:
        keywords = {keyword.arg for keyword in call.keywords}
        assert "allowed_paths" not in keywords and "max_file_size" in keywords
    assert os.environ.get("GRADIO_ALLOWED_PATHS") is None  # Gradio reads it too; the app under test inherits it


def test_hf_token_is_never_shown(monkeypatch, caplog):
    """What the System tab says about the machine, and a failed load's message and log."""
    from pipelines.manager import ModelLoadError, ModelManager
    from pipelines.memory import machine_report
    from pipelines.runtime import choose_runtime

    token = f"hf_{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", token)
    answers = [machine_report(choose_runtime("cpu"))]

    def gated(source, runtime, variant=None):
        raise OSError(f"401 Client Error: access to model {source} is restricted (gated repo)")

    manager = ModelManager(choose_runtime("cpu"), loaders={"blip-caption": gated, "sd3": gated})
    with pytest.raises(ModelLoadError, match="set HF_TOKEN") as caught:
        manager.get("sd35-large")
    shown = json.dumps(answers, default=str) + str(caught.value) + caplog.text
    assert token not in shown and token[3:] not in shown
