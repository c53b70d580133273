"""--precision: the choice of BLIP's CPU variant, the converted captioner, and what the API reports."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import settings
from pipelines.blip import precision as blip_precision
from pipelines.blip.captioner import CaptionRequest
from pipelines.blip.precision import (
    VARIANTS,
    PrecisionVariant,
    apply_blip_precision,
    choose_blip_precision,
    cpu_has_native_bf16,
    runtime_blip_precision,
    with_blip_precision,
)
from pipelines.catalog import CATALOG
from pipelines.manager import ModelManager
from pipelines.runtime import Runtime, choose_runtime
from tests.app_server import tiny_app

ROOT = Path(__file__).resolve().parent.parent


# --- the choice ------------------------------------------------------------------------------


def test_auto_picks_the_fastest_variant_within_the_deviation_on_native_bf16():
    choice = choose_blip_precision("auto", "cpu", native_bf16=True)
    allowed = [v for v in VARIANTS.values() if v.logit_deviation <= settings.MAX_BLIP_LOGIT_DEVIATION]
    assert choice.variant == min(allowed, key=lambda v: v.time_ratio).name
    assert VARIANTS[choice.variant].logit_deviation <= settings.MAX_BLIP_LOGIT_DEVIATION
    assert choice.variant != "fp32"  # the measured table has a faster variant within 2%


def test_auto_skips_a_faster_variant_over_the_threshold_and_bf16_without_native_bf16(monkeypatch):
    table = {
        "fp32": PrecisionVariant("fp32", "fp32", "fp32", 1.0, 0.0, True),
        "bf16": PrecisionVariant("bf16", "bf16", "bf16", 0.5, 0.01, False),
        "vision-bf16": PrecisionVariant("vision-bf16", "bf16", "fp32", 0.7, 0.004, True),
        "int8": PrecisionVariant("int8", "int8", "int8", 0.3, 0.05, False),  # fastest, but over 2%
        "vision-bf16-int8": PrecisionVariant("vision-bf16-int8", "bf16", "int8", 0.2, 0.05, False),
    }
    monkeypatch.setattr(blip_precision, "VARIANTS", table)
    assert choose_blip_precision("auto", "cpu", native_bf16=True).variant == "bf16"
    assert choose_blip_precision("auto", "cpu", native_bf16=False).variant == "fp32"
    monkeypatch.setattr(settings, "MAX_BLIP_LOGIT_DEVIATION", 0.06)
    assert choose_blip_precision("auto", "cpu", native_bf16=True).variant == "vision-bf16-int8"
    assert choose_blip_precision("auto", "cpu", native_bf16=False).variant == "int8"


def test_auto_detects_native_bf16(monkeypatch):
    monkeypatch.setattr(blip_precision, "cpu_has_native_bf16", lambda: False)
    assert choose_blip_precision("auto", "cpu").variant == "fp32"
    assert "no native bf16" in choose_blip_precision("auto", "cpu").reason
    monkeypatch.setattr(blip_precision, "cpu_has_native_bf16", lambda: True)
    assert choose_blip_precision("auto", "cpu").variant == "bf16"


def test_native_bf16_needs_the_cpu_flag_and_onednn(tmp_path, monkeypatch):
    without = tmp_path / "cpuinfo-old"
    without.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    with_flag = tmp_path / "cpuinfo-new"
    with_flag.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(blip_precision, "onednn_bf16_supported", lambda: True)
    assert not cpu_has_native_bf16(without)
    assert cpu_has_native_bf16(with_flag)
    assert cpu_has_native_bf16(tmp_path / "no-such-file")  # not Linux: oneDNN's check decides
    monkeypatch.setattr(blip_precision, "onednn_bf16_supported", lambda: False)
    assert not cpu_has_native_bf16(with_flag)


def test_fp32_flag_is_exact_and_tiny_auto_keeps_fp32():
    assert choose_blip_precision("fp32", "cpu", native_bf16=True).variant == "fp32"
    assert choose_blip_precision("FP32 ", "cpu", native_bf16=True).variant == "fp32"
    tiny = choose_blip_precision("auto", "cpu", tiny=True, native_bf16=True)
    assert tiny.variant == "fp32" and "tiny" in tiny.reason
    assert choose_blip_precision("bf16", "cpu", tiny=True, native_bf16=True).variant == "bf16"


def test_explicit_bf16_without_native_bf16_is_honoured_with_a_warning():
    choice = choose_blip_precision("bf16", "cpu", native_bf16=False)
    assert choice.variant == "bf16" and "no native bf16" in choice.reason


@pytest.mark.parametrize("requested", ["auto", "bf16", "fp32"])
def test_gpu_runtime_is_untouched(requested):
    choice = choose_blip_precision(requested, "cuda", native_bf16=True)
    assert choice.variant is None
    gpu = Runtime(torch.device("cuda"), torch.bfloat16)
    assert with_blip_precision(gpu, requested).blip_precision.variant is None
    assert runtime_blip_precision(gpu).variant is None
    model = torch.nn.Linear(2, 2)
    assert apply_blip_precision(model, None).weight.dtype == torch.float32


def test_unknown_value_is_refused_with_a_sentence():
    with pytest.raises(ValueError, match=r"--precision 'fp16' is not a BLIP precision; use one of: auto, fp32"):
        choose_blip_precision("fp16", "cpu")
    from pipelines.startup import build_studio

    with pytest.raises(SystemExit, match="not a BLIP precision"):
        build_studio(["--tiny", "--precision", "int4"])


def test_caption_folder_takes_the_flag():
    from pipelines.blip.caption_folder import parse_args

    assert parse_args(["photos"]).precision == "auto"
    assert parse_args(["photos", "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        parse_args(["photos", "--precision", "fp16"])


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_app_auto_follows_the_cpu(monkeypatch, native, expected):
    from pipelines.startup import build_studio

    monkeypatch.setattr(blip_precision, "cpu_has_native_bf16", lambda: native)
    studio = build_studio(["--device", "cpu", "--no-train"])  # real models: nothing loads until asked
    assert studio.manager.runtime.blip_precision.variant == expected
    assert build_studio(["--device", "cpu", "--precision", "fp32"]).manager.runtime.blip_precision.variant == "fp32"


def test_caption_folder_writes_bf16_captions_and_records_the_precision(tiny_root, tmp_path):
    import json
    import shutil

    from pipelines.blip import caption_folder

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(ROOT / "assets" / "examples" / "chelsea.png", folder / "chelsea.png")
    arguments = [str(folder), "--tiny", "--tiny-dir", str(tiny_root), "--device", "cpu", "--precision", "bf16"]
    assert caption_folder.run(caption_folder.parse_args(arguments)) == 0
    assert (folder / "chelsea.txt").read_text().strip()
    assert json.loads((folder / caption_folder.MANIFEST_FILE).read_text())["precision"] == "bf16"


def test_labels_say_the_deviation_and_the_way_back():
    label = choose_blip_precision("bf16", "cpu", native_bf16=True).label
    assert label.startswith("BLIP precision: bf16 (")
    assert f"{VARIANTS['bf16'].logit_deviation:.1%} logit deviation from fp32" in label
    assert "--precision fp32 for exact" in label
    assert runtime_blip_precision(choose_runtime("cpu")).variant == "fp32"


# --- packed bf16 weights ---------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
def test_packed_bf16_linear_equals_linear_bit_for_bit_and_follows_weight_changes():
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 80).to(torch.bfloat16)
    packed = blip_precision.PackedBf16Linear.from_linear(plain)
    assert packed.weight is plain.weight and isinstance(packed, torch.nn.Linear)
    for shape in [(1, 48), (2, 7, 48), (1, 1, 48)]:
        x = torch.randn(shape, dtype=torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(packed(x), plain(x))
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        plain.weight.mul_(2)  # e.g. a LoRA merged into the weight: the pack must follow
    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))
    assert packed(x).requires_grad  # with gradients wanted it is a plain Linear


@needs_onednn
def test_bf16_variant_packs_linears_only_with_onednn_bf16(tiny_root, monkeypatch):
    from transformers import BlipForConditionalGeneration

    source = str(tiny_root / CATALOG["blip-caption"].tiny_dir)
    monkeypatch.setattr(blip_precision, "onednn_bf16_supported", lambda: True)
    packed = apply_blip_precision(BlipForConditionalGeneration.from_pretrained(source), "bf16")
    monkeypatch.setattr(blip_precision, "onednn_bf16_supported", lambda: False)
    plain = apply_blip_precision(BlipForConditionalGeneration.from_pretrained(source), "bf16")
    kinds = {type(m).__name__ for m in packed.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {"PackedBf16Linear"}
    assert {type(m).__name__ for m in plain.modules() if isinstance(m, torch.nn.Linear)} == {"Linear"}
    head = packed.text_decoder.get_output_embeddings()
    assert head.weight is packed.text_decoder.get_input_embeddings().weight  # the tied LM head stays tied
    pixels = torch.rand(1, 3, packed.config.vision_config.image_size, packed.config.vision_config.image_size)
    with torch.inference_mode():
        out = [m.generate(pixel_values=pixels, max_new_tokens=6, min_new_tokens=6) for m in (packed, plain)]
    assert torch.equal(out[0], out[1])


# --- the converted captioner -----------------------------------------------------------------


@pytest.fixture(scope="module")
def variant_captioners(tiny_root):
    """The tiny captioner loaded through the manager in fp32 and in each variant."""
    captioners = {}
    for name in VARIANTS:
        runtime = with_blip_precision(choose_runtime("cpu"), name)
        captioners[name] = ModelManager(runtime, tiny_root=tiny_root).get("blip-caption")
    return captioners


@pytest.fixture(scope="module")
def photos():
    photo = Image.open(ROOT / "assets" / "examples" / "chelsea.png").convert("RGB")
    return [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((200, 150))]


def test_variants_convert_the_parts_they_name(variant_captioners):
    assert variant_captioners["fp32"].decoder_dtype == torch.float32
    bf16 = variant_captioners["bf16"]
    assert (bf16.precision, bf16.vision_dtype, bf16.decoder_dtype) == ("bf16", torch.bfloat16, torch.bfloat16)
    mixed = variant_captioners["vision-bf16"]
    assert (mixed.vision_dtype, mixed.decoder_dtype) == (torch.bfloat16, torch.float32)
    int8 = variant_captioners["vision-bf16-int8"]
    query = int8.model.text_decoder.bert.encoder.layer[0].attention.self.query
    assert "quantized" in type(query).__module__
    assert int8.vision_dtype == torch.bfloat16


@pytest.mark.parametrize("name", [name for name in VARIANTS if name != "fp32"])
@pytest.mark.parametrize(
    "request_",
    [
        CaptionRequest(strategy="greedy", min_new_tokens=3, max_new_tokens=8),
        CaptionRequest(strategy="beam", num_beams=3, num_captions=2, max_new_tokens=8),
        CaptionRequest(strategy="sampling", num_captions=3, seed=11, max_new_tokens=8),
    ],
    ids=["greedy", "beam", "sampling"],
)
def test_variant_captions_have_fp32_shapes_and_finite_scores(variant_captioners, photos, name, request_):
    expected = variant_captioners["fp32"].caption_batch(photos, request_)
    results = variant_captioners[name].caption_batch(photos, request_)
    assert len(results) == len(expected) == 2
    for result, reference in zip(results, expected, strict=True):
        assert len(result.captions) == len(reference.captions) == request_.num_captions
        for caption in result.captions:
            assert isinstance(caption.text, str)
            assert 1 <= caption.num_tokens <= request_.max_new_tokens
            assert math.isfinite(caption.score) and caption.score <= 0


def test_bf16_sampling_respects_seeds(variant_captioners, photos):
    captioner = variant_captioners["bf16"]
    request = CaptionRequest(strategy="sampling", num_captions=3, seed=5, max_new_tokens=10)
    first = captioner.caption(photos[0], request).captions
    captioner.caption(photos[1], dataclasses.replace(request, seed=6))  # another image and seed in between
    again = captioner.caption(photos[0], request).captions
    assert [(c.text, c.score) for c in again] == [(c.text, c.score) for c in first]


def test_bf16_first_step_logits_stay_close_to_fp32(variant_captioners, photos):
    """The deviation the bench measures on the real size, here on the tiny model: bounded, not zero."""

    def logits(captioner):
        with torch.inference_mode():
            embeds = captioner.encode_images(photos[:1])
            out = captioner.model.text_decoder(input_ids=captioner.prompt_ids(""), encoder_hidden_states=embeds)
        return out.logits[:, -1].float()

    reference = logits(variant_captioners["fp32"])
    for name in ("bf16", "vision-bf16"):
        deviation = float((logits(variant_captioners[name]) - reference).norm() / reference.norm())
        assert 0 < deviation < 0.05, name


@pytest.mark.parametrize("name", ["bf16", "vision-bf16", "vision-bf16-int8"])
def test_attention_maps_work_in_every_variant(variant_captioners, photos, name):
    from pipelines.blip.attention import cross_attention_maps

    maps = cross_attention_maps(variant_captioners[name], photos[0], "a cat on a sofa")
    reference = cross_attention_maps(variant_captioners["fp32"], photos[0], "a cat on a sofa")
    assert maps.maps.shape == reference.maps.shape and maps.maps.dtype == reference.maps.dtype
    assert np.isfinite(maps.maps).all()


def test_adapters_load_on_bf16_and_are_refused_with_a_sentence_on_int8(tiny_root):
    from pipelines.startup import build_studio

    bf16 = build_studio(["--tiny", "--tiny-dir", str(tiny_root), "--precision", "bf16"])
    info = bf16.load_blip_adapter("tiny-demo")
    photo = Image.open(ROOT / "assets" / "examples" / "chelsea.png").convert("RGB")
    result = bf16.captioner().caption(photo, CaptionRequest(strategy="greedy"), adapter=info.name)
    assert result.adapter == info.name and math.isfinite(result.captions[0].score)
    int8 = build_studio(["--tiny", "--tiny-dir", str(tiny_root), "--precision", "vision-bf16-int8"])
    with pytest.raises(ValueError, match="restart with --precision bf16 or fp32 to use adapters"):
        int8.load_blip_adapter("tiny-demo")


# --- through the API -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_app_url(tiny_root, tmp_path_factory):
    """`python app.py --tiny --precision bf16` on a loopback port (works on any CPU: explicit bf16 is honoured)."""
    log_path = tmp_path_factory.mktemp("app-bf16") / "app.log"
    with tiny_app(tiny_root, log_path, "--precision", "bf16", "--no-train") as (_, url):
        yield url


@pytest.mark.api
@pytest.mark.slow  # starts an app of its own
def test_api_reports_bf16_in_system_and_caption(bf16_app_url):
    from gradio_client import Client, handle_file

    client = Client(bf16_app_url, verbose=False)
    device, *_, details = client.predict(api_name="/system")
    assert details["blip_precision"]["variant"] == "bf16"
    assert details["blip_precision"]["max_logit_deviation"] == settings.MAX_BLIP_LOGIT_DEVIATION
    assert "BLIP precision: bf16" in device
    table, summary, caption = client.predict(
        handle_file(str(ROOT / "assets" / "examples" / "chelsea.png")),
        strategy="sampling",
        num_captions=2,
        seed=3,
        api_name="/caption",
    )
    assert caption["precision"]["variant"] == "bf16"
    assert "logit deviation from fp32" in caption["precision"]["label"]
    assert len(caption["captions"]) == 2 and all(math.isfinite(c["score"]) for c in caption["captions"])
    assert "bf16" in summary


@pytest.mark.api
def test_api_reports_fp32_under_tiny_auto(tiny_client):
    details = tiny_client.predict(api_name="/system")[-1]
    assert details["blip_precision"]["variant"] == "fp32"
    assert "tiny" in details["blip_precision"]["reason"]
