"""Hand-offs: what one of the Studio's images carries into the tab it is sent to, and what it cannot.

A1111 sends an image to img2img with its prompt, negative prompt, seed, steps, CFG, size and model;
the Studio does the same from the image's own record (its PNG's settings, read by
``pipelines.sd3.png_info.read_generation_settings``), and says in a sentence what the target has no
field for (a ControlNet, skip-layer guidance, a non-default T5 length), so nothing is dropped silently.

    info = read_generation_settings(path)
    values, notes = image_to_image_form_values(info, current_model="large", tiny=False)
    values["prompt"], values["seed"], values["strength"] ...

Values outside what the target model takes are clamped with a note, exactly as PNG Info's Send to
Generate does (``generate_form_values``): one place clamps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipelines import settings
from pipelines.sd3.png_info import generate_form_values
from pipelines.validation import as_float

# The fields of each Image to image mode that an image's settings fill (the size follows the image).
IMAGE_TO_IMAGE_FIELDS = ("model", "prompt", "negative_prompt", "seed", "steps", "guidance", "strength")
NO_SETTINGS_NOTE = "The image carries no settings, so only its pixels were sent; the form keeps its values."


def image_to_image_form_values(
    info: Mapping[str, Any] | None, current_model: str, *, tiny: bool = False
) -> tuple[dict, list[str]]:
    """(values for ``IMAGE_TO_IMAGE_FIELDS`` that the image's settings give, notes) for an image sent to
    img2img or inpaint. No settings: no values and one note. ``strength`` is carried only from an
    image that was itself drawn from an image (its denoising strength)."""
    if not info or not info.get("found"):
        return {}, [NO_SETTINGS_NOTE]
    form, notes = generate_form_values(info, current_model, tiny=tiny)
    values = {name: form[name] for name in IMAGE_TO_IMAGE_FIELDS if name in form}
    studio = info.get("studio") or {}
    strength = _strength(studio)
    if strength is not None:
        values["strength"] = strength
    if studio.get("controlnet"):
        notes.append(
            f"Its ControlNet ({studio['controlnet'].get('type')}) is not carried: image to image draws without one."
        )
    if form.get("skip_layer_guidance"):
        notes.append("Skip-layer guidance is not carried: diffusers' image-to-image pipelines lack it.")
    tokens = form.get("max_sequence_length")
    if tokens and tokens != settings.DEFAULT_T5_TOKENS:
        notes.append(f"T5 tokens {tokens} are not carried: image to image reads {settings.DEFAULT_T5_TOKENS}.")
    notes.append("The size follows the image.")
    return values, notes


def _strength(studio: Mapping[str, Any]) -> float | None:
    """The denoising strength an image-to-image record holds, when it is a valid one."""
    drawn_from_image = studio.get("image_to_image")
    if not isinstance(drawn_from_image, Mapping):
        return None
    try:
        return as_float(
            "strength", drawn_from_image.get("Denoising strength"), settings.STRENGTH.low, settings.STRENGTH.high
        )
    except (TypeError, ValueError):
        return None


def generate_resets(info: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """What Send to Generate sets that an image's settings do not: one image, no control image, each with
    its sentence (A1111 resets the batch too), so nothing an earlier run left in the form applies unseen."""
    studio = info.get("studio") or {}
    notes = ["Images is 1: the image was drawn as one."]
    control = studio.get("controlnet") if isinstance(studio.get("controlnet"), Mapping) else None
    if control:
        notes.append(
            f"The control image is cleared: its ControlNet ({control.get('type')}, scale {control.get('scale')}) "
            "is recorded, but its map is not in the PNG; upload the control image again to use it."
        )
    else:
        notes.append("The control image is cleared: the image was drawn without ControlNet.")
    return {"num_images": 1, "control_image": None}, notes
