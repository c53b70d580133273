"""LoRA cost: the Studio's checked load against diffusers' bare load, and a denoising step with and without LoRA.

    python -m bench.bench_lora            # CPU: SD3.5 Large's real width (2432), 2 of its 38 blocks, 256 px
    python -m bench.bench_lora --full     # CUDA: all 38 blocks, 1024 px, bf16

The MMDiT is built from the real config (assets/model-configs) with random
weights; on the CPU only ``--blocks`` of its blocks, which keeps each block's
real shape (compute per block, and per LoRA layer, is the real one). The LoRA
is a diffusers-format file of rank ``--rank`` on every attention projection
(to_q/k/v, to_out.0 and the context stream's add_*_proj/to_add_out), the
layers the Studio's trainer targets.

Rows:
- ``load``: ``LoraLibrary.load`` (header check, key inspection, both hashes,
  base-model check, attach, layer count) vs ``pipeline.load_lora_weights``.
- ``step``: one transformer forward (a denoising step at batch 2, as with CFG)
  for the base model, the LoRA unfused (a LoRA branch per layer) and fused.
Interleaved medians; ratios are Studio / bare and LoRA / base.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import interleaved_medians, machine_description, write_results
from pipelines.catalog import CATALOG, MODEL_CONFIGS_DIR

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def real_width_transformer(blocks: int | None, device: torch.device, dtype: torch.dtype, model_key: str = "sd35-large"):
    """An MMDiT from ``model_key``'s real config with random weights, keeping ``blocks`` blocks (None: all)."""
    from diffusers import SD3Transformer2DModel

    folder = MODEL_CONFIGS_DIR / CATALOG[model_key].config_dir / "transformer"
    config = json.loads((folder / "config.json").read_text())
    if blocks is not None:
        config["num_layers"] = blocks
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = SD3Transformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return transformer.eval().requires_grad_(False)


def transformer_only_pipeline(transformer):
    """A StableDiffusion3Pipeline holding just the transformer: all LoRA loading needs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def write_lora_file(transformer, rank: int, path: Path) -> int:
    """A diffusers-format LoRA (``transformer.``-prefixed lora_A/lora_B) on every attention projection."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".attn.", 1)[-1] in ATTENTION_PROJECTIONS:
            down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=generator) * 0.01
            tensors[f"transformer.{name}.lora_A.weight"] = down.to(torch.bfloat16).contiguous()
            tensors[f"transformer.{name}.lora_B.weight"] = up.to(torch.bfloat16).contiguous()
    save_file(tensors, str(path))
    return len(tensors) // 2


def step_inputs(transformer, side: int, device, dtype) -> dict:
    config = transformer.config
    latent = side // 8
    generator = torch.Generator().manual_seed(2)

    def noise(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    return {
        "hidden_states": noise(2, config.in_channels, latent, latent),
        "encoder_hidden_states": noise(2, 77 + 256, config.joint_attention_dim),  # CLIP 77 + T5 256 tokens
        "pooled_projections": noise(2, config.pooled_projection_dim),
        "timestep": torch.tensor([500.0, 500.0], device=device),
        "return_dict": False,
    }


def _alternating(setups: dict, forward, repeats: int) -> dict[str, float]:
    """Median seconds of ``forward`` under each setup, the setups taking turns (setups themselves untimed)."""
    import statistics

    times: dict[str, list[float]] = {name: [] for name in setups}
    for index in range(repeats + 1):
        for name, setup in setups.items():
            setup()
            started = time.perf_counter()
            forward()
            if index:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="all 38 blocks at 1024 px (a GPU's job)")
    parser.add_argument("--blocks", type=int, default=2, help="blocks kept on the CPU (default 2)")
    parser.add_argument("--side", type=int, default=None, help="image side (default 256 on the CPU, 1024 with --full)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging

    from pipelines.lora.library import LoraLibrary
    from pipelines.lora.sources import resolve_lora_source

    diffusers_logging.set_verbosity_error()  # the bare load warns about the text encoders this pipeline lacks

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    blocks = None if args.full else args.blocks
    side = args.side or (1024 if args.full else 256)
    repeats = args.repeats or (10 if cuda else 5)
    transformer = real_width_transformer(blocks, device, dtype)
    pipeline = transformer_only_pipeline(transformer)
    kept = transformer.config.num_layers
    size = f"SD3.5 Large width, {kept} of 38 blocks, {side}x{side}, LoRA rank {args.rank}, {str(dtype).split('.')[-1]}"
    print(f"{machine_description()}; {size}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        lora_path = Path(scratch) / "bench_style.safetensors"
        layers = write_lora_file(transformer, args.rank, lora_path)
        library = LoraLibrary("sd35-large")

        # 1. Loading: the Studio's checked path against the bare diffusers call (each undone before the next).
        def studio_load():
            library.load(pipeline, resolve_lora_source(file=lora_path.name, lora_dir=scratch), name="bench_style")
            library.unload(pipeline)

        def bare_load():
            pipeline.load_lora_weights(str(lora_path), adapter_name="bench_style")
            pipeline.unload_lora_weights()

        load_times = interleaved_medians({"studio": studio_load, "bare": bare_load}, repeats=max(3, repeats // 2))
        rows.append(
            {
                "what": "load",
                "layers": layers,
                "studio_s": round(load_times["studio"], 4),
                "bare_s": round(load_times["bare"], 4),
                "ratio": round(load_times["studio"] / load_times["bare"], 3),
            }
        )
        print(
            f"load {layers} layers: Studio {load_times['studio']:.3f} s, bare load_lora_weights "
            f"{load_times['bare']:.3f} s, ratio {rows[-1]['ratio']:.2f}",
            flush=True,
        )

        # 2. A denoising step: base, LoRA unfused, LoRA fused (the fused copy is made once, outside the timing).
        inputs = step_inputs(transformer, side, device, dtype)

        def forward():
            with torch.inference_mode():
                transformer(**inputs)
            if cuda:
                torch.cuda.synchronize()

        library.load(pipeline, resolve_lora_source(file=lora_path.name, lora_dir=scratch), name="bench_style")
        selection = [("bench_style", 1.0)]
        # Base and unfused alternate step by step (switching adapters is not timed), so drift hits both.
        step = _alternating(
            {"base": lambda: library.apply(pipeline, []), "unfused": lambda: library.apply(pipeline, selection)},
            forward,
            repeats,
        )
        started = time.perf_counter()
        library.fuse(pipeline, selection)
        fuse_seconds = time.perf_counter() - started
        step["fused"] = _alternating({"fused": lambda: None}, forward, repeats)["fused"]
        started = time.perf_counter()
        library.unfuse(pipeline)
        unfuse_seconds = time.perf_counter() - started
        step["base again"] = _alternating({"base": lambda: library.apply(pipeline, [])}, forward, repeats)["base"]
        library.unload(pipeline)
        base = (step["base"] + step["base again"]) / 2
        for variant in ("unfused", "fused"):
            rows.append(
                {
                    "what": f"step, LoRA {variant}",
                    "lora_s": round(step[variant], 4),
                    "base_s": round(base, 4),
                    "ratio": round(step[variant] / base, 3),
                }
            )
            print(
                f"step, LoRA {variant}: {step[variant]:.3f} s vs base {base:.3f} s, ratio {rows[-1]['ratio']:.3f}",
                flush=True,
            )
        rows.append({"what": "fuse / unfuse", "fuse_s": round(fuse_seconds, 3), "unfuse_s": round(unfuse_seconds, 3)})
        print(f"fuse {fuse_seconds:.2f} s, unfuse (restore exact weights) {unfuse_seconds:.2f} s", flush=True)
    path = write_results("lora-" + ("cuda" if cuda else "cpu"), size, rows)
    if os.environ.get("OUT"):  # the GPU machine hands back what is under $OUT
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    print(f"saved to {path}")


if __name__ == "__main__":
    main()
