"""BLIP on a CUDA GPU: what transformers 5 allows for speed, and the compiled vision encoder.

Checked against transformers 5.24 (its source, not assumed):

- **SDPA**: BLIP declares no ``_supports_sdpa``; its attention is written out with ``matmul`` and
  ``softmax`` (``BlipTextSelfAttention``), so ``attn_implementation="sdpa"`` is refused and BLIP
  runs eager attention. ``blip_gpu_support`` reads the flag, so a transformers that adds it is used.
- **Static KV cache**: BLIP's text decoder builds its own ``EncoderDecoderCache`` of two
  ``DynamicCache`` objects and declares no ``_can_compile_fullgraph``; a ``StaticCache`` passed in
  would be shared by self- and cross-attention, so ``generate(cache_implementation="static")`` and
  CUDA graphs for the decode step are not available. The decode step stays eager.
- **What works**: bf16 (the CUDA runtime's dtype), the vision encoder compiled (fixed 384² input,
  so one graph per batch size; ``mode="max-autotune-no-cudagraphs"`` keeps memory flat across
  batch sizes), and large batches with images decoded in DataLoader worker processes
  (``pipelines.blip.batch_caption``, ``settings.GPU_CAPTION_BATCH_SIZE``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class BlipGpuReport:
    """What ``apply_blip_gpu_fast_path`` did, and why each other part was not done."""

    sdpa: bool = False
    static_cache: bool = False
    vision_compiled: bool = False
    notes: list[str] = field(default_factory=list)

    def note(self, sentence: str) -> None:
        self.notes.append(sentence)
        logger.info("BLIP GPU fast path: %s", sentence)

    def as_dict(self) -> dict:
        return {
            "sdpa": self.sdpa,
            "static_cache": self.static_cache,
            "vision_compiled": self.vision_compiled,
            "notes": list(self.notes),
        }


def blip_gpu_support(model: Any) -> dict[str, bool]:
    """What this transformers offers BLIP: SDPA attention, and a decoder that compiles with a static cache."""
    return {
        "sdpa": bool(getattr(type(model), "_supports_sdpa", False)),
        "static_cache": bool(getattr(type(model.text_decoder), "_can_compile_fullgraph", False)),
    }


def apply_blip_gpu_fast_path(model: Any, device_type: str, *, enabled: bool = True) -> BlipGpuReport:
    """Compile BLIP's vision encoder on a CUDA GPU; elsewhere (or disabled) nothing changes. Returns the report."""
    report = BlipGpuReport()
    if not enabled:
        report.note("off (--fast off): eager BLIP.")
        return report
    if device_type != "cuda":
        report.note(f"eager on {device_type}: the BLIP GPU fast path compiles for CUDA GPUs only.")
        return report
    support = blip_gpu_support(model)
    if not support["sdpa"]:
        report.note("eager attention: this transformers has no SDPA kernels for BLIP.")
    if not support["static_cache"]:
        report.note(
            "dynamic KV cache: BLIP's text decoder takes no static cache, so its decode step is not CUDA-graphed."
        )
    model.vision_model.compile(mode="max-autotune-no-cudagraphs")
    report.vision_compiled = True
    return report
