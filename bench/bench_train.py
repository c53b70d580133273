"""One LoRA training step on real-size architectures: with gradient checkpointing against without; and the
Studio's whole training step against a bare loop.

    python -m bench.bench_train            # CPU: SD3.5 Large/Medium width, 2 blocks each, 256 px; BLIP base whole
    python -m bench.bench_train --full     # CUDA: every block, 1024 px, bf16 (the README's H200 figures)
    python -m bench.bench_train --studio-loop   # only the Studio's step against a bare loop (tiny SD3, seconds)

Each step is the trainers' own: the MMDiT frozen in the training dtype with a
rank-16 LoRA (fp32) on the layers ``pipelines.training.train_sd3_lora`` targets by
default, the flow-matching loss of ``pipelines.training.flow_matching``, backward and an
AdamW update, batch 1 with 77 + 256 text tokens; BLIP base with the default
``pipelines.training.train_blip_lora`` LoRA and ``decoder_loss`` on precomputed image
features (batch 8, 20-token captions). Weights are random (compute does not
depend on their values). Per row: median seconds per step, peak GPU memory on
CUDA, and checkpointing's cost as a ratio to the step without it.

The Studio-loop row runs ``pipelines.training.train_sd3_lora.train`` itself (DataLoader
under ``accelerator.prepare``, ``accelerator.accumulate``, diffusers' schedule,
the loss reduced across processes, a log line per step) on the tiny SD3 Large at
64 px, against a bare loop of the same transformer, LoRA, precomputed batches,
loss, clipping and AdamW: on a model this small the loop's own cost weighs the
most, so the ratio bounds what the library pieces add.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from bench.bench_lora import real_width_transformer
from bench.common import machine_description, real_size_blip_captioner, write_results


def _timed_steps(step, repeats: int, cuda: bool) -> tuple[float, float | None]:
    """Median seconds of ``step()`` after one warm-up, and the peak GPU GiB (None on the CPU)."""
    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return statistics.median(times), peak


def _sd3_step_seconds(model_key, checkpointing, blocks, side, repeats, device, dtype) -> tuple[float, float | None]:
    """(median s/step, peak GiB) of the SD3 trainer's step on a fresh real-width MMDiT."""
    from peft import LoraConfig

    from pipelines.training.flow_matching import flow_matching_loss
    from pipelines.training.train_sd3_lora import SD3LoraTrainingConfig

    cuda = device.type == "cuda"
    target_modules = SD3LoraTrainingConfig(dataset="", output_dir="").target_modules
    transformer = real_width_transformer(blocks, device, dtype, model_key=model_key)
    transformer.add_adapter(
        LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=target_modules)
    )
    trainable = [parameter for parameter in transformer.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()  # the trainer keeps the LoRA matrices in fp32
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    latents_shape = (1, config.in_channels, side // 8, side // 8)
    batch = {
        "latents": torch.randn(latents_shape, generator=generator).to(device, dtype),
        "prompt_embeds": torch.randn(1, 77 + 256, config.joint_attention_dim, generator=generator).to(device, dtype),
        "pooled_prompt_embeds": torch.randn(1, config.pooled_projection_dim, generator=generator).to(device, dtype),
    }
    noise = torch.randn(latents_shape, generator=generator).to(device, dtype)
    sigmas = torch.tensor([0.5])

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            loss = flow_matching_loss(transformer, batch, noise, sigmas * 1000, sigmas, "logit_normal")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed_steps(step, repeats, cuda)  # the model and optimiser go with this frame


def sd3_step_rows(model_key: str, blocks: int | None, side: int, repeats: int, device, dtype) -> list[dict]:
    measured = {}
    for checkpointing in (False, True):
        measured[checkpointing] = _sd3_step_seconds(model_key, checkpointing, blocks, side, repeats, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous model is gone; start the next peak from a clean pool
    kept = blocks or "all"
    rows = []
    for checkpointing, (seconds, peak) in measured.items():
        rows.append(
            {
                "model": model_key,
                "what": f"SD3 LoRA training step, {kept} blocks, {side}², gradient checkpointing "
                + ("on" if checkpointing else "off"),
                "seconds_per_step": round(seconds, 4),
                "peak_gib": None if peak is None else round(peak, 2),
                "ratio_to_no_checkpointing": round(seconds / measured[False][0], 3),
            }
        )
        print(
            f"{model_key} ({kept} blocks, {side}²) checkpointing {'on ' if checkpointing else 'off'}: "
            f"{seconds:.3f} s/step"
            + (f", peak {peak:.1f} GiB" if peak is not None else "")
            + f", ratio {rows[-1]['ratio_to_no_checkpointing']:.2f}",
            flush=True,
        )
    return rows


def blip_step_row(repeats: int, device, dtype) -> dict:
    from pipelines.training.train_blip_lora import BlipLoraTrainingConfig, add_lora, decoder_loss

    cuda = device.type == "cuda"
    captioner = real_size_blip_captioner(dtype=dtype, device=str(device))
    peft_model = add_lora(captioner, BlipLoraTrainingConfig(dataset="", output_dir=""))
    for parameter in peft_model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch_size, tokens = 8, 20
    input_ids = torch.randint(1000, 30000, (batch_size, tokens), generator=generator).to(device)
    batch = {
        "features": torch.randn(batch_size, 577, 768, generator=generator).to(device, dtype),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
    }
    decoder = captioner.model.text_decoder

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            loss = decoder_loss(decoder, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = _timed_steps(step, repeats, cuda)
    print(
        f"blip-caption LoRA step, batch {batch_size}: {seconds:.3f} s/step"
        + (f", peak {peak:.2f} GiB" if peak is not None else ""),
        flush=True,
    )
    return {
        "model": "blip-caption",
        "what": f"BLIP caption LoRA training step, batch {batch_size}",
        "seconds_per_step": round(seconds, 4),
        "peak_gib": None if peak is None else round(peak, 2),
    }


def _write_examples(folder: Path) -> Path:
    import json

    examples = Path(__file__).resolve().parent.parent / "assets" / "examples"
    captions = {
        "astronaut.png": "an astronaut",
        "chelsea.png": "a cat",
        "coffee.png": "a cup",
        "rocket.jpg": "a rocket",
    }
    folder.mkdir(parents=True)
    for name in captions:
        shutil.copy(examples / name, folder / name)
    lines = [json.dumps({"file_name": name, "text": text}) for name, text in captions.items()]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _bare_loop_seconds(config, steps: int) -> float:
    """Median s/step of the plainest loop over the trainer's own pieces: no accelerate, no DataLoader."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from peft import LoraConfig

    from pipelines.training.dataset import read_dataset
    from pipelines.training.flow_matching import flow_matching_loss, sample_noise_levels
    from pipelines.training.sd3_data import precompute, stack_batch
    from pipelines.training.train_sd3_lora import model_fingerprint, resolve_model

    model = resolve_model(config)
    data = precompute(  # the trainer's run before filled the cache, so nothing is encoded here
        read_dataset(config.dataset),
        resolution=config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        trigger=config.trigger,
        extra_prompts=[],
        max_sequence_length=config.max_sequence_length,
        dtype=torch.float32,
        device=torch.device("cpu"),
        model_fingerprint=model_fingerprint(model),
        cache_dir=config.cache_dir,
        load_text_pipeline=lambda: StableDiffusion3Pipeline.from_pretrained(model.source, transformer=None, vae=None),
        get_vae=lambda: AutoencoderKL.from_pretrained(model.source, subfolder="vae"),
    )
    transformer = SD3Transformer2DModel.from_pretrained(model.source, subfolder="transformer")
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(
            r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian", target_modules=config.target_modules
        )
    )
    transformer.train()
    trainable = [parameter for parameter in transformer.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=1e-4)
    schedule = FlowMatchEulerDiscreteScheduler.from_pretrained(model.source, subfolder="scheduler")
    batches = [stack_batch([item], "cpu", torch.float32) for item in data.examples]
    times = []
    for index in range(steps + 1):
        started = time.perf_counter()
        batch = batches[index % len(batches)]
        noise = torch.randn(batch["latents"].shape)
        timesteps, sigmas = sample_noise_levels(config, schedule, 1, None)
        loss = flow_matching_loss(transformer, batch, noise, timesteps, sigmas, config.weighting_scheme)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # as the trainer reads the loss each step
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def studio_loop_row(steps: int, rounds: int = 3) -> dict:
    """The Studio's whole SD3 training step (see the module docstring) against a bare loop, tiny SD3 Large, CPU."""
    import tempfile

    from pipelines.tiny import ensure_tiny_models
    from pipelines.training.train_sd3_lora import SD3LoraTrainingConfig, train

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        config = SD3LoraTrainingConfig(
            dataset=_write_examples(root / "data"),
            output_dir=root / "warm",
            tiny="large",
            tiny_dir=ensure_tiny_models(None),
            resolution=64,
            rank=4,
            steps=steps,
            batch_size=1,
            checkpoint_every=0,
            log_every=1,
            device="cpu",
            cache_dir=root / "cache",
        )
        train(dataclasses.replace(config, steps=2), log=lambda line: None)  # fills the cache
        studio_runs, bare_runs = [], []
        for round_ in range(rounds):  # alternated, and the best round of each kept: a shared machine's noise
            stamps: list[float] = []
            run = dataclasses.replace(config, output_dir=root / f"run-{round_}")
            train(run, log=lambda line, stamps=stamps: stamps.append(time.perf_counter()))
            step_lines = stamps[1 : steps + 1]  # the first line says what trains; then one line per step
            studio_runs.append(statistics.median(b - a for a, b in zip(step_lines[1:], step_lines[2:], strict=False)))
            bare_runs.append(_bare_loop_seconds(config.validated(), steps))
        studio, bare = min(studio_runs), min(bare_runs)
    ratio = studio / bare
    print(
        f"sd35-large tiny, 64²: Studio step {studio * 1000:.1f} ms, bare loop {bare * 1000:.1f} ms, ratio {ratio:.2f}"
    )
    return {
        "model": "sd35-large (tiny)",
        "what": "the Studio's SD3 training step (DataLoader, accelerate, schedule, log) against a bare loop, 64²",
        "seconds_per_step": round(studio, 5),
        "bare_seconds_per_step": round(bare, 5),
        "ratio_to_bare_loop": round(ratio, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every block at 1024 px (a GPU's job)")
    parser.add_argument("--blocks", type=int, default=2, help="MMDiT blocks kept on the CPU (default 2)")
    parser.add_argument("--side", type=int, default=None, help="image side (default 256 on the CPU, 1024 with --full)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--studio-loop", action="store_true", help="only the Studio's step against a bare loop")
    parser.add_argument("--loop-steps", type=int, default=30, help="steps of the Studio-loop row (default 30)")
    args = parser.parse_args(argv)
    if args.studio_loop:
        print(machine_description(), flush=True)
        path = write_results(
            "train-loop", "tiny SD3 Large, 64x64, LoRA rank 4, CPU", [studio_loop_row(args.loop_steps)]
        )
        print(f"saved to {path}")
        return

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    blocks = None if args.full else args.blocks
    side = args.side or (1024 if args.full else 256)
    repeats = args.repeats or (10 if cuda else 3)
    print(f"{machine_description()}; {str(dtype).split('.')[-1]}, random weights", flush=True)
    rows = []
    for model_key in ("sd35-medium", "sd35-large"):
        rows += sd3_step_rows(model_key, blocks, side, repeats, device, dtype)
    rows.append(blip_step_row(repeats, device, dtype))
    if not cuda:
        rows.append(studio_loop_row(args.loop_steps))
    size = f"real-size widths ({'all' if blocks is None else blocks} MMDiT blocks), {side}x{side}, LoRA rank 16"
    path = write_results("train-" + ("cuda" if cuda else "cpu"), size, rows)
    if os.environ.get("OUT"):  # the GPU machine hands back what is under $OUT
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    print(f"saved to {path}")


if __name__ == "__main__":
    main()
