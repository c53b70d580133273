"""Image to image and inpainting with SD3.5, on the generation service's ``prepare`` and ``finish``.

    request = ImageToImageRequest(image, GenerationRequest(prompt="", seed=7), strength=0.6)
    outcome = studio.generation(request)  # the service calls ``run`` below
    outcome.images, outcome.paths, outcome.details  # as /generate's, plus strength, denoising steps, caption

Only ``draw`` is this module's own: ``StableDiffusion3Img2ImgPipeline`` (or ``...InpaintPipeline``)
``.from_pipe`` the pipeline ``prepare`` returned, so both share its weights and its LoRAs, and
``sd3.generate`` runs it with the image, the strength and the mask as extra inputs.

1. Check what needs no model: strength, mask (size, not empty), the drawing size (the input's,
   snapped to 16 within the model's range) and every generation setting.
2. An empty prompt becomes BLIP's caption of the image (the base captioner, beam search, 3 beams).
3. ``GenerationService.prepare``: memory mode, pipeline, LoRAs, trigger words.
4. Draw through the derived pipeline (steps, previews and stop as for text to image).
5. Inpainting with paste-back: the drawing is composited onto the input through the blurred mask,
   as A1111 does, so every pixel farther than ``mask_blur`` outside the mask is the input's own.
6. ``GenerationService.finish``: PNGs and the details dict, plus what image to image adds.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines import settings
from pipelines.catalog import CATALOG
from pipelines.images import load_image
from pipelines.sd3.jobs import (
    GenerationOutcome,
    GenerationRequest,
    ImageToImageRequest,
    Notify,
    PreparedGeneration,
    StepCallback,
    image_fingerprint,
)
from pipelines.sd3.lora_tags import split_lora_tags
from pipelines.sd3.text_to_image import (
    SIZE_MULTIPLE,
    GenerateResult,
    LatentPreviewer,
    generate,
    model_key,
    size_limits,
    snap,
)
from pipelines.validation import as_float, as_int

# ----------------------------------------------------------------------------- checks


def check_strength(value) -> float:
    """``value`` (None: the default) within ``settings.STRENGTH``; ValueError with the range otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return settings.DEFAULT_STRENGTH
    return as_float("strength", value, settings.STRENGTH.low, settings.STRENGTH.high)


def denoising_steps(steps: int, strength: float) -> int:
    """How many denoising steps diffusers runs for ``steps`` at ``strength`` (its ``get_timesteps``).

    Not ``int(strength * steps)``: diffusers skips ``int(steps - steps * strength)`` steps and runs
    the rest, which rounds up: Turbo's 4 steps at 0.6 run 3, and 10 steps at 0.55 run 6.
    """
    skipped = int(max(steps - min(steps * strength, steps), 0))
    return steps - skipped


def drawing_size(size: tuple[int, int], model: str, tiny: bool) -> tuple[int, int]:
    """(width, height) to draw an image of ``size`` at: its own shape and size, scaled into the model's
    pixel range if needed and snapped to multiples of 16 (down when shrinking, up when growing)."""
    limits = size_limits(CATALOG[model_key(model)], tiny)
    width, height = size
    pixels = width * height
    scale = 1.0
    if pixels > limits["max_pixels"]:
        scale = math.sqrt(limits["max_pixels"] / pixels)
    elif pixels < limits["min_pixels"]:
        scale = math.sqrt(limits["min_pixels"] / pixels)
    scale = min(scale, limits["max_side"] / max(width, height))
    sides = [snap(width * scale), snap(height * scale)]
    if sides[0] * sides[1] > limits["max_pixels"] or max(sides) > limits["max_side"]:
        sides = [max(SIZE_MULTIPLE, math.floor(side * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE) for side in size]
    elif sides[0] * sides[1] < limits["min_pixels"]:
        sides = [math.ceil(side * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE for side in size]
    return sides[0], sides[1]


def check_mask(mask: Image.Image | None, image_size: tuple[int, int]) -> Image.Image:
    """The mask as a binary "L" image (255 = repaint); ValueError for a missing, empty or wrong-size mask."""
    if mask is None:
        raise ValueError(
            "No mask was given: paint over what to repaint with the brush, or upload a mask (white = repaint)."
        )
    if mask.size != tuple(image_size):
        raise ValueError(
            f"The mask is {mask.width}x{mask.height} but the image is {image_size[0]}x{image_size[1]}; "
            "give a mask of the image's size (white = repaint)."
        )
    binary = binary_mask(mask)
    if binary.getbbox() is None:
        raise ValueError("The mask is empty: paint over what to repaint (white in an uploaded mask), then run again.")
    return binary


def binary_mask(mask: Image.Image) -> Image.Image:
    """255 where ``mask`` asks for a repaint, else 0: painted pixels of a transparent layer, or light ones."""
    if "A" in mask.getbands() and mask.getextrema()[-1][0] < 255:  # a layer with transparency: its paint
        values = np.asarray(mask.getchannel("A"))
    else:
        values = np.asarray(mask.convert("L"))
    return Image.fromarray(np.where(values >= 128, 255, 0).astype(np.uint8), mode="L")


def mask_from_layers(layers: Sequence[Image.Image], size: tuple[int, int]) -> Image.Image | None:
    """The union of an image editor's brush layers (their painted pixels) as an "L" mask; None if none."""
    union = None
    for layer in layers:
        if layer is None:
            continue
        if layer.size != tuple(size):
            raise ValueError(
                f"A brush layer is {layer.width}x{layer.height} but the image is {size[0]}x{size[1]}; "
                "draw the mask on the image itself, or upload a mask of the image's size."
            )
        alpha = np.asarray(layer.convert("RGBA").getchannel("A")) > 0
        union = alpha if union is None else union | alpha
    if union is None:
        return None
    return Image.fromarray(union.astype(np.uint8) * 255, mode="L")


def load_brush_layer(source: Any, index: int = 1) -> Image.Image:
    """An image editor's brush layer (a path or bytes: a PNG, transparent where nothing was painted) as
    RGBA, through the safe decoder (formats, bytes, pixels, memory); ValueError with a sentence otherwise."""
    named = isinstance(source, (str, os.PathLike))
    return load_image(source, keep_alpha=True, name=None if named else f"brush layer {index}")


def editor_images(
    background: Any, layers: Sequence[Any], *, max_layers: int = settings.MAX_MASK_LAYERS
) -> tuple[Image.Image, Image.Image | None]:
    """The picture and the brush mask from an image editor's files, as the page sent them (paths or
    bytes, never decoded before): (RGB picture, "L" mask or None when nothing was painted).

    The number of layers is checked before any file is opened; then the image and each layer go
    through the safe decoder, so no format, size or count the Studio does not accept reaches Pillow.
    """
    layers = [layer for layer in layers if layer is not None]
    if len(layers) > max_layers:
        raise ValueError(
            f"The editor sent {len(layers)} brush layers, more than the {max_layers} read into one mask; "
            "paint the mask on one layer, or upload a mask image."
        )
    if background is None:
        raise ValueError("Upload an image into the editor (PNG, JPEG, WebP, GIF, BMP or TIFF) first.")
    picture = load_image(background)
    brushed = [load_brush_layer(layer, index) for index, layer in enumerate(layers, start=1)]
    return picture, mask_from_layers(brushed, picture.size)


# ----------------------------------------------------------------------------- masks


def blurred_mask(mask: Image.Image, radius: int) -> np.ndarray:
    """``mask`` (binary "L") blurred over ``radius`` pixels, as float weights in [0, 1].

    A Gaussian of sigma ``radius / 2.5`` cut off at ``radius`` (A1111's kernel reaches 2.5 sigma),
    so a pixel farther than ``radius`` (in x or y) from the mask keeps weight exactly 0.
    """
    weights = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
    if radius <= 0:
        return weights.numpy()
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * (radius / 2.5) ** 2))
    kernel = kernel / kernel.sum()
    planes = weights[None, None]
    planes = torch.nn.functional.conv2d(planes, kernel.view(1, 1, 1, -1), padding=(0, radius))
    planes = torch.nn.functional.conv2d(planes, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return planes[0, 0].clamp(0, 1).numpy()


def paste_back(original: Image.Image, drawn: Image.Image, weights: np.ndarray) -> Image.Image:
    """``drawn`` over ``original`` through ``weights`` (0: the original's pixel exactly; 1: the drawing's)."""
    if drawn.size != original.size:
        drawn = drawn.resize(original.size, Image.Resampling.LANCZOS)
    source = np.asarray(original.convert("RGB"), dtype=np.float32)
    painted = np.asarray(drawn.convert("RGB"), dtype=np.float32)
    alpha = weights[..., None]
    mixed = source * (1.0 - alpha) + painted * alpha  # alpha 0 gives source * 1 + 0: the very same value
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), mode="RGB")


# ----------------------------------------------------------------------------- pipelines


# The components an SD3 pipeline holds; a twin is made again when any of them was swapped.
SD3_COMPONENT_NAMES = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler",
    "image_encoder",
    "feature_extractor",
)


def derived_pipeline(pipeline, inpaint: bool):
    """``pipeline``'s image-to-image (or inpainting) twin: ``from_pipe`` shares every component, LoRAs
    included; kept on ``pipeline`` and made again only if a component was swapped since."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

    pipeline_class = StableDiffusion3InpaintPipeline if inpaint else StableDiffusion3Img2ImgPipeline
    kept: dict = pipeline.__dict__.setdefault("studio_image_to_image", {})
    # getattr per name, not ``pipeline.components``, which rebuilds a dict from the config (about
    # 0.5 ms a call: 2% of a tiny draw, the img2img bench's Studio/bare ratio).
    parts = tuple(getattr(pipeline, name, None) for name in SD3_COMPONENT_NAMES)
    derived, made_from = kept.get(pipeline_class, (None, None))
    if derived is None or made_from is None or any(a is not b for a, b in zip(parts, made_from, strict=True)):
        # from_pipe casts every component to its dtype, float32 unless told: name the one they have.
        derived = pipeline_class.from_pipe(pipeline, dtype=pipeline.vae.dtype)
        derived.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))  # as the pipeline shows it
        kept[pipeline_class] = (derived, parts)
    derived.studio_memory_mode = getattr(pipeline, "studio_memory_mode", None)  # read by sd3.configure_vae
    return derived


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class CheckedRequest:
    """An ImageToImageRequest checked: the generation request at its drawing size, the strength, the mask."""

    job: GenerationRequest  # width and height: the drawing size; skip-layer guidance off
    strength: float
    notes: tuple[str, ...]
    mask: Image.Image | None = None  # binary "L", inpaint only
    mask_blur: int | None = None
    mask_weights: np.ndarray | None = None  # the blurred mask, in [0, 1]


def check_request(
    service, request: ImageToImageRequest, image: Image.Image, visitor: str | None = None
) -> CheckedRequest:
    """Every check that needs no model (strength, mask, size, the generation settings); ValueError otherwise.
    An empty prompt is checked as if BLIP's caption were in it already."""
    strength = check_strength(request.strength)
    mask = blur = weights = None
    if request.inpaint:
        mask = check_mask(request.mask, image.size)
        blur = settings.DEFAULT_MASK_BLUR if request.mask_blur is None else request.mask_blur
        blur = as_int("mask_blur", blur, int(settings.MASK_BLUR.low), int(settings.MASK_BLUR.high))
        weights = blurred_mask(mask, blur)
    job = request.generation
    spec = CATALOG[model_key(job.model)]
    width, height = drawing_size(image.size, job.model, service.tiny)
    notes = []
    if (width, height) != image.size:
        notes.append(
            f"The image is {image.width}x{image.height}; it is drawn at {width}x{height} (multiples of 16 within "
            f"{spec.title}'s range)"
            + (", and pasted back at its own size." if request.inpaint and request.paste_back else ".")
        )
    if job.skip_layer_guidance:
        raise ValueError(
            "Skip-layer guidance is for text to image only (diffusers' image-to-image pipelines lack it); turn it off."
        )
    if job.skip_layer_guidance is None and spec.image_preset.skip_layer_guidance_layers:
        notes.append(
            "Skip-layer guidance (Medium's preset) is off: diffusers' image-to-image pipelines do not take it."
        )
    job = dataclasses.replace(job, width=width, height=height, skip_layer_guidance=False)
    if not split_lora_tags(job.prompt or "")[0].strip():
        service.check(dataclasses.replace(job, prompt="a caption " + (job.prompt or "")), visitor=visitor)
    else:
        service.check(job, visitor=visitor)
    return CheckedRequest(job, strength, tuple(notes), mask, blur, weights)


def run(
    service,
    request: ImageToImageRequest,
    *,
    describe: Callable[[Image.Image], str] | None = None,
    visitor: str | None = None,
    notify: Notify | None = None,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    folder: Path | None = None,
    save: bool = True,
) -> GenerationOutcome:
    """Redraw ``request.image`` (see the module docstring) with ``service``, the GenerationService whose
    ``__call__`` hands image-to-image jobs here. ``describe(image)`` gives BLIP's caption
    (``Studio.caption_for_prompt``), needed only for an empty prompt. ValueError with one sentence for the first bad input."""
    say = notify or (lambda _sentence: None)
    image = request.image.convert("RGB")

    # 1. Every check that needs no model.
    checked = check_request(service, request, image, visitor)
    job, notes, mask, mask_weights = checked.job, list(checked.notes), checked.mask, checked.mask_weights
    strength, blur, (width, height) = checked.strength, checked.mask_blur, (job.width, job.height)
    needs_caption = not split_lora_tags(job.prompt or "")[0].strip()

    # 2. An empty prompt: BLIP says what the image shows (the prompt's LoRA tags stay).
    caption = None
    if needs_caption:
        if describe is None:
            raise ValueError("Write a prompt: no BLIP captioner is at hand to describe the image.")
        caption = describe(image)
        job = dataclasses.replace(job, prompt=f"{caption} {job.prompt or ''}".strip())
        notes.append(f"The prompt is BLIP's caption of the image: {caption!r}.")

    # 3. Memory mode, pipeline and LoRAs, as for text to image.
    prepared = service.prepare(job, visitor=visitor, notify=notify)
    prepared.mode, prepared.source = request.mode, image_fingerprint(image)
    for note in notes:
        prepared.notes.append(note)
        say(note)

    # 4. Draw.
    drawing_mask = None
    if mask_weights is not None:
        drawing_mask = Image.fromarray(np.rint(mask_weights * 255).astype(np.uint8), mode="L")
    result = draw(
        prepared, image, strength, mask=drawing_mask, mask_blur=blur, on_step=on_step, should_stop=should_stop
    )

    # 5. Paste back: outside the blurred mask, the input's pixels.
    if request.inpaint and request.paste_back:
        result.images = [paste_back(image, drawn, mask_weights) for drawn in result.images]

    # 6. PNGs and details.
    outcome = service.finish(prepared, result, folder=folder, save=save)
    outcome.details.update(
        {
            "mode": request.mode,
            "strength": strength,
            "denoising_steps": denoising_steps(prepared.request.steps, strength),
            "input_size": f"{image.width}x{image.height}",
            "resized": (width, height) != image.size,
            "output_size": f"{result.images[0].width}x{result.images[0].height}",
            "caption": caption,  # None when the prompt was given
            "mask_blur": blur,
            "paste_back": bool(request.inpaint and request.paste_back),
            "mask_pixels": None if mask is None else int(np.count_nonzero(np.asarray(mask))),  # pixels to repaint
        }
    )
    return outcome


def draw(
    prepared: PreparedGeneration,
    image: Image.Image,
    strength: float,
    *,
    mask: Image.Image | None = None,
    mask_blur: int | None = None,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerateResult:
    """The ``draw`` step for image to image: ``prepared``'s pipeline's img2img (or inpaint, with ``mask``)
    twin, run by ``sd3.generate``. ``on_step`` counts the steps strength leaves (see ``denoising_steps``)."""
    pipeline = derived_pipeline(prepared.pipeline, inpaint=mask is not None)
    total = denoising_steps(prepared.request.steps, strength)
    # One copy of the image per seed: diffusers' img2img encodes image i with generator i, and slices
    # past a single image when given several generators.
    copies = [image] * prepared.request.num_images if mask is None else image
    inputs: dict[str, Any] = {"image": copies, "strength": strength}
    parameters: dict[str, Any] = {"Denoising strength": f"{strength:g}"}
    if mask is not None:
        inputs["mask_image"] = mask
        parameters["Mask blur"] = mask_blur
    return generate(
        pipeline,
        prepared.request,
        repo_id=prepared.repo_id,
        on_step=None if on_step is None else (lambda step, _steps, previews: on_step(step, total, previews)),
        should_stop=should_stop,
        preview_every=prepared.preview_every,
        previewer=LatentPreviewer.for_pipeline(prepared.pipeline) if prepared.preview_every else None,
        loras=[{key: value for key, value in lora.items() if key != "loaded_now"} for lora in prepared.loras],
        extra_arguments=inputs,
        extra_parameters=parameters,
        extra_settings={"image_to_image": dict(parameters)},
    )
