"""Tiny models, the catalog, device choice and the model manager."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from pipelines.catalog import CATALOG
from pipelines.errors import ModelLoadError
from pipelines.manager import ModelManager, explain_load_failure
from pipelines.runtime import choose_runtime
from pipelines.tiny import TINY_SD3_DIRS, build_tiny_blip, ensure_tiny_models

CPU = choose_runtime("cpu")


def test_tiny_models_are_saved_in_the_hub_layout(tiny_root):
    blip = tiny_root / "blip-caption"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (blip / name).is_file(), name
    for dirname in TINY_SD3_DIRS.values():
        pipeline = tiny_root / dirname
        assert (pipeline / "model_index.json").is_file()
        for component in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3"):
            assert (pipeline / component).is_dir(), f"{dirname}/{component}"


def test_tiny_build_is_deterministic(tmp_path):
    build_tiny_blip(tmp_path / "one")
    build_tiny_blip(tmp_path / "two")
    first, second = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_ensure_tiny_models_reuses_a_complete_build(tiny_root):
    marker = tiny_root / "blip-caption" / "model.safetensors"
    before = marker.stat().st_mtime_ns
    ensure_tiny_models(tiny_root)
    assert marker.stat().st_mtime_ns == before


def test_tiny_medium_is_shaped_for_skip_layer_guidance(tiny_manager):
    medium = tiny_manager.get("sd35-medium").transformer
    large = tiny_manager.get("sd35-large").transformer
    skip_layers = CATALOG["sd35-medium"].image_preset.skip_layer_guidance_layers
    assert max(skip_layers) < medium.config.num_layers
    assert medium.config.dual_attention_layers and not large.config.dual_attention_layers


@pytest.mark.parametrize("key", ["sd35-large", "sd35-large-turbo", "sd35-medium"])
def test_tiny_sd3_pipelines_reload_and_draw(tiny_manager, key):
    pipeline = tiny_manager.get(key)
    image = pipeline(
        "a cat on a table",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3)
    assert float(image.std()) > 0  # not a constant image


def test_large_and_turbo_are_different_models(tiny_manager):
    large = tiny_manager.get("sd35-large").transformer.state_dict()
    turbo = tiny_manager.get("sd35-large-turbo").transformer.state_dict()
    assert large.keys() == turbo.keys()
    assert not all(torch.equal(large[name], turbo[name]) for name in large)


def test_models_load_lazily_once_even_under_concurrent_requests():
    calls = []

    def slow_loader(source, runtime, variant=None):
        calls.append(source)
        time.sleep(0.2)
        return object()

    manager = ModelManager(CPU, loaders={"blip-caption": slow_loader, "sd3": slow_loader})
    assert not manager.is_loaded("blip-caption")
    results = []
    threads = [threading.Thread(target=lambda: results.append(manager.get("blip-caption"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["Salesforce/blip-image-captioning-base"]
    assert len({id(result) for result in results}) == 1
    assert manager.is_loaded("blip-caption")


def test_a_failed_load_caches_nothing_and_the_next_one_works():
    attempts = []

    def flaky_loader(source, runtime, variant=None):
        attempts.append(source)
        if len(attempts) == 1:
            raise RuntimeError("disk hiccup")
        return "model"

    manager = ModelManager(CPU, loaders={"blip-caption": flaky_loader, "sd3": flaky_loader})
    with pytest.raises(ModelLoadError, match="BLIP base"):
        manager.get("blip-caption")
    assert not manager.is_loaded("blip-caption")
    assert manager.get("blip-caption") == "model"


def test_unload_releases_the_model(tiny_root):
    manager = ModelManager(CPU, tiny_root=tiny_root)
    manager.get("blip-caption")
    (loaded,) = manager.loaded_models()
    assert loaded.footprint_bytes > 100_000  # the tiny BLIP's float32 weights
    assert manager.unload("blip-caption") is True
    assert manager.loaded_models() == [] and not manager.unload("blip-caption")


def test_a_repo_that_cannot_be_fetched_offline_gets_one_actionable_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = ModelManager(CPU, source_overrides={"blip-caption": "nobody-here/no-such-blip"})
    with pytest.raises(ModelLoadError) as caught:
        manager.get("blip-caption")
    message = str(caught.value)
    assert "BLIP base" in message and "no-such-blip" in message
    assert "--model blip-caption=DIR" in message and "--tiny" in message
    assert "Traceback" not in message and message.count("\n") == 0


def test_a_missing_local_folder_is_named(tmp_path):
    manager = ModelManager(CPU, source_overrides={"sd35-medium": str(tmp_path / "nowhere")})
    with pytest.raises(ModelLoadError, match="does not exist"):
        manager.get("sd35-medium")
    (tmp_path / "empty").mkdir()
    manager = ModelManager(CPU, source_overrides={"sd35-medium": str(tmp_path / "empty")})
    with pytest.raises(ModelLoadError, match="holds no model_index.json"):
        manager.get("sd35-medium")


def test_a_local_folder_stands_in_for_the_repo(tiny_root):
    manager = ModelManager(CPU, source_overrides={"blip-caption": str(tiny_root / "blip-caption")})
    assert manager.source_for("blip-caption") == str(tiny_root / "blip-caption")
    assert manager.source_for("sd35-large") == "stabilityai/stable-diffusion-3.5-large"
    assert manager.get("blip-caption").model.config.vision_config.image_size == 64


def test_gated_repo_message_names_the_licence_and_the_token():
    from types import SimpleNamespace

    from huggingface_hub.errors import GatedRepoError

    spec = CATALOG["sd35-large"]
    response = SimpleNamespace(headers={}, request=None)  # what the Hub client reads off a 401
    try:
        raise OSError("cannot load") from GatedRepoError("401 gated", response=response)
    except OSError as error:
        message = explain_load_failure(spec, spec.repo_id, error)
    assert "gated" in message and "HF_TOKEN" in message and spec.hub_url in message


def test_unknown_override_key_is_refused():
    with pytest.raises(ValueError, match="unknown model 'blip'"):
        ModelManager(CPU, source_overrides={"blip": "/x"})


def test_device_choice():
    assert choose_runtime("cpu").dtype == torch.float32
    with pytest.raises(ValueError, match="cpu, cuda"):
        choose_runtime("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU; use --device cpu"):
            choose_runtime("cuda")
        assert choose_runtime("auto").device.type in ("cpu", "mps")


def test_preload_loads_in_the_background_and_swallows_failures(tiny_root):
    manager = ModelManager(CPU, tiny_root=tiny_root)
    manager.preload("blip-caption").join(timeout=60)
    assert manager.is_loaded("blip-caption")
    broken = ModelManager(CPU, source_overrides={"blip-caption": "/no/such/folder"})
    broken.preload("blip-caption").join(timeout=60)  # logs, does not raise
    assert not broken.is_loaded("blip-caption")
    with pytest.raises(ModelLoadError, match="does not exist"):
        broken.get("blip-caption")


def test_the_runtime_names_its_dtype_as_the_planner_does():
    from pipelines.runtime import Runtime

    assert CPU.dtype_name == "fp32"
    assert Runtime(torch.device("cuda"), torch.bfloat16).dtype_name == "bf16"
    assert Runtime(torch.device("cuda"), torch.float16).dtype_name == "fp16"
