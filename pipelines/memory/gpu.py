"""This machine's memory: the CUDA GPU's free and total bytes, the System tab's machine report, and
the budget the model manager keeps loaded models under."""

from __future__ import annotations


def gpu_memory(device=None) -> dict | None:
    """Name, total and free bytes of the CUDA GPU ``device`` (the current one by default); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    return {
        "name": torch.cuda.get_device_name(device),
        "total_bytes": int(total),
        "free_bytes": int(free),
        "allocated_bytes": int(torch.cuda.memory_allocated(device)),
    }


def machine_report(runtime) -> dict:
    """Device, dtype, library versions and GPU memory of the machine serving the Studio."""
    import os
    import platform

    import torch

    report = {
        "device": str(runtime.device),
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "description": runtime.description,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": gpu_memory(runtime.device),
    }
    try:  # Linux and macOS; absent elsewhere
        report["ram_total_bytes"] = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        report["ram_total_bytes"] = None
    return report


def memory_budget_bytes(runtime) -> int:
    """What all loaded models may hold together: 95% of the GPU, or 80% of the RAM on a CPU machine."""
    import os

    gpu = gpu_memory(runtime.device) if runtime.device.type == "cuda" else None
    if gpu is not None:
        return int(gpu["total_bytes"] * 0.95)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.8)
