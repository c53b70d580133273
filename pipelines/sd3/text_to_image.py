"""Stable Diffusion 3.5 text-to-image: presets, validation, seeds, stop, previews, PNG metadata.

``GenerateRequest`` is what a user asks for; ``resolve_request`` turns it into
concrete settings for one model (preset values for what was left empty,
sizes snapped to 16, every value checked); ``generate`` runs the diffusers
pipeline with those settings and returns PIL images plus the parameters text
that goes into each PNG.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from pipelines import settings, workspace
from pipelines.catalog import CATALOG, SD3_SHORT_NAMES, ImagePreset, ModelSpec
from pipelines.sd3.fast import fast_call
from pipelines.sd3.png_metadata import a1111_parameters, save_png
from pipelines.validation import as_float, as_int

# What the UI and the API call each model; values are catalog keys.
MODEL_CHOICES = SD3_SHORT_NAMES  # UI/API names -> catalog keys (one map, in the catalog)

# The tiny stand-ins draw at most 512 px (pos_embed 64 patches x patch 2 x VAE 4) and
# start at 64 px; everything else about their presets is the real models'.
TINY_SIZE_LIMITS = {"min_pixels": 64 * 64, "max_pixels": 512 * 512, "default_size": 128, "max_side": 512}
REAL_MAX_SIDE = 2048  # no SD3.5 checkpoint was trained past ~1440 px a side
SIZE_MULTIPLE = 16  # sides snap to this: the VAE's 8x times the MMDiT's 2x patch

ASPECT_RATIOS = {  # name -> (width units, height units)
    "1:1": (1, 1),
    "4:3": (4, 3),
    "3:4": (3, 4),
    "3:2": (3, 2),
    "2:3": (2, 3),
    "16:9": (16, 9),
    "9:16": (9, 16),
    "21:9": (21, 9),
}


@dataclass(frozen=True)
class GenerateRequest:
    """What to draw. ``None`` means "the model's preset"."""

    prompt: str
    model: str = "large"  # large | large-turbo | medium (or a catalog key)
    negative_prompt: str = ""
    seed: int = -1  # -1: a random seed, reported back
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    max_sequence_length: int = settings.DEFAULT_T5_TOKENS
    skip_layer_guidance: bool | None = None  # Medium's preset turns it on
    num_images: int = 1


@dataclass(frozen=True)
class ResolvedRequest:
    """A GenerateRequest made concrete for one model: every value set and checked."""

    prompt: str
    negative_prompt: str
    model_key: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    max_sequence_length: int
    skip_layer_guidance_layers: tuple[int, ...]
    num_images: int
    notes: tuple[str, ...] = ()  # things the user should know (snapped sizes, ignored negative prompt)

    @property
    def uses_cfg(self) -> bool:
        """diffusers only runs classifier-free guidance (and reads the negative prompt) above 1."""
        return self.guidance > 1.0


def model_key(name: str) -> str:
    """The catalog key for a UI/API model name ("large") or a key itself ("sd35-large")."""
    key = MODEL_CHOICES.get(name, name)
    if key not in CATALOG or CATALOG[key].kind != "sd3":
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(MODEL_CHOICES)}.")
    return key


def size_limits(spec: ModelSpec, tiny: bool) -> dict:
    preset = spec.image_preset
    if tiny:
        return dict(TINY_SIZE_LIMITS)
    return {
        "min_pixels": preset.min_pixels,
        "max_pixels": preset.max_pixels,
        "default_size": preset.default_size,
        "max_side": REAL_MAX_SIDE,
    }


def snap(value: float) -> int:
    """Nearest multiple of ``SIZE_MULTIPLE`` (16), at least 16."""
    return max(SIZE_MULTIPLE, math.floor(value / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)  # halves round up: 1000 -> 1008


def slider_range(spec: ModelSpec, tiny: bool) -> tuple[int, int]:
    """(smallest, largest) side a size slider offers for ``spec``, from the limits ``resolve_request`` checks.

    The smallest is half the side of the smallest square (the other side can make up the area).
    """
    limits = size_limits(spec, tiny)
    low = max(SIZE_MULTIPLE, int(limits["min_pixels"] ** 0.5) // 2 // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return low, limits["max_side"]


def lora_weight_text(weight: float) -> str:
    """A LoRA weight as A1111 writes it ("1", "0.8"), but never rounded: parsing it back gives ``weight``."""
    short = f"{weight:g}"
    return short if float(short) == weight else repr(float(weight))


def size_for_aspect(ratio: str, spec: ModelSpec, tiny: bool) -> tuple[int, int]:
    """(width, height) with the model's default pixel count at ``ratio``, snapped to 16."""
    if ratio not in ASPECT_RATIOS:
        raise ValueError(f"Unknown aspect ratio {ratio!r}; choose one of: {', '.join(ASPECT_RATIOS)}.")
    units_w, units_h = ASPECT_RATIOS[ratio]
    area = size_limits(spec, tiny)["default_size"] ** 2
    width = math.sqrt(area * units_w / units_h)
    return snap(width), snap(area / width)


def resolve_request(request: GenerateRequest, *, tiny: bool = False) -> ResolvedRequest:
    """Fill presets, snap sizes and check every value; ValueError names what is wrong and the fix."""
    key = model_key(request.model)
    spec = CATALOG[key]
    preset: ImagePreset = spec.image_preset
    notes: list[str] = []

    prompt = _clean_text("prompt", request.prompt)
    if not prompt.strip():
        raise ValueError("Write a prompt first: describe the image you want.")
    negative = _clean_text("negative_prompt", request.negative_prompt or "")

    steps = preset.steps if request.steps is None else as_int("steps", request.steps, 1, settings.MAX_STEPS)
    guidance = (
        preset.guidance
        if request.guidance is None
        else as_float("guidance", request.guidance, 0.0, settings.MAX_GUIDANCE)
    )
    if negative and guidance <= 1.0:
        notes.append(
            f"Guidance {guidance:g} runs without classifier-free guidance, so the negative prompt is ignored"
            + (
                " (Large Turbo is distilled to run this way)."
                if key == "sd35-large-turbo"
                else "; raise guidance above 1 to use it."
            )
        )

    limits = size_limits(spec, tiny)
    default_side = limits["default_size"]
    width_in = default_side if request.width is None else as_float("width", request.width, 1, 100_000)
    height_in = default_side if request.height is None else as_float("height", request.height, 1, 100_000)
    width, height = snap(width_in), snap(height_in)
    if (width, height) != (width_in, height_in):
        notes.append(f"Size snapped to {width}x{height} (multiples of 16).")
    pixels = width * height
    if not limits["min_pixels"] <= pixels <= limits["max_pixels"] or max(width, height) > limits["max_side"]:
        low, high = limits["min_pixels"] / 2**20, limits["max_pixels"] / 2**20
        raise ValueError(
            f"{width}x{height} ({pixels / 2**20:.2f} MP) is outside what {spec.title}{' (tiny)' if tiny else ''} draws: "
            f"{low:.2f} to {high:.2f} megapixels, at most {limits['max_side']} px a side "
            f"(e.g. {default_side}x{default_side})."
        )

    max_sequence_length = as_int(
        "max_sequence_length", request.max_sequence_length, settings.MIN_T5_TOKENS, settings.MAX_T5_TOKENS
    )
    use_slg = (
        bool(preset.skip_layer_guidance_layers)
        if request.skip_layer_guidance is None
        else bool(request.skip_layer_guidance)
    )
    if use_slg and not preset.skip_layer_guidance_layers:
        raise ValueError(
            f"Skip-layer guidance is tuned for Medium only (layers 7-9); on {spec.title} it ruins images. Turn it off."
        )
    if use_slg and not guidance > 1.0:
        raise ValueError(
            "Skip-layer guidance works on top of classifier-free guidance: set guidance above 1, or turn it off."
        )
    num_images = as_int("num_images", request.num_images, 1, settings.MAX_IMAGES_PER_REQUEST)
    seed = as_int("seed", request.seed, -1, settings.MAX_SEED)
    if seed == -1:
        seed = random.randint(0, settings.MAX_SEED - settings.MAX_IMAGES_PER_REQUEST)
    elif seed + num_images - 1 > settings.MAX_SEED:
        raise ValueError(f"seed + num_images - 1 must stay at most {settings.MAX_SEED}; use a smaller seed.")
    return ResolvedRequest(
        prompt=prompt,
        negative_prompt=negative,
        model_key=key,
        seed=seed,
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        max_sequence_length=max_sequence_length,
        skip_layer_guidance_layers=tuple(preset.skip_layer_guidance_layers) if use_slg else (),
        num_images=num_images,
        notes=tuple(notes),
    )


def _clean_text(name: str, text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text, not {type(text).__name__}.")
    if len(text) > settings.MAX_PROMPT_CHARS:
        raise ValueError(
            f"The {name.replace('_', ' ')} has {len(text):,} characters; keep it under {settings.MAX_PROMPT_CHARS:,} "
            "(T5 reads at most 512 tokens, about 2,000 characters)."
        )
    # Control characters (NUL included) mean nothing to the tokenizers; keep newlines and tabs.
    return "".join(char for char in text if char in "\n\t" or char.isprintable())


# ----------------------------------------------------------------------------- prompts


def truncation_warnings(pipeline, prompt: str, max_sequence_length: int) -> list[str]:
    """Sentences saying how much of ``prompt`` CLIP (77 tokens) and T5 will drop, if any."""
    warnings = []
    clip_tokens = len(pipeline.tokenizer(prompt, truncation=False)["input_ids"])
    clip_limit = pipeline.tokenizer.model_max_length
    if clip_tokens > clip_limit:
        warnings.append(
            f"CLIP reads 77 tokens: {clip_tokens - clip_limit} of the prompt's {clip_tokens} CLIP tokens are dropped "
            "(T5 still reads them)."
            if pipeline.tokenizer_3 is not None
            else f"CLIP reads 77 tokens: {clip_tokens - clip_limit} of the prompt's {clip_tokens} CLIP tokens are dropped."
        )
    if pipeline.tokenizer_3 is not None:
        t5_tokens = len(pipeline.tokenizer_3(prompt, truncation=False)["input_ids"])
        if t5_tokens > max_sequence_length:
            warnings.append(
                f"T5 reads {max_sequence_length} tokens here: {t5_tokens - max_sequence_length} of the prompt's "
                f"{t5_tokens} T5 tokens are dropped; raise max_sequence_length (up to {settings.MAX_T5_TOKENS}) "
                "or shorten the prompt."
            )
    return warnings


# ----------------------------------------------------------------------------- previews


class LatentPreviewer:
    """Turns SD3 latents into a rough RGB image without running the VAE decoder.

    The linear map from the 16 latent channels to RGB is fitted once per VAE by
    least squares: a few smooth colour images are encoded and their pooled
    pixels regressed on the latents. It costs one small VAE encode at first use
    and a tiny matrix product per preview, and works for any SD3 VAE.
    """

    def __init__(self, vae) -> None:
        self.vae = vae
        self._projection: torch.Tensor | None = None

    @classmethod
    def for_pipeline(cls, pipeline) -> LatentPreviewer:
        """The previewer kept on ``pipeline`` itself, so it is fitted once and freed with the pipeline."""
        previewer = getattr(pipeline, "studio_previewer", None)
        if previewer is None or previewer.vae is not pipeline.vae:
            previewer = cls(pipeline.vae)
            pipeline.studio_previewer = previewer
        return previewer

    @torch.inference_mode()
    def _fit(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        coarse = torch.rand(12, 3, 4, 4, generator=generator) * 2 - 1
        images = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
        parameter = next(self.vae.parameters())
        latents = self.vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist.mean.float().cpu()
        shift = getattr(self.vae.config, "shift_factor", 0.0) or 0.0
        latents = (latents - shift) * self.vae.config.scaling_factor  # the pipeline's latent space
        targets = torch.nn.functional.adaptive_avg_pool2d(images, latents.shape[-2:])
        features = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        features = torch.cat([features, torch.ones(features.shape[0], 1)], dim=1)  # bias column
        rgb = targets.permute(0, 2, 3, 1).reshape(-1, 3)
        return torch.linalg.lstsq(features, rgb).solution  # (17, 3)

    def __call__(self, latents: torch.Tensor) -> list[Image.Image]:
        if self._projection is None:
            self._projection = self._fit()
        flat = latents.detach().float().cpu().permute(0, 2, 3, 1)
        flat = torch.cat([flat, torch.ones(*flat.shape[:-1], 1)], dim=-1)
        rgb = ((flat @ self._projection).clamp(-1, 1) + 1) * 127.5
        return [Image.fromarray(image.round().to(torch.uint8).numpy()) for image in rgb]


# ----------------------------------------------------------------------------- generation


class OutOfGpuMemory(ValueError):
    """The GPU ran out of memory while drawing; the message names the request and a mode that needs less."""


def lower_memory_mode(model_key: str, mode: str | None, height: int, width: int, num_images: int = 1) -> str | None:
    """The first memory mode, in ``auto``'s order (fastest first), whose planned peak is below ``mode``'s.

    None when ``mode`` is already the smallest; ``settings.OOM_FALLBACK_MEMORY_MODE`` when the
    planner cannot plan this request (an unknown mode, or a size only the tiny models draw).
    """
    from pipelines.memory import default_mode, modes_for, plan

    current = mode or default_mode(model_key)
    try:
        peak = plan(model_key, current, height, width, num_images).peak_bytes
        smaller = [
            candidate.key
            for candidate in modes_for(model_key)
            if plan(model_key, candidate.key, height, width, num_images).peak_bytes < peak
        ]
    except ValueError:
        return None if current == settings.OOM_FALLBACK_MEMORY_MODE else settings.OOM_FALLBACK_MEMORY_MODE
    return smaller[0] if smaller else None


def out_of_memory_message(request: ResolvedRequest, mode: str | None) -> str:
    """One sentence for a generation that ran out of GPU memory: what was asked, and what needs less."""
    asked = f"{request.num_images} image(s) of {request.width}x{request.height} with {request.steps} steps" + (
        f" in memory mode {mode}" if mode else ""
    )
    smaller = lower_memory_mode(request.model_key, mode, request.height, request.width, request.num_images)
    if smaller is None:
        return f"The GPU ran out of memory drawing {asked}; draw a smaller size or fewer images at once."
    return (
        f"The GPU ran out of memory drawing {asked}; choose memory mode {smaller}, which needs less, "
        "or draw a smaller size or fewer images at once."
    )


@dataclass
class GenerateResult:
    images: list[Image.Image]
    seeds: list[int]  # image i reproduces alone with seeds[i] and num_images=1
    parameters: list[str]  # the A1111 text for each image
    settings: list[dict]  # the full settings for each image (the PNG's JSON chunk)
    request: ResolvedRequest
    seconds: float
    steps_done: int
    stopped: bool
    warnings: list[str] = field(default_factory=list)


def scheduler_name(pipeline) -> str:
    scheduler = pipeline.scheduler
    shift = getattr(scheduler.config, "shift", None)
    return f"{type(scheduler).__name__}" + (f" (shift {shift:g})" if shift is not None else "")


def configure_vae(pipeline, request: ResolvedRequest) -> bool:
    """Decode in tiles for large images or offloaded pipelines, one image at a time for batches.

    The VAE decode is the memory peak at high resolution (its full-resolution
    feature maps); tiling bounds it at a small cost in time and tiny seams.
    Set on every call, so a small image after a large one decodes untiled.
    Returns whether tiling is on.
    """
    vae = pipeline.vae
    offloaded = str(getattr(pipeline, "studio_memory_mode", "")).endswith(("offload", "sequential"))
    tiled = offloaded or request.width * request.height > settings.VAE_TILING_ABOVE_PIXELS
    vae.enable_tiling() if tiled else vae.disable_tiling()
    vae.enable_slicing() if request.num_images > 1 else vae.disable_slicing()
    return tiled


@torch.inference_mode()
def generate(
    pipeline,
    request: ResolvedRequest,
    *,
    repo_id: str,
    on_step: Callable[[int, int, list[Image.Image] | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    preview_every: int = 0,
    previewer: LatentPreviewer | None = None,
    loras: list[dict] | None = None,
    extra_arguments: dict | None = None,
    extra_parameters: dict | None = None,
    extra_settings: dict | None = None,
) -> GenerateResult:
    """Draw ``request`` with ``pipeline``.

    ``extra_arguments`` go to the pipeline call as they are (a ControlNet's ``control_image`` and
    ``controlnet_conditioning_scale``; image-to-image's ``image``, ``strength``, ``mask_image``);
    ``extra_parameters`` are more A1111 pairs for each PNG's text, ``extra_settings`` more keys for
    its JSON chunk.

    ``on_step(step, total, previews)`` is called after every denoising step;
    ``previews`` holds projected latents every ``preview_every`` steps (0: never).
    ``should_stop()`` is polled each step; when True the run stops there and the
    partly denoised images are decoded and returned with ``stopped=True``.
    Image i uses seed ``request.seed + i``, so each reproduces alone.
    """
    started = time.perf_counter()
    warnings = truncation_warnings(pipeline, request.prompt, request.max_sequence_length)
    seeds = [request.seed + index for index in range(request.num_images)]
    # CPU generators: the same seed gives the same noise on any device.
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    state = {"steps_done": 0, "stopped": False}

    def step_end(pipe, step, timestep, tensors):
        state["steps_done"] = step + 1
        previews = None
        if preview_every and previewer is not None and (step + 1) % preview_every == 0 and step + 1 < request.steps:
            latents = tensors["latents"]
            previews = previewer(latents[-request.num_images :] if latents.shape[0] > request.num_images else latents)
        if on_step is not None:
            on_step(step + 1, request.steps, previews)
        if should_stop is not None and should_stop():
            state["stopped"] = True
            pipe._interrupt = True  # diffusers skips the remaining steps and decodes what it has
        return {}

    call = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt if request.uses_cfg and request.negative_prompt else None,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "height": request.height,
        "width": request.width,
        "num_images_per_prompt": request.num_images,
        "generator": generators,
        "max_sequence_length": request.max_sequence_length,
        "callback_on_step_end": step_end,
        "callback_on_step_end_tensor_inputs": ["latents"],
    }
    if request.skip_layer_guidance_layers:
        call["skip_guidance_layers"] = list(request.skip_layer_guidance_layers)
    call.update(extra_arguments or {})
    vae_tiled = configure_vae(pipeline, request)
    out_of_memory = False
    try:
        with fast_call(pipeline):  # the step cache's per-call state; the compile cache saved once
            images = pipeline(**call).images
    except torch.OutOfMemoryError:
        out_of_memory = True  # answered below, once this block has let go of the failed call's tensors
    if out_of_memory:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        mode = getattr(pipeline, "studio_memory_mode", None)
        raise OutOfGpuMemory(out_of_memory_message(request, mode))
    seconds = time.perf_counter() - started

    sampler = scheduler_name(pipeline)
    parameters, all_settings = [], []
    for seed in seeds:
        pairs = {
            "Steps": request.steps,
            "Sampler": "Euler",
            "Schedule type": "Simple",
            "CFG scale": f"{request.guidance:g}",
            "Seed": seed,
            "Size": f"{request.width}x{request.height}",
            "Model": repo_id.rsplit("/", 1)[-1],
        }
        if request.skip_layer_guidance_layers:
            pairs["SLG layers"] = "[" + ", ".join(map(str, request.skip_layer_guidance_layers)) + "]"
        if request.max_sequence_length != settings.DEFAULT_T5_TOKENS:
            pairs["T5 tokens"] = request.max_sequence_length
        pairs.update(extra_parameters or {})
        if loras:
            pairs["Lora hashes"] = ", ".join(f"{lora['name']}: {lora.get('hash', '')}" for lora in loras)
        if state["stopped"]:
            pairs["Interrupted at step"] = state["steps_done"]
        # A1111 keeps LoRAs in the prompt as <lora:name:weight> tags; image browsers and Civitai read them there.
        tagged_prompt = " ".join(
            [request.prompt, *(f"<lora:{lora['name']}:{lora_weight_text(lora['weight'])}>" for lora in loras or [])]
        )
        parameters.append(a1111_parameters(tagged_prompt, request.negative_prompt if request.uses_cfg else "", pairs))
        all_settings.append(
            {
                **dataclasses.asdict(request),
                "seed": seed,
                "num_images": 1,
                "model_id": repo_id,
                "scheduler": sampler,
                "loras": loras or [],
                "steps_done": state["steps_done"],
                "stopped": state["stopped"],
                "vae_tiling": vae_tiled,
                **(extra_settings or {}),
            }
        )
    return GenerateResult(
        images=images,
        seeds=seeds,
        parameters=parameters,
        settings=all_settings,
        request=request,
        seconds=seconds,
        steps_done=state["steps_done"],
        stopped=state["stopped"],
        warnings=warnings,
    )


def save_images(result: GenerateResult, folder: Path, *, outputs_dir: Path | None = None) -> list[Path]:
    """Write each image of ``result`` as a PNG carrying its settings; returns the paths in ``folder``.

    Names are ``<stamp>-<model>-<seed>-<random>.png``: two requests with the same seed in the same
    second (two visitors, say) get two files. ``outputs_dir`` (--outputs) gets a copy of each under
    the same name; an existing file there is never overwritten (a counter is added instead).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = result.request.model_key
    paths = []
    for image, seed, text, image_settings in zip(
        result.images, result.seeds, result.parameters, result.settings, strict=True
    ):
        name = workspace.unique_name(stamp, model, seed, suffix=".png")
        paths.append(save_png(image, workspace.exclusive_path(folder, name), text, image_settings))
        if outputs_dir is not None:
            save_png(image, workspace.exclusive_path(outputs_dir, name), text, image_settings)
    return paths
