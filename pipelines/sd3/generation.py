"""The one way to draw with SD3.5: a request in; images, PNG files, a details dict (and a control map) out.

Every tab, the round trip, the evaluation run and the benchmarks call the service; nothing else
draws (the trainer's validation renders, which run inside the training process, are the one
exception). The request picks the pipeline (pipelines/sd3/jobs.py):

    service = studio.generation                     # or GenerationService(manager) without a Studio
    outcome = service(GenerationRequest(prompt="a red fox <lora:style:0.8>", seed=7, steps=2))
    outcome = service(GenerationRequest(prompt="a house", control=ControlSettings(edges)))  # ControlNet
    outcome = service(ImageToImageRequest(photo, GenerationRequest(prompt=""), strength=0.6))  # img2img
    outcome.images, outcome.paths, outcome.details, outcome.control_map

Every job runs three named steps:

1. ``prepare``: LoRA tags are taken out of the prompt and merged with ``lora`` (pipelines/sd3/lora_tags);
   presets fill what was left empty and every value is checked (``sd3.resolve_request``); the memory
   mode is chosen (``Studio.memory_mode_for`` refuses a visitor's change on a public instance); each
   LoRA name is found (loaded already, else in the LoRA folder or the registry) before any
   model loads; then the pipeline is fetched in that mode, LoRAs named but not loaded are
   loaded, their trigger words join the prompt, and the selection is applied or fused.
2. draw: text to image here (``sd3.generate``); ControlNet and image to image bring their own
   (``pipelines.sd3.controlnet``, ``pipelines.sd3.image_to_image``), each on a pipeline made with
   ``from_pipe`` from the prepared one, which shares its weights and LoRAs.
3. ``finish``: the PNGs are written (``sd3.save_images``) and the details dict is built.

``pipelines`` never imports gradio: notes go to a ``notify`` callable, the step stream to
``on_step``, and a stop request is polled through ``should_stop``.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipelines import settings, workspace
from pipelines.catalog import CATALOG
from pipelines.history import LOCAL_OWNER, History
from pipelines.lora.library import LoadedLora, LoraLibrary, prompt_with_triggers
from pipelines.lora.sources import LoraSource
from pipelines.memory import resolve_mode
from pipelines.quotas import check_job_cost
from pipelines.sd3 import controlnet, image_to_image
from pipelines.sd3.control_maps import CheckedControl, check_control
from pipelines.sd3.fast import prepare_for_lora
from pipelines.sd3.jobs import (
    GenerationOutcome,
    GenerationRequest,
    ImageToImageRequest,
    Notify,
    PreparedGeneration,
    StepCallback,
    image_fingerprint,
)
from pipelines.sd3.lora_tags import LoraChoice, merge_lora_choices, parse_lora_text, split_lora_tags
from pipelines.sd3.text_to_image import (
    GenerateResult,
    LatentPreviewer,
    ResolvedRequest,
    generate,
    resolve_request,
    save_images,
    size_limits,
)
from pipelines.validation import as_int


@dataclass(frozen=True)
class _Checked:
    request: ResolvedRequest
    choices: list[LoraChoice]
    preview_every: int
    memory_mode: str
    memory_mode_reason: str
    library: LoraLibrary
    sources: dict[str, LoraSource]
    control: CheckedControl | None = None
    notes: tuple[str, ...] = ()  # what the user should know about the request as given (e.g. a LoRA tag won)


# ----------------------------------------------------------------------------- the service


class GenerationService:
    """Draws SD3.5 images for every tab (see the module docstring).

    ``manager`` loads the models; ``libraries`` holds the LoRAs loaded per model key (a fresh
    set if None); ``find_lora(name)`` returns the LoraSource a LoRA name stands for in the LoRA
    folder or the registry, or None (None: names must be loaded already); ``memory_mode_for``
    is ``Studio.memory_mode_for`` (None: any mode, default ``memory_mode``); ``outputs_dir``
    receives a copy of every PNG saved (--outputs; superseded by ``history``, which files each PNG it
    saves by mode and day and indexes it for the person at the machine); ``max_job_cost`` bounds what one request may cost
    (image-steps at the model's default size, ``pipelines.quotas``; None: no bound, the local default).
    """

    def __init__(
        self,
        manager,
        *,
        libraries: Mapping[str, LoraLibrary] | None = None,
        find_lora: Callable[[str], LoraSource | None] | None = None,
        memory_mode: str = "auto",
        memory_mode_for: Callable[[str | None, str, int, int], str] | None = None,
        outputs_dir: Path | None = None,
        describe: Callable[[Image.Image], str] | None = None,
        max_job_cost: int | None = None,
        history: History | None = None,
    ) -> None:
        self.manager = manager
        self.describe = describe
        self.max_job_cost = max_job_cost
        self.history = history
        self.libraries = (
            dict(libraries)
            if libraries is not None
            else {
                key: LoraLibrary(key, before_attach=prepare_for_lora)
                for key, spec in CATALOG.items()
                if spec.kind == "sd3"
            }
        )
        self.find_lora = find_lora
        self.default_memory_mode = memory_mode
        self._memory_mode_for = memory_mode_for
        self.outputs_dir = outputs_dir

    @property
    def tiny(self) -> bool:
        return bool(self.manager.tiny)

    # -- the pipeline (one way to get it)

    def memory_mode(
        self, key: str, requested: str | None, height: int, width: int, *, controlnet: str | None = None
    ) -> tuple[str, str]:
        """(mode, why) a request for ``key`` at ``width``x``height`` (with ``controlnet``, a catalog key)
        runs in; ValueError on a refused change."""
        if self._memory_mode_for is not None:
            wanted = self._memory_mode_for(requested, key, height, width)
        else:
            wanted = str(requested or "").strip() or self.default_memory_mode
        return resolve_mode(key, wanted or "auto", self.manager.runtime, height, width, controlnet=controlnet)

    def pipeline_in_mode(self, key: str, mode: str, notify: Notify | None = None):
        """The SD3.5 pipeline for ``key`` in memory mode ``mode`` (loaded, or reloaded, if needed)."""
        return self.manager.get(key, variant=mode, notify=notify)

    def pipeline(self, key: str, memory_mode: str | None = None, notify: Notify | None = None):
        """The pipeline for ``key`` as loaded already, else in ``memory_mode`` (None: the instance's) at the
        planner's default size: what the LoRA panel attaches LoRAs to."""
        if memory_mode is None:
            for loaded in self.manager.loaded_models():
                if loaded.key == key:
                    return self.pipeline_in_mode(key, loaded.variant, notify)
        side = settings.PLAN_DEFAULT_SIDE
        mode, _ = self.memory_mode(key, memory_mode, side, side)
        return self.pipeline_in_mode(key, mode, notify)

    def load_lora(
        self,
        key: str,
        source: LoraSource,
        *,
        memory_mode: str | None = None,
        name: str | None = None,
        scale: float | None = None,
        notify: Notify | None = None,
        visitor: str | None = None,
    ) -> LoadedLora:
        """Load ``source`` onto ``key``'s pipeline (as loaded, else in ``memory_mode``); see ``LoraLibrary.load``."""
        pipeline = self.pipeline(key, memory_mode, notify)
        return self.libraries[key].load(pipeline, source, name=name, scale=scale, visitor=visitor)

    # -- 1. prepare

    def prepare(
        self, request: GenerationRequest, *, visitor: str | None = None, notify: Notify | None = None
    ) -> PreparedGeneration:
        """Check ``request``, load what it needs and apply its LoRAs; nothing is drawn yet.

        Every check that needs no model runs before any model loads. ``notify`` receives the
        sentences a user should see (snapped sizes, ignored negative prompt, LoRAs loaded on
        demand, trigger words added, models unloaded to make room).
        """
        say = notify or (lambda _sentence: None)
        timings: dict[str, float] = {}
        started = time.perf_counter()

        # 1-3. Every check that needs no model: settings, ControlNet, memory mode, where each LoRA comes from.
        checked = self._check(request, visitor)
        resolved, choices, library, sources = checked.request, checked.choices, checked.library, checked.sources
        mode, mode_reason, key = checked.memory_mode, checked.memory_mode_reason, resolved.model_key
        notes = [*checked.notes, *resolved.notes]
        for note in notes:
            say(note)

        # 3. The pipeline, then the LoRAs named but not loaded yet.
        before = time.perf_counter()
        pipeline = self.pipeline_in_mode(key, mode, notify)
        timings["load_seconds"] = time.perf_counter() - before
        before = time.perf_counter()
        entries: dict[str, tuple[LoadedLora, bool]] = {}
        for choice in choices:
            source = sources.get(choice.name)
            if source is None:
                entries[choice.name] = (library.get(choice.name, visitor), False)
                continue
            loaded = library.load(pipeline, source, visitor=visitor)
            entries[choice.name] = (loaded, True)
            note = f"Loaded the LoRA {loaded.name} ({source.description}) on {library.model_title}."
            notes.append(note)
            say(note)
            for warning in loaded.warnings:
                notes.append(warning)
                say(warning)
        selection = [(entries[choice.name][0].name, choice.weight_for(entries[choice.name][0])) for choice in choices]

        # 4. Trigger words join the prompt (once: a prompt that has them already, as a PNG's does, keeps its own).
        prompt, trigger_words = prompt_with_triggers(
            resolved.prompt,
            [(entries[choice.name][0], weight) for choice, (_, weight) in zip(choices, selection, strict=True)],
        )
        if trigger_words:
            note = f"Added the LoRAs' trigger words to the prompt: {', '.join(trigger_words)}."
            notes.append(note)
            say(note)
        if prompt != resolved.prompt:
            resolved = dataclasses.replace(resolved, prompt=prompt)

        # 5. What the next image uses: exactly this selection, fused or not.
        if request.lora_fuse and selection:
            library.fuse(pipeline, selection, visitor)
        else:
            if library.fused:
                library.unfuse(pipeline)
            library.apply(pipeline, selection, visitor)
        loaded_now = {entry.name for entry, fresh in entries.values() if fresh}
        loras = [
            {**entry.png_entry(weight), "loaded_now": entry.name in loaded_now} for entry, weight in library.active()
        ]
        timings["lora_seconds"] = time.perf_counter() - before
        timings["prepare_seconds"] = time.perf_counter() - started
        return PreparedGeneration(
            request=resolved,
            pipeline=pipeline,
            repo_id=CATALOG[key].repo_id,
            memory_mode=mode,
            memory_mode_reason=mode_reason,
            loras=loras,
            lora_fused=library.fused,
            trigger_words=trigger_words,
            notes=notes,
            preview_every=checked.preview_every,
            visitor=visitor,
            tiny=self.tiny,
            timings=timings,
            control=checked.control,
            mode="controlnet" if checked.control is not None else "txt2img",
        )

    def check(self, request: GenerationRequest, *, visitor: str | None = None) -> ResolvedRequest:
        """Every check of ``prepare`` that needs no model (settings, memory mode, LoRA names); the resolved
        request. ValueError with a sentence for the first problem. Nothing loads."""
        return self._check(request, visitor).request

    def _check(self, request: GenerationRequest, visitor: str | None) -> _Checked:
        # 1. Settings: the prompt's LoRA tags out, presets in, every value checked.
        prompt, tagged = split_lora_tags(request.prompt)
        choices, lora_notes = merge_lora_choices(tagged, parse_lora_text(request.lora, request.lora_scale))
        resolved = resolve_request(request.drawing(prompt), tiny=self.tiny)
        self.check_cost(resolved)
        preview_every = 0 if request.preview_every is None else request.preview_every
        preview_every = as_int("preview_every", preview_every, 0, settings.MAX_PREVIEW_EVERY)
        # 2. A ControlNet fits SD3.5 Large only; its settings and upload are checked before any model loads.
        key = resolved.model_key
        control = check_control(request.control, key) if request.control is not None else None
        # 3. The memory mode (a public instance refuses a visitor's change) and each LoRA's source.
        mode, reason = self.memory_mode(
            key,
            request.memory_mode,
            resolved.height,
            resolved.width,
            controlnet=control.controlnet_key if control is not None else None,
        )
        library = self.libraries[key]
        sources = self._lora_sources(library, choices, visitor)
        return _Checked(resolved, choices, preview_every, mode, reason, library, sources, control, tuple(lora_notes))

    def check_cost(self, resolved: ResolvedRequest) -> None:
        """ValueError with a sentence when ``resolved`` costs more than ``max_job_cost`` (a public instance)."""
        default_side = size_limits(CATALOG[resolved.model_key], self.tiny)["default_size"]
        check_job_cost(
            resolved.steps, resolved.num_images, resolved.width, resolved.height, default_side, self.max_job_cost
        )

    def _lora_sources(
        self, library: LoraLibrary, choices: list[LoraChoice], visitor: str | None
    ) -> dict[str, LoraSource]:
        """The source of each named LoRA that ``visitor`` has not loaded; ValueError for a name found nowhere."""
        visible = set(library.names(visitor))
        sources = {}
        for choice in choices:
            if choice.name in visible:
                continue
            source = self.find_lora(choice.text or choice.name) if self.find_lora is not None else None
            if source is None:
                # The real cause first: loaded, but on the model it was made for (a LoRA trained on Medium).
                elsewhere = [
                    other.model_title
                    for other in self.libraries.values()
                    if other is not library and choice.name in other.names(visitor)
                ]
                if elsewhere:
                    raise ValueError(
                        f"The LoRA {choice.name!r} is loaded on {' and '.join(elsewhere)}, not on "
                        f"{library.model_title}: a LoRA fits the model it was made for. Choose that model, or a "
                        f"LoRA made for {library.model_title}."
                    )
                loaded = library.names(visitor)
                where = " in the LoRA folder or the registry" if self.find_lora is not None else ""
                if not loaded:
                    raise ValueError(
                        f"No LoRA is loaded, so {choice.name!r} cannot be used, and there is no LoRA of that name"
                        f"{where}; load it first (a registry name, a file in the LoRA folder, or an upload)."
                    )
                raise ValueError(
                    f"No LoRA named {choice.name!r} is loaded; loaded: {', '.join(loaded)}; nor is there one of that "
                    f"name{where}."
                )
            sources[choice.name] = source
        return sources

    # -- 2. draw

    def draw(
        self,
        prepared: PreparedGeneration,
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerateResult:
        """Run the denoising loop of ``prepared`` (previews every ``preview_every`` steps)."""
        previewer = LatentPreviewer.for_pipeline(prepared.pipeline) if prepared.preview_every else None
        return generate(
            prepared.pipeline,
            prepared.request,
            repo_id=prepared.repo_id,
            on_step=on_step,
            should_stop=should_stop,
            preview_every=prepared.preview_every,
            previewer=previewer,
            loras=[{key: value for key, value in lora.items() if key != "loaded_now"} for lora in prepared.loras],
        )

    # -- 3. finish

    def finish(
        self,
        prepared: PreparedGeneration,
        result: GenerateResult,
        *,
        folder: Path | None = None,
        save: bool = True,
    ) -> GenerationOutcome:
        """Write the PNGs (into ``folder``, default: the visitor's session folder; a copy in --outputs)
        and build the details dict."""
        before = time.perf_counter()
        # Each image's record: its job, its place in it, its source, its own pixels (pipelines/sd3/records).
        for index, (image, image_settings) in enumerate(zip(result.images, result.settings, strict=True)):
            image_settings["job"] = {
                "id": prepared.job_id,
                "mode": prepared.mode,
                "index": index,
                "source": prepared.source,
                "image": image_fingerprint(image),
            }
        paths: list[Path] = []
        records: list[str] = []
        if save:
            if folder is None:
                workspace.sweep(settings.CACHE_SECONDS)  # sessions that left without closing their page
                folder = workspace.session_folder(prepared.visitor or "local")
            paths = save_images(result, folder, outputs_dir=self.outputs_dir)
            records = self._keep(prepared, result, paths)
        timings = {
            **prepared.timings,
            "generate_seconds": result.seconds,
            "save_seconds": time.perf_counter() - before,
        }
        timings["total_seconds"] = timings.get("prepare_seconds", 0.0) + result.seconds + timings["save_seconds"]
        details = generation_details(prepared, result, paths, timings)
        details["records"] = records  # the saved history's ids of these images ([] when it keeps none)
        return GenerationOutcome(result=result, paths=paths, details=details)

    def _keep(self, prepared: PreparedGeneration, result: GenerateResult, paths: list[Path]) -> list[str]:
        """A copy of each PNG in the saved history (A1111's folder per mode and day), indexed; the ids.

        The history is the local owner's (the person at the machine): a public instance keeps none yet.
        The copy is the very file written for the page, byte for byte, settings chunks included.
        """
        if self.history is None:
            return []
        folder = self.history.folder_for(LOCAL_OWNER, prepared.mode)
        records = []
        for path, image_settings in zip(paths, result.settings, strict=True):
            kept = workspace.exclusive_path(folder, path.name)
            shutil.copyfile(path, kept)
            records.append(self.history.add(LOCAL_OWNER, kept, image_settings).id)
        return records

    def __call__(
        self,
        request: GenerationRequest | ImageToImageRequest,
        *,
        owner: str | None = None,
        notify: Notify | None = None,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        folder: Path | None = None,
        save: bool = True,
    ) -> GenerationOutcome:
        """Draw ``request``: text to image, ControlNet (``control`` set) or image to image.

        ``owner`` is whose LoRAs the job may use and whose folder receives the PNGs (None: the
        operator, who sees every LoRA); ``notify`` receives the sentences a user should see;
        ``on_step(step, total, previews)`` follows the denoising loop; ``should_stop()`` is polled
        at every step (a stop keeps the steps done). ``folder`` (default: the owner's session folder)
        receives the PNGs unless ``save`` is False. ValueError with one sentence for the first bad
        value, before any model loads.
        """
        arguments = {"visitor": owner, "notify": notify, "on_step": on_step, "should_stop": should_stop}
        if isinstance(request, ImageToImageRequest):
            return image_to_image.run(self, request, describe=self.describe, folder=folder, save=save, **arguments)
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"GenerationService draws a GenerationRequest or an ImageToImageRequest, not {request!r}.")
        if request.control is not None:
            return controlnet.run(self, request, folder=folder, save=save, **arguments)
        prepared = self.prepare(request, visitor=owner, notify=notify)
        result = self.draw(prepared, on_step=on_step, should_stop=should_stop)
        return self.finish(prepared, result, folder=folder, save=save)


def generation_details(
    prepared: PreparedGeneration, result: GenerateResult, paths: list[Path], timings: dict[str, float]
) -> dict:
    """The details dict of one generation: plain JSON data, what API clients and tests read."""
    request = prepared.request
    key = request.model_key
    return {
        "prompt": request.prompt,  # what the encoders read (LoRA tags out, trigger words in)
        "negative_prompt": request.negative_prompt if request.uses_cfg else "",
        "model": {"key": key, "repo_id": prepared.repo_id, "title": CATALOG[key].title},
        "seed": result.seeds[0],
        "seeds": list(result.seeds),
        "num_images": len(result.images),
        "steps": request.steps,
        "steps_done": result.steps_done,
        "stopped": result.stopped,
        "guidance": request.guidance,
        "width": request.width,
        "height": request.height,
        "size": f"{request.width}x{request.height}",
        "max_sequence_length": request.max_sequence_length,
        "skip_layer_guidance_layers": list(request.skip_layer_guidance_layers),
        "memory_mode": {
            "mode": prepared.memory_mode,
            "reason": prepared.memory_mode_reason,
            # What the weights really are: a "bf16" mode runs float32 on a CPU.
            "dtype": str(getattr(prepared.pipeline, "dtype", "")).removeprefix("torch."),
        },
        "loras": [dict(lora) for lora in prepared.loras],
        "lora_fused": prepared.lora_fused,
        "trigger_words_added": list(prepared.trigger_words),
        "parameters": list(result.parameters),  # each PNG's A1111 text: its prompt redraws it
        "files": [path.name for path in paths],  # names only: the gallery serves the files themselves
        "timings": {name: round(seconds, 4) for name, seconds in timings.items()},
        "notes": list(prepared.notes),
        "warnings": list(result.warnings),
        "tiny": prepared.tiny,  # a tiny random stand-in drew it: noise by design
        "controlnet": prepared.control.details() if prepared.control is not None else None,
        "mode": prepared.mode,
        "job_id": prepared.job_id,
        "source": prepared.source,  # the input image of an image-to-image job: size and pixel hash
    }
