"""What the SD3.5 LoRA trainer writes: the LoRA in diffusers format, checkpoint hooks, the model card."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pipelines.training.common import read_checkpoint_state, take_models, write_model_card
from pipelines.training.sd3_config import ModelSource, SD3LoraTrainingConfig, TrainingResult

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name: loading the folder finds it
TRAINING_ARGS_FILE = "training_args.json"
CARD_TAGS = ("text-to-image", "diffusers-training", "diffusers", "lora", "sd3", "sd3-diffusers", "template:sd-lora")


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


def save_adapter(transformer, folder: Path) -> Path:
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


def register_checkpoint_hooks(accelerator, transformer) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` save and load the LoRA alone, in diffusers format.

    As diffusers' DreamBooth LoRA scripts do: the hooks take the transformer out of accelerate's lists, so the
    frozen base weights (gigabytes) are neither written nor read; the main process writes
    ``pytorch_lora_weights.safetensors``, which is also a LoRA the Studio and ``load_lora_weights`` read.
    """
    unwrapped = accelerator.unwrap_model(transformer)

    def save_lora(models: list, weights: list, output_dir: str) -> None:
        take_models(models, weights)
        if accelerator.is_main_process:
            save_adapter(unwrapped, Path(output_dir))

    def load_lora(models: list, input_dir: str) -> None:
        take_models(models)
        load_adapter(unwrapped, Path(input_dir) / LORA_WEIGHTS_FILE)

    accelerator.register_save_state_pre_hook(save_lora)
    accelerator.register_load_state_pre_hook(load_lora)


def base_model_id(model: ModelSource) -> str:
    """The base model as the Hub names it: the catalog's repo id (also for a tiny stand-in or a local copy of a
    catalog model), else what ``--model`` gave."""
    return model.spec.repo_id


def write_outputs(config: SD3LoraTrainingConfig, model: ModelSource, result: TrainingResult) -> None:
    """training_args.json (every setting) and README.md, a ``ModelCard`` the Hub indexes (base model, tags,
    licence, instance prompt) that says what the LoRA is and how to load it."""
    from huggingface_hub import ModelCardData

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
    (folder / TRAINING_ARGS_FILE).write_text(json.dumps(arguments, indent=2, default=list) + "\n")
    widget = [
        {"text": config.validation_prompt, "output": {"url": path.relative_to(folder).as_posix()}}
        for path in result.validation_images[-1:]
    ]
    data = ModelCardData(
        base_model=base_model_id(model),
        library_name="diffusers",
        license="other",  # SD3.5's own licence has no Hub id of its own
        license_name=model.spec.licence,
        tags=list(CARD_TAGS),
        instance_prompt=config.trigger or None,
        widget=widget or None,
        pipeline_tag="text-to-image",
    )
    trigger = f"`{config.trigger}` (put it in your prompt)" if config.trigger else "none (captions as written)"
    body = [
        f"# {folder.name}: an SD3.5 LoRA",
        "",
        f"- Base model: {model.spec.title} (`{model.source}`){' - tiny random stand-in' if model.tiny else ''}",
        f"- Trigger words: {trigger}",
        f"- Trained {result.steps} steps on {result.train_images} images at {config.resolution} px "
        f"({'centre crop' if config.center_crop else 'aspect buckets'}), rank {config.rank}, "
        f"alpha {config.lora_alpha or config.rank}, learning rate {config.learning_rate:g} "
        f"({config.lr_scheduler}, {config.warmup_steps} warmup steps), layers {', '.join(config.target_modules)}",
        f"- Loss: SD3 flow matching, timesteps by {config.weighting_scheme}",
        "",
        f"Load `{LORA_WEIGHTS_FILE}` in the Studio's LoRA panel, or in diffusers:",
        "",
        "```python",
        f'pipeline.load_lora_weights("{folder}")',
        "```",
    ]
    write_model_card(folder, data, "\n".join(body))
