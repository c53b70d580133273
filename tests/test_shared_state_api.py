"""Two visitors of one `python app.py --tiny` (two gradio_client sessions): uploads are owned, capped, evicted.

Issue 15, attack 6: one visitor's /lora_unload removed the LoRAs other visitors had uploaded, and
16 BLIP adapter uploads filled every slot for everyone until a restart. /unload pulled a model
away from a running generation.
"""

from __future__ import annotations

import contextlib
import time
import zipfile

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from safetensors.torch import load_file, save_file

from pipelines import settings
from pipelines.blip.tiny_adapter import ensure_tiny_demo_adapter
from pipelines.tiny import tiny_lora_dir

pytestmark = pytest.mark.api

DRAW = {"model": "large", "seed": 3, "steps": 2, "width": 64, "height": 64, "preview_every": 0}


def visitor(url: str) -> Client:
    """A new visitor: each Client is its own Gradio session."""
    return Client(url, verbose=False)


def lora_upload(tiny_root, folder, name: str, factor: float):
    """A LoRA file of its own (the tiny style LoRA, scaled) to upload as ``name``.safetensors."""
    tensors = {key: value * factor for key, value in load_file(str(tiny_lora_dir(tiny_root) / "tiny-large-style.safetensors")).items()}  # fmt: skip
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path))
    return handle_file(str(path))


def names(table) -> list[str]:
    return [row[1] for row in (table["data"] if isinstance(table, dict) else table)]


@pytest.fixture(scope="module")
def adapter_zip(tiny_root, tmp_path_factory):
    """make(name): a .zip of a tiny BLIP adapter whose folder is ``name`` (so that is the name it loads as)."""
    folder = ensure_tiny_demo_adapter(tmp_path_factory.mktemp("adapter"), tiny_root / "blip-caption")
    out = tmp_path_factory.mktemp("zips")

    def make(name: str):
        path = out / f"{name}.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for file in ("adapter_config.json", "adapter_model.safetensors"):
                archive.write(folder / file, f"{name}/{file}")
        return handle_file(str(path))

    return make


def test_an_uploaded_lora_is_invisible_unusable_and_unremovable_for_another_visitor(tiny_app_url, tiny_root, tmp_path):
    alice, bob = visitor(tiny_app_url), visitor(tiny_app_url)
    try:
        table, _, active = alice.predict(
            upload=lora_upload(tiny_root, tmp_path, "alice_style", 1.5), model="large", api_name="/lora_load"
        )
        assert "alice_style" in names(table) and active == "alice_style:1"
        assert "alice_style" not in names(bob.predict(api_name="/lora_list"))
        with pytest.raises(AppError, match="No LoRA is loaded, so 'alice_style' cannot be used"):
            bob.predict("a fox", lora="alice_style", **DRAW, api_name="/generate")
        bob.predict(upload=lora_upload(tiny_root, tmp_path, "bob_style", 0.5), model="large", api_name="/lora_load")
        with pytest.raises(AppError, match="No LoRA named 'alice_style' is loaded; loaded: bob_style"):
            bob.predict("a fox", lora="alice_style", **DRAW, api_name="/generate")
        with pytest.raises(AppError, match="No LoRA named 'alice_style' is loaded; loaded: bob_style"):
            bob.predict(name="alice_style", model="large", active="", api_name="/lora_unload")
        # "Unload all" from bob takes his own LoRAs only; alice still draws with hers.
        _, note, _ = bob.predict(name="", model="large", active="", api_name="/lora_unload")
        assert "bob_style" in note and "alice_style" not in note
        assert "alice_style" in names(alice.predict(api_name="/lora_list"))
        *_, details = alice.predict("a fox", lora="alice_style", **DRAW, api_name="/generate")
        assert [(lora["name"], lora["weight"]) for lora in details["loras"]] == [("alice_style", 1.0)]
    finally:
        alice.predict(name="", model="large", active="", api_name="/lora_unload")


def test_uploaded_lora_per_visitor_cap(tiny_app_url, tiny_root, tmp_path):
    carol = visitor(tiny_app_url)
    cap = settings.MAX_UPLOADS_PER_SESSION
    try:
        for index in range(cap):
            carol.predict(
                upload=lora_upload(tiny_root, tmp_path, f"carol_{index}", 1 + index / 10), api_name="/lora_load"
            )
        with pytest.raises(AppError, match=f"You have {cap} uploaded LoRAs loaded .*unload one of them first"):
            carol.predict(upload=lora_upload(tiny_root, tmp_path, "carol_extra", 3.0), api_name="/lora_load")
    finally:
        carol.predict(name="", model="large", active="", api_name="/lora_unload")


def test_an_uploaded_adapter_is_its_visitors_alone(tiny_app_url, adapter_zip):
    alice, bob = visitor(tiny_app_url), visitor(tiny_app_url)
    photo = handle_file("assets/examples/chelsea.png")
    chosen, _, listing = alice.predict("", [adapter_zip("alice-adapter")], api_name="/blip_adapter_load")
    assert chosen == "alice-adapter" and "alice-adapter" in [entry["name"] for entry in listing["loaded"]]
    assert "alice-adapter" not in [entry["name"] for entry in bob.predict(api_name="/blip_adapter_list")["loaded"]]
    with pytest.raises(AppError, match="No BLIP adapter named 'alice-adapter' is loaded"):
        bob.predict(photo, strategy="greedy", adapter="alice-adapter", api_name="/caption")
    with pytest.raises(AppError, match="No BLIP adapter named 'alice-adapter' is loaded"):
        bob.predict([photo], adapter="alice-adapter", api_name="/caption_batch")
    with pytest.raises(AppError, match="No BLIP adapter named 'alice-adapter' is loaded"):
        bob.predict("alice-adapter", api_name="/blip_adapter_unload")
    *_, details = alice.predict(photo, strategy="greedy", adapter="alice-adapter", api_name="/caption")
    assert details["adapter"] == "alice-adapter"
    status, listing = alice.predict("alice-adapter", api_name="/blip_adapter_unload")
    assert "Removed" in status and "alice-adapter" not in [entry["name"] for entry in listing["loaded"]]


@pytest.mark.slow  # over 3 s: the full suite runs it, the fast lane does not
def test_adapter_uploads_are_capped_per_visitor_and_never_fill_every_slot(tiny_app_url, adapter_zip):
    cap, slots = settings.MAX_UPLOADS_PER_SESSION, settings.MAX_BLIP_ADAPTERS
    crowd = [visitor(tiny_app_url) for _ in range(slots // cap + 1)]  # more uploads than there are slots
    loaded = []
    try:
        for number, client in enumerate(crowd):
            for index in range(cap):
                name = f"v{number}-a{index}"
                assert client.predict("", [adapter_zip(name)], api_name="/blip_adapter_load")[0] == name
                loaded.append((client, name))
            with pytest.raises(AppError, match=f"You have {cap} uploaded BLIP adapters loaded"):
                client.predict("", [adapter_zip(f"v{number}-extra")], api_name="/blip_adapter_load")
        # The first visitor's oldest upload made room; the newest uploads and a shared adapter still load.
        first, oldest = loaded[0]
        assert oldest not in [entry["name"] for entry in first.predict(api_name="/blip_adapter_list")["loaded"]]
        with pytest.raises(AppError, match=f"No BLIP adapter named '{oldest}' is loaded"):
            first.predict(handle_file("assets/examples/chelsea.png"), adapter=oldest, api_name="/caption")
        last, newest = loaded[-1]
        assert newest in [entry["name"] for entry in last.predict(api_name="/blip_adapter_list")["loaded"]]
        assert visitor(tiny_app_url).predict("tiny-demo", api_name="/blip_adapter_load")[0] == "tiny-demo"
    finally:
        for client, name in loaded:
            with contextlib.suppress(AppError):  # evicted already
                client.predict(name, api_name="/blip_adapter_unload")


@pytest.mark.slow  # over 3 s: the full suite runs it, the fast lane does not
def test_unload_waits_for_a_running_generation(tiny_app_url):
    painter, operator = visitor(tiny_app_url), visitor(tiny_app_url)
    painter.predict("warm up", **DRAW, api_name="/generate")  # Large is loaded before the long run starts
    long_run = {**DRAW, "steps": 100, "num_images": 4, "width": 128, "height": 128}  # several seconds on a CPU
    job = painter.submit("a long one", **long_run, api_name="/generate")
    deadline = time.monotonic() + 60
    while not (job.status().progress_data or job.done()):  # the denoising loop has started
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.05)
    assert not job.done(), "the generation ended before /unload was sent; make it longer"
    sent = time.monotonic()
    message, _ = operator.predict("sd35-large", api_name="/unload")
    unloaded = time.monotonic()
    gallery, *_ = job.result(timeout=120)  # the generation finished, with its model, and all its images
    finished = time.monotonic()
    assert "Unloaded" in message and len(gallery) == 4
    # /unload waited in the GPU queue: it answered as the generation ended, not seconds before. (The
    # client hears of a job's end up to ~1 s late, so compare shares: measured 0.09 waiting, 0.73 not.)
    waited = (unloaded - sent) / (finished - sent)
    assert waited > 0.5, f"/unload answered {finished - unloaded:.1f} s before the generation ended"
