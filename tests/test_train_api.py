"""The whole loop through the API of `python app.py --tiny`: train in the background, load the result, use it."""

from __future__ import annotations

import shutil
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from pipelines.lora.sources import sanitize_lora_name
from tests.test_train_blip_lora import make_dataset

pytestmark = [pytest.mark.api, pytest.mark.slow]  # each test trains in a background process


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory) -> Path:
    """The Batch tab's export layout: one folder with the images and metadata.jsonl, zipped."""
    root = tmp_path_factory.mktemp("train-upload")
    folder = make_dataset(root / "dataset")
    archive = root / "dataset.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.iterdir()):
            zipped.write(path, f"dataset/{path.name}")
    shutil.rmtree(folder)
    return archive


def _wait(client, run_id: str, *, until, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while True:
        status, _, log, _ = client.predict(run_id, api_name="/train_status")
        if until(status) or time.monotonic() > deadline:
            return status, log
        time.sleep(1)


def _start(client, dataset_zip, kind: str, steps: int, **options) -> str:
    name = f"{kind}-{uuid.uuid4().hex[:6]}"
    run_id, status, _ = client.predict(
        kind=kind,
        files=[handle_file(str(dataset_zip))],
        name=name,
        model="large",
        steps=steps,
        rank=4,
        resolution=64,
        gradient_checkpointing=False,
        **options,
        api_name="/train_start",
    )
    assert run_id.endswith(name) and "running" in status
    return run_id


def _draw(client, lora: str = "") -> np.ndarray:
    gallery, *_ = client.predict(
        "a red fox", model="large", seed=3, steps=2, width=64, height=64, preview_every=0, lora=lora,
        api_name="/generate",
    )  # fmt: skip
    return np.asarray(Image.open(gallery[0]["image"]).convert("RGB"), dtype=np.int16)


def test_an_sd3_lora_trained_in_the_background_loads_and_changes_the_image(tiny_client, dataset_zip):
    run_id = _start(tiny_client, dataset_zip, "sd3", steps=4, trigger="sks")
    status, log = _wait(tiny_client, run_id, until=lambda text: "running" not in text)
    assert "finished" in status, log
    assert "step 4/4" in log and "train_sd3_lora" in log.splitlines()[0]

    note, details = tiny_client.predict(run_id, model="medium", api_name="/train_load_result")
    name = sanitize_lora_name(run_id.split("-sd3-", 1)[1])
    assert f"LoRA **{name}** is loaded" in note
    # The run's own base model (large), not the model named in the call, and its trigger word.
    assert details == {"kind": "sd3", "name": name, "model": "large", "trigger_words": ["sks"], "weight": 1.0}
    try:
        assert np.abs(_draw(tiny_client, lora=name) - _draw(tiny_client)).max() > 0
    finally:
        tiny_client.predict(name=name, model="large", active="", api_name="/lora_unload")


def test_a_blip_adapter_trained_in_the_background_captions_in_the_caption_tab(tiny_client, dataset_zip):
    run_id = _start(tiny_client, dataset_zip, "blip", steps=3, learning_rate=5e-3)
    status, log = _wait(tiny_client, run_id, until=lambda text: "running" not in text)
    assert "finished" in status, log
    note, details = tiny_client.predict(run_id, model="large", api_name="/train_load_result")
    name = run_id.split("-blip-", 1)[1]
    assert f"BLIP adapter **{name}** is loaded" in note and details["kind"] == "blip" and details["name"] == name
    listing = tiny_client.predict(api_name="/blip_adapter_list")
    assert name in str(listing)


def test_cancel_stops_a_run_and_the_next_one_may_start(tiny_client, dataset_zip):
    run_id = _start(tiny_client, dataset_zip, "sd3", steps=5000)
    with pytest.raises(AppError, match="already going"):
        _start(tiny_client, dataset_zip, "sd3", steps=2)
    _wait(tiny_client, run_id, until=lambda text: "step 1" in text or "running" not in text, timeout=120)
    status = tiny_client.predict(run_id, api_name="/train_cancel")
    assert "cancelled" in status
    with pytest.raises(AppError, match="is cancelled"):
        tiny_client.predict(run_id, model="large", api_name="/train_load_result")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"rank": -1}, "rank"),
        ({"learning_rate": "fast"}, "learning"),
        ({"name": "///"}, "cannot name a training run"),
    ],
)
def test_bad_settings_are_refused_before_a_run_starts(tiny_client, dataset_zip, options, message):
    arguments = {"kind": "sd3", "files": [handle_file(str(dataset_zip))], "name": "bad-settings", "resolution": 64}
    with pytest.raises(AppError, match=message):
        tiny_client.predict(**{**arguments, **options}, api_name="/train_start")


def test_an_upload_without_captions_is_refused_by_name(tiny_client, tmp_path):
    image = tmp_path / "lonely.png"
    Image.new("RGB", (16, 16)).save(image)
    with pytest.raises(AppError, match="no captions"):
        tiny_client.predict(kind="sd3", files=[handle_file(str(image))], name="x", api_name="/train_start")
