"""The ``from_pretrained`` calls: the same code path for real, local and tiny models."""

from __future__ import annotations

from typing import Any

from pipelines.runtime import Runtime


def load_blip_captioner(source: str, runtime: Runtime):
    """A BlipCaptioner for a repo id or a folder in the Hub layout."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from pipelines.blip import BlipCaptioner

    processor = BlipProcessor.from_pretrained(source)
    # BLIP has no SDPA kernels in transformers 5; eager attention is its only path.
    model = BlipForConditionalGeneration.from_pretrained(source, dtype=runtime.dtype, attn_implementation="eager")
    model.to(runtime.device).eval()
    return BlipCaptioner(model=model, processor=processor, source=source)


def load_blip_retrieval(source: str, runtime: Runtime):
    """A BlipRetrieval (ITM + ITC heads) for a repo id or a folder in the Hub layout."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from pipelines.matching import BlipRetrieval

    processor = BlipProcessor.from_pretrained(source)
    model = BlipForImageTextRetrieval.from_pretrained(source, dtype=runtime.dtype, attn_implementation="eager")
    model.to(runtime.device).eval()
    return BlipRetrieval(model=model, processor=processor, source=source)


def load_sd3_pipeline(source: str, runtime: Runtime) -> Any:
    """A diffusers StableDiffusion3Pipeline for a repo id or a folder in the Hub layout."""
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(source, dtype=runtime.dtype)
    pipeline.to(runtime.device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
