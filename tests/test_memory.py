"""The memory planner: real parameter counts, quantized bytes checked against real quantized models, plans."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

from pipelines import settings
from pipelines.architectures import component_size, component_sizes, measure_module
from pipelines.catalog import CATALOG, MODEL_CONFIGS_DIR
from pipelines.memory import (
    GIB,
    SD3_MODES,
    WEIGHT_FORMATS,
    auto_choice,
    modes_for,
    plan,
    plan_table,
    weight_bytes,
)
from pipelines.memory.activations import blip_activation, mmdit_activation, vae_activation

# --- parameter counts: exact, from assets/model-configs/SOURCES.md ----------------------------

EXACT_COUNTS = [
    # (model, component, parameters(), checkpoint elements)
    ("blip-caption", "model", 223_971_644, 223_971_644),  # state_dict's 247,444,600 lists the tied LM head twice
    ("blip-itm", "model", 223_744_258, 223_744_258),
    ("sd35-large", "transformer", 8_056_627_520, 8_146_280_768),  # + the pos_embed buffer, which is in the checkpoint
    ("sd35-large-turbo", "transformer", 8_056_627_520, 8_146_280_768),
    ("sd35-medium", "transformer", 2_243_171_520, 2_469_663_936),
    ("sd35-large", "vae", 83_819_683, 83_819_683),
    ("sd35-large", "text_encoder", 123_650_304, 123_650_304),
    ("sd35-large", "text_encoder_2", 694_659_840, 694_659_840),
    ("sd35-large", "text_encoder_3", 4_762_310_656, 4_762_310_656),  # shared + embed_tokens: one tensor
]


@pytest.mark.parametrize(("key", "component", "parameters", "elements"), EXACT_COUNTS)
def test_meta_counts_match_the_sources_exactly(key, component, parameters, elements):
    size = component_size(key, component)
    assert size.parameters == parameters
    assert size.checkpoint_elements == elements


@pytest.mark.parametrize("key", ["sd35-large", "sd35-large-turbo", "sd35-medium"])
def test_sd3_totals_match_the_catalog(key):
    assert sum(size.checkpoint_elements for size in component_sizes(key)) == CATALOG[key].parameters


@pytest.mark.parametrize(
    ("key", "component", "published"),
    [
        ("blip-caption", "model", 224e6),
        ("sd35-large", "transformer", 8.1e9),
        ("sd35-medium", "transformer", 2.5e9),
        ("sd35-large", "text_encoder", 123e6),
        ("sd35-large", "text_encoder_2", 695e6),
        ("sd35-large", "text_encoder_3", 4.76e9),
    ],
)
def test_counts_agree_with_published_sizes(key, component, published):
    assert component_size(key, component).checkpoint_elements == pytest.approx(published, rel=0.03)


@pytest.mark.parametrize(
    ("key", "component", "index"),
    [
        ("sd35-large", "transformer", "transformer/diffusion_pytorch_model.safetensors.index.json"),
        ("sd35-large", "text_encoder_3", "text_encoder_3/model.safetensors.index.json"),
    ],
)
def test_bf16_bytes_equal_the_real_checkpoint_index(key, component, index):
    path = MODEL_CONFIGS_DIR / CATALOG[key].config_dir / index
    total_size = json.loads(path.read_text())["metadata"]["total_size"]  # bytes of the 16-bit checkpoint
    assert weight_bytes(component_size(key, component), "full", "bf16") == total_size


# --- the quantization rules -------------------------------------------------------------------


def test_format_table_gives_the_documented_bits_per_weight():
    rows, columns = 4096, 4096
    assert WEIGHT_FORMATS["nf4"].bits_per_weight(rows, columns) == 4.5
    assert WEIGHT_FORMATS["nf4-dq"].bits_per_weight(rows, columns) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert WEIGHT_FORMATS["int8"].bits_per_weight(rows, columns) == 8 + 32 / columns
    assert WEIGHT_FORMATS["full"].bits_per_weight(rows, columns, dtype_bytes=2) == 16


def test_only_linear_weights_are_quantized():
    size = component_size("sd35-large", "transformer")
    untouched = (size.float_elements - size.quantized_elements) * 2  # norms, biases, convs, pos_embed: bf16
    assert weight_bytes(size, "nf4", "bf16") == untouched + size.quantized_elements * 9 // 16  # 4.5 bits
    assert size.quantized_elements == pytest.approx(size.parameters, rel=0.01)  # the MMDiT is nearly all Linear


def test_t5_keeps_wo_unquantized_as_transformers_does():
    size = component_size("sd35-large", "text_encoder_3")
    assert size.fp32_kept_elements == 24 * 4096 * 10240  # wo of each of the 24 blocks
    assert size.quantized_elements == 24 * (4 * 4096 * 4096 + 2 * 4096 * 10240)  # q, k, v, o, wi_0, wi_1


def test_diffusers_bnb_replaces_exactly_the_layers_the_planner_counts():
    bnb = pytest.importorskip("bitsandbytes")
    from diffusers import BitsAndBytesConfig
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    from pipelines.architectures import build_on_meta

    model = build_on_meta("sd35-medium", "transformer")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    replace_with_bnb_linear(model, modules_to_not_convert=[], quantization_config=config)
    replaced = [layer for layer in model.modules() if isinstance(layer, bnb.nn.Linear4bit)]
    size = component_size("sd35-medium", "transformer")
    assert len(replaced) == size.quantized_layers
    assert sum(layer.in_features * layer.out_features for layer in replaced) == size.quantized_elements


# --- planner bytes vs models quantized for real on this CPU -----------------------------------


def _bnb_bytes(model) -> int:
    """What a bitsandbytes model holds: get_memory_footprint() plus the statistics it leaves out."""
    total = model.get_memory_footprint()
    for parameter in model.parameters():
        scales = getattr(parameter, "SCB", None)  # LLM.int8: one absmax per output row
        if scales is not None:
            total += scales.numel() * scales.element_size()
        state = getattr(parameter, "quant_state", None)  # 4-bit: absmax per block (+ nested absmax)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def _bnb_config(fmt: str):
    from transformers import BitsAndBytesConfig

    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=fmt == "nf4-dq")


def _quantized_vs_planned(model_class, config, fmt, dtype, tmp_path):
    torch.manual_seed(0)
    model_class(config).save_pretrained(tmp_path)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    quantized = model_class.from_pretrained(
        tmp_path, quantization_config=_bnb_config(fmt), dtype=torch_dtype, device_map="cpu"
    )
    with torch.device("meta"):
        planned = weight_bytes(measure_module(model_class(config)), fmt, dtype)
    return planned, quantized


@pytest.mark.parametrize(("fmt", "dtype"), [("int8", "fp32"), ("nf4", "bf16"), ("nf4-dq", "fp32")])
def test_planned_bytes_match_a_quantized_t5_encoder(fmt, dtype, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=8192, d_model=512, d_kv=64, d_ff=2048, num_layers=4, num_heads=8, feed_forward_proj="gated-gelu"
    )
    planned, quantized = _quantized_vs_planned(T5EncoderModel, config, fmt, dtype, tmp_path)
    assert planned == pytest.approx(quantized.get_memory_footprint(), rel=0.10)
    assert planned == _bnb_bytes(quantized)  # exact once the statistics are counted
    kept = [name for name, layer in quantized.named_modules() if type(layer) is torch.nn.Linear]
    assert kept and all(name.endswith("wo") for name in kept)  # the planner's T5 rule, seen in the real model


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_planned_bytes_match_a_quantized_blip(fmt, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BlipForConditionalGeneration

    config = _mid_size_blip_config()
    planned, quantized = _quantized_vs_planned(BlipForConditionalGeneration, config, fmt, "fp32", tmp_path)
    assert planned == pytest.approx(quantized.get_memory_footprint(), rel=0.10)
    assert planned == _bnb_bytes(quantized)


def test_planned_bytes_match_a_torchao_int8_sd3_transformer(tmp_path):
    pytest.importorskip("torchao", reason="torchao is not installed here (optional; not in requirements.txt)")
    from diffusers import SD3Transformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    config = _small_mmdit_config()
    torch.manual_seed(0)
    SD3Transformer2DModel.from_config(config).save_pretrained(tmp_path)
    quantized = SD3Transformer2DModel.from_pretrained(
        tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.float32
    )
    real = sum(tensor.numel() * tensor.element_size() for tensor in quantized.buffers())
    for parameter in quantized.parameters():
        parts = [getattr(parameter, name) for name in ("qdata", "scale", "zero_point") if hasattr(parameter, name)]
        real += sum(part.numel() * part.element_size() for part in parts or [parameter])
    with torch.device("meta"):
        planned = weight_bytes(measure_module(SD3Transformer2DModel.from_config(config)), "int8-torchao", "fp32")
    assert planned == real


# --- activation estimates vs peaks measured on this CPU ---------------------------------------


def _measured_peak(function) -> int:
    """Peak bytes the CPU allocator held above its level at the start while ``function`` ran."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        profiler.export_chrome_trace(path)
        with open(path) as trace:
            events = [event for event in json.load(trace)["traceEvents"] if event.get("name") == "[memory]"]
    finally:
        os.remove(path)
    events.sort(key=lambda event: event["ts"])
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(event["args"]["Total Allocated"] for event in events) - start


def _small_mmdit_config() -> dict:
    from pipelines.architectures import component_config

    config = dict(component_config("sd35-large", "transformer"))
    config.update(num_layers=2, num_attention_heads=4, caption_projection_dim=256, joint_attention_dim=256)
    config.update(pooled_projection_dim=64, pos_embed_max_size=64)
    return config


def _mid_size_blip_config():
    from transformers import BlipConfig

    config = BlipConfig.from_pretrained(MODEL_CONFIGS_DIR / "Salesforce__blip-image-captioning-base")
    for part in (config.vision_config, config.text_config):
        part.num_hidden_layers, part.hidden_size, part.intermediate_size, part.num_attention_heads = 2, 256, 1024, 2
    config.text_config.encoder_hidden_size = 256
    return config


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_mmdit_activation_estimate_is_near_a_measured_peak(attention):
    from diffusers import SD3Transformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = _small_mmdit_config()
    model = SD3Transformer2DModel.from_config(config).eval()
    rows, side, text = 2, 64, 333  # a 512 px image: 64x64 latents
    inputs = {
        "hidden_states": torch.randn(rows, 16, side, side),
        "encoder_hidden_states": torch.randn(rows, text, 256),
        "pooled_projections": torch.randn(rows, 64),
        "timestep": torch.tensor([500.0] * rows),
    }
    backends = [SDPBackend.MATH] if attention == "math" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        measured = _measured_peak(lambda: model(**inputs))
    estimate = mmdit_activation(config, (side // 2) ** 2 + text, rows, "fp32", attention).bytes
    assert 0.75 <= measured / estimate <= 1.25, (measured, estimate)


def test_vae_decode_estimate_is_near_a_measured_peak():
    from diffusers import AutoencoderKL

    from pipelines.architectures import component_config

    config = dict(component_config("sd35-large", "vae"), block_out_channels=[32, 64, 128, 128])
    model = AutoencoderKL.from_config(config).eval()
    measured = _measured_peak(lambda: model.decode(torch.randn(1, 16, 32, 32)))
    estimate = vae_activation(config, 256, 256, 1, "fp32").bytes
    assert 0.75 <= measured / estimate <= 1.25, (measured, estimate)


def test_blip_beam_search_estimate_is_near_a_measured_peak():
    from transformers import BlipForConditionalGeneration

    config = _mid_size_blip_config()
    config.text_config.num_hidden_layers = 8  # enough decoder layers for the beam cache to set the peak
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    pixels = torch.randn(1, 3, 384, 384)
    measured = _measured_peak(
        lambda: model.generate(pixel_values=pixels, num_beams=3, min_new_tokens=20, max_new_tokens=20)
    )
    estimate = blip_activation(config, 1, "fp32", num_beams=3, new_tokens=20)
    assert estimate.formula.startswith("beam cache")
    assert 0.75 <= measured / estimate.bytes <= 1.25, (measured, estimate.bytes)


# --- plans and the automatic choice -----------------------------------------------------------


def test_large_bf16_peak_is_near_the_published_measurement():
    # SD3.5 Large bf16 at 1024², peak 31.5 GB on an H100 (onnxruntime PR 22986; see DESIGN.md).
    estimate = plan("sd35-large", "bf16", 1024, 1024).peak_bytes
    assert estimate == pytest.approx(31.5e9, rel=0.10)


def test_offload_modes_keep_only_what_runs_on_the_gpu():
    full = plan("sd35-large", "bf16")
    model_offload = plan("sd35-large", "bf16-offload")
    sequential = plan("sd35-large", "bf16-sequential")
    assert full.resident_at_peak == ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")
    assert len(model_offload.resident_at_peak) == 1
    assert full.weight_bytes == model_offload.weight_bytes == sequential.weight_bytes
    assert sequential.peak_bytes < model_offload.peak_bytes < full.peak_bytes
    transformer = component_size("sd35-large", "transformer")
    assert model_offload.peak_bytes >= weight_bytes(transformer, "full", "bf16")


def test_dropping_t5_removes_its_weights_but_not_its_tokens():
    with_t5, without = plan("sd35-medium", "bf16"), plan("sd35-medium", "bf16-no-t5")
    t5 = next(part for part in without.components if part.name == "text_encoder_3")
    assert t5.format == "dropped" and t5.weight_bytes == 0
    assert with_t5.weight_bytes - without.weight_bytes == weight_bytes(component_size("sd35-medium", "text_encoder_3"))
    transformer = [next(p for p in item.components if p.name == "transformer") for item in (with_t5, without)]
    assert transformer[0].activation == transformer[1].activation  # zeros stand in for T5's 256 tokens


def test_quantized_modes_are_smaller_and_cfg_doubles_the_transformer_batch():
    peaks = {mode.key: plan("sd35-large", mode.key).weight_bytes for mode in SD3_MODES}
    assert peaks["nf4-t5nf4"] < peaks["nf4"] < peaks["int8"] < peaks["bf16"]
    large = plan("sd35-large", "bf16").components[3].activation
    turbo = plan("sd35-large-turbo", "bf16").components[3].activation  # guidance 0: no CFG
    assert large.bytes == 2 * turbo.bytes


def test_activations_grow_with_size_and_batch():
    small, large = plan("sd35-medium", "bf16", 512, 512), plan("sd35-medium", "bf16", 1024, 1024)
    assert small.activation_bytes < large.activation_bytes
    one, many = plan("blip-caption", "bf16", batch=1), plan("blip-caption", "bf16", batch=32)
    assert many.activation_bytes > 20 * one.activation_bytes
    assert plan("sd35-medium", "bf16", attention="math").peak_bytes > large.peak_bytes


def test_longer_t5_prompts_cost_t5_and_transformer_memory():
    short, long = plan("sd35-large", "bf16"), plan("sd35-large", "bf16", t5_tokens=512)
    assert (short.text_tokens, long.text_tokens) == (77 + 256, 77 + 512)
    for index in (2, 3):  # T5, transformer
        assert long.components[index].activation.bytes > short.components[index].activation.bytes
    with pytest.raises(ValueError, match="between 1 and 512"):
        plan("sd35-large", "bf16", t5_tokens=1024)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (("sd35-huge", "bf16"), "choose one of"),
        (("sd35-large", "fp6"), "choose one of"),
        (("sd35-large", "bf16", 1000, 1024), "multiple of 16"),
        (("sd35-large", "bf16", 4096, 1024), "between 256 and 3072"),
        (("sd35-large", "bf16", 1024, 1024, 0), "batch must be between"),
    ],
)
def test_bad_inputs_get_a_sentence(arguments, words):
    with pytest.raises(ValueError, match=words):
        plan(*arguments)


@pytest.mark.parametrize("gib", [80, 48, 24, 16, 12, 8, 6])
def test_auto_choice_takes_the_first_mode_that_fits(gib):
    free = gib * GIB
    for key in ("sd35-large", "sd35-medium"):
        mode, reason = auto_choice(key, free, 1024, 1024)
        keys = [candidate.key for candidate in modes_for(key)]
        chosen = plan(key, mode)
        assert chosen.peak_bytes + settings.PLAN_MARGIN_BYTES <= free
        for earlier in keys[: keys.index(mode)]:
            assert plan(key, earlier).peak_bytes + settings.PLAN_MARGIN_BYTES > free
        assert chosen.mode.title in reason and reason.endswith(".")


def test_auto_choice_on_big_and_tiny_gpus():
    assert auto_choice("sd35-large", 80 * GIB)[0] == "bf16"
    mode, reason = auto_choice("sd35-large", 1 * GIB)
    assert mode is None and "No mode fits" in reason


def test_plan_table_covers_every_model_and_mode():
    rows = plan_table()
    assert {(row.model_key, row.mode.key) for row in rows} >= {("sd35-large", mode.key) for mode in SD3_MODES}
    assert {row.batch for row in rows if row.model_key == "blip-caption"} == set(settings.PLAN_CAPTION_BATCHES)
    assert all(row.peak_bytes >= row.activation_bytes > 0 for row in rows)
    assert json.dumps([row.as_dict() for row in rows])
