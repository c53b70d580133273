"""The SD3.5 jobs: one request type per kind of work, the prepared job, and its outcome.

``GenerationService.__call__`` (pipelines/sd3/generation.py) is the one way to draw: it takes
either request and picks the pipeline from it.

- ``GenerationRequest``: text to image; with ``control`` set, a ControlNet (SD3.5 Large).
- ``ImageToImageRequest``: img2img, inpainting (``inpaint`` with a ``mask``) and variations
  (an empty prompt, several images: BLIP's caption as the prompt, consecutive seeds).

Both are plain frozen dataclasses holding every setting, so a job can be queued, recorded and
replayed; the outcome carries the images, the PNGs, the details dict and the control map.
This module sits below the drawing modules (text_to_image, controlnet, image_to_image) and the
service, which all import it; it imports none of them but the request and result types.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines import settings
from pipelines.sd3.control_maps import CheckedControl, ControlSettings
from pipelines.sd3.text_to_image import GenerateRequest, GenerateResult, ResolvedRequest

# The kinds of work an SD3.5 job does; each image record names its job's.
JOB_MODES = ("txt2img", "controlnet", "img2img", "inpaint", "variations")


def image_fingerprint(image: Image.Image) -> dict:
    """What a record says of an image: its size and the SHA-256 of its RGB pixels (16 hex digits).

    The pixels, not the file: the same image saved again, or uploaded, has the same fingerprint,
    so a record's ``source`` finds the record that drew it.
    """
    rgb = image.convert("RGB")
    return {"size": f"{rgb.width}x{rgb.height}", "sha256": hashlib.sha256(rgb.tobytes()).hexdigest()[:16]}


Notify = Callable[[str], None]
StepCallback = Callable[[int, int, list[Image.Image] | None], None]


@dataclass(frozen=True)
class GenerationRequest:
    """Everything ``/generate`` takes. ``None`` means "the model's preset" (or the instance's mode).

    ``lora`` is "name", "name:0.8, other:0.5" or A1111 tags; names load on demand from the LoRA
    folder or the registry. ``lora_scale`` multiplies the weights of ``lora`` (not the prompt's
    own ``<lora:name:w>`` tags, which are the exact weights a Studio PNG records).
    """

    prompt: str
    model: str = "large"
    negative_prompt: str = ""
    seed: int = -1
    steps: int | None = None
    guidance: float | None = None
    width: int | float | None = None
    height: int | float | None = None
    max_sequence_length: int = settings.DEFAULT_T5_TOKENS
    skip_layer_guidance: bool | None = None
    num_images: int = 1
    memory_mode: str | None = None  # None or "": the instance's --memory
    lora: str = ""
    lora_scale: float | None = None  # None: 1
    lora_fuse: bool = False
    preview_every: int = 0  # 0: no previews
    control: ControlSettings | None = None  # a ControlNet (SD3.5 Large only): drawn by pipelines.sd3.controlnet

    def drawing(self, prompt: str) -> GenerateRequest:
        """The model-level request for ``prompt`` (the prompt with its LoRA tags taken out)."""
        return GenerateRequest(
            prompt=prompt,
            model=self.model,
            negative_prompt=self.negative_prompt or "",
            seed=-1 if self.seed is None else self.seed,
            steps=self.steps,
            guidance=self.guidance,
            width=self.width,
            height=self.height,
            max_sequence_length=self.max_sequence_length,
            skip_layer_guidance=self.skip_layer_guidance,
            num_images=self.num_images,
        )


@dataclass(frozen=True)
class ImageToImageRequest:
    """An image to redraw, and how. ``generation.width``/``height`` are ignored: the image sets the size.

    ``generation.prompt`` empty (or only LoRA tags) means BLIP's caption of ``image``. ``inpaint``
    repaints only where ``mask`` is white; ``paste_back`` then keeps every other pixel as it was.
    """

    image: Image.Image  # RGB, decoded and checked (pipelines.images.load_image)
    generation: GenerationRequest
    strength: float | None = None  # None: settings.DEFAULT_STRENGTH
    inpaint: bool = False
    mask: Image.Image | None = None  # inpaint: white (or any painted pixel) = repaint
    mask_blur: int | None = None  # None: settings.DEFAULT_MASK_BLUR
    paste_back: bool = True

    variations: bool = False  # the Variations button: BLIP's caption as the prompt, consecutive seeds

    @property
    def mode(self) -> str:
        return "inpaint" if self.inpaint else "variations" if self.variations else "img2img"


@dataclass
class PreparedGeneration:
    """A request made ready to draw: checked settings, the pipeline in its mode, the LoRAs applied."""

    request: ResolvedRequest  # its prompt is what the encoders read: tags out, trigger words in
    pipeline: Any
    repo_id: str
    memory_mode: str
    memory_mode_reason: str
    loras: list[dict]  # LoadedLora.png_entry(weight) of each active LoRA (+ "loaded_now")
    lora_fused: bool
    trigger_words: list[str]
    notes: list[str]
    preview_every: int
    visitor: str | None
    tiny: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    control: CheckedControl | None = None  # the checked ControlNet request, if any
    mode: str = "txt2img"  # one of JOB_MODES: what kind of work drew the images
    source: dict | None = None  # the input image of an image-to-image job (image_fingerprint)
    job_id: str = field(default_factory=lambda: secrets.token_hex(6))  # names the job in every record it makes


@dataclass
class GenerationOutcome:
    result: GenerateResult
    paths: list[Path]  # the PNGs written (empty when not saved)
    details: dict
    control_map: Image.Image | None = None  # the map a ControlNet followed (None without one)

    @property
    def images(self) -> list[Image.Image]:
        return self.result.images
