"""ControlNet for SD3.5 Large: the generation service's prepare and finish, with its own draw.

    outcome = studio.generation(GenerationRequest(prompt="a house", control=ControlSettings(image)))
    outcome.control_map  # the map the ControlNet followed (the service calls ``run`` below)

1. ``GenerationService.prepare`` checks the request (a ControlNet fits SD3.5 Large only; Medium
   and Turbo get one sentence before any model loads), plans the memory mode with the ControlNet,
   loads Large and applies its LoRAs.
2. The ControlNet (``SD3ControlNetModel``, one of Stability's canny/depth/blur releases) loads
   through the manager in Large's memory mode (``sd3.loading.load_sd3_controlnet``), and ``StableDiffusion3ControlNetPipeline.from_pipe``
   builds the ControlNet pipeline from Large's loaded components: the MMDiT, text encoders and
   VAE are the very same objects (LoRAs included), never a second copy. The pipeline is kept on
   the ControlNet model while Large's components stay the same, so it is built once.
3. The control map is made (``pipelines.sd3.control_maps``; ``preprocess=False`` uses the upload as
   it is), and each image is drawn by ``sd3.generate`` with the map and the scale. diffusers
   VAE-encodes the map with ``latent_dist.sample()`` from the global generator, so each image runs
   with it seeded from the image's own seed: image *i* redraws alone with seed + *i*.
4. ``GenerationService.finish`` writes the PNGs (their text says ``ControlNet: canny, weight 1``)
   and the details dict, whose ``controlnet`` entry records type, scale and preprocessing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from PIL import Image

from pipelines.catalog import DEPTH_ESTIMATOR_KEY
from pipelines.memory.modes import get_mode
from pipelines.sd3.control_maps import DEPTH_TRAINING_NOTE, CheckedControl, control_map
from pipelines.sd3.jobs import GenerationOutcome, GenerationRequest, Notify, PreparedGeneration, StepCallback
from pipelines.sd3.text_to_image import GenerateResult, LatentPreviewer, generate


def controlnet_pipeline(base, controlnet):
    """The ``StableDiffusion3ControlNetPipeline`` of ``base``'s loaded components plus ``controlnet``.

    Built with ``from_pipe`` (no weight is copied but the small position table diffusers gives
    the ControlNet) and kept on the ControlNet while ``base``'s components are the same objects.
    """
    from diffusers import StableDiffusion3ControlNetPipeline

    cached = getattr(controlnet, "studio_pipeline", None)
    if cached is not None and all(cached.components.get(name) is module for name, module in base.components.items()):
        return cached
    pipeline = StableDiffusion3ControlNetPipeline.from_pipe(base, controlnet=controlnet)
    pipeline.set_progress_bar_config(disable=True)
    mode = getattr(base, "studio_memory_mode", "bf16")
    pipeline.studio_memory_mode = mode
    if get_mode("sd35-large", mode).offload == "sequential":
        from accelerate import cpu_offload

        cpu_offload(controlnet, execution_device=base._execution_device)
    controlnet.studio_pipeline = pipeline  # freed with the ControlNet; the manager unloads it with Large
    return pipeline


def make_control_map(service, control: CheckedControl, notify: Notify | None = None):
    """The map the ControlNet follows: the upload itself, or its canny/depth/blur map."""
    if not control.preprocess:
        return control.image
    estimator = None
    if control.control_type == "depth":
        estimator = service.manager.get(DEPTH_ESTIMATOR_KEY, notify=notify, keep=("sd35-large",))
    return control_map(
        control.control_type,
        control.image,
        canny_low=control.canny_low,
        canny_high=control.canny_high,
        estimator=estimator,
    )


def control_tensor(pipeline, control: CheckedControl, image: Image.Image, height: int, width: int) -> torch.Tensor:
    """``image`` as the pixel tensor the ControlNet was trained on, at the drawing's size.

    Depth and blur: the pipeline's own preprocessing (resize, [-1, 1]). Canny: Stability's canny
    ControlNet reads unnormalised pixels times 127.5 plus 0.5, as its model card's diffusers example
    does with its ``SD3CannyImageProcessor`` (a ``VaeImageProcessor`` with ``do_normalize=False``).
    """
    from diffusers.image_processor import VaeImageProcessor

    if control.control_type != "canny":
        return pipeline.image_processor.preprocess(image, height=height, width=width)
    unnormalised = VaeImageProcessor(vae_scale_factor=pipeline.vae_scale_factor, do_normalize=False)
    return unnormalised.preprocess(image, height=height, width=width) * 255 * 0.5 + 0.5


def draw(
    service,
    prepared: PreparedGeneration,
    control_image: Image.Image,
    *,
    notify: Notify | None = None,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerateResult:
    """Draw ``prepared`` with its ControlNet following ``control_image`` (a map, as made by ``make_control_map``)."""
    control = prepared.control
    request = prepared.request
    controlnet = service.manager.get(
        control.controlnet_key, variant=prepared.memory_mode, notify=notify, keep=(request.model_key,)
    )
    pipeline = controlnet_pipeline(prepared.pipeline, controlnet)
    pixels = control_tensor(pipeline, control, control_image, request.height, request.width)
    previewer = LatentPreviewer.for_pipeline(pipeline) if prepared.preview_every else None
    loras = [{key: value for key, value in lora.items() if key != "loaded_now"} for lora in prepared.loras]
    pairs = {
        "ControlNet": f"{control.control_type}, weight {control.scale:g}"
        + ("" if control.preprocess else ", map as given")
    }
    total_steps = request.steps * request.num_images
    parts: list[GenerateResult] = []
    # The CUDA generators fork too (the map is encoded there on a GPU); none on a CPU-only machine.
    accelerators = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    for index in range(request.num_images):  # one image at a time: each seeds its own map encoding
        seed = request.seed + index
        single = dataclasses.replace(request, seed=seed, num_images=1)
        done_before = index * request.steps

        def step(done, total, previews, done_before=done_before):
            if on_step is not None:
                on_step(done_before + done, total_steps, previews)

        with torch.random.fork_rng(devices=accelerators):
            torch.manual_seed(seed)
            part = generate(
                pipeline,
                single,
                repo_id=prepared.repo_id,
                on_step=step,
                should_stop=should_stop,
                preview_every=prepared.preview_every,
                previewer=previewer,
                loras=loras,
                extra_arguments={"control_image": pixels, "controlnet_conditioning_scale": control.scale},
                extra_parameters=pairs,
                extra_settings={"controlnet": control.details()},
            )
        parts.append(part)
        if part.stopped:
            break
    return _joined(parts, request)


def _joined(parts: list[GenerateResult], request) -> GenerateResult:
    """One result for a request drawn one image at a time."""
    return GenerateResult(
        images=[image for part in parts for image in part.images],
        seeds=[seed for part in parts for seed in part.seeds],
        parameters=[text for part in parts for text in part.parameters],
        settings=[entry for part in parts for entry in part.settings],
        request=request,
        seconds=sum(part.seconds for part in parts),
        steps_done=parts[-1].steps_done,
        stopped=parts[-1].stopped,
        warnings=list(dict.fromkeys(warning for part in parts for warning in part.warnings)),
    )


def run(
    service,
    request: GenerationRequest,
    *,
    visitor: str | None = None,
    notify: Notify | None = None,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    folder=None,
    save: bool = True,
) -> GenerationOutcome:
    """Prepare, draw with the ControlNet, finish (``service`` is the GenerationService, whose ``__call__``
    hands requests with ``control`` here); the outcome's ``control_map`` is the map it followed."""
    if request.control is None:
        raise ValueError("No control image was given; upload one, or draw without ControlNet.")
    prepared = service.prepare(request, visitor=visitor, notify=notify)
    before = time.perf_counter()
    control_image = make_control_map(service, prepared.control, notify)
    if prepared.control.control_type == "depth" and prepared.control.preprocess:
        prepared.notes.append(DEPTH_TRAINING_NOTE)
    prepared.timings["control_map_seconds"] = time.perf_counter() - before
    before = time.perf_counter()
    result = draw(service, prepared, control_image, notify=notify, on_step=on_step, should_stop=should_stop)
    prepared.timings["controlnet_load_seconds"] = time.perf_counter() - before - result.seconds
    # Both happen before the first step, as loading Large does: they count as preparation.
    prepared.timings["prepare_seconds"] += prepared.timings["control_map_seconds"]
    prepared.timings["prepare_seconds"] += prepared.timings["controlnet_load_seconds"]
    outcome = service.finish(prepared, result, folder=folder, save=save)
    outcome.control_map = control_image
    return outcome
