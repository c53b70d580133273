"""LoRA adapters on BLIP's text decoder: load them from a folder, the Hub or an upload, switch per request.

An adapter is a standard PEFT LoRA folder: ``adapter_config.json`` and
``adapter_model.safetensors``. The layout expected is what peft writes when the
*whole* ``BlipForConditionalGeneration`` is wrapped (``get_peft_model(model,
config)``) with ``target_modules`` naming text-decoder layers only, keys such as
``base_model.model.text_decoder.bert.encoder.layer.0.attention.self.query.lora_A.weight``.
That is what ``pipelines.training.train_blip_lora`` writes and what community BLIP
caption LoRAs (``target_modules=["query", "value"]``) look like. An adapter made
by wrapping ``model.text_decoder`` alone (keys ``base_model.model.bert...``)
loads too.

Why peft itself rather than transformers' PEFT integration: with transformers
5.24 and peft 0.21, ``model.load_adapter`` works (with a load report that lists
every base weight as missing), but ``set_adapter``, ``enable_adapters``,
``disable_adapters`` and ``delete_adapter`` refuse to run (they want peft >= 0.22).
peft's ``inject_adapter_in_model`` and its LoRA layers' ``set_adapter`` /
``enable_adapters`` / ``delete_adapter`` are what transformers calls underneath,
and they work in place on the loaded model.

Every check fails with one sentence: only safetensors weights (an
``adapter_model.bin`` is a pickle, which can run code when it is opened); a
plain LoRA config; target modules that exist in the text decoder and none in
the vision encoder (adapters must leave the image features alone: that is what
lets one cached image encoding serve the base model and every adapter); the
matrices' shapes against the loaded BLIP (an adapter for a BLIP with other
widths names both); at least one LoRA layer that the adapter really changes.

Attached adapters rest inactive. A caption request activates its adapter for
the duration of its decode (``BlipCaptioner.using_adapter``); matching and
attention always run on the base model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import settings
from pipelines.blip.adapter_sources import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    HUB_ID,
    PICKLE_SENTENCE,
    PICKLE_SUFFIXES,
    download_adapter,
    unpack_adapter_upload,
)
from pipelines.blip.captioner import BlipCaptioner, switch_adapter_layers
from pipelines.ownership import SHARED, UploadSlots, may_see

logger = logging.getLogger(__name__)

TINY_ADAPTER_DIR = "blip-adapters"  # under the tiny root: the --tiny adapters folder
TINY_DEMO_ADAPTER = "tiny-demo"
TINY_DEMO_SCALE = 16.0  # how far the demo's random LoRA moves each layer: enough to change the tiny captions
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
_PEFT_PREFIX = "base_model.model."
_ATTENTION_MODULES = {"self": "attention", "cross": "crossattention"}


def text_decoder_targets(
    projections: Iterable[str] = settings.BLIP_TRAIN_TARGET_PROJECTIONS,
    attention: Iterable[str] = settings.BLIP_TRAIN_ATTENTION_KINDS,
) -> str:
    """A peft ``target_modules`` regex over ``BlipForConditionalGeneration``'s module names.

    ``projections`` are among query, key, value, dense (the attention block's output
    projection); ``attention`` among self, cross. peft matches a string in full, so
    the regex names text-decoder layers only, never the vision encoder.
    """
    projections, attention = list(projections), list(attention)
    unknown = [item for item in projections if item not in settings.BLIP_TRAIN_TARGET_PROJECTIONS]
    unknown += [item for item in attention if item not in _ATTENTION_MODULES]
    if unknown or not projections or not attention:
        raise ValueError(
            f"LoRA targets {', '.join(unknown) or '(none)'} unknown; choose projections from "
            f"{', '.join(settings.BLIP_TRAIN_TARGET_PROJECTIONS)} and attention from "
            f"{', '.join(settings.BLIP_TRAIN_ATTENTION_KINDS)}."
        )
    parts = [rf"self\.{name}" for name in projections if name != "dense"]
    if "dense" in projections:
        parts.append(r"output\.dense")
    blocks = "|".join(_ATTENTION_MODULES[kind] for kind in attention)
    return rf"text_decoder\.bert\.encoder\.layer\.\d+\.(?:{blocks})\.(?:{'|'.join(parts)})"


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter folder, read and checked on its own (not yet against a model)."""

    folder: Path
    config: object  # peft.LoraConfig, inference mode
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (lora_A, lora_B) weights
    decoder_only: bool  # made on model.text_decoder alone: module paths are relative to it
    base_model: str  # base_model_name_or_path from the config; "" when absent
    label: str  # how sentences name it: the folder name, the Hub id, the upload


def read_adapter_folder(folder: Path, label: str | None = None) -> AdapterFiles:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` from ``folder``; ValueError naming the fault."""
    folder = Path(folder)
    label = label or str(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    if not config_path.is_file():
        raise ValueError(
            f"{label} holds no {ADAPTER_CONFIG_FILE}, so it is not a PEFT adapter folder; give the folder that "
            "peft's save_pretrained() wrote (adapter_config.json + adapter_model.safetensors)."
        )
    if not weights_path.is_file():
        if any(path.suffix.lower() in PICKLE_SUFFIXES for path in folder.iterdir()):
            raise ValueError(f"{label} has pickled weights; {PICKLE_SENTENCE}.")
        raise ValueError(
            f"{label} holds no {ADAPTER_WEIGHTS_FILE}; copy the adapter's weights file next to its config."
        )
    if config_path.stat().st_size > settings.MAX_BLIP_ADAPTER_CONFIG_BYTES:
        raise ValueError(f"{label}/{ADAPTER_CONFIG_FILE} is over 1 MB, far more than a LoRA config; check the file.")
    if weights_path.stat().st_size > settings.MAX_BLIP_ADAPTER_BYTES:
        raise ValueError(
            f"{label}/{ADAPTER_WEIGHTS_FILE} is {weights_path.stat().st_size / 2**20:.0f} MB, over the "
            f"{settings.MAX_BLIP_ADAPTER_BYTES // 2**20} MB limit for a BLIP LoRA (STUDIO_MAX_BLIP_ADAPTER_MB)."
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{label}/{ADAPTER_CONFIG_FILE} is not valid JSON ({error}); fix or replace it.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{label}/{ADAPTER_CONFIG_FILE} is not a JSON object; it is not a PEFT adapter config.")
    config = lora_config_from_dict(raw, label)
    weights, decoder_only = read_lora_weights(weights_path, label)
    base_model = str(raw.get("base_model_name_or_path") or "")
    return AdapterFiles(folder, config, weights, decoder_only, base_model, label)


def lora_config_from_dict(raw: dict, label: str = "The adapter"):
    """A peft ``LoraConfig`` (inference mode) from adapter_config.json's fields; ValueError for anything but LoRA."""
    from peft import LoraConfig

    peft_type = str(raw.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise ValueError(
            f"{label} is a {peft_type or 'untyped'} adapter; only LoRA adapters (peft_type LORA) load on BLIP here."
        )
    refused = {
        "use_dora": "it is a DoRA adapter",
        "modules_to_save": "it replaces whole layers (modules_to_save)",
        "lora_bias": "it trains biases",
        "target_parameters": "it targets parameters, not layers",
        "trainable_token_indices": "it trains token embeddings",
    }
    for key, reason in refused.items():
        if raw.get(key):
            raise ValueError(f"{label} cannot load: {reason}; only plain LoRA matrices on linear layers are supported.")
    if raw.get("bias", "none") != "none":
        raise ValueError(
            f"{label} cannot load: it trains biases (bias={raw['bias']!r}); only bias='none' is supported."
        )
    if not raw.get("target_modules"):
        raise ValueError(f"{label}'s config names no target_modules, so it cannot say which layers it changes.")
    skipped = {"peft_type", "task_type", "auto_mapping", "peft_version", "revision", "inference_mode"}
    known = {field.name for field in dataclasses.fields(LoraConfig)} - skipped
    try:
        return LoraConfig(**{key: value for key, value in raw.items() if key in known}, inference_mode=True)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{label}'s config is not a LoRA config peft can read ({error}); re-save it with peft."
        ) from None


def read_lora_weights(
    path: Path, label: str = "The adapter"
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], bool]:
    """(module path -> (A, B), decoder_only) from a peft LoRA safetensors file; ValueError naming a foreign key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{label}'s {ADAPTER_WEIGHTS_FILE} is not a readable safetensors file ({error}).") from None
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key.removeprefix(_PEFT_PREFIX))
        if match is None or tensor.ndim != 2:
            raise ValueError(
                f"{label}'s weights hold {key!r}, which is not a peft LoRA matrix (…lora_A.weight / …lora_B.weight); "
                "only plain PEFT LoRA adapters load here (not kohya files, DoRA, biases or modules_to_save)."
            )
        pieces.setdefault(match["module"], {})[match["which"]] = tensor
    if not pieces:
        raise ValueError(f"{label}'s {ADAPTER_WEIGHTS_FILE} holds no LoRA matrices.")
    vision = sorted(module for module in pieces if module.startswith("vision_model."))
    if vision:
        raise ValueError(_vision_sentence(label, vision[0]))
    if all(module.startswith("text_decoder.") for module in pieces):
        decoder_only = False
    elif all(module.startswith(("bert.", "cls.")) for module in pieces):
        decoder_only = True
    else:
        strange = next(module for module in pieces if not module.startswith(("text_decoder.", "bert.", "cls.")))
        raise ValueError(
            f"{label}'s weights are for layer {strange!r}, which BLIP's text decoder does not have; it was made for "
            "another model (a BLIP caption LoRA names text_decoder.bert.encoder.layer.N... layers)."
        )
    weights = {}
    for module, pair in pieces.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ValueError(f"{label}'s weights have no {missing} for {module}; the file is incomplete, re-save it.")
        if pair["A"].shape[0] != pair["B"].shape[1]:
            raise ValueError(
                f"{label}'s weights for {module} disagree on the rank (A {tuple(pair['A'].shape)}, "
                f"B {tuple(pair['B'].shape)}); the file is damaged."
            )
        weights[module] = (pair["A"], pair["B"])
    return weights, decoder_only


def _vision_sentence(label: str, module: str) -> str:
    return (
        f"{label} changes the vision encoder ({module}); adapters here may change only BLIP's text decoder, so one "
        "image encoding serves the base model and every adapter. Train it with target_modules on text_decoder "
        "layers only (e.g. query, key, value)."
    )


# ----------------------------------------------------------------------------- attaching


@dataclass(frozen=True)
class BlipAdapterInfo:
    """One adapter as the Studio lists it."""

    name: str  # what requests and the UI call it
    source: str  # a Hub id, a folder name in the adapters folder, a resolved path (CLI), or the uploaded file names
    kind: str  # folder (in the adapters folder) | path (any folder; CLI) | hub | upload
    folder: Path  # where its two files are; it is attached again from here after BLIP reloads
    rank: int
    alpha: float
    target_modules: str  # as its config states them
    lora_layers: int  # text-decoder layers it changes
    base_model: str  # the base model its config names ("" if none)
    owner: str | None = SHARED  # an upload's visitor (pipelines.ownership); None: shared, read-only for visitors

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "shared": self.owner is SHARED,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.target_modules,
            "lora_layers": self.lora_layers,
            "base_model": self.base_model,
        }


def attach_adapter(captioner: BlipCaptioner, name: str, files: AdapterFiles) -> int:
    """Add ``files`` to the captioner's text decoder as adapter ``name``, inactive; returns the layers it changes.

    Checks the adapter against this model first (so a refused adapter changes
    nothing), then injects peft LoRA layers and copies the matrices in, all
    under the captioner's decoder lock.
    """
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import check_target_module_exists

    model = captioner.model
    root = model.text_decoder if files.decoder_only else model
    prefix = "text_decoder." if files.decoder_only else ""
    label = files.label

    # 1. The layers its config targets, by peft's own matching rule: text decoder only, linear only.
    targeted = {
        path: _base_layer(module)
        for path, module in root.named_modules()
        if path and check_target_module_exists(files.config, path)
    }
    vision = sorted(prefix + path for path in targeted if (prefix + path).startswith("vision_model."))
    if vision:
        raise ValueError(_vision_sentence(label, vision[0]))
    elsewhere = sorted(prefix + path for path in targeted if not (prefix + path).startswith("text_decoder."))
    if elsewhere:
        raise ValueError(f"{label} targets {elsewhere[0]}, outside BLIP's text decoder; only text-decoder LoRAs load.")
    if not targeted:
        raise ValueError(
            f"{label}'s target_modules ({_describe_targets(files.config)}) match no layer of this BLIP's text decoder; "
            "it was made for another model."
        )
    not_linear = sorted(path for path, module in targeted.items() if not isinstance(module, torch.nn.Linear))
    if not_linear:
        if "quantized" in type(targeted[not_linear[0]]).__module__:  # --precision int8 / vision-bf16-int8
            raise ValueError(
                f"{label} cannot load while BLIP's text decoder runs in dynamic int8 (--precision int8 or "
                "vision-bf16-int8); restart with --precision bf16 or fp32 to use adapters."
            )
        raise ValueError(f"{label} targets {prefix + not_linear[0]}, which is not a linear layer; only those load.")

    # 2. Every matrix belongs to a targeted layer of the same width.
    for path, (lora_a, lora_b) in files.weights.items():
        layer = targeted.get(path)
        if layer is None:
            raise ValueError(
                f"{label}'s weights hold LoRA matrices for {prefix + path}, which its target_modules do not name "
                "or this BLIP does not have; its config and weights do not belong together."
            )
        if lora_a.shape[1] != layer.in_features or lora_b.shape[0] != layer.out_features:
            raise ValueError(_width_sentence(label, prefix + path, lora_a, lora_b, layer, model, files.base_model))

    # 3. Inject, copy, count; on any failure take the half-attached adapter out again.
    with captioner.decoder_lock:
        if name in captioner.adapter_names():
            raise ValueError(f"An adapter named {name!r} is already loaded; choose another name.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "already found a peft_config" for a second adapter: intended
            inject_adapter_in_model(files.config, root, adapter_name=name)
        try:
            changed = 0
            for path, (lora_a, lora_b) in files.weights.items():
                layer = root.get_submodule(path)
                target_a, target_b = layer.lora_A[name].weight, layer.lora_B[name].weight
                if target_a.shape != lora_a.shape or target_b.shape != lora_b.shape:
                    raise ValueError(
                        f"{label}'s weights have rank {lora_a.shape[0]} at {prefix + path}, but its "
                        f"{ADAPTER_CONFIG_FILE} gives that layer rank {target_a.shape[0]}; config and weights "
                        "do not belong together."
                    )
                with torch.no_grad():
                    target_a.copy_(lora_a.to(target_a.dtype))
                    target_b.copy_(lora_b.to(target_b.dtype))
                changed += int(bool(torch.count_nonzero(lora_a)) and bool(torch.count_nonzero(lora_b)))
            if changed == 0:
                raise ValueError(
                    f"{label} changes nothing: all its LoRA matrices are zero (an untrained adapter); "
                    "train it first or pick another."
                )
        except BaseException:
            detach_adapter(captioner, name)
            raise
        switch_adapter_layers(captioner.adapter_layers(), None)  # rest on the base model
    return changed


def _base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The layer itself, or the original layer inside a peft LoRA wrapper (from an adapter attached earlier)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def detach_adapter(captioner: BlipCaptioner, name: str) -> None:
    """Take adapter ``name`` out of the text decoder (its LoRA layers stay, empty, passing the base output)."""
    with captioner.decoder_lock:
        layers = captioner.adapter_layers()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns when the deleted adapter was the active one
            for layer in layers:
                if name in getattr(layer, "lora_A", {}):
                    layer.delete_adapter(name)
        switch_adapter_layers(layers, None)


def _describe_targets(config) -> str:
    targets = config.target_modules
    return targets if isinstance(targets, str) else ", ".join(sorted(targets))


def _width_sentence(label: str, path: str, lora_a, lora_b, layer, model, base_model: str) -> str:
    text_width = model.config.text_config.hidden_size
    image_width = model.config.vision_config.hidden_size
    made_for = f" (its config names {base_model})" if base_model else ""
    return (
        f"{label} was made for a different BLIP{made_for}: at {path} it expects {lora_a.shape[1]} input and "
        f"{lora_b.shape[0]} output features, this BLIP's layer has {layer.in_features} and {layer.out_features} "
        f"(the loaded BLIP's text decoder is {text_width} wide and its image features {image_width}; BLIP large's "
        "image features are 1024 wide, BLIP base's 768). Load it on the BLIP it was trained for."
    )


def adapter_name(text: str) -> str:
    """A name for requests and the UI: letters, digits, '.', '_' and '-' (other runs become '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text or "")).strip("-._")[:64]
    return name or "adapter"


# ----------------------------------------------------------------------------- the Studio's set


class BlipAdapterSet:
    """The adapters one app (or CLI run) has loaded, re-attached whenever BLIP is loaded again.

    Adapter folders are found by name in ``adapter_dir``; API callers may give
    only names inside it (no absolute paths, no ``..``, no symbolic link out of
    it). ``tiny_blip_source`` (``--tiny`` mode) makes the random ``tiny-demo``
    adapter appear there, built on first use.

    Ownership (``pipelines.ownership``): an uploaded adapter belongs to the ``visitor`` who
    loaded it; others neither see nor use it. Folder and Hub adapters are shared.
    ``visitor=None`` is the operator (Python, the CLI), who sees everything.
    """

    def __init__(
        self, adapter_dir: Path, *, tiny_blip_source: str | Path | None = None, work_dir: Path | None = None
    ) -> None:
        self.adapter_dir = Path(adapter_dir).expanduser()
        self.tiny_blip_source = tiny_blip_source
        self._work_dir = Path(work_dir) if work_dir is not None else None
        self._adapters: dict[str, BlipAdapterInfo] = {}
        self._slots = UploadSlots("BLIP adapter")
        self._lock = threading.RLock()
        self._demo_ready = False

    # -- what is there

    def loaded(self, visitor: str | None = None) -> list[BlipAdapterInfo]:
        """The adapters ``visitor`` may use: the shared ones and their own uploads."""
        with self._lock:
            return [info for info in self._adapters.values() if may_see(info.owner, visitor)]

    def names(self, visitor: str | None = None) -> list[str]:
        return [info.name for info in self.loaded(visitor)]

    def use(self, name: str | None, visitor: str | None = None) -> str | None:
        """``name`` tidied (None or blank: the base model) once ``visitor`` may use it; marks it as used now.

        Another visitor's upload is "not loaded", in the same sentence as a name nobody loaded.
        """
        if name is None or not str(name).strip():
            return None
        name = str(name).strip()
        with self._lock:
            if not self._slots.visible(name, visitor):
                names = self.names(visitor)
                loaded = f"the loaded ones are: {', '.join(names)}" if names else "none is loaded yet"
                raise ValueError(
                    f"No BLIP adapter named {name!r} is loaded ({loaded}); load it first, or leave the adapter "
                    "empty for the base model."
                )
            self._slots.touch(name)
        return name

    def available(self) -> list[str]:
        """Folder names in ``adapter_dir`` (one or two levels deep) that hold an adapter config."""
        self._ensure_demo()
        if not self.adapter_dir.is_dir():
            return []
        root = self.adapter_dir.resolve()
        found = []
        for config in sorted(self.adapter_dir.glob(f"*/{ADAPTER_CONFIG_FILE}")) + sorted(
            self.adapter_dir.glob(f"*/*/{ADAPTER_CONFIG_FILE}")
        ):
            folder = config.parent
            if folder.name.startswith(".") or not folder.resolve().is_relative_to(root):
                continue
            found.append(folder.relative_to(self.adapter_dir).as_posix())
        return found

    def describe(self, visitor: str | None = None) -> dict:
        """What ``/blip_adapter_list`` answers: the adapters folder, the adapters ``visitor`` may use, the folders there."""
        return {
            "adapter_dir": str(self.adapter_dir),
            "loaded": [info.as_dict() for info in self.loaded(visitor)],
            "available": self.available(),
        }

    # -- loading

    def load(
        self,
        captioner: BlipCaptioner,
        source: str = "",
        uploads: Iterable[str | Path] = (),
        *,
        name: str | None = None,
        trusted_paths: bool = False,
        visitor: str | None = None,
    ) -> BlipAdapterInfo:
        """Load an adapter onto ``captioner`` from a folder name, a Hub id or uploaded files; returns its entry.

        ``trusted_paths`` (the command line) also accepts any folder path. The
        same folder loaded twice returns the adapter already loaded. Uploaded files
        become ``visitor``'s (at most ``settings.MAX_UPLOADS_PER_SESSION`` each); when all
        ``settings.MAX_BLIP_ADAPTERS`` slots are taken, the least recently used upload is
        removed to make room, never a shared adapter.
        """
        # 1. Check inputs: one source, within limits.
        uploads = [Path(path) for path in uploads or ()]
        source = " ".join(str(source or "").split())
        if bool(source) == bool(uploads):
            raise ValueError(
                "Give an adapter folder name or Hub id, or upload its files, not both."
                if source
                else "Give an adapter: a folder name in the adapters folder, a Hub id (owner/name), or upload its files."
            )

        owner = visitor if uploads else SHARED
        if uploads:  # before anything is unpacked
            with self._lock:
                self._slots.check_visitor_cap(owner, settings.MAX_UPLOADS_PER_SESSION)

        # 2. Its files in a local folder.
        if uploads:
            folder, suggested = unpack_adapter_upload(uploads, self._uploads_dir())
            kind, described = "upload", ", ".join(path.name for path in uploads)
        else:
            folder, kind, suggested, described = self._resolve(source, trusted_paths)

        # 3. Read, check and attach under a free name; then make room (the least recently used upload).
        try:
            files = read_adapter_folder(folder, label=suggested if kind == "upload" else source)
            with self._lock:
                return self._attach_new(captioner, files, folder, kind, described, name or suggested, owner)
        except BaseException:
            if kind == "upload":
                shutil.rmtree(folder, ignore_errors=True)  # a refused upload leaves nothing behind
            raise

    def _attach_new(
        self, captioner, files: AdapterFiles, folder: Path, kind: str, described: str, wanted: str, owner
    ) -> BlipAdapterInfo:
        """Attach checked ``files`` as a new entry owned by ``owner``, evicting an upload if full (lock held)."""
        for info in self.loaded(owner):
            if info.folder.resolve() == folder.resolve() and info.name in captioner.adapter_names():
                self._slots.touch(info.name)
                return info
        if owner is not SHARED:
            self._slots.check_visitor_cap(owner, settings.MAX_UPLOADS_PER_SESSION)
        try:
            victim = self._slots.victim(settings.MAX_BLIP_ADAPTERS)
        except ValueError:
            raise ValueError(
                f"{len(self._adapters)} adapters are loaded, the most at once, and none is an upload that could "
                "make room; remove one before loading another."
            ) from None
        chosen = self._free_name(adapter_name(wanted), captioner)
        changed = attach_adapter(captioner, chosen, files)
        info = BlipAdapterInfo(
            name=chosen,
            source=described,
            kind=kind,
            folder=folder,
            rank=int(files.config.r),
            alpha=float(files.config.lora_alpha),
            target_modules=_describe_targets(files.config),
            lora_layers=changed,
            base_model=files.base_model,
            owner=owner,
        )
        self._adapters[chosen] = info
        self._slots.add(chosen, owner)
        if victim is not None:
            self._forget(captioner, victim)
            logger.info("BLIP adapter upload %s removed to make room for %s", victim, chosen)
        logger.info("BLIP adapter %s loaded from %s (%d LoRA layers)", chosen, described, changed)
        return info

    def attached(self, captioner: BlipCaptioner) -> BlipCaptioner:
        """``captioner`` with every loaded adapter on it (after BLIP was unloaded and loaded again, they are not)."""
        with self._lock:  # two requests meeting a freshly loaded BLIP attach each adapter once
            present = set(captioner.adapter_names())
            for info in list(self._adapters.values()):
                if info.name in present:
                    continue
                try:
                    attach_adapter(captioner, info.name, read_adapter_folder(info.folder, label=info.source))
                except ValueError as error:  # its files went away or changed: drop it rather than fail every caption
                    logger.warning("BLIP adapter %s could not be attached again and was dropped: %s", info.name, error)
                    self._adapters.pop(info.name, None)
                    self._slots.remove(info.name)
        return captioner

    def remove(self, captioner: BlipCaptioner, name: str, *, visitor: str | None = None, shared: bool = True) -> None:
        """Unload adapter ``name``; ValueError if ``visitor`` has no such adapter.

        With ``shared=False`` (a public instance's visitors) shared adapters are refused: only
        the operator removes those. An upload's unpacked files are deleted with it.
        """
        with self._lock:
            if not self._slots.visible(name, visitor):
                loaded = ", ".join(self.names(visitor)) or "none"
                raise ValueError(f"No BLIP adapter named {name!r} is loaded; the loaded ones: {loaded}.")
            if not shared and not self._slots.is_upload(name):
                raise ValueError(
                    f"The BLIP adapter {name!r} is shared by every visitor of this public instance; only the operator "
                    "can remove it (leave the adapter empty to caption without it)."
                )
            self._forget(captioner, name)

    def _forget(self, captioner: BlipCaptioner, name: str) -> None:
        """Detach ``name``, drop its entry and delete an upload's files (the lock is held)."""
        detach_adapter(captioner, name)
        info = self._adapters.pop(name)
        self._slots.remove(name)
        if info.kind == "upload" and self._work_dir is not None and info.folder.is_relative_to(self._work_dir):
            shutil.rmtree(info.folder, ignore_errors=True)

    # -- helpers

    def _free_name(self, wanted: str, captioner: BlipCaptioner) -> str:
        taken = set(self._adapters) | set(captioner.adapter_names())
        candidate, counter = wanted, 2
        while candidate in taken:
            candidate, counter = f"{wanted}-{counter}", counter + 1
        return candidate

    def _uploads_dir(self) -> Path:
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="studio-blip-adapters-"))
        return self._work_dir

    def _resolve(self, source: str, trusted_paths: bool) -> tuple[Path, str, str, str]:
        """(folder, kind, suggested name, normalised source) for a folder name, a path (trusted) or a Hub id."""
        if trusted_paths:
            path = Path(source).expanduser()
            if path.is_dir():
                return path.resolve(), "path", path.resolve().name, str(path.resolve())
        folder = self.folder_in_dir(source)
        if folder is not None:
            return folder, "folder", Path(source).name, source
        if HUB_ID.match(source):
            return download_adapter(source, self.adapter_dir), "hub", source.split("/")[-1], source
        raise ValueError(
            f"There is no adapter folder {source!r} in {self.adapter_dir}, and it is not a Hub id (owner/name); "
            f"pick one of: {', '.join(self.available()) or '(the folder is empty)'}, or upload the adapter."
        )

    def folder_in_dir(self, name: str) -> Path | None:
        """The folder ``name`` inside ``adapter_dir`` (resolved), None if there is none; ValueError if it escapes."""
        self._ensure_demo()
        text = name.strip()
        if Path(text).is_absolute() or text.startswith("~") or "\\" in text or ":" in text:
            raise ValueError(
                f"Give the adapter folder's name inside {self.adapter_dir} (e.g. my-adapter), not a path: {text!r}."
            )
        if ".." in Path(text).parts:
            raise ValueError(
                f"An adapter name may not contain '..' ({text!r}); give a folder inside {self.adapter_dir}."
            )
        candidate = self.adapter_dir / text
        if not candidate.exists():
            return None
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.adapter_dir.resolve()):
            raise ValueError(
                f"{text!r} leads outside {self.adapter_dir} (through a symbolic link); copy the adapter into that "
                "folder instead."
            )
        if not resolved.is_dir():
            raise ValueError(f"{text!r} in {self.adapter_dir} is a file; give the folder that holds the adapter.")
        return resolved

    def _ensure_demo(self) -> None:
        if self.tiny_blip_source is None or self._demo_ready:
            return
        with self._lock:
            if not self._demo_ready:
                ensure_tiny_demo_adapter(self.adapter_dir, self.tiny_blip_source)
                self._demo_ready = True


def default_adapter_dir(tiny_root: Path | None = None) -> Path:
    """``$STUDIO_BLIP_ADAPTER_DIR``; else ``<tiny root>/blip-adapters`` in --tiny mode; else ``adapters/``."""
    import os

    if tiny_root is not None and not os.environ.get(settings.BLIP_ADAPTER_DIR_ENV):
        return Path(tiny_root) / TINY_ADAPTER_DIR
    return settings.BLIP_ADAPTER_DIR


# ----------------------------------------------------------------------------- the tiny demo adapter


def write_random_adapter(
    blip_config: dict,
    out_dir: Path,
    *,
    rank: int = 4,
    seed: int = 1,
    scale: float = 1.0,
    base_model: str = "",
) -> Path:
    """Write a LoRA adapter of random weights for the BLIP whose config.json is ``blip_config``.

    It targets every projection of the text decoder's self- and cross-attention,
    in the standard whole-model layout, with no model built: ``from_pretrained``
    changes process-wide state (the default dtype, patched init functions), so
    building a model while the app loads BLIP in another thread breaks that load.
    ``scale`` sets how far the LoRA moves each layer's output (for a unit input).
    """
    from safetensors.torch import save_file

    text = blip_config["text_config"]
    hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
    image_width = int(text.get("encoder_hidden_size") or blip_config["vision_config"]["hidden_size"])
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for kind, block in _ATTENTION_MODULES.items():
            for projection in settings.BLIP_TRAIN_TARGET_PROJECTIONS:
                leaf = "output.dense" if projection == "dense" else f"self.{projection}"
                path = f"{_PEFT_PREFIX}text_decoder.bert.encoder.layer.{layer}.{block}.{leaf}"
                width = image_width if kind == "cross" and projection in ("key", "value") else hidden
                lora_a = torch.randn(rank, width, generator=generator) * math.sqrt(scale / width)
                lora_b = torch.randn(hidden, rank, generator=generator) * math.sqrt(1.0 / rank)
                tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = lora_a, lora_b
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": text_decoder_targets(),
        "base_model_name_or_path": base_model,
    }
    (out_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def ensure_tiny_demo_adapter(adapter_dir: Path, blip_source: str | Path) -> Path:
    """``adapter_dir/tiny-demo``: a random LoRA for the tiny BLIP saved at ``blip_source``, built once.

    Built in a temporary folder and renamed into place, so a concurrent or
    interrupted build never leaves a half-written adapter behind.
    """
    adapter_dir = Path(adapter_dir)
    target = adapter_dir / TINY_DEMO_ADAPTER
    if (target / ADAPTER_CONFIG_FILE).is_file() and (target / ADAPTER_WEIGHTS_FILE).is_file():
        return target
    blip_config = json.loads((Path(blip_source) / "config.json").read_text())
    adapter_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_DEMO_ADAPTER}-", dir=adapter_dir))
    try:
        write_random_adapter(blip_config, staging, scale=TINY_DEMO_SCALE, base_model=str(blip_source))
        (staging / "README.md").write_text(
            "# tiny-demo\n\nA LoRA with random weights for the tiny offline BLIP (`--tiny`): it changes the "
            "gibberish captions, which is all it is for.\n"
        )
        try:
            staging.rename(target)
        except OSError:
            if not (target / ADAPTER_WEIGHTS_FILE).is_file():  # not another process's finished build
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
