"""The state every tab shares: passed to the tab builders, never a module global."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.blip import BlipCaptioner
from pipelines.manager import ModelManager
from pipelines.matching import ImageTextMatcher

TINY_MODE_NOTICE = (
    "Tiny mode: every model here is a miniature with random weights, built offline. Captions are "
    "gibberish and images are noise by design; everything else (decoding, scores, exports, the API) is real."
)


@dataclass
class Studio:
    manager: ModelManager
    outputs_dir: Path | None = None  # --outputs: generated PNGs are also saved here
    memory_mode: str = "auto"  # --memory: the default SD3.5 memory mode

    @property
    def tiny(self) -> bool:
        return self.manager.tiny

    def captioner(self) -> BlipCaptioner:
        """The BLIP captioning model, loaded on first use."""
        return self.manager.get("blip-caption")

    def matcher(self) -> ImageTextMatcher:
        """Image-text matching with the captioner; the retrieval model loads only if a request asks for it."""
        return ImageTextMatcher(self.captioner(), retrieval=lambda: self.manager.get("blip-itm"))
