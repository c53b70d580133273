"""What the SD3.5 LoRA trainer writes: the LoRA in diffusers format, resumable checkpoints, the model card."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelines.training_common import STATE_FILE, read_checkpoint_state

if TYPE_CHECKING:
    from pipelines.train_sd3_lora import ModelSource, SD3LoraTrainingConfig, TrainingResult

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name: loading the folder finds it


def adapter_settings(config: SD3LoraTrainingConfig, model: ModelSource) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    return {
        "model": model.source,
        "rank": config.rank,
        "lora_alpha": config.lora_alpha or config.rank,
        "target_modules": config.target_modules,
    }


def check_checkpoint(path: Path, config: SD3LoraTrainingConfig, model: ModelSource) -> dict:
    """The checkpoint's state; ValueError when it was trained with another model, rank or layers."""
    return read_checkpoint_state(path, adapter_settings(config, model))


def save_adapter(transformer, folder: Path, config: SD3LoraTrainingConfig) -> Path:
    """The LoRA in diffusers format (``transformer.``-prefixed keys, peft config as metadata); returns the file."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    layers = {
        key: value.detach().to("cpu", torch.float32) for key, value in get_peft_model_state_dict(transformer).items()
    }
    metadata = transformer.peft_config["default"].to_dict()
    StableDiffusion3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=metadata,
        weight_name=LORA_WEIGHTS_FILE,
    )
    return folder / LORA_WEIGHTS_FILE


def load_adapter(transformer, file: Path) -> None:
    """Put a saved LoRA's weights back into the transformer's adapter (for resuming)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = {key.removeprefix("transformer."): value for key, value in load_file(file).items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{file} does not fit this adapter ({result.unexpected_keys[0]} unexpected); start afresh.")


def write_model_card(config: SD3LoraTrainingConfig, model: ModelSource, result: TrainingResult) -> None:
    """training_args.json (every setting) and README.md (what it is, its trigger words, how to load it)."""
    folder = Path(config.output_dir)
    arguments = {
        key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(config).items()
    }
    arguments.update(
        source=model.source,
        target_modules=config.target_modules,
        train_images=result.train_images,
        held_out_images=result.held_out_images,
        global_step=result.steps,
    )
    (folder / "training_args.json").write_text(json.dumps(arguments, indent=2, default=list) + "\n")
    trigger = f"`{config.trigger}` (put it in your prompt)" if config.trigger else "none (captions as written)"
    card = [
        f"# {folder.name}: an SD3.5 LoRA",
        "",
        f"- Base model: {model.spec.title} (`{model.source}`){' - tiny random stand-in' if model.tiny else ''}",
        f"- Trigger words: {trigger}",
        f"- Trained {result.steps} steps on {result.train_images} images at {config.resolution} px "
        f"({'centre crop' if config.center_crop else 'aspect buckets'}), rank {config.rank}, "
        f"alpha {config.lora_alpha or config.rank}, learning rate {config.learning_rate:g}, "
        f"layers {', '.join(config.target_modules)}",
        f"- Loss: SD3 flow matching, timesteps by {config.weighting_scheme}",
        "",
        f"Load `{LORA_WEIGHTS_FILE}` in the Studio's LoRA panel, or in diffusers:",
        "",
        "```python",
        f'pipeline.load_lora_weights("{folder}")',
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(card))


def save_checkpoint(accelerator, folder: Path, transformer, optimizer, scheduler, state: dict, generator) -> None:
    """Adapter, optimiser, LR schedule, position in the data and every process's noise generator."""
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    torch.save(generator.get_state(), folder / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(transformer), folder, state["config"])
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        public = {key: value for key, value in state.items() if key != "config"}
        (folder / STATE_FILE).write_text(json.dumps(public, indent=2) + "\n")  # last: marks it complete
    accelerator.wait_for_everyone()
