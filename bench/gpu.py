"""GPU proof on real-size models with random weights: speed and peak memory per memory mode.

    python -m bench.gpu                 # on a CUDA machine; no Hub needed
    python -m bench.gpu --tiny          # the same script on the tiny models, on any machine (a preflight)
    python -m bench.gpu --fast          # the fast paths against eager instead (bench/gpu_fast.py)

Compute does not depend on weight values, so SD3.5 and BLIP are built from
their real config files (assets/model-configs) with random bf16 weights. For
the quantized and offloaded modes the random pipeline is saved once and loaded
back through the Studio's own loader (pipelines/sd3/loading.py), so those rows
exercise the same from_pretrained + BitsAndBytesConfig path users run.

Per row: seconds per image, median seconds per denoising step, peak GPU memory
(torch.cuda.max_memory_allocated) and the planner's estimate next to it.
Large Turbo has Large's architecture: its rows run the Large-shaped pipelines
with Turbo's preset (4 steps, no CFG). Results go to bench/results/gpu-*.json
(and $OUT when set) in the format the scoreboard reads.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, machine_description, real_size_sd3, write_results
from pipelines.catalog import CATALOG
from pipelines.runtime import Runtime

PROMPT = "a capybara holding a sign that reads Hello World, photograph"


def measure(pipeline, *, steps: int, guidance: float, side: int, skip_layers=None) -> dict:
    """Seconds per image, median seconds per step and peak memory for one 1-image generation."""
    cuda = torch.cuda.is_available()
    call = {"prompt": PROMPT, "height": side, "width": side, "guidance_scale": guidance}
    if skip_layers:
        call["skip_guidance_layers"] = list(skip_layers)
    pipeline(**call, num_inference_steps=2, generator=torch.Generator().manual_seed(0))  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []

    def on_step(pipe, step, timestep, tensors):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return {}

    started = time.perf_counter()
    pipeline(
        **call,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(1),
        callback_on_step_end=on_step,
    )
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - started
    step_times = [later - earlier for earlier, later in zip([started, *stamps], stamps, strict=False)][1:]
    return {
        "seconds_per_image": total,
        "seconds_per_step": statistics.median(step_times) if step_times else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "steps": steps,
        "size": f"{side}x{side}",
    }


def planner_gib(model_key: str, mode: str, side: int) -> float | None:
    from pipelines.memory import plan

    try:
        return plan(model_key, mode, side, side).peak_bytes / 2**30
    except ValueError:
        return None


def release() -> None:
    """Free what the caller has just dropped (``del``) before the next model is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sd3_rows(model_key: str, modes: list[str], side: int, runtime: Runtime, scratch: Path, tiny_root: Path | None):
    """Rows for ``model_key`` (and Turbo's preset on Large's architecture) in every mode."""
    from pipelines.sd3.loading import load_sd3_pipeline

    presets = [(model_key, CATALOG[model_key].image_preset)]
    if model_key == "sd35-large":
        presets.append(("sd35-large-turbo", CATALOG["sd35-large-turbo"].image_preset))
    if tiny_root is not None:
        folder = tiny_root / CATALOG[model_key].tiny_dir
    else:
        folder = scratch / model_key
        pipeline = real_size_sd3(model_key, runtime.device, runtime.dtype)
        pipeline.save_pretrained(folder)  # once, for the loader-path modes
        del pipeline
        release()
    rows = []
    for mode in modes:
        try:
            pipeline = load_sd3_pipeline(str(folder), runtime, mode)
        except ValueError as error:  # a mode this machine cannot run: say so, keep going
            rows.append({"model": model_key, "mode": mode, "skipped": str(error)})
            print(f"  {model_key:<17} {mode:<18} skipped: {error}")
            continue
        for key, preset in presets:
            result = measure(
                pipeline,
                steps=preset.steps,
                guidance=preset.guidance,
                side=side,
                skip_layers=preset.skip_layer_guidance_layers,
            )
            estimate = planner_gib(key, mode, side) if tiny_root is None else None
            rows.append({"model": key, "mode": mode, **result, "planner_peak_gib": estimate})
            peak = "-" if result["peak_gib"] is None else f"{result['peak_gib']:.1f}"
            plan_text = "-" if estimate is None else f"{estimate:.1f}"
            step = "-" if result["seconds_per_step"] is None else f"{result['seconds_per_step']:.3f}"
            print(
                f"  {key:<17} {mode:<18} {result['seconds_per_image']:8.2f} s/img {step:>7} s/step  peak {peak:>6} GiB  plan {plan_text:>6} GiB"
            )
        del pipeline
        release()
    shutil.rmtree(scratch / model_key, ignore_errors=True)
    return rows


def blip_rows(runtime: Runtime, tiny_root: Path | None) -> list[dict]:
    from PIL import Image

    from bench.common import real_size_blip_captioner
    from pipelines.blip.captioner import CaptionRequest

    if tiny_root is not None:
        from pipelines.manager import ModelManager

        captioner = ModelManager(runtime, tiny_root=tiny_root).get("blip-caption")
    else:
        captioner = real_size_blip_captioner(dtype=runtime.dtype, device=str(runtime.device))
    image = Image.open(Path(__file__).resolve().parent.parent / "assets" / "examples" / "chelsea.png").convert("RGB")
    rows = []
    for strategy, batch in (("greedy", 1), ("beam", 1), ("beam", 32)):
        request = CaptionRequest(strategy=strategy, num_beams=3, min_new_tokens=20, max_new_tokens=20)
        images = [image] * batch
        captioner.caption_batch(images[:1], request)  # warm-up
        captioner.feature_cache.clear()  # time the ViT too: a caption service sees new images
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        captioner.caption_batch(images, request)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        row = {
            "model": "blip-caption",
            "mode": str(runtime.dtype).removeprefix("torch."),
            "strategy": strategy,
            "batch": batch,
            "seconds": seconds,
            "images_per_second": batch / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }
        rows.append(row)
        print(f"  blip-caption {strategy:<6} batch {batch:>2}: {seconds:6.3f} s, {batch / seconds:6.1f} img/s")
    del captioner
    release()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="run on the tiny models (CPU preflight)")
    parser.add_argument("--side", type=int, default=None, help="image side (default 1024, tiny 128)")
    parser.add_argument("--models", default="sd35-large,sd35-medium")
    parser.add_argument("--modes", default="bf16,nf4-t5nf4,bf16-offload")
    parser.add_argument("--name", default=None, help="results file name (default gpu-cuda, or gpu-tiny-cpu)")
    parser.add_argument("--fast", action="store_true", help="the fast paths against eager (bench/gpu_fast.py)")
    parser.add_argument("--repeats", type=int, default=3, help="--fast: draws per median")
    parser.add_argument("--only", default=None, help="--fast: some groups (large, medium, fp8, cold-warm, blip)")
    args = parser.parse_args(argv)
    if args.fast:  # its own rows and file (gpu-fast-*.json): the memory-mode rows above stay as measured
        from bench.gpu_fast import run

        run(tiny=args.tiny, side=args.side, repeats=args.repeats, name=args.name, only=args.only)
        return

    from pipelines.runtime import choose_runtime

    runtime = choose_runtime("auto")
    tiny_root = None
    if args.tiny:
        from pipelines.tiny import ensure_tiny_models

        tiny_root = ensure_tiny_models()
    side = args.side or (128 if args.tiny else 1024)
    print(
        f"{machine_description()}, {runtime.description}; {'tiny' if args.tiny else 'real-size random-weight'} models, {side}x{side}"
    )
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_SCRATCH")) as scratch:
        for model_key in filter(None, args.models.split(",")):  # --models "" measures BLIP alone
            rows += sd3_rows(model_key, args.modes.split(","), side, runtime, Path(scratch), tiny_root)
    try:
        rows += blip_rows(runtime, tiny_root)
    except Exception as error:  # keep the SD3 rows whatever happens here
        # The exception goes to the console; the results file keeps one sentence the Scoreboard can show.
        print(f"  blip-caption failed: {type(error).__name__}: {error}", flush=True)
        reason = "the BLIP pass of bench/gpu.py failed before timing anything; its console output has the error"
        rows.append({"model": "blip-caption", "not_measured": reason})
    size = "tiny" if args.tiny else "real-size random weights"
    name = args.name or "gpu-" + ("tiny-" if args.tiny else "") + ("cuda" if torch.cuda.is_available() else "cpu")
    path = write_results(name, size, rows)
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    print(f"{time.perf_counter() - started:.0f} s in all; saved to {path.relative_to(RESULTS_DIR.parent.parent)}")


if __name__ == "__main__":
    main()
