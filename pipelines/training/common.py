"""What both LoRA trainers share: device and precision checks, accelerate's state, resumable checkpoints,
learning-rate schedules, the epoch loop over a prepared ``DataLoader``, and model cards.

``pipelines.training.train_blip_lora`` and ``pipelines.training.train_sd3_lora`` write checkpoints
the same way, through ``accelerator.save_state``: ``OUT/checkpoint-N/`` holds
the LoRA weights only (each trainer's save hook writes them in its own
loadable format, and drops the frozen base model from the state),
``optimizer.bin``, ``custom_checkpoint_0.pkl`` (the LR schedule),
``random_states_<process>.pkl`` (every process's Python, NumPy, torch and CUDA
generators) and, written last, ``training_state.json``: a folder without it (a
run killed mid-save) is never resumed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"  # written last: a checkpoint without it is incomplete and ignored
DEVICES = ("auto", "cpu", "cuda")


def check_device(device: str, mixed_precision: str, precisions: tuple[str, ...]) -> bool:
    """Whether training runs on CUDA; ValueError for a device or precision this machine cannot give."""
    if mixed_precision not in precisions:
        raise ValueError(f"mixed precision {mixed_precision!r} unknown; choose one of: {', '.join(precisions)}.")
    if device not in DEVICES:
        raise ValueError(f"device {device!r} unknown; use auto, cpu or cuda (pick GPUs with accelerate).")
    cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ValueError("device cuda was asked for, but this machine has no CUDA GPU; use --device cpu.")
    if mixed_precision in ("bf16", "fp16") and not cuda:
        raise ValueError(
            f"{mixed_precision} mixed precision needs a CUDA GPU (the CPU trains in fp32); "
            "use --mixed-precision no or auto."
        )
    return cuda


def resolve_mixed_precision(device: str, mixed_precision: str) -> str:
    """accelerate's precision for ``auto``: bf16 on CUDA (fp16 before Ampere), none on the CPU."""
    if mixed_precision != "auto":
        return mixed_precision
    if device == "cpu" or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def forget_single_process_state() -> None:
    """Let a second ``train()`` in one process choose its own device and precision.

    accelerate keeps its state per interpreter, so a second call would silently inherit the
    first one's. Only a single process is reset; under ``accelerate launch`` the launcher's
    state stays as it is.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def find_checkpoint(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: None without ``resume`` (or with "latest" and none written yet)."""
    if resume is None:
        return None
    if resume == "latest":
        done = [
            path
            for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
            if (path / STATE_FILE).is_file() and path.name.removeprefix(CHECKPOINT_PREFIX).isdigit()
        ]
        return max(done, key=lambda path: int(path.name.removeprefix(CHECKPOINT_PREFIX)), default=None)
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"{path} is not a complete checkpoint (no {STATE_FILE}); give a {CHECKPOINT_PREFIX}N folder "
            "from an earlier run, or --resume latest."
        )
    return path


def read_checkpoint_state(path: Path, adapter: dict) -> dict:
    """The checkpoint's state; ValueError when its adapter settings (model, rank, targets...) differ from ``adapter``."""
    state = json.loads((path / STATE_FILE).read_text())
    if not (path / "optimizer.bin").is_file():  # before accelerate's layout: optimizer.pt and rng-N.pt
        raise ValueError(
            f"{path} was written in the older checkpoint layout, which cannot be resumed; train into a new "
            "output folder (its LoRA file still loads as a LoRA)."
        )
    theirs = state["adapter"]
    for key, value in adapter.items():
        if theirs.get(key) != value:
            raise ValueError(
                f"{path} was trained with {key} {theirs.get(key)!r}, this run asks for {value!r}; "
                "resume with the same settings, or train into a new output folder."
            )
    return state


def make_accelerator(
    device: str, mixed_precision: str, gradient_accumulation: int = 1, *, data_seed: int | None = None
):
    """The run's ``Accelerator``, after forgetting a previous run's state in this process.

    Gradient accumulation does not restart at an epoch's end (``sync_with_dataloader=False``): an optimiser
    update is always ``gradient_accumulation`` micro-batches, whichever epochs they come from, so the step
    count and a resumed run's position are plain arithmetic. ``data_seed`` seeds accelerate's seedable
    sampler, which makes a shuffled epoch's order a function of the seed and the epoch alone.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    forget_single_process_state()
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=device == "cpu",
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=data_seed is not None, data_seed=data_seed),
    )


def make_lr_scheduler(name: str, optimizer, *, warmup_steps: int, total_steps: int):
    """diffusers' ``get_scheduler``: ``name`` (constant, cosine, linear, ...) after a linear warmup.

    The warmup follows diffusers: update ``k`` (from 0) runs at ``lr * k / warmup_steps``. "constant" with a
    warmup is diffusers' "constant_with_warmup". The schedule is stepped once per optimiser update and is
    not passed to ``accelerator.prepare`` (which would step it once per process), but registered for
    checkpointing instead.
    """
    from diffusers.optimization import get_scheduler

    if name == "constant" and warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def micro_batches(accelerator, loader, order, *, start: int) -> Iterator:
    """The prepared ``loader``'s micro-batches from global position ``start`` on, one epoch after another.

    ``order`` is the sampler whose ``set_epoch`` fixes an epoch's order (a function of seed and epoch), so
    a resumed run computes its epoch and place in it from ``start`` alone and skips there with
    ``accelerator.skip_first_batches``.
    """
    epoch, skip = divmod(start, len(loader))
    while True:
        current = accelerator.skip_first_batches(loader, skip) if skip else loader
        current.set_epoch(epoch)  # the DataLoaderShard passes it on to a single process's sampler
        order.set_epoch(epoch)  # and here for a sharded one, whose wrapper does not
        yield from current
        epoch, skip = epoch + 1, 0


def save_training_state(accelerator, folder: Path, state: dict) -> None:
    """``accelerator.save_state`` into ``folder`` (the save hooks write the LoRA), then ``STATE_FILE`` last."""
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # last: marks it complete
    accelerator.wait_for_everyone()


def take_models(models: list, weights: list | None = None) -> list:
    """Empty accelerate's lists of models (and their full state dicts) so ``save_state`` / ``load_state`` leave
    the frozen base model alone, as diffusers' DreamBooth LoRA hooks do; returns the models taken out."""
    taken = []
    while models:
        taken.append(models.pop())
        if weights:
            weights.pop()
    return taken


def write_model_card(folder: Path, data, body: str) -> Path:
    """``folder/README.md`` as a ``huggingface_hub.ModelCard``: ``data`` (a ``ModelCardData``) as YAML front
    matter, which the Hub indexes (base_model, tags, licence), then ``body`` in Markdown."""
    from huggingface_hub import ModelCard

    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")
    path = Path(folder) / "README.md"
    card.save(path)
    return path
