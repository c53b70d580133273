"""The state every tab shares: passed to the tab builders, never a module global."""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import settings, workspace
from pipelines.blip.adapters import BlipAdapterInfo, BlipAdapterSet, default_adapter_dir
from pipelines.blip.captioner import BlipCaptioner, CaptionRequest
from pipelines.blip.matching import ImageTextMatcher
from pipelines.blip.tiny_adapter import TINY_ADAPTER_DIR
from pipelines.catalog import CATALOG
from pipelines.history import History
from pipelines.lora.formats import PICKLED_SUFFIXES
from pipelines.lora.library import LoadedLora, LoraLibrary
from pipelines.lora.sources import (
    LoraSource,
    RegistryEntry,
    list_lora_files,
    load_registry,
    resolve_lora_source,
    sanitize_lora_name,
)
from pipelines.manager import ModelManager
from pipelines.sd3.fast import prepare_for_lora
from pipelines.sd3.generation import GenerationService
from pipelines.training.runs import LoadedTrainingResult, TrainingRun, TrainingRuns, renaming_sentence

logger = logging.getLogger(__name__)

HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
APP_ROOT = Path(__file__).resolve().parent.parent

TINY_MODE_NOTICE = (
    "Tiny mode: every model here is a miniature with random weights, built offline. Captions are "
    "gibberish and images are noise by design; everything else (decoding, scores, exports, the API) is real."
)


@dataclass
class Studio:
    manager: ModelManager
    outputs_dir: Path | None = None  # --outputs: where generated PNGs are saved (and, locally, indexed)
    memory_mode: str = "auto"  # --memory: the default SD3.5 memory mode
    blip_adapter_dir: Path | None = None  # None: $STUDIO_BLIP_ADAPTER_DIR, <tiny root>/blip-adapters, or adapters/
    # The BLIP LoRA adapters the Caption and Batch tabs share (see pipelines/blip/adapters.py).
    blip_adapters: BlipAdapterSet = field(init=False, repr=False)
    lora_dir: Path | None = None  # --lora-dir; None: <tiny root>/loras under --tiny, else loras/
    lora_registry_path: Path | None = None  # None: the tiny registry under --tiny, else assets/loras.json
    runs_dir: Path | None = None  # one folder per training run (log, dataset, PID file); None: <lora_dir>/.runs
    training_enabled: bool = True  # --no-train leaves the Train tab out
    # --public / $SPACE_ID: anonymous visitors share this process. Operator-only actions (unload,
    # evaluation runs, memory-mode changes, training unless $STUDIO_PUBLIC_TRAINING=1) are refused to them.
    public: bool = False
    public_training: bool = False  # with public: visitors may train
    # The SD3.5 LoRAs loaded per model (catalog key); they survive the model being evicted and reloaded.
    sd3_loras: dict[str, LoraLibrary] = field(init=False, repr=False)
    training_runs: TrainingRuns = field(init=False, repr=False)
    # The one way to draw (pipelines/sd3/generation.py): every tab that makes an SD3.5 image calls it.
    generation: GenerationService = field(init=False, repr=False)
    # The saved images of the person at the machine (pipelines/history); None on a public instance.
    history: History | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.history = History(self.outputs_dir) if self.outputs_dir is not None and not self.public else None
        directory = self.blip_adapter_dir or default_adapter_dir(self.manager.tiny_root)
        # --tiny: the random tiny-demo adapter appears in the tiny root's adapters folder, built on first use.
        tiny_folder = self.tiny and Path(directory) == Path(self.manager.tiny_root) / TINY_ADAPTER_DIR
        demo_source = self.manager.source_for("blip-caption") if tiny_folder else None
        self.blip_adapters = BlipAdapterSet(directory, tiny_blip_source=demo_source)
        self._init_sd3_loras()
        self.generation = GenerationService(
            self.manager,
            libraries=self.sd3_loras,
            find_lora=self.find_lora,
            memory_mode=self.memory_mode,
            memory_mode_for=self.memory_mode_for,
            # Locally the saved history files and indexes every image; a public instance given --outputs
            # keeps the operator's flat copy (its visitors' histories are not the operator's).
            outputs_dir=self.outputs_dir if self.public else None,
            history=self.history,
            describe=self.caption_for_prompt,
            # A public visitor's job cannot hold the GPU for minutes; the person at the machine has no bound.
            max_job_cost=settings.MAX_PUBLIC_JOB_COST if self.public else None,
        )

    def _init_sd3_loras(self) -> None:
        from pipelines.tiny import tiny_base_names, tiny_lora_dir, tiny_registry_path

        root = self.manager.tiny_root
        if self.lora_dir is None:
            self.lora_dir = tiny_lora_dir(root) if self.tiny else Path(settings.DEFAULT_LORA_DIR)
        if self.lora_registry_path is None:
            self.lora_registry_path = tiny_registry_path(root) if self.tiny else settings.LORA_REGISTRY_PATH
        self.sd3_loras = {
            key: LoraLibrary(
                key,
                model_title=f"{spec.title} (tiny)" if self.tiny else None,
                known_bases=tiny_base_names() if self.tiny else None,
                before_attach=prepare_for_lora,
                public=self.public,  # a public instance's visitors own the LoRAs they name
            )
            for key, spec in CATALOG.items()
            if spec.kind == "sd3"
        }
        self.training_runs = TrainingRuns(
            self.runs_dir or Path(self.lora_dir) / ".runs",
            environment={"HF_HUB_OFFLINE": "1"} if self.tiny else None,
        )
        # The real folders for the operator; visitors see the placeholders of path_placeholders().
        logger.info(
            "LoRA folder %s, training runs (with their outputs) in %s", self.lora_dir, self.training_runs.runs_dir
        )

    def path_placeholders(self) -> dict[Path, str]:
        """The server folders an answer could name, and what a visitor reads instead (the log has the real ones)."""
        from huggingface_hub import constants

        places = {
            APP_ROOT: "<app>",
            Path(tempfile.gettempdir()): "<tmp>",
            workspace.work_root(): "<work>",
            Path(constants.HF_HUB_CACHE): "<hub cache>",
            Path(self.lora_dir): "<loras>",
            self.adapter_dir: "<adapters>",
            self.training_runs.runs_dir: "<runs>",
        }
        if self.manager.tiny_root is not None:
            places[Path(self.manager.tiny_root)] = "<models>"
        return places

    def shown(self, value):
        """``value`` (an endpoint's details: dicts, lists, strings) with every server path replaced by a
        placeholder (``<models>/blip-caption``, ``<path>``), for a visitor's eyes."""
        return workspace.hide_paths_in(value, self.path_placeholders())

    @property
    def adapter_dir(self) -> Path:
        """Where BLIP adapters are read from (and the Train tab writes them)."""
        return Path(self.blip_adapters.adapter_dir)

    @property
    def tiny(self) -> bool:
        return self.manager.tiny

    @property
    def visitors_may_train(self) -> bool:
        """Training is open to whoever reaches the app: always locally, in public mode only if allowed."""
        return self.training_enabled and (not self.public or self.public_training)

    def require_operator(self, action: str) -> None:
        """ValueError with a sentence when a visitor of a public instance asks for an operator-only ``action``."""
        if self.public:
            raise ValueError(
                f"{action} is reserved for the operator of this public instance; run the Studio yourself "
                "(python app.py) to use it."
            )

    def memory_mode_for(self, requested: str | None, key: str, height: int, width: int) -> str:
        """The memory mode a request runs in: ``requested`` locally ("" or None: --memory).

        In public mode the mode is the operator's (--memory, or auto): a visitor asking for
        another one gets a sentence, so nobody reloads Large in a new mode for everyone else.
        "", "auto" (let the instance choose), the operator's setting and the mode it resolves to
        here are all accepted.
        """
        from pipelines.memory import resolve_mode

        requested = str(requested or "").strip()
        if not self.public:
            return requested or self.memory_mode
        if requested in ("", "auto", self.memory_mode):
            return self.memory_mode
        current, _ = resolve_mode(key, self.memory_mode, self.manager.runtime, height, width)
        if requested == current:
            return self.memory_mode
        raise ValueError(
            f"Changing the memory mode (to {requested!r}; this instance runs {current!r}) is reserved for the "
            "operator of this public instance; leave memory_mode out or send 'auto', or run the Studio yourself "
            "(python app.py) to choose one."
        )

    def captioner(self) -> BlipCaptioner:
        """The BLIP captioning model, loaded on first use, with every loaded adapter attached (inactive)."""
        return self.blip_adapters.attached(self.manager.get("blip-caption"))

    def caption_for_prompt(self, image) -> str:
        """BLIP's caption of ``image`` as a prompt (image to image with an empty prompt): the base
        captioner, no adapter, beam search with 3 beams."""
        request = CaptionRequest(strategy=settings.CaptionStrategy.BEAM, num_beams=3)
        return self.captioner().caption(image, request, adapter=None).captions[0].text

    def load_blip_adapter(
        self, source: str = "", uploads: list[str | Path] | tuple = (), *, visitor: str | None = None
    ) -> BlipAdapterInfo:
        """Load a BLIP LoRA adapter (folder name, Hub id, or uploaded files) for every tab that captions.

        Uploaded files become ``visitor``'s own adapter; folder and Hub adapters are shared.
        """
        return self.blip_adapters.load(self.captioner(), source, uploads, visitor=visitor)

    def matcher(self) -> ImageTextMatcher:
        """Image-text matching with the captioner; the retrieval model loads only if a request asks for it."""
        return ImageTextMatcher(self.captioner(), retrieval=lambda: self.manager.get("blip-itm"))

    # -- SD3.5 LoRAs

    def lora_registry(self) -> dict[str, RegistryEntry]:
        """The curated LoRAs offered by name (assets/loras.json; the tiny registry under --tiny)."""
        return load_registry(self.lora_registry_path)

    def lora_source(self, source: str = "", weight_name: str = "", upload: str | Path | None = None):
        """Resolve what a user typed: an upload, a registry name, a file in the LoRA folder, or a Hub repo id.

        A name with a file suffix is a file in the LoRA folder (so ``x.bin`` is refused as a pickle, by
        name); ``owner/name`` is a Hub repo; any other name is looked up in the registry, then the folder.
        """
        source = str(source or "").strip()
        if upload:
            return resolve_lora_source(upload=upload)
        if not source:
            raise ValueError(
                "Choose a LoRA: a registry name, a .safetensors file in the LoRA folder, an upload, "
                "or a Hub repo id such as owner/name."
            )
        hidden = [part for part in Path(source).parts if part.startswith(".") and part != ".."]
        if hidden:  # .runs/ (the training runs: their owners' alone) and other hidden folders are not the folder's
            raise ValueError(
                f"{hidden[0]!r} is a hidden folder, not part of the LoRA folder; give a file the LoRA list shows, "
                "or load a training run's result with its Load the result button."
            )
        suffix = Path(source).suffix.lower()
        if suffix in (".safetensors", *PICKLED_SUFFIXES) or Path(source).is_absolute() or ".." in Path(source).parts:
            return resolve_lora_source(file=source, lora_dir=self.lora_dir)
        registry = self.lora_registry()
        if source in registry:
            return resolve_lora_source(registry_name=source, registry=registry)
        if HUB_REPO_ID.match(source) and not (Path(self.lora_dir) / source).exists():
            return resolve_lora_source(repo=source, weight_name=weight_name or None)
        return resolve_lora_source(file=source, lora_dir=self.lora_dir)

    def find_lora(self, name: str) -> LoraSource | None:
        """The LoRA a bare name stands for, A1111's way: a registry entry, else a file in the LoRA folder
        (by its relative name, or by its stem as the Studio names adapters); None when neither has it.

        What this finds is shared by every visitor (an upload is found only by its own visitor, loaded).
        """
        name = str(name or "").strip()
        if not name:
            return None
        registry = self.lora_registry()
        wanted = sanitize_lora_name(name)
        for entry_name in registry:
            if entry_name in (name, wanted):
                return resolve_lora_source(registry_name=entry_name, registry=registry)
        files = list_lora_files(self.lora_dir)
        matches = [file for file in files if file == name or sanitize_lora_name(Path(file).stem) == wanted]
        if len(matches) > 1:
            raise ValueError(
                f"Several files in the LoRA folder are named like {name!r} ({', '.join(matches[:4])}); "
                "load the one you mean in the LoRA panel, or rename the others."
            )
        return resolve_lora_source(file=matches[0], lora_dir=self.lora_dir) if matches else None

    def sd3_pipeline(self, key: str, memory_mode: str | None = None, notify: Callable[[str], None] | None = None):
        """The SD3.5 pipeline for ``key``: as loaded already, else in ``memory_mode`` (default: --memory)."""
        return self.generation.pipeline(key, memory_mode, notify)

    def load_sd3_lora(
        self,
        key: str,
        source: str = "",
        *,
        weight_name: str = "",
        upload: str | Path | None = None,
        name: str | None = None,
        scale: float | None = None,
        memory_mode: str | None = None,
        notify: Callable[[str], None] | None = None,
        visitor: str | None = None,
    ) -> LoadedLora:
        """Load a LoRA onto the SD3.5 model ``key`` (loading the model first if needed).

        An upload becomes ``visitor``'s own LoRA (see ``LoraLibrary.load``); in public mode a
        ``memory_mode`` other than the operator's is refused before anything loads.
        """
        if self.public and memory_mode:
            side = settings.PLAN_DEFAULT_SIDE
            self.memory_mode_for(memory_mode, key, side, side)
            memory_mode = None  # as loaded, else the operator's mode
        lora_source = self.lora_source(source, weight_name, upload)  # checked before any model loads
        return self.generation.load_lora(
            key, lora_source, memory_mode=memory_mode, name=name or None, scale=scale, notify=notify, visitor=visitor
        )

    def load_training_result(self, run: TrainingRun, *, model: str = "medium") -> LoadedTrainingResult:
        """Load what a finished training ``run`` wrote as its owner's own entry: an SD3.5 LoRA onto ``model``
        (the run's base model) with the run's trigger word, or a BLIP adapter.

        The output stays in the run's folder (never a shared folder); the entry is ``run.owner``'s, as
        an upload is: nobody else lists, uses or unloads it. Says where it is now.
        """
        from pipelines.sd3.text_to_image import MODEL_CHOICES, model_key

        # 1. The output must be where this app's runs write, whatever the run object says.
        output_dir = Path(run.output_dir)
        runs_root = Path(self.training_runs.runs_dir).resolve()
        if not output_dir.resolve().is_relative_to(runs_root) or not output_dir.is_dir():
            raise ValueError(f"Run {run.run_id} left no output folder; start it again.")
        name = run.name or run.kind
        # 2. A BLIP adapter: attached as the owner's entry, named after the run.
        if run.kind == "blip":
            info = self.blip_adapters.load_owned_folder(
                self.captioner(), output_dir, name=name, owner=run.owner, described=f"run:{name}"
            )
            sentence = f"BLIP adapter **{info.name}** is loaded: choose it in the Caption tab."
            return LoadedTrainingResult(run.kind, info.name, sentence)
        # 3. An SD3.5 LoRA: the library's owned-entry path (an upload's), on the run's model.
        files = sorted(output_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"Run {run.run_id} left no .safetensors LoRA; it may not have finished.")
        key = model_key(model)
        trigger = " ".join(str(run.options.get("trigger", "") or "").split())
        triggers = (trigger,) if trigger else ()
        source = dataclasses.replace(
            resolve_lora_source(upload=files[0]),  # kind "upload": the library makes it the visitor's own
            description=f"run:{name}",
            name=sanitize_lora_name(name),
            trigger_words=triggers,
            bases=(key,),
        )
        loaded = self.generation.load_lora(key, source, notify=None, visitor=run.owner)
        short = next(short for short, catalog_key in MODEL_CHOICES.items() if catalog_key == key)
        with_trigger = f", trigger word `{triggers[0]}` (added to the prompt)" if triggers else ""
        sentence = (
            f"LoRA **{loaded.name}** is loaded on {CATALOG[key].title} ({loaded.modules_changed} layers){with_trigger}: "
            f"the Generate tab now uses {CATALOG[key].title} with `{loaded.name}` active."
        )
        renamed = renaming_sentence(name, name, loaded.name)
        return LoadedTrainingResult(
            run.kind,
            loaded.name,
            f"{sentence} {renamed}".strip(),
            model=short,
            trigger_words=tuple(loaded.trigger_words),
            weight=loaded.default_scale,
        )
