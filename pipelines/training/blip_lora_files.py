"""What the BLIP LoRA trainer writes: the adapter folder peft and the Caption tab load, checkpoint hooks, the
model card."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipelines.blip.adapter_files import ADAPTER_WEIGHTS_FILE
from pipelines.catalog import CATALOG
from pipelines.training.blip_config import BlipLoraTrainingConfig, TrainingResult
from pipelines.training.common import read_checkpoint_state, take_models, write_model_card

ADAPTER_NAME = "default"  # peft's name for the adapter being trained
TRAINING_ARGS_FILE = "training_args.json"
CARD_TAGS = ("image-to-text", "image-captioning", "blip", "lora", "peft")


def adapter_settings(config: BlipLoraTrainingConfig, source: str) -> dict:
    return {"model": source, "rank": config.rank, "lora_alpha": config.alpha, "target_modules": config.target_modules}


def check_checkpoint(path: Path, config: BlipLoraTrainingConfig, source: str) -> dict:
    """The checkpoint's state; ValueError when it was trained with another model, rank or targets."""
    return read_checkpoint_state(path, adapter_settings(config, source))


def save_adapter(peft_model, folder: Path) -> None:
    """The adapter folder the Caption tab loads: adapter_config.json + adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder), safe_serialization=True)


def load_adapter_weights(peft_model, folder: Path) -> None:
    """Put a checkpoint's LoRA weights back into the adapter being trained."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(peft_model, load_file(str(folder / ADAPTER_WEIGHTS_FILE)), ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{folder} does not fit this adapter ({unexpected[0]} unexpected); train into a new folder.")


def register_checkpoint_hooks(accelerator, peft_model) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` save and load the adapter alone, as diffusers' LoRA
    scripts do: the frozen BLIP stays out of the checkpoint, which holds an adapter folder peft loads."""

    def save_lora(models: list, weights: list, output_dir: str) -> None:
        take_models(models, weights)
        if accelerator.is_main_process:
            save_adapter(peft_model, Path(output_dir))

    def load_lora(models: list, input_dir: str) -> None:
        take_models(models)
        load_adapter_weights(peft_model, Path(input_dir))

    accelerator.register_save_state_pre_hook(save_lora)
    accelerator.register_load_state_pre_hook(load_lora)


def base_model_id(config: BlipLoraTrainingConfig, source: str) -> str:
    """The base model as the Hub names it: the catalog's BLIP for ``blip-caption`` (its tiny stand-in or a
    local copy included), else what ``--model`` gave."""
    return CATALOG["blip-caption"].repo_id if config.tiny or config.model == "blip-caption" else config.model


def write_outputs(config: BlipLoraTrainingConfig, source: str, result: TrainingResult) -> None:
    """training_args.json (every setting and the outcome) and README.md, a ``ModelCard`` whose YAML front
    matter the Hub indexes (base model, tags, licence), saying what the adapter is and how to load it."""
    from huggingface_hub import ModelCardData

    folder = Path(config.output_dir)
    arguments = {
        key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(config).items()
    }
    final_validation = result.validation_losses.get(result.steps)
    first_validation = result.validation_losses.get(min(result.validation_losses, default=0))
    arguments.update(
        source=source,
        target_modules=config.target_modules,
        train_images=result.train_images,
        validation_images=result.validation_images,
        global_step=result.steps,
        final_train_loss=result.losses[-1] if result.losses else None,
        validation_losses={str(step): loss for step, loss in result.validation_losses.items()},
        unknown_token_rate=result.unknown_token_rate,
    )
    (folder / TRAINING_ARGS_FILE).write_text(json.dumps(arguments, indent=2, default=list) + "\n")
    held_out = (
        f"{result.validation_images} held-out images"
        if result.validation_images
        else "the first training images (no held-out split)"
    )
    losses = []
    if result.losses:
        losses.append(f"final training loss {result.losses[-1]:.4f}")
    if final_validation is not None and first_validation is not None:
        losses.append(f"validation loss {first_validation:.4f} → {final_validation:.4f} on {held_out}")
    data = ModelCardData(
        base_model=base_model_id(config, source),
        library_name="peft",
        license=CATALOG["blip-caption"].licence,
        tags=list(CARD_TAGS),
        pipeline_tag="image-to-text",
    )
    card = [
        f"# {folder.name}: a BLIP caption LoRA",
        "",
        f"- Base model: `{source}`{' (tiny random stand-in)' if config.tiny else ''}",
        f"- Dataset: {result.train_images} training images from `{config.dataset}`",
        f"- Trained {result.steps} steps: rank {config.rank}, alpha {config.alpha:g}, learning rate "
        f"{config.learning_rate:g} ({config.schedule}, {config.warmup_steps} warmup steps), batch {config.batch_size} "
        f"x {config.gradient_accumulation} accumulation",
        f"- LoRA on the text decoder: {', '.join(config.targets)} of {' and '.join(config.attention)}-attention",
        f"- Losses: {'; '.join(losses) or 'none recorded'}",
        "",
        "Load this folder in the Studio's Caption tab (Adapter), or with peft:",
        "",
        "```python",
        "from peft import PeftModel",
        f'model = PeftModel.from_pretrained(blip, "{folder}")',
        "```",
    ]
    write_model_card(folder, data, "\n".join(card))
