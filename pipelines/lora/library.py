"""SD3.5 LoRAs: loading that is never silently wrong, mixing, fusing, unloading (sources: pipelines.lora.sources).

A LoRA reaches a pipeline in three moves, each a plain function call a Gradio
event (or a script) can make:

    source = resolve_lora_source(file="my_style.safetensors", lora_dir="loras")   # or upload=, repo=, registry_name=
    loaded = library.load(pipeline, source)          # checks, converts, attaches; returns a LoadedLora
    library.apply(pipeline, [("my_style", 0.8)])     # what the next image uses; [] = the base model

``LoraLibrary`` (one per SD3 model key, owned by whoever holds the Studio's
state) remembers every LoRA it loaded, with the converted CPU state dict, so a
pipeline the model manager evicted and loaded again gets its adapters back on
the next ``apply``. Every load is checked before the pipeline is touched (file
header, key style, the model it was made for) and after (the number of layers
peft really changed); any failure leaves the pipeline as it was.

Ownership: an upload is its visitor's; on a public instance (``LoraLibrary(public=True)``) so is
a LoRA a visitor names from the Hub or the registry (it fills their slots, not the shared ones).
The operator's folder and the operator's own calls (``visitor=None``) make shared entries; one
nobody drew with for ``settings.SHARED_LORA_IDLE_SECONDS`` may make room when all slots are full.
The same file is one entry for whoever sees it (by its SHA-256): a second load, under any name,
answers with the entry already there. A visitor's names are their own: a name another visitor
uses privately looks free (the adapter gets a distinct internal name), so names reveal nothing.

Hashes: ``sha256`` is the whole file's (its first 10 hex digits are Civitai's
"AutoV2"); ``a1111_hash`` is what AUTOMATIC1111 writes in "Lora hashes": the
first 12 hex digits of the SHA-256 of the tensor data after the safetensors
header (sd-scripts' "addnet" hash), which A1111 computes for every .safetensors
LoRA (``extensions-builtin/Lora/network.py``, ``modules/hashes.py``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines import settings
from pipelines.catalog import CATALOG
from pipelines.lora.formats import (
    ConvertedLora,
    SafetensorsHeader,
    convert_to_diffusers,
    inspect_lora_keys,
    lora_shape,
    read_safetensors_header,
)
from pipelines.lora.sources import LoraSource, sanitize_lora_name
from pipelines.ownership import SHARED, UploadSlots

logger = logging.getLogger(__name__)

# Inner width -> (name, blocks) of the real MMDiTs, for messages that name the model a LoRA was made for.
KNOWN_MMDIT_BASES: dict[int, tuple[str, int]] = {
    2432: ("SD3.5 Large / Large Turbo", 38),  # 38 heads x 64
    1536: ("SD3.5 Medium", 24),  # 24 heads x 64 (SD3 Medium has the same width, without dual attention)
}
LIST_HEADERS = ("name", "weight", "source", "format", "modules", "trigger words", "default scale", "hash", "made for")


# ----------------------------------------------------------------------------- base-model checks


def _describe_lora_base(
    width: int | None, min_blocks: int, known: Mapping[int, tuple[str, int]]
) -> tuple[str, str | None]:
    """("a 1536-wide, 24-block MMDiT (SD3.5 Medium)", "SD3.5 Medium") for a LoRA's inferred shape."""
    if width in known:
        name, blocks = known[width]
        return f"a {width}-wide, {blocks}-block MMDiT ({name})", name
    if width is None:
        return f"an MMDiT with at least {min_blocks} blocks", None
    return f"a {width}-wide MMDiT with at least {min_blocks} blocks", None


def check_lora_fits(
    transformer,
    converted: ConvertedLora,
    *,
    model_title: str,
    label: str = "This LoRA",
    known_bases: Mapping[int, tuple[str, int]] = KNOWN_MMDIT_BASES,
) -> None:
    """ValueError naming both models when ``converted`` was made for another MMDiT than ``transformer``.

    Compares the LoRA's inner width, deepest block and dual-attention (attn2) blocks with the
    transformer's config, then every target module's in/out features with the LoRA's factors.
    """
    config = transformer.config
    width = int(config.num_attention_heads) * int(config.attention_head_dim)
    layers = int(config.num_layers)
    dual = tuple(int(block) for block in (getattr(config, "dual_attention_layers", None) or ()))
    loaded = f"{model_title} ({width} wide, {layers} blocks)"
    shape = lora_shape(converted)
    made_for, made_for_name = _describe_lora_base(shape.width, shape.min_blocks, known_bases)
    choose = (
        f"Choose {made_for_name}, or a LoRA made for {model_title}."
        if made_for_name
        else f"Choose a model of that shape, or a LoRA made for {model_title}."
    )

    # 1. The overall shape.
    if shape.width is not None and shape.width != width:
        raise ValueError(f"{label} was made for {made_for}; the loaded model is {loaded}. {choose}")
    if shape.min_blocks > layers:
        raise ValueError(
            f"{label} changes block {shape.min_blocks - 1}, so it was made for {made_for}; the loaded model is "
            f"{loaded}. {choose}"
        )
    extra_dual = [block for block in shape.dual_attention_blocks if block not in dual]
    if extra_dual:
        has = f"dual attention in blocks {', '.join(map(str, dual))}" if dual else "no dual attention"
        raise ValueError(
            f"{label} changes dual-attention (attn2) layers in block {extra_dual[0]}, which MMDiT-X models such as "
            f"SD3.5 Medium have; the loaded model is {loaded}, with {has}. Choose SD3.5 Medium, or a LoRA made for {model_title}."
        )

    # 2. Every layer it changes.
    for module_name in converted.modules:
        try:
            module = transformer.get_submodule(module_name)
        except AttributeError:
            raise ValueError(
                f"{label} changes {module_name!r}, which the loaded model ({loaded}) does not have; it was made for "
                f"{made_for}. {choose}"
            ) from None
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        in_features, out_features = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if in_features is None or out_features is None:
            raise ValueError(f"{label} changes {module_name!r}, which is not a linear layer in {model_title}.")
        down, up = converted.factors(module_name)
        if (down.shape[1], up.shape[0]) != (in_features, out_features):
            raise ValueError(
                f"{label} does not fit {module_name} of the loaded model ({loaded}): the LoRA maps {down.shape[1]} to "
                f"{up.shape[0]} features, the layer {in_features} to {out_features}; it was made for {made_for}. {choose}"
            )


# ----------------------------------------------------------------------------- the library


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA the library holds: what it is, where it came from, and its converted weights (CPU)."""

    name: str
    source: str  # LoraSource.description
    kind: str
    style: str  # the key style of the file (diffusers, kohya, comfyui, ...)
    trigger_words: tuple[str, ...]
    default_scale: float
    modules_changed: int  # layers peft attached this adapter to
    sha256: str  # of the whole file (Civitai's AutoV2 = sha256[:10])
    a1111_hash: str  # AUTOMATIC1111's "Lora hashes" value (see the module docstring)
    base: str  # the model it was checked against
    file_bytes: int
    warnings: tuple[str, ...] = ()
    licence: str = ""
    url: str = ""
    owner: str | None = SHARED  # an upload's visitor (pipelines.ownership); None: shared, read-only for visitors
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    adapter: str = ""  # the internal (peft) adapter name; "" = ``name``. Visitors only ever see ``name``.
    # Gives back what loading it charged (a visitor's Hub download); called when the entry goes.
    release: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def png_entry(self, weight: float) -> dict:
        """What a generated image records about this LoRA (the ``loras`` list of ``text_to_image.generate``)."""
        return {
            "name": self.name,
            "weight": weight,
            "hash": self.a1111_hash,
            "sha256": self.sha256,
            "source": self.source,
        }


@dataclass
class _Fused:
    pipeline: weakref.ReferenceType
    selection: tuple[tuple[str, float], ...]
    originals: dict[str, torch.Tensor]  # module name -> its weight before fusing (CPU copy)


def _file_hashes(path: Path, header_bytes: int) -> tuple[str, str]:
    """(sha256 of the file, first 12 hex digits of the sha256 of its tensor data) in one read."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    seen = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            whole.update(chunk)
            if seen + len(chunk) > header_bytes:
                data.update(chunk[max(0, header_bytes - seen) :])
            seen += len(chunk)
    return whole.hexdigest(), data.hexdigest()[:12]


def _adapter_names(transformer) -> list[str]:
    return list(getattr(transformer, "peft_config", None) or {})


def count_adapter_modules(transformer, adapter_name: str) -> int:
    """How many layers of ``transformer`` carry peft LoRA weights for ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    return sum(1 for module in transformer.modules() if isinstance(module, LoraLayer) and adapter_name in module.lora_A)


def _is_quantized(transformer) -> bool:
    if getattr(transformer, "is_quantized", False) or getattr(transformer, "hf_quantizer", None) is not None:
        return True
    return any(type(module).__name__ in ("Linear4bit", "Linear8bitLt") for module in transformer.modules())


class LoraLibrary:
    """The LoRAs loaded for one SD3 model (one library per catalog key; no module globals).

    Thread-safe: every public method holds the library's lock. Call ``apply`` (or ``fuse``)
    right before generating, in the same queued event, so what is drawn is what was asked for.

    Ownership (``pipelines.ownership``): methods taking ``visitor`` act for that visitor, who
    sees shared LoRAs and their own uploads only; another visitor's upload is "not loaded".
    ``visitor=None`` is the operator (Python, the CLI): everything is visible.
    """

    def __init__(
        self,
        model_key: str,
        *,
        model_title: str | None = None,
        known_bases: Mapping[int, tuple[str, int]] | None = None,
        before_attach: Callable[[Any], None] | None = None,
        public: bool = False,
    ) -> None:
        """``before_attach(pipeline)`` runs before an adapter attaches: the SD3.5 fast path passes its
        ``prepare_for_lora`` (unfuse QKV, refuse an ahead-of-time compiled transformer); this package
        never imports the drawing code. ``public``: visitors are strangers (see the module docstring)."""
        if model_key not in CATALOG or CATALOG[model_key].kind != "sd3":
            raise ValueError(f"LoRAs are for the SD3.5 models; {model_key!r} is not one.")
        self.model_key = model_key
        self.model_title = model_title or CATALOG[model_key].title
        self.known_bases = dict(KNOWN_MMDIT_BASES if known_bases is None else known_bases)
        self.before_attach = before_attach
        self.public = public
        self._entries: dict[str, LoadedLora] = {}  # internal adapter name -> entry
        self._selection: tuple[tuple[str, float], ...] = ()  # (internal adapter name, weight)
        self._selected_by: str | None = None  # the visitor whose selection that is (None: the operator)
        self._fused: _Fused | None = None
        self._slots = UploadSlots("LoRA", f"on {self.model_title}")
        self._lock = threading.RLock()

    # -- reading

    def names(self, visitor: str | None = None) -> list[str]:
        """The names ``visitor`` knows the LoRAs they may use by (the operator: the internal names)."""
        with self._lock:
            return [self._shown(key, visitor) for key in self._visible_keys(visitor)]

    def get(self, name: str, visitor: str | None = None) -> LoadedLora:
        with self._lock:
            return self._entries[self._known_name(name, visitor)]

    def loaded(self, visitor: str | None = None) -> list[LoadedLora]:
        with self._lock:
            return [self._entries[key] for key in self._visible_keys(visitor)]

    def _visible_keys(self, visitor: str | None) -> list[str]:
        return self._slots.visible_names(self._entries, visitor)

    def _shown(self, key: str, visitor: str | None) -> str:
        return key if visitor is None else self._entries[key].name

    @property
    def selection(self) -> list[tuple[str, float]]:
        """The (internal name, weight) pairs the last ``apply``/``fuse`` set (the operator's view)."""
        with self._lock:
            return list(self._selection)

    @property
    def fused(self) -> bool:
        with self._lock:
            return self._fused is not None

    def active(self) -> list[tuple[LoadedLora, float]]:
        """The LoRAs of the current selection with their weights (for trigger words and PNG metadata)."""
        with self._lock:
            return [(self._entries[name], weight) for name, weight in self._selection if name in self._entries]

    def list(self, visitor: str | None = None) -> list[list]:
        """One row per loaded LoRA ``visitor`` may see, columns ``LIST_HEADERS``, for a UI table.

        The weight column shows ``visitor``'s own last selection only: what another visitor drew
        with last is theirs.
        """
        with self._lock:
            weights = dict(self._selection) if visitor is None or visitor == self._selected_by else {}
            return [
                [
                    self._shown(key, visitor),
                    weights.get(key, ""),
                    entry.source,
                    entry.style,
                    entry.modules_changed,
                    ", ".join(entry.trigger_words),
                    entry.default_scale,
                    entry.a1111_hash,
                    entry.base,
                ]
                for key, entry in ((key, self._entries[key]) for key in self._visible_keys(visitor))
            ]

    def parse_selection(
        self, text: str, lora_scale: float = 1.0, visitor: str | None = None
    ) -> list[tuple[str, float]]:
        """``parse_lora_selection`` against the LoRAs of this library that ``visitor`` may use."""
        with self._lock:
            # A visitor's own entry wins over a shared one of the same name (as in ``_key_for``).
            keys = sorted(self._visible_keys(visitor), key=lambda key: self._entries[key].owner is not SHARED)
            loaded = {self._shown(key, visitor): self._entries[key] for key in keys}
            return parse_lora_selection(text, lora_scale, loaded=loaded)

    # -- loading

    def load(
        self,
        pipeline,
        source: LoraSource,
        *,
        name: str | None = None,
        scale: float | None = None,
        visitor: str | None = None,
    ) -> LoadedLora:
        """Check, convert and attach the LoRA of ``source``; return what was loaded.

        ``name`` (sanitised to ``[a-z0-9_]``) defaults to the source's; ``scale`` overrides the
        source's default weight. The same file loaded again returns the entry already there.
        Loading never changes what is drawn: the new LoRA is used once ``apply`` selects it.
        Any failure raises ValueError in one sentence and leaves the pipeline as it was.

        Who owns it: see the module docstring (``_owner_for``). A visitor keeps at most
        ``settings.MAX_UPLOADS_PER_SESSION`` entries of their own. When all ``settings.MAX_LOADED_LORAS``
        slots are taken, the least recently used of the visitors' entries, and of the shared ones idle
        for ``settings.SHARED_LORA_IDLE_SECONDS``, is unloaded to make room.

        The same file (by SHA-256) already loaded where ``visitor`` sees it, as theirs or shared, is
        that entry, under whatever name was asked: its name is the answer.
        """
        try:
            with self._lock:
                entry = self._load_locked(pipeline, source, name=name, scale=scale, visitor=visitor)
        except BaseException:
            if source.download is not None:
                source.download.release()  # a refused Hub file leaves nothing behind, and costs nothing
            raise
        if source.download is not None:
            source.download.delete_files()  # the weights are in memory now
            if entry.release != source.download.release:
                source.download.release()  # the same file was loaded already: nothing new is kept
        return entry

    def _owner_for(self, source: LoraSource, visitor: str | None) -> str | None:
        """An upload is its visitor's; on a public instance so is what a visitor names from the Hub or the
        registry. The operator's folder, and anything the operator (``visitor=None``) loads, is shared."""
        if visitor is None:
            return SHARED
        if source.kind == "upload" or (self.public and source.kind in ("hub", "registry")):
            return visitor
        return SHARED

    def _load_locked(
        self, pipeline, source: LoraSource, *, name: str | None, scale: float | None, visitor: str | None
    ) -> LoadedLora:
        label = source.description
        owner = self._owner_for(source, visitor)
        # 1. The file, before the pipeline is touched.
        header = read_safetensors_header(source.path, label=label)
        if header.file_bytes > settings.MAX_LORA_BYTES:
            raise ValueError(f"{label} is over the {settings.MAX_LORA_BYTES / 2**20:,.0f} MB limit for a LoRA.")
        inspect_lora_keys(header.shapes, label=label)
        sha256, a1111_hash = _file_hashes(source.path, header.header_bytes)
        for key in self._visible_keys(visitor):
            entry = self._entries[key]
            if entry.sha256 == sha256 and entry.owner in (SHARED, owner):
                self._slots.touch(key)
                return entry
        # 2. Its name, as the caller will know it, and a distinct internal one.
        taken = self._names_in_view(visitor)
        if name is not None:
            shown = sanitize_lora_name(name)
            if shown in taken:
                raise ValueError(f"A LoRA named {shown!r} is already loaded; unload it first or pick another name.")
        elif visitor is not None and owner is SHARED:
            # Everyone will see it: its name comes from the shared ones, never from the loader's own
            # (a visitor's own entry of the same name still wins for them, as in ``_known_name``).
            shown = _unique_name(source.name, {entry.name for entry in self._entries.values() if entry.owner is SHARED})
        else:
            shown = _unique_name(source.name, taken)
        adapter = _unique_name(shown, set(self._entries))
        if owner is not SHARED:
            self._slots.check_visitor_cap(
                owner,
                settings.MAX_UPLOADS_PER_SESSION,
                shown=lambda key: self._entries[key].name,
                uploads_only=all(self._entries[key].kind == "upload" for key in self._slots.uploads_of(owner)),
            )
        try:
            victim = self._slots.victim(
                settings.MAX_LOADED_LORAS, keep=dict(self._selection), idle_seconds=settings.SHARED_LORA_IDLE_SECONDS
            )
        except ValueError:
            raise ValueError(
                f"{len(self._entries)} LoRAs are loaded, the most this Studio keeps (STUDIO_MAX_LOADED_LORAS), "
                "and none is a visitor's own or a shared one idle long enough to make room; unload one first, "
                "or try again later."
            ) from None
        default_scale = source.default_scale if scale is None else _check_weight("scale", scale)

        # 3. Convert to the canonical diffusers form.
        from safetensors.torch import load_file

        tensors = load_file(str(source.path), device="cpu")
        converted = convert_to_diffusers(tensors, header.metadata, label=label)
        del tensors
        changing = [module for module in converted.modules if all(factor.any() for factor in converted.factors(module))]
        if not changing:
            raise ValueError(f"{label} changes nothing: every one of its LoRA matrices is zero.")

        # 4. Does it fit this model?
        check_lora_fits(
            pipeline.transformer,
            converted,
            model_title=self.model_title,
            label=label,
            known_bases=self.known_bases,
        )
        notes = list(converted.warnings)
        if source.bases and self.model_key not in source.bases:
            made_for = ", ".join(CATALOG[key].title for key in source.bases)
            notes.append(f"{label} was made for {made_for}; on {self.model_title} it may look different.")

        # 5. Attach it, count what changed, and undo everything on any surprise; then make room.
        self._drop_fused(pipeline)
        modules = self._attach(pipeline, adapter, converted.state_dict, label)
        if victim is not None:  # the least recently used candidate goes, once the new one is in
            self._remove(pipeline, victim)
            self._set_adapters(pipeline, self._selection)
            logger.info("unloaded the LoRA %s from %s to make room for %s", victim, self.model_key, label)
        entry = LoadedLora(
            name=shown,
            source=label,
            kind=source.kind,
            style=converted.style,
            trigger_words=tuple(source.trigger_words),
            default_scale=default_scale,
            modules_changed=modules,
            sha256=sha256,
            a1111_hash=a1111_hash,
            base=self.model_title,
            file_bytes=header.file_bytes,
            warnings=tuple(notes),
            licence=source.licence,
            url=source.url,
            owner=owner,
            state_dict=converted.state_dict,
            adapter=adapter,
            release=source.download.release if source.download is not None else None,
        )
        self._entries[adapter] = entry
        self._slots.add(adapter, owner)
        for note in notes:
            logger.warning(note)
        return entry

    def _names_in_view(self, visitor: str | None) -> set[str]:
        """The names ``visitor`` could confuse a new one with: those they see (the operator: all, both kinds)."""
        if visitor is None:
            return set(self._entries) | {entry.name for entry in self._entries.values()}
        return {self._entries[key].name for key in self._visible_keys(visitor)}

    def check_header(self, pipeline, header: SafetensorsHeader, label: str) -> None:
        """ValueError when a file with this header (e.g. one the Hub serves) is no LoRA for this model.

        Reads shapes only: the factors become meta tensors (scalars, such as kohya's alphas, real
        ones), are converted as a loaded file would be, and checked against the transformer.
        """
        inspect_lora_keys(header.shapes, label=label)
        tensors = {
            key: torch.ones(shape) if torch.Size(shape).numel() <= 1 else torch.empty(shape, device="meta")
            for key, shape in header.shapes.items()
        }
        try:
            converted = convert_to_diffusers(tensors, header.metadata, label=label)
        except ValueError:
            raise
        except Exception as error:  # a conversion that needs values: the full check after download decides
            logger.info("%s: shapes alone could not be converted (%s)", label, error)
            return
        check_lora_fits(
            pipeline.transformer, converted, model_title=self.model_title, label=label, known_bases=self.known_bases
        )

    def _attach(self, pipeline, adapter: str, state_dict: dict[str, torch.Tensor], label: str) -> int:
        """Load ``state_dict`` as adapter ``adapter``; the number of layers it changed. Undone on failure."""
        transformer = pipeline.transformer
        expected = len({key.rsplit(".lora_", 1)[0] for key in state_dict})
        if self.before_attach is not None:
            self.before_attach(pipeline)  # e.g. the fast path's fused QKV would hide the projections peft wraps
        try:
            # The transformer only (the text encoders get nothing, and diffusers would log that twice);
            # low_cpu_mem_usage=False: peft copies the factors, so the library's CPU copy stays its own.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipeline.load_lora_into_transformer(
                    dict(state_dict),
                    transformer=transformer,
                    adapter_name=adapter,
                    _pipeline=pipeline,
                    low_cpu_mem_usage=False,
                )
            counted = count_adapter_modules(transformer, adapter)
            if counted != expected:
                raise ValueError(
                    f"{label} should change {expected} layers of {self.model_title} but peft attached it to {counted}; "
                    "it was not loaded."
                )
        except Exception as error:
            self._detach(pipeline, adapter)
            self._set_adapters(pipeline, self._selection)
            if isinstance(error, ValueError):
                raise
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise ValueError(f"{label} could not be loaded into {self.model_title}: {first_line}.") from error
        # Loading makes the new adapter active in diffusers; keep drawing what was selected.
        self._set_adapters(pipeline, self._selection)
        return counted

    @staticmethod
    def _detach(pipeline, adapter: str) -> None:
        transformer = pipeline.transformer
        from peft.tuners.lora import LoraLayer

        if adapter in _adapter_names(transformer) or count_adapter_modules(transformer, adapter):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                transformer.delete_adapters(adapter)
        if not _adapter_names(transformer) and any(isinstance(m, LoraLayer) for m in transformer.modules()):
            transformer.unload_lora()  # no adapter left: put the plain layers back

    def _known_name(self, name: str, visitor: str | None = None) -> str:
        """The internal name of the entry ``visitor`` calls ``name``: their own first, else a shared one
        (the operator: an internal name, else a shown one). ValueError naming what they may use."""
        wanted = sanitize_lora_name(name)
        if visitor is None and wanted in self._entries:
            return wanted
        matches = [key for key in self._visible_keys(visitor) if self._entries[key].name == wanted]
        if not matches:
            raise ValueError(_unknown_lora_sentence(name, self.names(visitor)))
        own = [key for key in matches if self._entries[key].owner is not SHARED]
        return (own or matches)[0]

    # -- choosing what is drawn

    def apply(self, pipeline, selection: Sequence[tuple[str, float]], visitor: str | None = None) -> None:
        """Make the next image use exactly ``selection`` ((name, weight) pairs); ``[]`` = the base model.

        Adapters missing from ``pipeline`` (the manager evicted and reloaded the model) are
        loaded again from the stored state dicts first. A fused set that differs is unfused.
        Every name must be one ``visitor`` may use.
        """
        with self._lock:
            selection = self._checked_selection(selection, visitor)
            for name, _ in selection:
                self._slots.touch(name)
            self._restore_missing(pipeline, selection)
            self._selected_by = visitor
            fused = self._fused
            if fused is not None and fused.pipeline() is pipeline and fused.selection == selection:
                self._selection = selection
                return
            self._unfuse_locked(pipeline)
            self._selection = selection
            self._set_adapters(pipeline, selection)

    def _checked_selection(self, selection, visitor: str | None = None) -> tuple[tuple[str, float], ...]:
        if isinstance(selection, str):
            raise ValueError("Pass the LoRAs as (name, weight) pairs; parse text with parse_selection first.")
        checked = []
        for item in selection:
            name, weight = item
            key = self._known_name(name, visitor)
            shown = self._shown(key, visitor)
            if key in dict(checked):
                raise ValueError(f"The LoRA {shown!r} is chosen twice; give each LoRA once.")
            checked.append((key, _check_weight(f"the weight of {shown}", weight)))
        if len(checked) > settings.MAX_ACTIVE_LORAS:
            raise ValueError(f"{len(checked)} LoRAs were chosen; use at most {settings.MAX_ACTIVE_LORAS} at once.")
        return tuple(checked)

    def _restore_missing(self, pipeline, selection) -> None:
        fused = self._fused
        if fused is not None and fused.pipeline() is not pipeline:
            self._fused = None  # that pipeline is gone (or no longer served); its fused state with it
        present = set(_adapter_names(pipeline.transformer))
        for name, _ in selection:
            if name in present:
                continue
            entry = self._entries[name]
            converted = ConvertedLora(state_dict=entry.state_dict, style=entry.style)
            check_lora_fits(
                pipeline.transformer,
                converted,
                model_title=self.model_title,
                label=entry.source,
                known_bases=self.known_bases,
            )
            self._attach(pipeline, name, entry.state_dict, entry.source)
            logger.info("re-attached LoRA %s to a reloaded %s", name, self.model_key)

    @staticmethod
    def _set_adapters(pipeline, selection) -> None:
        transformer = pipeline.transformer
        present = set(_adapter_names(transformer))
        if not present:
            return
        active = [(name, weight) for name, weight in selection if name in present]
        if not active:
            transformer.disable_lora()
            return
        transformer.enable_lora()
        transformer.set_adapters([name for name, _ in active], [weight for _, weight in active])

    # -- fusing

    def fuse(self, pipeline, selection: Sequence[tuple[str, float]], visitor: str | None = None) -> None:
        """Merge ``selection`` into the transformer's weights for speed (no LoRA branch per layer).

        The weights it changes are copied to the CPU first, so ``unfuse`` restores them bit for
        bit (subtracting the delta again would not, in bf16). A bitsandbytes-quantized or
        sequentially offloaded transformer is refused: its weights cannot be merged into.
        """
        with self._lock:
            transformer = pipeline.transformer
            # 1. Can this transformer's weights be changed in place?
            if _is_quantized(transformer):
                raise ValueError(
                    "Fusing LoRAs into a bitsandbytes-quantized (NF4/8-bit) transformer would re-quantize its weights; "
                    "keep the LoRAs unfused in this memory mode, or choose bf16 to fuse."
                )
            if any(parameter.is_meta for parameter in transformer.parameters()):
                raise ValueError(
                    "This transformer's weights are offloaded (sequential offload), so LoRAs cannot be fused into "
                    "them; keep the LoRAs unfused, or choose a memory mode without sequential offload."
                )
            # 2. Select (re-attaching or unfusing as needed).
            self.apply(pipeline, selection, visitor)
            if self._fused is not None or not self._selection:
                return  # already fused with this selection, or nothing to fuse
            names = [name for name, _ in self._selection]
            # 3. Keep what fusing overwrites, then merge.
            from peft.tuners.lora import LoraLayer

            originals = {}
            for module_name, module in transformer.named_modules():
                if isinstance(module, LoraLayer) and any(name in module.lora_A for name in names):
                    weight = module.get_base_layer().weight
                    originals[module_name] = weight.detach().to("cpu", copy=True)
            pipeline.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=names)
            self._fused = _Fused(weakref.ref(pipeline), self._selection, originals)

    def unfuse(self, pipeline) -> None:
        """Undo ``fuse``: the original weights come back exactly and the selection stays active, unfused."""
        with self._lock:
            self._unfuse_locked(pipeline)
            self._set_adapters(pipeline, self._selection)

    def _unfuse_locked(self, pipeline) -> None:
        fused = self._fused
        if fused is None:
            return
        self._fused = None
        if fused.pipeline() is not pipeline:
            return  # the fused pipeline is gone; this one was never fused
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already unmerged")  # layers of adapters left out of the fuse
            pipeline.unfuse_lora(components=["transformer"])
        transformer = pipeline.transformer
        with torch.no_grad():
            for module_name, original in fused.originals.items():
                weight = transformer.get_submodule(module_name).get_base_layer().weight
                weight.copy_(original.to(weight.device, weight.dtype))

    def _drop_fused(self, pipeline) -> None:
        if self._fused is not None:
            self._unfuse_locked(pipeline)
            self._set_adapters(pipeline, self._selection)

    # -- unloading

    def unload(
        self, pipeline, name: str | None = None, *, visitor: str | None = None, shared: bool = True
    ) -> list[str]:
        """Remove one LoRA (or all, with ``name=None``) from the pipeline and the library; the names removed.

        ``visitor`` removes only what they may see: their own entries, and the shared LoRAs
        unless ``shared`` is False (a public instance's visitors, for whom those are read-only).
        After unloading everything, the pipeline draws exactly what the base model draws.
        What an entry charged (a visitor's Hub download) is given back.
        """
        with self._lock:
            if name is not None:
                key = self._known_name(name, visitor)
                if not shared and not self._slots.is_upload(key):
                    raise ValueError(
                        f"The LoRA {self._shown(key, visitor)!r} is shared by every visitor of this public instance; "
                        "only the operator can unload it (leave it out of the lora text to draw without it)."
                    )
                keys = [key]
            else:
                keys = [key for key in self._visible_keys(visitor) if shared or self._slots.is_upload(key)]
            removed = [self._shown(key, visitor) for key in keys]
            self._unfuse_locked(pipeline)
            if keys and len(keys) == len(self._entries) and _adapter_names(pipeline.transformer):
                pipeline.unload_lora_weights()  # everything: put the plain layers back in one go
                for entry in self._entries.values():
                    if entry.release is not None:
                        entry.release()
                self._entries.clear()
                self._slots.clear()
                self._selection = ()
                return removed
            for key in keys:
                self._remove(pipeline, key)
            self._set_adapters(pipeline, self._selection)
            return removed

    def _remove(self, pipeline, key: str) -> None:
        """Detach ``key`` and forget it, giving back what it charged (the lock is held)."""
        self._detach(pipeline, key)
        entry = self._entries.pop(key)
        if entry.release is not None:
            entry.release()
        self._slots.remove(key)
        self._selection = tuple((item, weight) for item, weight in self._selection if item != key)


# ----------------------------------------------------------------------------- selections and prompts


def _unique_name(base: str, taken: set[str]) -> str:
    """``base`` (sanitised), or ``base_2``, ``base_3``, ... : the first not in ``taken``."""
    base = sanitize_lora_name(base)
    name = base
    for counter in range(2, len(taken) + 3):  # len(taken) + 1 candidates: one of them is free
        if name not in taken:
            return name
        suffix = f"_{counter}"
        name = base[: settings.MAX_LORA_NAME_CHARS - len(suffix)] + suffix
    return name


def _check_weight(name: str, value) -> float:
    from pipelines.validation import as_float

    return as_float(name, value, -settings.MAX_LORA_WEIGHT, settings.MAX_LORA_WEIGHT)


def _unknown_lora_sentence(name: str, loaded: list[str]) -> str:
    if not loaded:
        return f"No LoRA is loaded, so {name!r} cannot be used; load it first."
    return f"No LoRA named {name!r} is loaded; loaded: {', '.join(loaded)}."


def parse_lora_selection(
    text: str, lora_scale: float = 1.0, *, loaded: Iterable[LoadedLora] | Mapping[str, LoadedLora]
) -> list[tuple[str, float]]:
    """The ``/generate`` API's ``lora`` text -> (name, weight) pairs.

    ``text`` is ``"name"`` or ``"name:0.8, other:0.5"`` (A1111's ``<lora:name:0.8>`` works too);
    a name without a weight gets the LoRA's default scale, and ``lora_scale`` multiplies every
    weight. Names are checked against ``loaded``, weights against ``settings.MAX_LORA_WEIGHT``,
    the count against ``settings.MAX_ACTIVE_LORAS``. Empty text -> ``[]`` (the base model).
    """
    entries = dict(loaded) if isinstance(loaded, Mapping) else {entry.name: entry for entry in loaded}
    if text is None:
        return []
    if not isinstance(text, str):
        raise ValueError(f"lora must be text such as 'name:0.8, other:0.5', not {type(text).__name__}.")
    multiplier = _check_weight("lora_scale", lora_scale)
    pairs: list[tuple[str, float]] = []
    for raw in re.split(r"[,\n]", text):
        item = raw.strip()
        if item.lower().startswith("<lora:") and item.endswith(">"):
            item = item[len("<lora:") : -1]
        if not item:
            continue
        name, _, weight_text = item.partition(":")
        key = sanitize_lora_name(name.strip())
        if key not in entries:
            raise ValueError(_unknown_lora_sentence(name.strip(), list(entries)))
        if any(key == chosen for chosen, _ in pairs):
            raise ValueError(f"The LoRA {key!r} is named twice; give each LoRA once.")
        weight = (
            entries[key].default_scale
            if not weight_text.strip()
            else _check_weight(f"the weight of {key}", weight_text)
        )
        pairs.append((key, _check_weight(f"the weight of {key} times lora_scale", weight * multiplier)))
    if len(pairs) > settings.MAX_ACTIVE_LORAS:
        raise ValueError(f"{len(pairs)} LoRAs were named; use at most {settings.MAX_ACTIVE_LORAS} at once.")
    return pairs


def prompt_with_triggers(prompt: str, loaded_adapters: Iterable[Any]) -> tuple[str, list[str]]:
    """``prompt`` with the trigger words of ``loaded_adapters`` appended; (new prompt, the words added).

    ``loaded_adapters`` holds LoadedLora (or (LoadedLora, weight) pairs, as ``LoraLibrary.active()``
    returns; weight-0 ones add nothing). A word already in the prompt (case-insensitive, as a whole
    word or phrase) is not added again.
    """
    added: list[str] = []
    for item in loaded_adapters:
        entry, weight = item if isinstance(item, tuple) else (item, None)
        if weight == 0:
            continue
        for word in entry.trigger_words:
            pattern = r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)"
            if re.search(pattern, prompt, flags=re.IGNORECASE) or any(word.lower() == done.lower() for done in added):
                continue
            added.append(word.strip())
    if not added:
        return prompt, []
    separator = "" if not prompt.strip() else ", "
    return prompt.rstrip().rstrip(",") + separator + ", ".join(added), added
