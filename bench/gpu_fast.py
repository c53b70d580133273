"""The fast paths side by side with eager, in one run: ``python -m bench.gpu --fast`` (``--tiny`` on any CPU).

Rows (each with eager and fast seconds and their ratio; the file records machine, date, torch
version and model size):

- SD3.5 Large 1024², 28 steps; Large Turbo's preset (4 steps, no CFG) on Large's architecture;
  Medium, 40 steps: eager bf16 against the fast path (``pipelines/sd3/fast.py``), medians of
  ``--repeats`` draws after a warm-up that compiles;
- fp8 (torchao, compute capability ≥ 8.9) with the fast path, against eager bf16, with peak memory
  beside the planner's estimate; on a machine that cannot run it, the row says why;
- the step cache (First Block Cache, lossy): relative L2 deviation of the latents from the uncached
  run at every step, and of the decoded image;
- recompiles across 5 sizes, and seconds of the first draw at each;
- cold and warm start: a fresh process compiles with an empty cache folder, a second one with the
  folder the first filled (``torch.compiler`` mega-cache + Inductor's cache);
- LoRA switching on the compiled transformer: adapters set, switched and fused, with the recompiles
  each step causes;
- BLIP greedy batch 1 and beam 3 batch 32, eager against the compiled vision encoder.

Real-size models carry random weights (compute does not depend on their values; no Hub is needed),
so perceptual quality is not measured here. ``--tiny`` runs every row on the tiny models on the CPU
(compiling with Inductor's C++ backend): a preflight of this script, not a speed figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, write_results
from pipelines.catalog import CATALOG
from pipelines.runtime import Runtime, choose_runtime
from pipelines.sd3.fast import apply_fast_path, choose_fast_path, fast_call, recompile_count

PROMPT = "a capybara holding a sign that reads Hello World, photograph"
REAL_SIZES = (768, 896, 1024, 1152, 1280)  # five sizes the UI allows (multiples of 16)
TINY_SIZES = (64, 80, 96, 112, 128)


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def build_sd3(model_key: str, runtime: Runtime, tiny_root: Path | None):
    """A real-size random-weight pipeline on the runtime's device, or the tiny one loaded eager."""
    if tiny_root is None:
        from bench.common import real_size_sd3

        return real_size_sd3(model_key, runtime.device, runtime.dtype)
    from pipelines.sd3.loading import load_sd3_pipeline

    return load_sd3_pipeline(str(tiny_root / CATALOG[model_key].tiny_dir), runtime, "bf16")


def call_for(preset_key: str, side: int, steps: int | None = None) -> dict:
    preset = CATALOG[preset_key].image_preset
    call = {
        "prompt": PROMPT,
        "height": side,
        "width": side,
        "guidance_scale": preset.guidance,
        "num_inference_steps": preset.steps if steps is None else steps,
    }
    if preset.skip_layer_guidance_layers:
        call["skip_guidance_layers"] = list(preset.skip_layer_guidance_layers)
    return call


def draw(pipeline, call: dict, *, seed: int = 1, **extra):
    with fast_call(pipeline):
        return pipeline(**call, generator=torch.Generator().manual_seed(seed), **extra)


def timed(function) -> float:
    cuda_sync()
    started = time.perf_counter()
    function()
    cuda_sync()
    return time.perf_counter() - started


def median_seconds(pipeline, call: dict, repeats: int) -> float:
    return statistics.median(timed(lambda: draw(pipeline, call)) for _ in range(repeats))


def side_by_side(name: str, eager: float | None, fast: float, **fields) -> dict:
    """One row: eager and fast seconds and their ratio (None without an eager run in this process)."""
    ratio = fast / eager if eager else None
    row = {"row": name, "eager_seconds": eager, "fast_seconds": fast, "fast_over_eager": ratio, **fields}
    eager_text = "-" if eager is None else f"{eager:8.3f}"
    ratio_text = "-" if ratio is None else f"{ratio:5.2f}x"
    print(f"  {name:<34} eager {eager_text:>8} s   fast {fast:8.3f} s   fast/eager {ratio_text}")
    return row


# --- SD3.5 ---------------------------------------------------------------------------------


def latents_per_step(pipeline, call: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The latents after every step, and the decoded image, of one seeded draw."""
    steps: list[torch.Tensor] = []

    def keep(pipe, step, timestep, tensors):
        steps.append(tensors["latents"].float().cpu().clone())
        return {}

    image = draw(pipeline, call, callback_on_step_end=keep, output_type="pt").images
    return steps, image.float().cpu()


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def step_cache_row(pipeline, preset_key: str, side: int, threshold: float) -> dict:
    """Per-step latent deviation of First Block Cache from the uncached draw (same seed), and its time."""
    from diffusers.hooks import HookRegistry

    from pipelines.sd3.fast import FastPathReport, enable_step_cache

    call = call_for(preset_key, side)
    exact_steps, exact_image = latents_per_step(pipeline, call)
    exact_seconds = timed(lambda: draw(pipeline, call))
    report = FastPathReport()
    previous = getattr(pipeline, "studio_fast_path", None)
    enable_step_cache(pipeline.transformer, threshold, report)
    pipeline.studio_fast_path = report
    try:
        if report.step_cache_threshold is None:
            return {"row": "step cache", "model": preset_key, "skipped": report.notes[-1]}
        cached_steps, cached_image = latents_per_step(pipeline, call)
        cached_seconds = timed(lambda: draw(pipeline, call))
    finally:  # take the hooks off again: the rows after this one measure the uncached model
        for block in pipeline.transformer.transformer_blocks:
            registry = HookRegistry.check_if_exists_or_initialize(block)
            for name in ("fbc_leader_block_hook", "fbc_block_hook"):
                registry.remove_hook(name, recurse=False)
        pipeline.studio_fast_path = previous
    deviations = [relative_l2(cached, exact) for cached, exact in zip(cached_steps, exact_steps, strict=True)]
    row = side_by_side(
        f"step cache {threshold:g} ({preset_key})",
        exact_seconds,
        cached_seconds,
        model=preset_key,
        threshold=threshold,
        lossy=True,
        latent_relative_l2_per_step=deviations,
        image_relative_l2=relative_l2(cached_image, exact_image),
        steps=call["num_inference_steps"],
        size=f"{side}x{side}",
    )
    print(f"    per-step latent deviation: {', '.join(f'{value:.3g}' for value in deviations)}")
    return row


def recompile_rows(pipeline, preset_key: str, sizes: tuple[int, ...]) -> dict:
    """Seconds of the first draw at each size after the first, and the graphs compiled for them."""
    before = recompile_count()
    seconds = {}
    for side in sizes:
        seconds[f"{side}x{side}"] = timed(lambda side=side: draw(pipeline, call_for(preset_key, side, steps=2)))
    recompiles = recompile_count() - before
    print(
        f"  recompiles across {len(sizes)} sizes: {recompiles} ({', '.join(f'{k} {v:.2f} s' for k, v in seconds.items())})"
    )
    return {
        "row": "recompiles across sizes",
        "model": preset_key,
        "recompiles": recompiles,
        "first_draw_seconds": seconds,
    }


def lora_switch_row(pipeline, preset_key: str, side: int) -> dict:
    """Two rank-16 adapters on the compiled transformer: set, switch, fuse; seconds and recompiles of each."""
    from peft import LoraConfig

    call = call_for(preset_key, side)
    transformer = pipeline.transformer
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    steps = {}

    def step(name: str, action) -> None:
        before = recompile_count()
        seconds = timed(action)
        steps[name] = {"seconds": seconds, "recompiles": recompile_count() - before}
        print(f"    LoRA {name:<32} {seconds:7.3f} s, {steps[name]['recompiles']} recompiles")

    steady = median_seconds(pipeline, call, 2)
    for name in ("lora_a", "lora_b"):
        transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=targets, init_lora_weights=False), name)
    step("draw with adapter a (first)", lambda: (transformer.set_adapters(["lora_a"]), draw(pipeline, call)))
    step("draw with adapter a (again)", lambda: draw(pipeline, call))
    step("switch to b and draw", lambda: (transformer.set_adapters(["lora_b"]), draw(pipeline, call)))
    step("switch back to a and draw", lambda: (transformer.set_adapters(["lora_a"]), draw(pipeline, call)))
    step(
        "fuse a and draw",
        lambda: (pipeline.fuse_lora(components=["transformer"], adapter_names=["lora_a"]), draw(pipeline, call)),
    )
    step(
        "unfuse, fuse b and draw",
        lambda: (
            pipeline.unfuse_lora(components=["transformer"]),
            pipeline.fuse_lora(components=["transformer"], adapter_names=["lora_b"]),
            draw(pipeline, call),
        ),
    )
    step("draw fused b (again)", lambda: draw(pipeline, call))
    # Fused, then the peft layers dropped (diffusers' fuse_lora + unload_lora_weights): plain Linears
    # whose weights changed in place, so the graph compiled before any LoRA serves again.
    step(
        "fuse a, drop the adapters, draw",
        lambda: (
            pipeline.unfuse_lora(components=["transformer"]),
            pipeline.fuse_lora(components=["transformer"], adapter_names=["lora_a"]),
            pipeline.unload_lora_weights(),
            draw(pipeline, call),
        ),
    )
    return {"row": "LoRA switching (compiled)", "model": preset_key, "no_lora_seconds": steady, "steps": steps}


def sd3_model_rows(model_key: str, runtime: Runtime, side: int, repeats: int, tiny_root: Path | None, cache_dir: Path):
    """Eager, step cache, then the fast path on one pipeline (and Turbo's preset on Large's)."""
    presets = [model_key] + (["sd35-large-turbo"] if model_key == "sd35-large" else [])
    pipeline = build_sd3(model_key, runtime, tiny_root)
    rows = []
    # 1. Eager.
    eager = {}
    for key in presets:
        call = call_for(key, side)
        draw(pipeline, {**call, "num_inference_steps": 2})  # warm-up
        reset_peak()
        eager[key] = (median_seconds(pipeline, call, repeats), peak_gib())
    # 2. The step cache, on the eager model (Medium's 40 steps, or the model's own preset).
    rows += guarded("step cache", lambda: [step_cache_row(pipeline, model_key, side, 0.05)])
    # 3. The fast path, compiled on the first draw.
    options = dataclasses.replace(choose_fast_path("on", runtime.device), cache_dir=cache_dir)
    report = apply_fast_path(pipeline, options)
    first = timed(lambda: draw(pipeline, {**call_for(presets[0], side), "num_inference_steps": 2}))
    for key in presets:
        call = call_for(key, side)
        draw(pipeline, {**call, "num_inference_steps": 2})
        reset_peak()
        fast = median_seconds(pipeline, call, repeats)
        rows.append(
            side_by_side(
                f"{key} {side}², {call['num_inference_steps']} steps",
                eager[key][0],
                fast,
                model=key,
                mode="bf16",
                steps=call["num_inference_steps"],
                size=f"{side}x{side}",
                eager_peak_gib=eager[key][1],
                fast_peak_gib=peak_gib(),
                first_fast_draw_seconds_incl_compile=first if key == presets[0] else None,
                fast_path=report.as_dict(),
            )
        )
    # 4. Sizes and LoRAs on the compiled transformer.
    if model_key == "sd35-large":
        sizes = TINY_SIZES if tiny_root else REAL_SIZES
        rows += guarded("recompiles", lambda: [recompile_rows(pipeline, "sd35-large-turbo", sizes)])
        rows += guarded("LoRA switching", lambda: [lora_switch_row(pipeline, "sd35-large-turbo", side)])
    return rows, {key: value[0] for key, value in eager.items()}


def fp8_row(
    runtime: Runtime, side: int, repeats: int, tiny_root: Path | None, eager_seconds: float | None, scratch: Path
):
    """Large in fp8 with the fast path, against eager bf16; skipped with the loader's sentence where it cannot run."""
    from pipelines.memory import plan
    from pipelines.sd3.loading import check_fp8, load_sd3_pipeline

    try:
        check_fp8(runtime)
    except ValueError as error:
        print(f"  fp8: skipped: {error}")
        return {"row": "fp8 (sd35-large)", "model": "sd35-large", "mode": "fp8", "skipped": str(error)}
    if tiny_root is not None:
        folder = tiny_root / CATALOG["sd35-large"].tiny_dir
    else:
        folder = scratch / "sd35-large"
        pipeline = build_sd3("sd35-large", runtime, None)
        pipeline.save_pretrained(folder)
        del pipeline
        release()
    fast_runtime = dataclasses.replace(runtime, fast_path=choose_fast_path("on", runtime.device))
    pipeline = load_sd3_pipeline(str(folder), fast_runtime, "fp8")
    call = call_for("sd35-large", side)
    draw(pipeline, {**call, "num_inference_steps": 2})  # compiles
    reset_peak()
    seconds = median_seconds(pipeline, call, repeats)
    row = side_by_side(
        f"fp8 + fast, sd35-large {side}²",
        eager_seconds,  # the large group's eager bf16 median in this run (None when it did not run)
        seconds,
        model="sd35-large",
        mode="fp8",
        steps=call["num_inference_steps"],
        size=f"{side}x{side}",
        fast_peak_gib=peak_gib(),
        planner_peak_gib=plan("sd35-large", "fp8", side, side).peak_bytes / 2**30 if tiny_root is None else None,
    )
    del pipeline
    release()
    return row


# --- cold and warm start (separate processes) ----------------------------------------------------


def compile_probe(model_key: str, side: int, cache_dir: Path, tiny: bool) -> dict:
    """In this process: build, apply the fast path with ``cache_dir``, time the first 2-step draw."""
    runtime = choose_runtime("auto")
    tiny_root = None
    if tiny:
        from pipelines.tiny import ensure_tiny_models

        tiny_root = ensure_tiny_models()
    pipeline = build_sd3(model_key, runtime, tiny_root)
    options = dataclasses.replace(choose_fast_path("on", runtime.device), cache_dir=cache_dir)
    report = apply_fast_path(pipeline, options)
    call = {**call_for(model_key, side), "num_inference_steps": 2}
    first = timed(lambda: draw(pipeline, call))
    second = timed(lambda: draw(pipeline, call))
    return {
        "first_draw_seconds": first,
        "second_draw_seconds": second,
        "loaded_cache_artifacts": report.loaded_cache_artifacts,
    }


def cold_warm_rows(model_key: str, side: int, tiny: bool, scratch: Path) -> dict:
    cache_dir = scratch / "compile-cache"
    environment = {
        k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "STUDIO_COMPILE_CACHE_DIR")
    }
    results = {}
    for start in ("cold", "warm"):
        command = [sys.executable, "-m", "bench.gpu_fast", "--compile-probe", "--model", model_key, "--side", str(side)]
        command += ["--cache-dir", str(cache_dir)] + (["--tiny"] if tiny else [])
        finished = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
        lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
        if finished.returncode or not lines:
            results[start] = {"error": (finished.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        else:
            results[start] = json.loads(lines[-1])
        print(f"  {start} start ({model_key}): {results[start]}")
    row = {"row": "compile cache: cold vs warm start", "model": model_key, "size": f"{side}x{side}", **results}
    if "first_draw_seconds" in results.get("cold", {}) and "first_draw_seconds" in results.get("warm", {}):
        row["warm_over_cold"] = results["warm"]["first_draw_seconds"] / results["cold"]["first_draw_seconds"]
    return row


# --- BLIP -----------------------------------------------------------------------------------


def blip_rows(runtime: Runtime, tiny_root: Path | None, repeats: int) -> list[dict]:
    from PIL import Image

    from bench.common import real_size_blip_captioner
    from pipelines.blip.captioner import CaptionRequest
    from pipelines.blip.gpu import apply_blip_gpu_fast_path

    if tiny_root is not None:
        from pipelines.manager import ModelManager

        captioner = ModelManager(runtime, tiny_root=tiny_root).get("blip-caption")
    else:
        captioner = real_size_blip_captioner(dtype=runtime.dtype, device=str(runtime.device))
    image = Image.open(Path(__file__).resolve().parent.parent / "assets" / "examples" / "chelsea.png").convert("RGB")
    cases = (("greedy", 1), ("beam", 32))

    def seconds(strategy: str, batch: int) -> float:
        request = CaptionRequest(strategy=strategy, num_beams=3, min_new_tokens=20, max_new_tokens=20)
        captioner.caption_batch([image], request)  # warm-up (compiles)

        def once():
            captioner.feature_cache.clear()  # a caption service sees new images: time the ViT too
            captioner.caption_batch([image] * batch, request)

        return statistics.median(timed(once) for _ in range(repeats))

    eager = {case: seconds(*case) for case in cases}
    report = apply_blip_gpu_fast_path(captioner.model, runtime.device.type)
    rows = []
    for (strategy, batch), eager_seconds in eager.items():
        fast = seconds(strategy, batch)
        rows.append(
            side_by_side(
                f"blip {strategy}{' 3' if strategy == 'beam' else ''} batch {batch}",
                eager_seconds,
                fast,
                model="blip-caption",
                mode=runtime.dtype_name,
                strategy=strategy,
                batch=batch,
                eager_images_per_second=batch / eager_seconds,
                fast_images_per_second=batch / fast,
                fast_path=report.as_dict(),
            )
        )
    return rows


# --- the run ---------------------------------------------------------------------------------


GROUPS = ("large", "medium", "fp8", "cold-warm", "blip")  # --only: run some, e.g. one device call each


def run(*, tiny: bool, side: int | None, repeats: int, name: str | None, only: str | None = None) -> Path:
    runtime = choose_runtime("auto")
    tiny_root = None
    if tiny:
        from pipelines.tiny import ensure_tiny_models

        tiny_root = ensure_tiny_models()
    side = side or (64 if tiny else 1024)
    from pipelines.runtime import machine_description

    print(f"{machine_description()}, {runtime.description}; {'tiny' if tiny else 'real-size random-weight'} models")
    started = time.perf_counter()
    groups = set(GROUPS if not only else only.split(","))
    if groups - set(GROUPS):
        raise SystemExit(f"--only {only!r}: choose among {', '.join(GROUPS)}.")
    rows: list[dict] = []
    eager_large: dict = {}

    def large_and_medium(model_key: str, cache: Path) -> list[dict]:
        model_rows, eager = sd3_model_rows(model_key, runtime, side, repeats, tiny_root, cache)
        eager_large.update(eager)
        return model_rows

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_SCRATCH")) as scratch_name:
        scratch = Path(scratch_name)
        for model_key in [key for key in ("sd35-large", "sd35-medium") if key.removeprefix("sd35-") in groups]:
            rows += guarded(model_key, lambda key=model_key: large_and_medium(key, scratch / "cache"))
            release()  # the model's pipeline went out of scope with its function
        eager_seconds = eager_large.get("sd35-large")
        if "fp8" in groups:
            rows += guarded("fp8", lambda: [fp8_row(runtime, side, repeats, tiny_root, eager_seconds, scratch)])
        if "cold-warm" in groups:
            rows += guarded("cold/warm", lambda: [cold_warm_rows("sd35-large", side, tiny, scratch)])
    if "blip" in groups:
        rows += guarded("blip", lambda: blip_rows(runtime, tiny_root, repeats))
    release()
    size = "tiny" if tiny else "real-size random weights"
    if name is None:  # parts run with --only keep their own files
        name = "gpu-fast-" + ("tiny-" if tiny else "") + runtime.device.type
        name += "" if not only else "-" + "-".join(sorted(groups))
    path = write_results(name, size, rows)
    if os.environ.get("OUT"):
        import shutil

        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    print(f"{time.perf_counter() - started:.0f} s in all; saved to {path.relative_to(RESULTS_DIR.parent.parent)}")
    return path


def guarded(label: str, produce) -> list[dict]:
    """The rows ``produce`` returns; a failure becomes one row with its error, and the run goes on."""
    try:
        return produce()
    except Exception as error:
        print(f"  {label} failed: {type(error).__name__}: {error}", flush=True)
        release()
        return [{"row": label, "error": f"{type(error).__name__}: {error}"}]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--side", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default=None)
    parser.add_argument("--only", default=None, help=f"comma-separated groups of rows: {', '.join(GROUPS)}")
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="sd35-large", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_probe:
        side = args.side or (64 if args.tiny else 1024)
        with contextlib.redirect_stdout(sys.stderr):
            result = compile_probe(args.model, side, args.cache_dir, args.tiny)
        print(json.dumps(result))
        return
    run(tiny=args.tiny, side=args.side, repeats=args.repeats, name=args.name, only=args.only)


if __name__ == "__main__":
    main()
