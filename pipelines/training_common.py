"""What both LoRA trainers share: device and precision checks, accelerate's state, resumable checkpoints.

``pipelines.train_blip_lora`` and ``pipelines.train_sd3_lora`` write checkpoints
the same way: ``OUT/checkpoint-N/`` folders whose ``training_state.json`` is
written last, so a folder without it (a run killed mid-save) is never resumed.
"""

from __future__ import annotations

import json
import os
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
    theirs = state["adapter"]
    for key, value in adapter.items():
        if theirs.get(key) != value:
            raise ValueError(
                f"{path} was trained with {key} {theirs.get(key)!r}, this run asks for {value!r}; "
                "resume with the same settings, or train into a new output folder."
            )
    return state
