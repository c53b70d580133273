"""Memory modes at load time: refusals, dropping T5, reloading in another mode, LRU eviction."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from pipelines.manager import ModelManager
from pipelines.memory import SD3_MODES, get_mode, resolve_mode
from pipelines.runtime import Runtime, choose_runtime
from pipelines.sd3.loading import check_mode, load_sd3_pipeline
from pipelines.sd3.text_to_image import GenerateRequest, generate, resolve_request

CPU = choose_runtime("cpu")
CUDA_LIKE = Runtime(device=torch.device("cuda"), dtype=torch.bfloat16)  # only its device type is read


@pytest.mark.parametrize(
    ("mode", "runtime", "words"),
    [
        ("nf4", CPU, "needs a CUDA GPU"),
        ("nf4-t5nf4", CPU, "needs a CUDA GPU"),
        ("int8", CPU, "needs a CUDA GPU"),
        ("bf16-offload", CPU, "no CUDA GPU"),
        ("bf16-sequential", CPU, "no CUDA GPU"),
    ],
)
def test_modes_this_machine_cannot_run_are_refused_in_one_sentence(mode, runtime, words):
    with pytest.raises(ValueError, match=words) as caught:
        check_mode(get_mode("sd35-large", mode), runtime)
    assert str(caught.value).count(". ") <= 1 and "use 'bf16'" in str(caught.value)


def test_eight_bit_with_offload_is_refused_even_on_a_gpu():
    from pipelines.memory import MemoryMode

    int8_offload = MemoryMode("int8-offload", "8-bit + offload", (("transformer", "int8"),), offload="model")
    with pytest.raises(ValueError, match="8-bit .* cannot be moved by CPU offload"):
        check_mode(int8_offload, CUDA_LIKE)
    check_mode(get_mode("sd35-large", "nf4-t5nf4-offload"), CUDA_LIKE)  # allowed


def test_dropping_t5_loads_without_it_and_still_draws(tiny_root):
    pipeline = load_sd3_pipeline(str(tiny_root / "sd35-medium"), CPU, "bf16-no-t5")
    assert pipeline.text_encoder_3 is None and pipeline.tokenizer_3 is None
    request = resolve_request(GenerateRequest(prompt="a cat", model="medium", steps=2, width=64, height=64), tiny=True)
    result = generate(pipeline, request, repo_id="tiny")
    assert result.images[0].size == (64, 64) and result.warnings == []


def test_another_mode_reloads_the_model_and_frees_the_old_one(tiny_root):
    manager = ModelManager(CPU, tiny_root=tiny_root)
    full = manager.get("sd35-medium", variant="bf16")
    assert full.text_encoder_3 is not None
    old = weakref.ref(full)
    del full
    without_t5 = manager.get("sd35-medium", variant="bf16-no-t5")
    gc.collect()
    assert without_t5.text_encoder_3 is None and old() is None
    assert manager.is_loaded("sd35-medium", "bf16-no-t5") and not manager.is_loaded("sd35-medium", "bf16")
    assert manager.get("sd35-medium", variant="bf16-no-t5") is without_t5  # cached


def test_a_cpu_machine_refuses_quantized_modes_through_the_manager(tiny_root):
    manager = ModelManager(CPU, tiny_root=tiny_root)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        manager.get("sd35-large", variant="nf4")
    assert not manager.is_loaded("sd35-large")


def test_least_recently_used_models_are_evicted_to_fit_the_budget(tiny_root):
    probe = ModelManager(CPU, tiny_root=tiny_root)
    for key in ("blip-caption", "sd35-large", "sd35-medium"):
        probe.get(key)
    sizes = {entry.key: entry.footprint_bytes for entry in probe.loaded_models()}
    del probe
    budget = sizes["sd35-medium"] + sizes["blip-caption"] + 1000  # room for medium and blip, not all three
    assert budget < sum(sizes.values())
    told = []
    manager = ModelManager(
        CPU, tiny_root=tiny_root, memory_budget_bytes=budget, estimate_bytes=lambda key, variant: sizes[key]
    )
    manager.get("blip-caption")
    large = weakref.ref(manager.get("sd35-large"))
    manager.get("blip-caption")  # blip is now the most recently used; sd35-large the least
    manager.get("sd35-medium", notify=told.append)
    gc.collect()
    assert {entry.key for entry in manager.loaded_models()} == {"blip-caption", "sd35-medium"}
    assert sum(entry.footprint_bytes for entry in manager.loaded_models()) <= budget
    assert large() is None  # its weights are really gone
    assert len(told) == 1 and told[0].startswith("Unloaded Stable Diffusion 3.5 Large")


def test_auto_mode_on_a_cpu_machine_is_full_precision_and_says_why():
    mode, why = resolve_mode("sd35-large", "auto", CPU, 1024, 1024)
    assert mode == "bf16" and "no CUDA GPU" in why
    assert resolve_mode("sd35-large", "nf4", CPU, 1024, 1024) == ("nf4", "chosen by hand")
    with pytest.raises(ValueError, match="choose one of: bf16, nf4"):
        resolve_mode("sd35-large", "fp6", CPU, 1024, 1024)


def test_the_app_refuses_an_unknown_memory_mode_at_start(tiny_root):
    from pipelines.startup import parse_args, studio_from_args

    with pytest.raises(SystemExit, match="Unknown memory mode 'fp6'"):
        studio_from_args(parse_args(["--tiny", "--tiny-dir", str(tiny_root), "--memory", "fp6"]))


@pytest.mark.slow  # over 3 s: the full suite runs it, the fast lane does not
@pytest.mark.api
def test_generate_api_reports_the_mode_and_refuses_gpu_only_modes(tiny_client):
    from gradio_client.exceptions import AppError

    *_, details = tiny_client.predict("a cat", steps=2, memory_mode="bf16-no-t5", api_name="/generate")
    assert details["memory_mode"] == {"mode": "bf16-no-t5", "reason": "chosen by hand", "dtype": "float32"}
    *_, details = tiny_client.predict("a cat", steps=2, api_name="/generate")
    assert details["memory_mode"]["mode"] == "bf16" and "auto: no CUDA GPU" in details["memory_mode"]["reason"]
    with pytest.raises(AppError, match="needs a CUDA GPU"):
        tiny_client.predict("a cat", steps=2, memory_mode="nf4", api_name="/generate")


# ----------------------------------------------------------------------------- per-component quantization


@pytest.mark.parametrize("mode", [mode.key for mode in SD3_MODES if mode.key != "fp8"])  # fp8: test_fast_paths
def test_each_mode_quantizes_exactly_its_components_through_one_pipeline_config(mode):
    """The config load_sd3_pipeline passes (checked as an object: diffusers refuses the bitsandbytes
    MMDiT without a GPU)."""
    import diffusers
    import transformers

    from pipelines.sd3.loading import pipeline_quantization

    memory_mode = get_mode("sd35-large", mode)
    config = pipeline_quantization(memory_mode, torch.bfloat16)
    expected = {c: fmt for c, fmt in memory_mode.formats if fmt != "full" and c not in memory_mode.dropped}
    if not expected:
        assert config is None  # full precision stays the default
        return
    assert isinstance(config, diffusers.PipelineQuantizationConfig)
    assert set(config.quant_mapping) == set(expected)
    for component, fmt in expected.items():
        library = diffusers if component == "transformer" else transformers
        bnb = config.quant_mapping[component]
        assert type(bnb) is library.BitsAndBytesConfig
        assert (bnb.load_in_4bit, bnb.load_in_8bit) == (fmt == "nf4", fmt == "int8")
        if fmt == "nf4":
            assert bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_compute_dtype == torch.bfloat16


def test_loading_a_quantized_mode_hands_that_config_to_from_pretrained(monkeypatch):
    import diffusers

    from pipelines.sd3.loading import pipeline_quantization

    seen = {}

    class Stop(Exception):
        pass

    def from_pretrained(source, **kwargs):
        seen.update(kwargs, source=source)
        raise Stop

    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained", from_pretrained)
    with pytest.raises(Stop):
        load_sd3_pipeline("some/folder", CUDA_LIKE, "nf4-no-t5")
    config = seen["quantization_config"]
    assert set(config.quant_mapping) == {"transformer"}  # T5 is dropped, so it gets no config
    assert seen["text_encoder_3"] is None and seen["dtype"] == torch.bfloat16
    assert repr(config.quant_mapping) == repr(
        pipeline_quantization(get_mode("sd35-large", "nf4-no-t5"), torch.bfloat16).quant_mapping
    )
