"""One LoRA training step on real-size architectures: with gradient checkpointing against without.

    python -m bench.bench_train            # CPU: SD3.5 Large/Medium width, 2 blocks each, 256 px; BLIP base whole
    python -m bench.bench_train --full     # CUDA: every block, 1024 px, bf16 (the README's H200 figures)

Each step is the trainers' own: the MMDiT frozen in the training dtype with a
rank-16 LoRA (fp32) on the layers ``pipelines.train_sd3_lora`` targets by
default, the flow-matching loss of ``pipelines.flow_matching``, backward and an
AdamW update, batch 1 with 77 + 256 text tokens; BLIP base with the default
``pipelines.train_blip_lora`` LoRA and ``decoder_loss`` on precomputed image
features (batch 8, 20-token captions). Weights are random (compute does not
depend on their values). Per row: median seconds per step, peak GPU memory on
CUDA, and checkpointing's cost as a ratio to the step without it.
"""

from __future__ import annotations

import argparse
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

    from pipelines.flow_matching import flow_matching_loss
    from pipelines.train_sd3_lora import SD3LoraTrainingConfig

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
    from pipelines.train_blip_lora import BlipLoraTrainingConfig, add_lora, decoder_loss

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every block at 1024 px (a GPU's job)")
    parser.add_argument("--blocks", type=int, default=2, help="MMDiT blocks kept on the CPU (default 2)")
    parser.add_argument("--side", type=int, default=None, help="image side (default 256 on the CPU, 1024 with --full)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

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
    size = f"real-size widths ({'all' if blocks is None else blocks} MMDiT blocks), {side}x{side}, LoRA rank 16"
    path = write_results("train-" + ("cuda" if cuda else "cpu"), size, rows)
    if os.environ.get("OUT"):  # the GPU machine hands back what is under $OUT
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    print(f"saved to {path}")


if __name__ == "__main__":
    main()
