"""A BLIP LoRA adapter folder, read and checked on its own (not yet against a model).

An adapter is a standard PEFT LoRA folder: ``adapter_config.json`` and
``adapter_model.safetensors``, in the layout peft writes when the whole
``BlipForConditionalGeneration`` is wrapped (keys such as
``base_model.model.text_decoder.bert.encoder.layer.0.attention.self.query.lora_A.weight``)
or ``model.text_decoder`` alone (keys ``base_model.model.bert...``). Every check fails
with one sentence: only safetensors weights, a plain LoRA config, LoRA matrices in pairs of
one rank, and nothing in the vision encoder. ``pipelines.blip.adapter_layers`` checks the
result against a loaded BLIP and attaches it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import settings

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights that torch.load would unpickle
PICKLE_SENTENCE = (
    "only adapter_model.safetensors is loaded: .bin weights are Python pickles, which can run code when opened; "
    "convert it with safetensors (or ask its author for a .safetensors copy)"
)
PEFT_PREFIX = "base_model.model."
ATTENTION_MODULES = {"self": "attention", "cross": "crossattention"}  # attention kind -> BLIP's module name
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


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
    unknown += [item for item in attention if item not in ATTENTION_MODULES]
    if unknown or not projections or not attention:
        raise ValueError(
            f"LoRA targets {', '.join(unknown) or '(none)'} unknown; choose projections from "
            f"{', '.join(settings.BLIP_TRAIN_TARGET_PROJECTIONS)} and attention from "
            f"{', '.join(settings.BLIP_TRAIN_ATTENTION_KINDS)}."
        )
    parts = [rf"self\.{name}" for name in projections if name != "dense"]
    if "dense" in projections:
        parts.append(r"output\.dense")
    blocks = "|".join(ATTENTION_MODULES[kind] for kind in attention)
    return rf"text_decoder\.bert\.encoder\.layer\.\d+\.(?:{blocks})\.(?:{'|'.join(parts)})"


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
        match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
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
        raise ValueError(vision_encoder_sentence(label, vision[0]))
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


def vision_encoder_sentence(label: str, module: str) -> str:
    """The sentence for an adapter that would change the vision encoder (read here, or matched on the model)."""
    return (
        f"{label} changes the vision encoder ({module}); adapters here may change only BLIP's text decoder, so one "
        "image encoding serves the base model and every adapter. Train it with target_modules on text_decoder "
        "layers only (e.g. query, key, value)."
    )
