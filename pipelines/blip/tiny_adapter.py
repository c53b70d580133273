"""The tiny demo adapter: a BLIP LoRA of random weights, so ``--tiny`` shows adapters without a download."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from pipelines import settings
from pipelines.blip.adapter_files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    ATTENTION_MODULES,
    PEFT_PREFIX,
    text_decoder_targets,
)

TINY_ADAPTER_DIR = "blip-adapters"  # under the tiny root: the --tiny adapters folder
TINY_DEMO_ADAPTER = "tiny-demo"
TINY_DEMO_SCALE = 16.0  # how far the demo's random LoRA moves each layer: enough to change the tiny captions


def write_random_adapter(
    blip_config: dict,
    out_dir: Path,
    *,
    rank: int = 4,
    seed: int = 1,
    scale: float = 1.0,
    base_model: str = "",
) -> Path:
    """Write a LoRA adapter of random weights for the BLIP whose config.json is ``blip_config``.

    It targets every projection of the text decoder's self- and cross-attention,
    in the standard whole-model layout, with no model built: ``from_pretrained``
    changes process-wide state (the default dtype, patched init functions), so
    building a model while the app loads BLIP in another thread breaks that load.
    ``scale`` sets how far the LoRA moves each layer's output (for a unit input).
    """
    from safetensors.torch import save_file

    text = blip_config["text_config"]
    hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
    image_width = int(text.get("encoder_hidden_size") or blip_config["vision_config"]["hidden_size"])
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for kind, block in ATTENTION_MODULES.items():
            for projection in settings.BLIP_TRAIN_TARGET_PROJECTIONS:
                leaf = "output.dense" if projection == "dense" else f"self.{projection}"
                path = f"{PEFT_PREFIX}text_decoder.bert.encoder.layer.{layer}.{block}.{leaf}"
                width = image_width if kind == "cross" and projection in ("key", "value") else hidden
                lora_a = torch.randn(rank, width, generator=generator) * math.sqrt(scale / width)
                lora_b = torch.randn(hidden, rank, generator=generator) * math.sqrt(1.0 / rank)
                tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = lora_a, lora_b
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": text_decoder_targets(),
        "base_model_name_or_path": base_model,
    }
    (out_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def ensure_tiny_demo_adapter(adapter_dir: Path, blip_source: str | Path) -> Path:
    """``adapter_dir/tiny-demo``: a random LoRA for the tiny BLIP saved at ``blip_source``, built once.

    Built in a temporary folder and renamed into place, so a concurrent or
    interrupted build never leaves a half-written adapter behind.
    """
    adapter_dir = Path(adapter_dir)
    target = adapter_dir / TINY_DEMO_ADAPTER
    if (target / ADAPTER_CONFIG_FILE).is_file() and (target / ADAPTER_WEIGHTS_FILE).is_file():
        return target
    blip_config = json.loads((Path(blip_source) / "config.json").read_text())
    adapter_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_DEMO_ADAPTER}-", dir=adapter_dir))
    try:
        write_random_adapter(blip_config, staging, scale=TINY_DEMO_SCALE, base_model=str(blip_source))
        (staging / "README.md").write_text(
            "# tiny-demo\n\nA LoRA with random weights for the tiny offline BLIP (`--tiny`): it changes the "
            "gibberish captions, which is all it is for.\n"
        )
        try:
            staging.rename(target)
        except OSError:
            if not (target / ADAPTER_WEIGHTS_FILE).is_file():  # not another process's finished build
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
