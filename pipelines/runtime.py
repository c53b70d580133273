"""Where models run: device and dtype choice."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Runtime:
    """The device models are placed on and the dtype their weights use."""

    device: torch.device
    dtype: torch.dtype
    # --precision: the variant BLIP's captioner converts to after loading (CPU only); None: ``dtype``.
    # A pipelines.blip.precision.BlipPrecision; not imported here, since that module builds on this one.
    blip_precision: Any = None
    # --fast / --step-cache: a pipelines.sd3.fast.FastPathOptions the SD3 loader applies; None: eager.
    fast_path: Any = None

    @property
    def dtype_name(self) -> str:
        """The dtype as the memory planner names it: bf16, fp16 or fp32."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]

    @property
    def description(self) -> str:
        name = str(self.device)
        if self.device.type == "cuda":
            name += f" ({torch.cuda.get_device_name(self.device)})"
        return f"{name}, {str(self.dtype).removeprefix('torch.')}"


def choose_runtime(device: str = "auto") -> Runtime:
    """Resolve a ``--device`` value ("auto", "cpu", "cuda", "cuda:1", "mps") to a Runtime.

    CUDA runs bf16 where the GPU supports it and fp16 otherwise (pre-Ampere);
    the CPU runs fp32, because bf16 on CPU is slow and gives SD3 visible noise.
    """
    requested = device.strip().lower()
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    try:
        resolved = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps.") from None

    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for, but this machine has no CUDA GPU; use --device cpu.")
        index = resolved.index if resolved.index is not None else 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}."
            )
        resolved = torch.device("cuda", index)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(device=resolved, dtype=dtype)
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device} was asked for, but MPS is not available; use --device cpu.")
        return Runtime(device=resolved, dtype=torch.float16)
    if resolved.type == "cpu":
        return Runtime(device=resolved, dtype=torch.float32)
    raise ValueError(f"--device {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps.")


def machine_description() -> str:
    """The accelerator (or CPU and thread count) that timings and evaluation files record."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    threads = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()}, {threads} thread{'' if threads == 1 else 's'}"
