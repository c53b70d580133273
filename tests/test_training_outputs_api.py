"""A training run's LoRA and BLIP adapter are its owner's (issue 5), through the API of `python app.py --tiny`.

Two ``gradio_client.Client`` objects are two visitors. Alice trains an SD3.5 LoRA and a BLIP adapter;
Bob tries every name that could reach them (the old folder layout, the run's name, its id, the run's
own folder) and never loads or lists them. Alice's "Load the result" makes entries of her own: Bob
neither sees, draws or captions with, nor unloads them; Alice does. Once in local mode (the session's
app), once in public mode with training open to visitors.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from pipelines.blip.tiny_adapter import TINY_ADAPTER_DIR
from pipelines.lora.sources import list_lora_files, sanitize_lora_name
from pipelines.tiny import tiny_lora_dir
from tests import test_train_api
from tests.app_server import tiny_app

# tests/test_train_api.py's fixture: the Batch tab's export layout, zipped.
dataset_zip = test_train_api.dataset_zip

pytestmark = [pytest.mark.api, pytest.mark.slow]  # trains in background processes; one app of its own

DRAW = {"model": "large", "seed": 3, "steps": 2, "width": 64, "height": 64, "preview_every": 0}
PHOTO = "assets/examples/chelsea.png"


@pytest.fixture(scope="module")
def public_training_app(tiny_root, tmp_path_factory):
    """`python app.py --tiny` with STUDIO_PUBLIC=1 and STUDIO_PUBLIC_TRAINING=1, on a LoRA folder of its own."""
    folder = tmp_path_factory.mktemp("public-training")
    lora_dir = folder / "loras"
    shutil.copytree(tiny_lora_dir(tiny_root), lora_dir, ignore=shutil.ignore_patterns(".runs"))
    environment = {
        "STUDIO_PUBLIC": "1",
        "STUDIO_PUBLIC_TRAINING": "1",
        "STUDIO_RESULTS_DIR": str(folder / "results"),
    }
    with tiny_app(tiny_root, folder / "app.log", "--lora-dir", str(lora_dir), environment=environment) as (_, url):
        yield url, lora_dir


def _train(client: Client, dataset_zip: Path, kind: str, name: str, steps: int, **options) -> str:
    run_id, status, _ = client.predict(
        kind=kind, files=[handle_file(str(dataset_zip))], name=name, model="large", steps=steps, rank=4,
        resolution=64, gradient_checkpointing=False, **options, api_name="/train_start",
    )  # fmt: skip
    assert "running" in status
    deadline = time.monotonic() + 240
    while True:
        status, _, log, _ = client.predict(run_id, api_name="/train_status")
        if "running" not in status or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "finished" in status, log
    return run_id


def _refused(call, source: str, *secrets: str) -> str:
    """Run ``call``; it must be refused, and its sentence may echo ``source`` but name none of ``secrets``."""
    with pytest.raises(AppError) as refused:
        call()
    message = str(refused.value).replace(source, "")
    for secret in secrets:
        assert secret not in message, message
    return message


def _alice_owns_what_she_trains(url: str, dataset_zip: Path, lora_dir: Path, adapter_dir: Path) -> None:
    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    name = f"alice-private-{uuid.uuid4().hex[:6]}"
    lora_name = sanitize_lora_name(name)
    sd3_run = _train(alice, dataset_zip, "sd3", name, steps=2, trigger="sks")
    blip_run = _train(alice, dataset_zip, "blip", name, steps=2, learning_rate=5e-3)

    # 1. Nothing of hers is in the shared folders: no file to list in the dropdown, no folder to name.
    assert not [file for file in list_lora_files(lora_dir) if name in file or lora_name in file]
    assert not [path for path in adapter_dir.rglob("*") if name in path.as_posix()]
    assert name not in str(bob.predict(api_name="/blip_adapter_list"))

    # 2. Bob names it every way he can think of, and gets nothing (nor her name in a listing).
    lora_sources = [
        f"{name}/pytorch_lora_weights.safetensors",  # where run outputs used to land
        name,
        lora_name,
        sd3_run,
        f"{sd3_run}/output/pytorch_lora_weights.safetensors",
        f".runs/{sd3_run}/output/pytorch_lora_weights.safetensors",
    ]
    for source in lora_sources:
        _refused(
            lambda source=source: bob.predict(source=source, model="large", api_name="/lora_load"),
            source,
            name,
            lora_name,
            sd3_run,
        )
    for source in [name, blip_run, f"{blip_run}/output", f"../loras/.runs/{blip_run}/output"]:
        _refused(lambda source=source: bob.predict(source, api_name="/blip_adapter_load"), source, name, blip_run)
    assert bob.predict(api_name="/lora_list")["data"] == []

    # 3. Alice loads her results: entries of her own.
    _, details = alice.predict(sd3_run, model="large", api_name="/train_load_result")
    assert details["name"] == lora_name and details["model"] == "large"
    _, blip_details = alice.predict(blip_run, model="large", api_name="/train_load_result")
    adapter = blip_details["name"]
    assert adapter == name
    assert ["sd35-large", lora_name] in [row[:2] for row in alice.predict(api_name="/lora_list")["data"]]
    mine = {entry["name"]: entry for entry in alice.predict(api_name="/blip_adapter_list")["loaded"]}
    assert mine[adapter]["shared"] is False and mine[adapter]["kind"] == "run"

    # 4. Bob can neither see, draw or caption with, nor unload them.
    assert bob.predict(api_name="/lora_list")["data"] == []
    assert adapter not in [entry["name"] for entry in bob.predict(api_name="/blip_adapter_list")["loaded"]]
    _refused(lambda: bob.predict("a fox", lora=lora_name, **DRAW, api_name="/generate"), lora_name, sd3_run)
    _refused(lambda: bob.predict(f"a fox <lora:{lora_name}:1>", **DRAW, api_name="/generate"), lora_name, sd3_run)
    _, note, _ = bob.predict(name="", model="large", active="", api_name="/lora_unload")  # "all of mine": none
    assert lora_name not in note
    try:  # "No LoRA is loaded" when Bob has none, "No LoRA named ..." when he has shared ones: never unloaded
        _, note, _ = bob.predict(name=lora_name, model="large", active="", api_name="/lora_unload")
        assert "Unloaded" not in note, note
    except AppError as refused:
        assert sd3_run not in str(refused)
    assert ["sd35-large", lora_name] in [row[:2] for row in alice.predict(api_name="/lora_list")["data"]]
    with pytest.raises(AppError, match=f"No BLIP adapter named '{adapter}' is loaded"):
        bob.predict(handle_file(PHOTO), strategy="greedy", adapter=adapter, api_name="/caption")
    with pytest.raises(AppError, match=f"No BLIP adapter named '{adapter}' is loaded"):
        bob.predict(adapter, api_name="/blip_adapter_unload")

    # 5. Alice draws and captions with them, then unloads them.
    *_, details = alice.predict("a fox", lora=lora_name, **DRAW, api_name="/generate")
    assert [lora["name"] for lora in details["loras"]] == [lora_name]
    *_, caption = alice.predict(handle_file(PHOTO), strategy="greedy", adapter=adapter, api_name="/caption")
    assert caption["adapter"] == adapter
    _, note, _ = alice.predict(name=lora_name, model="large", active="", api_name="/lora_unload")
    assert f"Unloaded {lora_name}" in note
    status, listing = alice.predict(adapter, api_name="/blip_adapter_unload")
    assert "Removed" in status and adapter not in [entry["name"] for entry in listing["loaded"]]


def test_a_trained_lora_and_adapter_are_their_owners_alone_in_local_mode(tiny_app_url, tiny_root, dataset_zip):
    _alice_owns_what_she_trains(tiny_app_url, dataset_zip, tiny_lora_dir(tiny_root), tiny_root / TINY_ADAPTER_DIR)


def test_a_trained_lora_and_adapter_are_their_owners_alone_in_public_mode(public_training_app, tiny_root, dataset_zip):
    url, lora_dir = public_training_app
    _alice_owns_what_she_trains(url, dataset_zip, lora_dir, tiny_root / TINY_ADAPTER_DIR)
