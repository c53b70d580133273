"""The state every tab shares: passed to the tab builders, never a module global."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.blip import BlipCaptioner
from pipelines.manager import ModelManager

TINY_MODE_NOTICE = (
    "Tiny mode: every model here is a miniature with random weights, built offline. Captions are "
    "gibberish and images are noise by design; everything else (decoding, scores, exports, the API) is real."
)


@dataclass
class Studio:
    manager: ModelManager

    @property
    def tiny(self) -> bool:
        return self.manager.tiny

    def captioner(self) -> BlipCaptioner:
        """The BLIP captioning model, loaded on first use."""
        return self.manager.get("blip-caption")
