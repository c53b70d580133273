"""Loads models on first use, keeps them, and explains why a load failed.

One ``ModelManager`` is built by ``app.py`` (or a test, or a CLI) and passed to
whoever needs a model; there are no module-level model globals. Each model has
its own lock, so two requests for the same model load it once, while a request
for another model is not held up.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.catalog import CATALOG, ModelSpec
from pipelines.errors import ModelLoadError
from pipelines.hub_access import HubProbe, cached_snapshot, unreachable_sentence
from pipelines.runtime import Runtime

__all__ = ["LoadedModel", "ModelLoadError", "ModelManager", "explain_load_failure"]  # ModelLoadError: re-exported

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    key: str
    source: str
    model: Any
    load_seconds: float
    footprint_bytes: int
    variant: str | None = None  # the memory mode an SD3 pipeline was loaded in
    last_used: float = 0.0  # time.monotonic() of the last get(), for least-recently-used eviction


Loader = Callable[[str, Runtime, str | None], Any]  # (source, runtime, variant) -> model


def _loaders() -> dict[str, Loader]:
    # Imported here so that importing the manager stays cheap (no diffusers import
    # until an SD3 model is actually wanted).
    from pipelines import loaders

    return {
        "blip-caption": loaders.load_blip_captioner,
        "blip-itm": loaders.load_blip_retrieval,
        "sd3": loaders.load_sd3_pipeline,
        "sd3-controlnet": loaders.load_sd3_controlnet,
        "depth-estimator": loaders.load_depth_estimator,
    }


class ModelManager:
    """Lazy, cached, per-model-locked access to the catalog's models.

    ``source_overrides`` maps a catalog key to a local folder (or another repo
    id) to load instead of the catalog's repo. With ``tiny_root`` set, every
    model without an override loads from its tiny stand-in there.

    ``memory_budget_bytes`` bounds what the loaded models may hold together:
    before a load that would go past it (by ``estimate_bytes(key, variant)``),
    the least recently used models are unloaded, and ``notify`` is told so.

    With ``hub_probe``, a model that would load by repo id first asks whether the
    Hub answers (one short request, see pipelines/hub_access.py). If it does not,
    the model loads from the local cache when it is there, and otherwise fails at
    once with a sentence naming the network, instead of minutes of retries.

    A model that ``requires`` another (an SD3.5 ControlNet its base) is unloaded
    with it: it cannot draw alone, and what it caches refers to the base.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        tiny_root: Path | None = None,
        source_overrides: dict[str, str] | None = None,
        catalog: dict[str, ModelSpec] = CATALOG,
        loaders: dict[str, Loader] | None = None,
        memory_budget_bytes: int | None = None,
        estimate_bytes: Callable[[str, str | None], int] | None = None,
        hub_probe: HubProbe | None = None,
    ) -> None:
        self.runtime = runtime
        self.tiny_root = Path(tiny_root) if tiny_root is not None else None
        self.catalog = catalog
        self._loaders = loaders
        self.source_overrides = dict(source_overrides or {})
        for key in self.source_overrides:
            if key not in catalog:
                raise ValueError(f"--model {key}=...: unknown model {key!r}; choose one of: {', '.join(catalog)}.")
        self.memory_budget_bytes = memory_budget_bytes
        self._estimate_bytes = estimate_bytes
        self.hub_probe = hub_probe
        self._loaded: dict[str, LoadedModel] = {}
        self._locks = {key: threading.Lock() for key in catalog}
        self._registry_lock = threading.Lock()

    def _spec(self, key: str) -> ModelSpec:
        try:
            return self.catalog[key]
        except KeyError:
            raise ValueError(f"Unknown model {key!r}; choose one of: {', '.join(self.catalog)}.") from None

    @property
    def tiny(self) -> bool:
        return self.tiny_root is not None

    def source_for(self, key: str) -> str:
        """Where ``key`` loads from: an override, its tiny stand-in, or its Hub repo."""
        spec = self._spec(key)
        if key in self.source_overrides:
            return self.source_overrides[key]
        if self.tiny_root is not None:
            return str(self.tiny_root / spec.tiny_dir)
        return spec.repo_id

    def get(
        self,
        key: str,
        variant: str | None = None,
        notify: Callable[[str], None] | None = None,
        *,
        keep: tuple[str, ...] = (),
    ) -> Any:
        """The loaded model for ``key`` (in memory mode ``variant``), loading it on first use.

        A model loaded in another variant is unloaded and loaded again in this
        one. Raises ModelLoadError with a sentence that names the model and the
        fix; a failed load caches nothing, so the next request tries cleanly.
        ``notify`` receives a sentence for each model unloaded to make room;
        the models in ``keep`` (e.g. a ControlNet's base, in use) are never among them.
        """
        spec = self._spec(key)
        loaded = self._loaded.get(key)
        if loaded is not None and loaded.variant == variant:
            loaded.last_used = time.monotonic()
            return loaded.model
        with self._locks[key]:
            loaded = self._loaded.get(key)  # another request may have loaded it meanwhile
            if loaded is not None and loaded.variant == variant:
                loaded.last_used = time.monotonic()
                return loaded.model
            if loaded is not None:  # same model, another memory mode: this one replaces it
                with self._registry_lock:
                    self._loaded.pop(key, None)
                del loaded
                self._unload_dependents(key)
                _release_memory()
            self._make_room(key, variant, notify, keep)
            source = self.source_for(key)
            loader = (self._loaders or _loaders())[spec.kind]
            started = time.perf_counter()
            failure: Exception | None = None
            try:
                _check_local_source(spec, source)
                source = self._reachable_source(spec, source)
                model = loader(source, self.runtime, variant)
            except (ModelLoadError, ValueError) as error:  # already a sentence (ValueError: e.g. a memory mode)
                failure = error.with_traceback(None)
            except Exception as error:  # any other failure becomes one actionable sentence
                # The traceback goes into the log as text: a record holding the exception would keep
                # the loader's frames, and the half-loaded weights they reference, alive.
                logger.warning(
                    "loading %s from %s failed:\n%s", key, source, "".join(traceback.format_exception(error)).rstrip()
                )
                failure = ModelLoadError(explain_load_failure(spec, source, error, tiny=self.tiny))
            if failure is not None:
                # Past the except block the loader's frames are gone, so collecting and emptying the
                # CUDA cache really frees whatever it had built; nothing was cached.
                _release_memory()
                raise failure
            elapsed = time.perf_counter() - started
            entry = LoadedModel(key, source, model, elapsed, _footprint_bytes(model), variant, time.monotonic())
            with self._registry_lock:
                self._loaded[key] = entry
            logger.info("loaded %s (%s) from %s in %.1f s", key, variant or "default", source, elapsed)
            return model

    def _reachable_source(self, spec: ModelSpec, source: str) -> str:
        """``source``, or its cached snapshot folder when the Hub does not answer; ModelLoadError if neither."""
        from huggingface_hub import constants

        if self.hub_probe is None or self.tiny or constants.HF_HUB_OFFLINE or _looks_like_path(source):
            return source  # offline mode: huggingface_hub reads the cache itself and asks nothing
        problem = self.hub_probe.problem()
        if problem is None:
            return source
        snapshot = cached_snapshot(source)
        if snapshot is not None:
            logger.info("the Hub does not answer: loading %s from the local cache at %s", spec.key, snapshot)
            return snapshot
        raise ModelLoadError(unreachable_sentence(spec, self.hub_probe.endpoint(), problem, tiny=self.tiny))

    def _make_room(
        self, key: str, variant: str | None, notify: Callable[[str], None] | None, keep: tuple[str, ...] = ()
    ) -> None:
        """Unload least-recently-used models (never those in ``keep``) until ``key`` is expected to fit."""
        if self.memory_budget_bytes is None or self._estimate_bytes is None:
            return
        needed = self._estimate_bytes(key, variant)
        while True:
            with self._registry_lock:
                others = sorted(
                    (entry for entry in self._loaded.values() if entry.key != key), key=lambda e: e.last_used
                )
                held = sum(entry.footprint_bytes for entry in others)
            candidates = [entry for entry in others if entry.key not in keep]
            if held + needed <= self.memory_budget_bytes or not candidates:
                return
            victim = candidates[0]
            self.unload(victim.key)
            message = (
                f"Unloaded {self.catalog[victim.key].title} ({victim.footprint_bytes / 2**30:.1f} GiB, least recently "
                f"used) to make room for {self.catalog[key].title} (~{needed / 2**30:.1f} GiB)."
            )
            logger.info(message)
            if notify is not None:
                notify(message)

    def preload(self, key: str) -> threading.Thread:
        """Start loading ``key`` in the background, so the first request finds it ready.

        A failure is only logged here: the next request that needs the model
        tries again and shows the user the sentence explaining it.
        """

        def load() -> None:
            try:
                self.get(key)
            except Exception as error:
                logger.warning("preloading %s failed: %s", key, error)

        thread = threading.Thread(target=load, name=f"preload-{key}", daemon=True)
        thread.start()
        return thread

    def is_loaded(self, key: str, variant: str | None = None) -> bool:
        entry = self._loaded.get(key)
        return entry is not None and (variant is None or entry.variant == variant)

    def loaded_models(self) -> list[LoadedModel]:
        with self._registry_lock:
            return list(self._loaded.values())

    def unload(self, key: str) -> bool:
        """Drop ``key`` (and the models that require it) from the cache; True if ``key`` was loaded."""
        self._spec(key)
        with self._locks[key], self._registry_lock:
            removed = self._loaded.pop(key, None)
        if removed is not None:
            del removed
            self._unload_dependents(key)
            _release_memory()
            return True
        return False

    def _unload_dependents(self, key: str) -> None:
        """Drop the loaded models whose catalog entry ``requires`` ``key`` (its ControlNets)."""
        for entry in self.loaded_models():
            if self.catalog[entry.key].requires == key:
                with self._registry_lock:
                    self._loaded.pop(entry.key, None)


def _footprint_bytes(model: Any) -> int:
    """Bytes held by the parameters and buffers of every torch module inside ``model``."""
    import torch

    seen: set[int] = set()
    total = 0
    attributes = getattr(model, "__dict__", {})
    modules = [value for value in attributes.values() if isinstance(value, torch.nn.Module)]
    if isinstance(model, torch.nn.Module):
        modules.append(model)
    components = getattr(model, "components", None)  # diffusers pipelines
    if isinstance(components, dict):
        modules += [value for value in components.values() if isinstance(value, torch.nn.Module)]
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.data_ptr() in seen or tensor.is_meta:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or "\\" in source or Path(source).exists()


def _check_local_source(spec: ModelSpec, source: str) -> None:
    """Fail early, in plain words, when a local folder is missing or is not a model."""
    if not _looks_like_path(source):
        return
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(
            f"{spec.title}: the local folder {folder} does not exist; "
            f"pass a folder that holds the model's files, or the Hub id {spec.repo_id}."
        )
    expected = "model_index.json" if spec.kind == "sd3" else "config.json"
    if not (folder / expected).is_file():
        raise ModelLoadError(
            f"{spec.title}: the folder {folder} holds no {expected}, so it is not a saved "
            f"{spec.repo_id} model; point to the folder that save_pretrained() wrote."
        )


def explain_load_failure(spec: ModelSpec, source: str, error: BaseException, *, tiny: bool = False) -> str:
    """Turn any load failure into one sentence naming the model and the fix."""
    from huggingface_hub import errors as hub_errors

    chain = []
    current: BaseException | None = error
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    kinds = tuple(type(item) for item in chain)
    text = " ".join(str(item) for item in chain).lower()
    local_alternative = f"or pass a local copy with --model {spec.key}=DIR"
    if not tiny:
        local_alternative += ", or try the whole app offline with --tiny"

    def any_of(*classes: type) -> bool:
        return any(issubclass(kind, classes) for kind in kinds)

    if any_of(hub_errors.GatedRepoError) or ("gated" in text and "access" in text):
        return (
            f"{spec.title} ({spec.repo_id}) is gated: accept its licence at {spec.hub_url} and set HF_TOKEN "
            f"to a token of that account, {local_alternative}."
        )
    if any_of(hub_errors.RepositoryNotFoundError, hub_errors.HFValidationError):
        return (
            f"{spec.title} could not be found at {source!r}: check the repo id (the catalog uses "
            f"{spec.repo_id}); if it is private, set HF_TOKEN, {local_alternative}."
        )
    if any_of(hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) or any(
        word in text for word in ("offline", "couldn't connect", "connection", "not fully cached")
    ):
        return (
            f"{spec.title} ({source}) is not in the local Hugging Face cache and could not be downloaded "
            f"(no network, or HF_HUB_OFFLINE is set): download it once with network access, {local_alternative}."
        )
    import torch

    if any_of(torch.OutOfMemoryError, MemoryError):
        return (
            f"Not enough memory to load {spec.title}: unload other models in the System tab, "
            f"use a smaller model, or choose a memory-saving mode."
        )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{spec.title} could not be loaded from {source}: {first_line[:300]}. Check the files, {local_alternative}."
