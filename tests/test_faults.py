"""Faults a public instance meets: loads that fail halfway, out-of-memory errors, Stop, a killed CLI run."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
import weakref
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import handle_file
from PIL import Image

from pipelines.blip import caption_folder
from pipelines.manager import ModelLoadError, ModelManager
from pipelines.memory import modes_for, plan
from pipelines.runtime import choose_runtime
from pipelines.sd3.text_to_image import GenerateRequest, OutOfGpuMemory, generate, lower_memory_mode, resolve_request
from pipelines.settings import OOM_FALLBACK_MEMORY_MODE

CPU = choose_runtime("cpu")
ROOT = Path(__file__).resolve().parent.parent


class CudaCacheSpy:
    """Pretends CUDA is there and records each ``torch.cuda.empty_cache`` call while it is installed.

    At each call it notes whether the tensors in ``watched`` are already freed: emptying the
    cache only returns memory that nothing references any more.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, watched: list[weakref.ref] | None = None) -> None:
        self.watched = watched if watched is not None else []
        self.freed_at_call: list[bool] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "empty_cache", self._empty_cache)

    def _empty_cache(self) -> None:
        self.freed_at_call.append(all(ref() is None for ref in self.watched))


def out_of_memory_once(real, watched: list[weakref.ref]):
    """A stand-in for a module's ``real`` forward: the first call holds a big activation, then runs out of memory."""
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            activation = torch.empty(4_000_000)  # what a real forward holds when the allocator gives up
            watched.append(weakref.ref(activation))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    patched.calls = calls
    return patched


def noise_image(seed: int, side: int = 48) -> Image.Image:
    """A random picture no other test has shown to BLIP, so its feature cache cannot answer for it."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- model loads


def test_a_load_that_fails_halfway_frees_what_it_built_and_the_next_get_loads_cleanly():
    built: list[weakref.ref] = []

    def loader(source, runtime, variant=None):
        weights = torch.nn.Linear(512, 512)  # the first half of a model is in memory...
        built.append(weakref.ref(weights))
        if len(built) == 1:
            raise RuntimeError("the second shard's safetensors header is corrupt")  # ...when the second half fails
        return weights

    manager = ModelManager(CPU, loaders={"blip-caption": loader, "sd3": loader})
    with pytest.raises(ModelLoadError, match=r"BLIP base \(captioning\) could not be loaded") as caught:
        manager.get("blip-caption")
    assert "header is corrupt" in str(caught.value)
    # Nothing holds the half-built weights any more, not even the error the user is holding.
    assert built[0]() is None
    assert manager.loaded_models() == [] and not manager.is_loaded("blip-caption")

    model = manager.get("blip-caption")
    assert model is built[1]() and manager.is_loaded("blip-caption")
    assert manager.get("blip-caption") is model and len(built) == 2  # cached now: no third load


def test_a_failed_switch_of_memory_mode_leaves_neither_mode_loaded():
    built: dict[str, list[weakref.ref]] = {"bf16": [], "nf4": []}

    def loader(source, runtime, variant=None):
        weights = torch.nn.Linear(256, 256)
        built[variant].append(weakref.ref(weights))
        if variant == "nf4" and len(built["nf4"]) == 1:
            raise OSError("disk full while reading the quantized transformer")
        weights.studio_variant = variant
        return weights

    manager = ModelManager(CPU, loaders={"blip-caption": loader, "sd3": loader})
    assert manager.get("sd35-large", variant="bf16").studio_variant == "bf16"
    with pytest.raises(ModelLoadError, match="disk full"):
        manager.get("sd35-large", variant="nf4")
    # The bf16 copy was unloaded to make room and the nf4 one never finished: neither lingers.
    assert not manager.is_loaded("sd35-large") and manager.loaded_models() == []
    assert built["bf16"][0]() is None and built["nf4"][0]() is None
    assert manager.get("sd35-large", variant="nf4").studio_variant == "nf4"
    assert manager.is_loaded("sd35-large", "nf4") and not manager.is_loaded("sd35-large", "bf16")


def test_out_of_memory_while_loading_says_so_and_empties_the_cuda_cache(monkeypatch):
    def loader(source, runtime, variant=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    manager = ModelManager(CPU, loaders={"blip-caption": loader, "sd3": loader})
    spy = CudaCacheSpy(monkeypatch)
    with pytest.raises(ModelLoadError, match="Not enough memory to load Stable Diffusion 3.5 Large"):
        manager.get("sd35-large")
    assert spy.freed_at_call and not manager.is_loaded("sd35-large")


# ----------------------------------------------------------------------------- out of memory while running


def test_out_of_memory_during_generation_names_a_smaller_mode_and_the_next_generation_works(tiny_manager, monkeypatch):
    resolved = resolve_request(GenerateRequest(prompt="a lighthouse", seed=3, steps=2, width=64, height=64), tiny=True)
    pipeline = tiny_manager.get(resolved.model_key)
    before = generate(pipeline, resolved, repo_id="tiny").images[0]

    watched: list[weakref.ref] = []
    forward = out_of_memory_once(pipeline.transformer.forward, watched)
    monkeypatch.setattr(pipeline.transformer, "forward", forward)
    with monkeypatch.context() as cuda:
        spy = CudaCacheSpy(cuda, watched)
        with pytest.raises(OutOfGpuMemory) as caught:
            generate(pipeline, resolved, repo_id="tiny")
    assert spy.freed_at_call == [True]  # emptied once, after the failed step's tensors were let go
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)  # so the UI shows it as the sentence it is
    assert "ran out of memory drawing 1 image(s) of 64x64 with 2 steps" in message
    # 64 px is a tiny-model size the planner does not cover, so the fallback mode is named.
    assert f"choose memory mode {OOM_FALLBACK_MEMORY_MODE}" in message

    after = generate(pipeline, resolved, repo_id="tiny")
    assert len(forward.calls) > 1 and not after.stopped and after.steps_done == 2
    assert np.array_equal(np.asarray(after.images[0]), np.asarray(before))  # nothing left over from the failed run


def test_the_suggested_mode_is_the_first_in_autos_order_that_plans_less_memory():
    peaks = {mode.key: plan("sd35-medium", mode.key, 1024, 1024).peak_bytes for mode in modes_for("sd35-medium")}
    for current, peak in peaks.items():
        suggested = lower_memory_mode("sd35-medium", current, 1024, 1024)
        smaller = [key for key, other in peaks.items() if other < peak]
        if not smaller:
            assert suggested is None, current
            continue
        assert suggested == smaller[0] and peaks[suggested] < peak, current
    assert lower_memory_mode("sd35-medium", "bf16-sequential", 1024, 1024) is None  # the smallest there is
    assert lower_memory_mode("sd35-medium", "bf16", 64, 64) == OOM_FALLBACK_MEMORY_MODE  # tiny sizes: no plan
    assert lower_memory_mode("sd35-medium", OOM_FALLBACK_MEMORY_MODE, 64, 64) is None


def test_out_of_memory_while_captioning_gives_a_sentence_and_the_next_caption_works(tiny_manager, monkeypatch):
    from components.caption import make_caption_function
    from pipelines.studio import Studio

    endpoint = make_caption_function(Studio(manager=tiny_manager))
    defaults = [parameter.default for parameter in inspect.signature(endpoint).parameters.values()][1:]

    def caption(image):  # as Gradio calls it: every input, positionally
        return endpoint(image, *defaults)

    decoder = tiny_manager.get("blip-caption").model.text_decoder
    watched: list[weakref.ref] = []
    forward = out_of_memory_once(decoder.forward, watched)
    monkeypatch.setattr(decoder, "forward", forward)
    image = noise_image(seed=101)
    with monkeypatch.context() as cuda:
        spy = CudaCacheSpy(cuda, watched)
        with pytest.raises(gr.Error) as caught:
            caption(image)
    assert spy.freed_at_call == [True]
    assert "ran out of memory" in caught.value.message and "memory-saving mode" in caught.value.message
    table, summary, details = caption(image)
    assert len(forward.calls) > 1 and len(table) == 1 and details["captions"][0]["text"] == table[0][1]


# ----------------------------------------------------------------------------- Stop and kill


def write_photos(folder: Path, count: int, side: int = 32) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"photo-{index:02d}.png" for index in range(count)]
    for index, name in enumerate(names):
        noise_image(seed=1000 + index, side=side).save(folder / name)
    return names


@pytest.mark.api
def test_stop_during_a_batch_keeps_the_captions_made_so_far_downloadable(tiny_client, tmp_path):
    names = write_photos(tmp_path / "photos", 24)
    slow = {"batch_size": 1, "min_new_tokens": 60, "max_new_tokens": 60, "api_name": "/caption_batch"}
    job = tiny_client.submit([handle_file(str(tmp_path / "photos" / name)) for name in names], **slow)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not job.done():
        progress = job.status().progress_data
        if progress and (progress[0].index or 0) >= 2:
            break
        time.sleep(0.05)
    tiny_client.predict(api_name="/caption_batch_stop")
    table, archive, summary = job.result(timeout=90)

    captioned = [row for row in table["data"] if not str(row[2]).startswith("⚠")]
    assert "Stopped on request" in summary and f"**{len(captioned)} of {len(names)} images captioned**" in summary
    assert 2 <= len(captioned) < len(names)
    with zipfile.ZipFile(archive) as zipped:
        metadata = [json.loads(line) for line in zipped.read("metadata.jsonl").decode().splitlines()]
        assert {entry["file_name"]: entry["text"] for entry in metadata} == {row[1]: row[2] for row in captioned}
        for entry in metadata:
            assert (
                zipped.read(Path(entry["file_name"]).with_suffix(".txt").as_posix()).decode().strip() == entry["text"]
            )
    # The next batch is not stopped by the old request.
    _, _, again = tiny_client.predict([handle_file(str(tmp_path / "photos" / names[0]))], api_name="/caption_batch")
    assert "**1 of 1 images captioned**" in again and "Stopped" not in again


@pytest.mark.slow
def test_a_killed_cli_run_resumes_and_captions_every_image_exactly_once(tiny_root, tmp_path, capsys):
    folder = tmp_path / "dataset"
    names = write_photos(folder, 30)
    flags = ["--tiny", "--tiny-dir", str(tiny_root), "--device", "cpu", "--batch-size", "1", "--workers", "0"]
    slow = ["--min-new-tokens", "40", "--max-new-tokens", "40"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.blip.caption_folder", str(folder), *flags, *slow],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(folder.glob("*.txt"))) < 3:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run wrote no captions in 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # no handler, no cleanup: as an OOM killer or a lost node does
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    done_before = len(list(folder.glob("*.txt")))
    assert 3 <= done_before < len(names), "the kill came too late to test a resume"

    args = caption_folder.parse_args([str(folder), *flags])
    assert caption_folder.run(args) == 0
    summary = capsys.readouterr().out
    captioned_now = int(summary.split(" captioned")[0].split()[-1])
    skipped = int(summary.split(" already had captions")[0].split()[-1])
    # Every image is captioned once: what the killed run finished is skipped, the rest done now.
    assert skipped + captioned_now == len(names) and skipped >= done_before - 1

    lines = (folder / "metadata.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert sorted(entry["file_name"] for entry in entries) == names  # each file exactly once
    for entry in entries:
        assert (folder / entry["file_name"]).with_suffix(".txt").read_text().strip() == entry["text"]
    assert not (folder / ".caption-parts").exists()
