"""Control maps for the SD3.5 Large ControlNets: canny edges, depth, blur; each one library call.

Each function takes an RGB PIL image (already decoded safely by ``pipelines.images``) and
returns an RGB PIL image of the same size, ready to hand to ``StableDiffusion3ControlNetPipeline``:

- ``canny_map``: OpenCV's ``cv2.Canny`` on the grey image: white edges on black;
- ``blur_map``: OpenCV's ``cv2.GaussianBlur`` (``settings.CONTROL_BLUR_SIGMA``);
- ``depth_map``: a transformers depth estimator (Depth Anything V2 Small) through its image
  processor's ``post_process_depth_estimation``, scaled to 0-255, near = bright. Stability trained
  the depth ControlNet on DepthFM maps, so Depth Anything's maps are a stand-in, not the same map.

``preprocess=False`` in a request skips these: the upload is used as the map as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines import settings
from pipelines.catalog import CATALOG, CONTROLNET_BASE, CONTROLNET_KEYS
from pipelines.images import load_image
from pipelines.validation import as_float, as_int

DEPTH_TRAINING_NOTE = (
    "Stability trained the depth ControlNet on DepthFM depth maps; the Studio estimates depth with "
    "Depth Anything V2 Small, which looks alike (near is bright) but is not the same map."
)


@dataclass(frozen=True)
class ControlSettings:
    """A ControlNet request: the image to follow and how (``/generate``'s control_* parameters).

    ``image`` is an upload (a path the app received, bytes, a PIL image); ``preprocess=False`` uses it
    as the map as it is (an edge, depth or blurred image made elsewhere).
    """

    image: Any
    control_type: str = settings.DEFAULT_CONTROL_TYPE
    scale: float = settings.DEFAULT_CONTROL_SCALE
    preprocess: bool = True
    canny_low: int = settings.DEFAULT_CANNY_LOW
    canny_high: int = settings.DEFAULT_CANNY_HIGH


@dataclass(frozen=True)
class CheckedControl:
    """ControlSettings checked: the decoded RGB upload, the ControlNet's catalog key, the numbers in range."""

    image: Image.Image
    control_type: str
    controlnet_key: str
    scale: float
    preprocess: bool
    canny_low: int
    canny_high: int

    def details(self) -> dict:
        """What the details dict and the PNG's settings record about the ControlNet."""
        return {
            "type": self.control_type,
            "scale": self.scale,
            "preprocess": self.preprocess,
            "canny_low": self.canny_low if self.control_type == "canny" and self.preprocess else None,
            "canny_high": self.canny_high if self.control_type == "canny" and self.preprocess else None,
            "model": CATALOG[self.controlnet_key].repo_id,
        }


def controlnet_refusal(model_key: str) -> str:
    """The one sentence for a ControlNet asked of a model it does not fit."""
    return (
        f"ControlNet works with SD3.5 Large only: Stability released its canny, depth and blur ControlNets for "
        f"Large (8B), and none fits {CATALOG[model_key].title}; choose the model large, or remove the control image."
    )


def check_control(control: ControlSettings, model_key: str) -> CheckedControl:
    """Check ``control`` for a request drawn by ``model_key``; ValueError with one sentence otherwise.

    Nothing loads here: the model is checked first (only SD3.5 Large takes a ControlNet), then the
    type, the numbers, and last the upload itself (decoded safely by ``pipelines.images``).
    """
    if model_key != CONTROLNET_BASE:
        raise ValueError(controlnet_refusal(model_key))
    control_type = str(control.control_type or "").strip().lower()
    if control_type not in CONTROLNET_KEYS:
        raise ValueError(
            f"Unknown control_type {control.control_type!r}; choose one of: {', '.join(settings.CONTROL_TYPES)}."
        )
    limits = settings.CONTROL_SCALE
    scale = as_float("control_scale", control.scale, limits.low, limits.high)
    low, high = check_canny_thresholds(control.canny_low, control.canny_high)
    image = load_image(control.image, name="The control image")
    return CheckedControl(
        image, control_type, CONTROLNET_KEYS[control_type], scale, bool(control.preprocess), low, high
    )


def check_canny_thresholds(low, high) -> tuple[int, int]:
    """(low, high) as whole numbers in ``settings.CANNY_THRESHOLD``, low below high; ValueError otherwise."""
    limits = settings.CANNY_THRESHOLD
    low = as_int("canny_low", low, int(limits.low), int(limits.high))
    high = as_int("canny_high", high, int(limits.low), int(limits.high))
    if low >= high:
        raise ValueError(f"canny_low ({low}) must be below canny_high ({high}); e.g. 100 and 200.")
    return low, high


def canny_map(image: Image.Image, low: int = settings.DEFAULT_CANNY_LOW, high: int = settings.DEFAULT_CANNY_HIGH):
    """White Canny edges on black (RGB, same size): ``cv2.Canny`` with hysteresis thresholds ``low``/``high``."""
    import cv2

    low, high = check_canny_thresholds(low, high)
    grey = np.asarray(image.convert("L"))
    edges = cv2.Canny(grey, low, high)
    return Image.fromarray(edges).convert("RGB")


def blur_map(image: Image.Image, sigma: float = settings.CONTROL_BLUR_SIGMA) -> Image.Image:
    """The image under a Gaussian blur of ``sigma`` pixels (RGB, same size): ``cv2.GaussianBlur``."""
    import cv2

    pixels = np.asarray(image.convert("RGB"))
    # ksize (0, 0): OpenCV sizes the kernel from sigma (about 6 sigma + 1), as its documentation advises.
    blurred = cv2.GaussianBlur(pixels, (0, 0), sigmaX=float(sigma), sigmaY=float(sigma))
    return Image.fromarray(blurred)


@torch.inference_mode()
def depth_map(image: Image.Image, estimator: Any) -> Image.Image:
    """A relative depth map (RGB grey, same size, near = bright) from ``estimator`` (a ``DepthEstimator``)."""
    model, processor = estimator.model, estimator.processor
    parameter = next(model.parameters())
    inputs = processor(images=image.convert("RGB"), return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(parameter.device, parameter.dtype)
    outputs = model(pixel_values=pixel_values)
    # The processor undoes its own resize: one depth map at the image's (height, width).
    depth = processor.post_process_depth_estimation(outputs, target_sizes=[(image.height, image.width)])[0]
    values = depth["predicted_depth"].float().cpu()
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else torch.zeros_like(values)
    return Image.fromarray((scaled * 255).round().to(torch.uint8).numpy()).convert("RGB")


class DepthEstimator:
    """A loaded depth-estimation model and its image processor (what the manager caches)."""

    def __init__(self, model, processor, source: str) -> None:
        self.model = model
        self.processor = processor
        self.source = source


def control_map(control_type: str, image: Image.Image, *, canny_low=None, canny_high=None, estimator=None):
    """The map ``control_type`` ("canny", "depth", "blur") draws with, made from ``image``."""
    if control_type == "canny":
        low = settings.DEFAULT_CANNY_LOW if canny_low is None else canny_low
        high = settings.DEFAULT_CANNY_HIGH if canny_high is None else canny_high
        return canny_map(image, low, high)
    if control_type == "blur":
        return blur_map(image)
    if control_type == "depth":
        if estimator is None:
            raise ValueError("A depth map needs the depth estimator; none was given.")
        return depth_map(image, estimator)
    raise ValueError(f"Unknown control_type {control_type!r}; choose one of: {', '.join(settings.CONTROL_TYPES)}.")
