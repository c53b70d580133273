"""The ``from_pretrained`` calls: the same code path for real, local and tiny models.

Every loader takes ``(source, runtime, variant)``; ``variant`` is the memory
mode for SD3 (see pipelines/memory/) and is ignored by the BLIP loaders.
"""

from __future__ import annotations

from typing import Any

from pipelines.runtime import Runtime


def load_blip_captioner(source: str, runtime: Runtime, variant: str | None = None):
    """A BlipCaptioner for a repo id or a folder in the Hub layout."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from pipelines.blip.captioner import BlipCaptioner

    processor = BlipProcessor.from_pretrained(source)
    # BLIP has no SDPA kernels in transformers 5; eager attention is its only path.
    model = BlipForConditionalGeneration.from_pretrained(source, dtype=runtime.dtype, attn_implementation="eager")
    model.to(runtime.device).eval()
    variant = runtime.blip_precision.variant if runtime.blip_precision is not None else None
    if variant is not None:  # --precision on the CPU: e.g. bf16 (pipelines/blip/precision.py)
        from pipelines.blip.precision import apply_blip_precision

        apply_blip_precision(model, variant)
    if runtime.device.type == "cuda":  # --fast: the compiled vision encoder (pipelines/blip/gpu.py)
        from pipelines.blip.gpu import apply_blip_gpu_fast_path

        fast = runtime.fast_path
        apply_blip_gpu_fast_path(model, runtime.device.type, enabled=fast is not None and fast.enabled)
    captioner = BlipCaptioner(model=model, processor=processor, source=source)
    captioner.precision = variant
    return captioner


def load_blip_retrieval(source: str, runtime: Runtime, variant: str | None = None):
    """A BlipRetrieval (ITM + ITC heads) for a repo id or a folder in the Hub layout."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from pipelines.blip.matching import BlipRetrieval

    processor = BlipProcessor.from_pretrained(source)
    model = BlipForImageTextRetrieval.from_pretrained(source, dtype=runtime.dtype, attn_implementation="eager")
    model.to(runtime.device).eval()
    return BlipRetrieval(model=model, processor=processor, source=source)


def load_sd3_pipeline(source: str, runtime: Runtime, variant: str | None = None) -> Any:
    """A diffusers StableDiffusion3Pipeline in memory mode ``variant`` (default: full precision)."""
    from pipelines.sd3.loading import load_sd3_pipeline as load_in_mode

    return load_in_mode(source, runtime, variant or "bf16")


def load_sd3_controlnet(source: str, runtime: Runtime, variant: str | None = None) -> Any:
    """A diffusers SD3ControlNetModel stored as its base's memory mode ``variant`` stores the MMDiT."""
    from pipelines.sd3.loading import load_sd3_controlnet as load_in_mode

    return load_in_mode(source, runtime, variant or "bf16")


def load_depth_estimator(source: str, runtime: Runtime, variant: str | None = None):
    """A DepthEstimator (transformers depth-estimation model + its image processor) for depth control maps."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from pipelines.sd3.control_maps import DepthEstimator

    processor = AutoImageProcessor.from_pretrained(source)
    model = AutoModelForDepthEstimation.from_pretrained(source, dtype=runtime.dtype)
    model.to(runtime.device).eval()
    return DepthEstimator(model=model, processor=processor, source=source)
