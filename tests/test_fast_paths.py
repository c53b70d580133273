"""The fast paths (pipelines/sd3/fast.py, pipelines/blip/gpu.py, the fp8 mode): same shapes, same
seeds, and a clean fallback with one sentence wherever a feature is missing (no CUDA, no fp8, no
torchao, no ``spaces``). One slow test really compiles the tiny MMDiT's blocks on the CPU."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch

from pipelines.runtime import choose_runtime
from pipelines.sd3.fast import (
    FastPathReport,
    choose_fast_path,
    compile_ahead_of_time,
    fast_call,
    on_zerogpu,
    prepare_for_lora,
    recompile_count,
)
from pipelines.sd3.loading import check_fp8, load_sd3_pipeline, pipeline_quantization

# Compiled and eager float32 add the same products in another order (Inductor fuses and reorders);
# 2 steps of the tiny model moved decoded pixels by 2.3e-6 here. 1e-4 of the [0, 1] range is far
# below one 8-bit level (3.9e-3) and far above that reordering.
COMPILED_PIXEL_ATOL = 1e-4


def draw(pipeline, *, seed: int = 0, side: int = 64, steps: int = 2) -> np.ndarray:
    with fast_call(pipeline):
        return pipeline(
            "a red cube",
            num_inference_steps=steps,
            height=side,
            width=side,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images


def tiny_pipeline(tiny_root, fast: str = "off", step_cache: float | None = None, model: str = "sd35-large"):
    runtime = choose_runtime("cpu")
    runtime = dataclasses.replace(runtime, fast_path=choose_fast_path(fast, "cpu", step_cache_threshold=step_cache))
    return load_sd3_pipeline(str(tiny_root / model), runtime, "bf16")


# ----------------------------------------------------------------------------- the decision


def test_auto_stays_eager_without_cuda_and_says_why():
    options = choose_fast_path("auto", "cpu")
    assert not options.enabled and "eager on cpu" in options.reason


def test_auto_turns_on_for_a_triton_gpu_and_off_for_an_old_one():
    assert choose_fast_path("auto", "cuda", capability=(9, 0), triton_available=True).enabled
    old = choose_fast_path("auto", "cuda", capability=(6, 1), triton_available=True)
    assert not old.enabled and "Triton does not compile" in old.reason
    assert not choose_fast_path("auto", "cuda", capability=(9, 0), triton_available=False).enabled


def test_off_and_on_are_honoured_and_bad_values_refused():
    assert not choose_fast_path("off", "cuda", capability=(9, 0), triton_available=True).enabled
    assert choose_fast_path("on", "cpu").enabled
    with pytest.raises(ValueError, match="use auto"):
        choose_fast_path("fastest", "cpu")
    with pytest.raises(ValueError, match="out of range"):
        choose_fast_path("auto", "cpu", step_cache_threshold=2.0)
    assert choose_fast_path("auto", "cpu", step_cache_threshold=0).step_cache_threshold is None  # 0 = off


def test_startup_flags_reach_the_runtime(tiny_root):
    from pipelines.startup import parse_args, studio_from_args

    assert parse_args(["--no-fast"]).fast == "off"
    assert parse_args([]).fast == "auto"
    studio = studio_from_args(parse_args(["--tiny", "--tiny-dir", str(tiny_root), "--step-cache", "0.1"]))
    options = studio.manager.runtime.fast_path
    assert not options.enabled and options.step_cache_threshold == 0.1
    with pytest.raises(SystemExit, match="out of range"):
        studio_from_args(parse_args(["--tiny", "--tiny-dir", str(tiny_root), "--step-cache", "3"]))


def test_help_lists_the_fast_path_flags(capsys):
    """``--help`` prints (a bare % in a help string used to make argparse raise TypeError)."""
    from pipelines.startup import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--no-fast" in text and "--step-cache" in text and "LOSSY" in text and "fp8" in text


# ----------------------------------------------------------------------------- eager fallback


def test_an_eager_pipeline_keeps_its_images_and_reports_no_compile(tiny_root):
    plain = load_sd3_pipeline(str(tiny_root / "sd35-large"), choose_runtime("cpu"), "bf16")
    auto = tiny_pipeline(tiny_root, "auto")
    assert auto.studio_fast_path.compiled == "no" and not auto.studio_fast_path.vae_channels_last
    first, second = draw(plain, seed=3), draw(auto, seed=3)
    assert first.shape == second.shape == (1, 64, 64, 3)
    assert np.array_equal(first, second)  # the same computation: nothing was changed
    assert not np.array_equal(first, draw(auto, seed=4))  # and the seed still matters


def test_qkv_fusion_is_skipped_on_sd35_with_a_sentence(tiny_root):
    """diffusers' fused SD3 processor leaves out SD3.5's QK RMS norms; the fast path must not fuse."""
    from pipelines.sd3.fast import fuse_qkv

    pipeline = tiny_pipeline(tiny_root)
    report = FastPathReport()
    fuse_qkv(pipeline.transformer, report)
    assert not report.fused_qkv and "QK RMS norms" in report.notes[0]


def test_diffusers_fused_sd3_attention_still_changes_sd35_outputs(tiny_root):
    """Why the fusion is skipped: if this starts failing, diffusers fixed it and fusion can come back."""
    pipeline = tiny_pipeline(tiny_root)
    before = draw(pipeline)
    pipeline.transformer.fuse_qkv_projections()
    assert np.abs(draw(pipeline) - before).max() > 1e-3


def test_a_lora_attaching_unfuses_qkv_and_refuses_after_ahead_of_time_compilation(tiny_root):
    pipeline = tiny_pipeline(tiny_root)
    processors = {type(p) for p in pipeline.transformer.attn_processors.values()}
    pipeline.transformer.fuse_qkv_projections()
    pipeline.studio_fast_path.fused_qkv = True
    prepare_for_lora(pipeline)
    assert {type(p) for p in pipeline.transformer.attn_processors.values()} == processors
    assert "unfused" in pipeline.studio_fast_path.notes[-1]
    pipeline.studio_fast_path.compiled = "ahead-of-time (ZeroGPU)"
    with pytest.raises(ValueError, match="--fast off"):
        prepare_for_lora(pipeline)


# ----------------------------------------------------------------------------- compiled


def test_forced_fast_path_compiles_each_block_lazily_with_room_for_lora_graphs(tiny_root, tmp_path):
    from pipelines import settings

    runtime = dataclasses.replace(
        choose_runtime("cpu"), fast_path=dataclasses.replace(choose_fast_path("on", "cpu"), cache_dir=tmp_path)
    )
    pipeline = load_sd3_pipeline(str(tiny_root / "sd35-large"), runtime, "bf16")
    report = pipeline.studio_fast_path
    assert report.compiled == "per-block torch.compile" and report.compiled_blocks == 2
    assert all(block._compiled_call_impl is not None for block in pipeline.transformer.transformer_blocks)
    assert torch._dynamo.config.recompile_limit >= settings.FAST_PATH_RECOMPILE_LIMIT
    assert report.cache_dir == str(tmp_path) and not report.loaded_cache_artifacts  # an empty folder
    sequential = tiny_pipeline(tiny_root)
    from pipelines.sd3.fast import apply_fast_path

    skipped = apply_fast_path(sequential, choose_fast_path("on", "cpu"), offload="sequential")
    assert skipped.compiled == "no" and "sequential offload" in skipped.notes[-1]


@pytest.mark.slow
def test_compiled_blocks_match_eager_keep_seeds_and_do_not_recompile_across_sizes(tiny_root, tmp_path):
    """Really compiles the tiny MMDiT's blocks with Inductor on the CPU (about a minute here)."""
    eager = tiny_pipeline(tiny_root)
    runtime = dataclasses.replace(
        choose_runtime("cpu"), fast_path=dataclasses.replace(choose_fast_path("on", "cpu"), cache_dir=tmp_path)
    )
    fast = load_sd3_pipeline(str(tiny_root / "sd35-large"), runtime, "bf16")
    report = fast.studio_fast_path
    assert report.compiled in ("per-block torch.compile", "compile_repeated_blocks") and report.compiled_blocks == 2
    assert report.vae_channels_last
    compiled = draw(fast, seed=5)
    np.testing.assert_allclose(compiled, draw(eager, seed=5), rtol=0, atol=COMPILED_PIXEL_ATOL)
    assert report.saved_cache_artifacts and (tmp_path / "sd3-fast-mega-cache.bin").stat().st_size > 0
    assert np.array_equal(draw(fast, seed=5), compiled)  # the same seed, the same image
    assert not np.array_equal(draw(fast, seed=6), compiled)
    graphs = recompile_count()
    for side in (80, 96, 112, 128, 160):  # five sizes the UI allows: one dynamic graph serves them all
        assert draw(fast, side=side).shape == (1, side, side, 3)
    assert recompile_count() == graphs


# ----------------------------------------------------------------------------- step cache (lossy)


def test_step_cache_is_lossy_resets_per_call_and_keeps_seeds(tiny_root):
    """Tiny Medium (10 blocks); tiny Large's 2 blocks leave nothing to cache between, which it says."""
    assert "too few blocks" in tiny_pipeline(tiny_root, step_cache=0.5).studio_fast_path.notes[0]
    exact = draw(tiny_pipeline(tiny_root, model="sd35-medium"), steps=6)
    cached_pipeline = tiny_pipeline(tiny_root, step_cache=0.5, model="sd35-medium")
    assert cached_pipeline.studio_fast_path.step_cache_threshold == 0.5
    assert "lossy" in cached_pipeline.studio_fast_path.notes[0]
    cached = draw(cached_pipeline, steps=6)
    assert cached.shape == exact.shape
    assert not np.array_equal(cached, exact)  # steps were skipped: a different image
    assert np.array_equal(draw(cached_pipeline, steps=6), cached)  # fresh state per call: reproducible
    # Medium's preset adds skip-layer guidance, a second forward per step with its own cache state.
    with fast_call(cached_pipeline):
        guided = cached_pipeline(
            "a red cube",
            num_inference_steps=6,
            height=64,
            width=64,
            skip_guidance_layers=[7, 8, 9],
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
    assert guided.shape == exact.shape and np.isfinite(guided).all()


# ----------------------------------------------------------------------------- fp8


def test_fp8_is_refused_with_a_sentence_without_cuda_capability_or_torchao(tiny_root):
    cpu = choose_runtime("cpu")
    with pytest.raises(ValueError, match="needs a CUDA GPU of compute capability 8.9"):
        load_sd3_pipeline(str(tiny_root / "sd35-large"), cpu, "fp8")
    gpu = dataclasses.replace(cpu, device=torch.device("cuda", 0))  # not used: only its type is read
    with pytest.raises(ValueError, match="this GPU has 8.6"):
        check_fp8(gpu, capability=(8, 6), has_torchao=True)
    with pytest.raises(ValueError, match="torchao, which is not installed"):
        check_fp8(gpu, capability=(9, 0), has_torchao=False)
    check_fp8(gpu, capability=(8, 9), has_torchao=True)  # Ada and newer with torchao: allowed


def test_fp8_mode_is_planned_between_bf16_and_nf4_and_never_chosen_automatically():
    from pipelines.memory import SD3_MODES, auto_choice, plan

    peaks = {mode: plan("sd35-large", mode).weight_bytes for mode in ("bf16", "fp8", "nf4")}
    assert peaks["nf4"] < peaks["fp8"] < peaks["bf16"]
    assert SD3_MODES[-1].key == "fp8"
    assert auto_choice("sd35-large", 80 * 1024**3)[0] == "bf16"


def test_fp8_config_is_torchao_row_wise_or_a_sentence_without_torchao():
    from pipelines.memory import get_mode

    mode = get_mode("sd35-large", "fp8")
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install torchao"):
            pipeline_quantization(mode, torch.bfloat16)
        return
    import diffusers

    config = pipeline_quantization(mode, torch.bfloat16).quant_mapping["transformer"]
    assert isinstance(config, diffusers.TorchAoConfig)
    assert type(config.quant_type).__name__ == "Float8DynamicActivationFloat8WeightConfig"


# ----------------------------------------------------------------------------- ZeroGPU


def test_zerogpu_needs_the_flag_and_the_spaces_package(monkeypatch):
    import importlib.util

    assert not on_zerogpu({})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not on_zerogpu({"SPACES_ZERO_GPU": "true"})


def _spaces_module():
    """The real ``spaces`` AoT helpers where they import, else a stand-in with their capture semantics
    (the patched forward raises out of the pipeline and keeps the call; compile returns the exported
    module; apply swaps the forward). spaces 0.51's AoT module imports only with a CUDA build of torch
    (it reads ``torch.version.cuda``), so on a CPU machine the stand-in runs."""
    try:
        import spaces
        import spaces.zero.torch.aoti  # noqa: F401

        return spaces
    except Exception:  # ImportError, or AttributeError from a CPU-only torch
        pass
    import contextlib
    from unittest import mock

    @contextlib.contextmanager
    def aoti_capture(module, call_method="forward"):
        class Captured(Exception):
            pass

        captured = types.SimpleNamespace(args=(), kwargs={})

        def capture(*args, **kwargs):
            captured.args, captured.kwargs = args, kwargs
            raise Captured

        with mock.patch.object(module, call_method, new=capture), contextlib.suppress(Captured):
            yield captured

    return types.SimpleNamespace(
        aoti_capture=aoti_capture,
        aoti_compile=lambda exported: exported.module(),
        aoti_apply=lambda compiled, module, call_method="forward": setattr(module, call_method, compiled),
    )


def test_zerogpu_compiles_inside_spaces_gpu_and_falls_back_to_eager_with_a_sentence(tiny_root):
    from pipelines import settings
    from pipelines.sd3.fast import aot_on_zerogpu

    durations = []

    def gpu(duration):
        durations.append(duration)
        return lambda function: function

    def failing_capture(module, call_method="forward"):
        raise RuntimeError("no GPU worker here")

    spaces = types.SimpleNamespace(GPU=gpu, aoti_capture=failing_capture)
    pipeline = tiny_pipeline(tiny_root)
    before = draw(pipeline, seed=2)
    report = FastPathReport()
    aot_on_zerogpu(pipeline, report, spaces)
    assert durations == [settings.AOT_COMPILE_SECONDS]
    assert report.compiled == "no" and "runs eager" in report.notes[-1] and "no GPU worker here" in report.notes[-1]
    assert np.array_equal(draw(pipeline, seed=2), before)


@pytest.mark.slow
def test_ahead_of_time_path_exports_with_dynamic_sizes_and_keeps_the_images(tiny_root):
    eager = draw(tiny_pipeline(tiny_root), seed=7)
    pipeline = tiny_pipeline(tiny_root)
    example = {"prompt": "a red cube", "num_inference_steps": 1, "height": 64, "width": 64}
    report = compile_ahead_of_time(pipeline, example, _spaces_module())
    assert report.compiled == "ahead-of-time (ZeroGPU)"
    np.testing.assert_allclose(draw(pipeline, seed=7), eager, rtol=0, atol=COMPILED_PIXEL_ATOL)
    assert draw(pipeline, side=96).shape == (1, 96, 96, 3)  # another size: the export kept sizes dynamic


# ----------------------------------------------------------------------------- BLIP on a GPU


def test_blip_gpu_fast_path_reads_the_library_and_stays_eager_off_cuda(tiny_captioner):
    from pipelines.blip.gpu import apply_blip_gpu_fast_path, blip_gpu_support

    support = blip_gpu_support(tiny_captioner.model)
    assert support == {"sdpa": False, "static_cache": False}  # transformers 5.24: see pipelines/blip/gpu.py
    report = apply_blip_gpu_fast_path(tiny_captioner.model, "cpu")
    assert not report.vision_compiled and "CUDA GPUs only" in report.notes[0]
    assert getattr(tiny_captioner.model.vision_model, "_compiled_call_impl", None) is None


def test_caption_folder_takes_large_batches_on_a_gpu():
    from pipelines import settings
    from pipelines.blip.caption_folder import default_batch_size

    assert default_batch_size("cuda:0") == settings.GPU_CAPTION_BATCH_SIZE > default_batch_size("cpu")


def test_system_details_say_what_the_fast_path_did_and_label_the_step_cache_lossy(tiny_manager):
    from pipelines.sd3.fast import fast_path_details

    tiny_manager.get("sd35-large", variant="bf16")
    details = fast_path_details(tiny_manager)
    assert details["pipelines"]["sd35-large"]["compiled"] == "no" and "off" in details["label"]
    manager = types.SimpleNamespace(
        runtime=types.SimpleNamespace(fast_path=choose_fast_path("auto", "cpu", step_cache_threshold=0.05)),
        loaded_models=lambda: [],
    )
    assert "LOSSY" in fast_path_details(manager)["label"]
