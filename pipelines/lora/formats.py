"""LoRA files for the SD3 MMDiT: read the header safely, tell the key style apart, convert to diffusers.

Everything here works on plain tensors and key names, before any pipeline is
touched. ``read_safetensors_header`` validates a file without loading it (a
renamed pickle is refused by its first bytes); ``inspect_lora_keys`` names the
key style and refuses what cannot be converted, naming one such key;
``convert_to_diffusers`` turns any supported style into one canonical form:

    transformer.<diffusers module>.lora_A.weight  (rank, in)
    transformer.<diffusers module>.lora_B.weight  (out, rank), with alpha / rank folded in

so that peft applies it with scale 1 and no per-file config is needed later.

Supported styles:

- diffusers / peft: ``transformer.`` prefix, ``lora_A``/``lora_B`` or ``lora.down``/``lora.up``
  (loaded as they are; a ``lora_adapter_metadata`` header with ``lora_alpha`` is folded in);
- bare peft keys (``transformer_blocks.N...``, or ``base_model.model.`` + those): prefix added;
- kohya sd-scripts (``lora_unet_joint_blocks_{i}_{x_block|context_block}_{part}``) and ComfyUI's
  dotted original names (``diffusion_model.joint_blocks.N.x_block.attn.qkv``), converted exactly
  with the mapping of diffusers' own checkpoint converter (``scripts/convert_sd3_to_diffusers.py``);
- OneTrainer's ``lora_transformer_<diffusers name with underscores>``: renamed.

Text-encoder keys (``lora_te1_``/``lora_te2_``/``lora_te3_``, ``text_encoder.*``) are dropped with
a warning the caller must show: SD3 LoRAs carry their effect in the MMDiT (diffusers' SD3 trainer
trains the text encoders only on request), so refusing them would turn away usable files, while
loading only the transformer part is still honest when the user is told.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

# safetensors' own reader refuses headers above 100 MB; a LoRA's header is a few hundred KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLED_SENTENCE = "pickled files can run code when loaded; convert it to .safetensors"

# Top-level children of diffusers' SD3Transformer2DModel: bare peft keys start with one of these.
_TRANSFORMER_CHILDREN = (
    "transformer_blocks",
    "pos_embed",
    "context_embedder",
    "time_text_embed",
    "norm_out",
    "proj_out",
)
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder.", "text_encoder_2.", "text_encoder_3.")

# The parameter part of a key: kohya/ComfyUI (lora_down/lora_up/alpha), peft (lora_A/lora_B),
# old diffusers (lora.down/lora.up). The module is everything before it.
_PARAM_PATTERN = re.compile(
    r"^(?P<module>.+?)\.(?P<param>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight"
    r"|lora\.down\.weight|lora\.up\.weight|alpha)$"
)
_DOWN = {"lora_down.weight", "lora_A.weight", "lora.down.weight"}
_UP = {"lora_up.weight", "lora_B.weight", "lora.up.weight"}
# Keys of other adapter kinds, which a plain LoRA loader would silently mis-apply.
_OTHER_ADAPTERS = (
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA"),
    (re.compile(r"\.lora_mid\."), "LoCon (LyCORIS)"),
    (re.compile(r"\.hada_"), "LoHa (LyCORIS)"),
    (re.compile(r"\.lokr_"), "LoKr (LyCORIS)"),
    (re.compile(r"\.oft_"), "OFT"),
    (re.compile(r"\.diff(_b)?$"), "full-weight difference"),
    (re.compile(r"\.lora_(B|up)\.bias$|\.lora\.up\.bias$"), "LoRA bias"),
)

# Original SD3 names (sd-scripts and ComfyUI both use them) -> diffusers modules. Each part maps
# to (diffusers module suffixes, how lora_up is split over them); "qkv" shares lora_down and splits
# lora_up's rows in three, as diffusers' converter chunks the fused qkv weight.
_BLOCK_PARTS = {
    ("x_block", "attn_qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("context_block", "attn_qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("x_block", "attn2_qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    ("x_block", "attn_proj"): ("attn.to_out.0",),
    ("context_block", "attn_proj"): ("attn.to_add_out",),
    ("x_block", "attn2_proj"): ("attn2.to_out.0",),
    ("x_block", "mlp_fc1"): ("ff.net.0.proj",),
    ("x_block", "mlp_fc2"): ("ff.net.2",),
    ("context_block", "mlp_fc1"): ("ff_context.net.0.proj",),
    ("context_block", "mlp_fc2"): ("ff_context.net.2",),
    ("x_block", "adaLN_modulation_1"): ("norm1.linear",),
    ("context_block", "adaLN_modulation_1"): ("norm1_context.linear",),
}
_TOP_PARTS = {
    "context_embedder": "context_embedder",
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",  # rows swapped: see _convert_adaln
}
_KOHYA_BLOCK = re.compile(r"^lora_unet_joint_blocks_(\d+)_(x_block|context_block)_(.+)$")
_COMFY_BLOCK = re.compile(r"^(?:model\.)?diffusion_model\.joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)$")
_COMFY_TOP = re.compile(r"^(?:model\.)?diffusion_model\.(.+)$")

# OneTrainer writes diffusers module names with dots turned into underscores.
_DIFFUSERS_BLOCK_MODULES = sorted({module for modules in _BLOCK_PARTS.values() for module in modules})
_ONETRAINER_BLOCK = {module.replace(".", "_"): module for module in _DIFFUSERS_BLOCK_MODULES}
_ONETRAINER_TOP = {module.replace(".", "_"): module for module in _TOP_PARTS.values()}
_ONETRAINER_BLOCK_KEY = re.compile(r"^lora_transformer_transformer_blocks_(\d+)_(.+)$")

STYLE_TITLES = {
    "diffusers": "diffusers/peft",
    "peft-bare": "peft (no transformer. prefix)",
    "kohya": "kohya sd-scripts",
    "comfyui": "ComfyUI (original SD3 names)",
    "onetrainer": "OneTrainer",
}


# ----------------------------------------------------------------------------- the file header


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a .safetensors file declares, read without loading a single tensor."""

    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    dtypes: dict[str, str]  # tensor name -> safetensors dtype ("F16", "BF16", "F32", ...)
    metadata: dict[str, str]  # the free-form __metadata__ block (trainer settings, peft config)
    header_bytes: int  # 8 + the JSON header's length: where the tensor data starts
    file_bytes: int


def read_safetensors_header(path: Path, *, label: str | None = None) -> SafetensorsHeader:
    """Parse and check the header of a .safetensors file; ValueError in one sentence if it is not one.

    The first 8 bytes are the header's length (little-endian); a pickle or zip renamed to
    ``.safetensors`` fails here, before anything could unpickle it.
    """
    path = Path(path)
    label = label or path.name
    file_bytes = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{label} is {file_bytes} bytes long: too short to be a .safetensors file.")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= min(MAX_HEADER_BYTES, file_bytes - 8):
            looks_pickled = head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"
            raise ValueError(
                f"{label} is not a valid .safetensors file (its first 8 bytes are not a header length)"
                + (
                    f"; it looks like a PyTorch pickle renamed to .safetensors, and {PICKLED_SENTENCE}."
                    if looks_pickled
                    else "."
                )
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{label} is not a valid .safetensors file (its header is not JSON).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{label} is not a valid .safetensors file (its header is not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    shapes, dtypes = {}, {}
    for name, info in header.items():
        if not isinstance(info, dict) or "shape" not in info or "dtype" not in info:
            raise ValueError(f"{label} is not a valid .safetensors file (entry {name!r} has no shape or dtype).")
        shapes[name] = tuple(int(size) for size in info["shape"])
        dtypes[name] = str(info["dtype"])
    return SafetensorsHeader(shapes, dtypes, dict(metadata), 8 + length, file_bytes)


# ----------------------------------------------------------------------------- key styles


@dataclass(frozen=True)
class LoraInspection:
    """The key style of a LoRA file and what it holds, from its key names alone."""

    style: str  # diffusers | peft-bare | kohya | comfyui | onetrainer (the transformer keys' style)
    transformer_keys: int
    text_encoder_keys: int
    example_text_encoder_key: str = ""

    @property
    def style_title(self) -> str:
        return STYLE_TITLES.get(self.style, self.style)


def _style_of(key: str) -> str | None:
    if key.startswith("transformer."):
        return "diffusers"
    if key.startswith("lora_unet_"):
        return "kohya"
    if key.startswith(("diffusion_model.", "model.diffusion_model.")):
        return "comfyui"
    if key.startswith("lora_transformer_"):
        return "onetrainer"
    if key.startswith("base_model.model.") or key.split(".", 1)[0] in _TRANSFORMER_CHILDREN:
        return "peft-bare"
    return None


def inspect_lora_keys(keys, *, label: str = "This file") -> LoraInspection:
    """Classify ``keys``; ValueError naming one key when the file holds anything that cannot be loaded exactly.

    Refused: files with no LoRA keys, other adapter kinds (DoRA, LyCORIS, ...), keys of an
    unknown style, files mixing styles, and files whose only LoRA keys are for the text encoders.
    """
    keys = list(keys)
    if not keys:
        raise ValueError(f"{label} holds no tensors at all; it is not a LoRA.")
    styles: dict[str, str] = {}  # style -> an example key
    text_encoder = [key for key in keys if key.startswith(_TEXT_ENCODER_PREFIXES)]
    text_encoder_set = set(text_encoder)
    lora_like = 0
    for key in keys:
        for marker, kind in _OTHER_ADAPTERS:
            if marker.search(key):
                raise ValueError(
                    f"{label} holds {kind} weights (e.g. {key!r}), which the Studio cannot apply exactly; "
                    "use a plain LoRA (lora_A/lora_B or lora_down/lora_up keys)."
                )
        if _PARAM_PATTERN.match(key):
            lora_like += 1
        if key in text_encoder_set:
            continue
        style = _style_of(key)
        if style is None:
            if _PARAM_PATTERN.match(key):
                raise ValueError(
                    f"{label} has LoRA keys of a layout the Studio does not know (e.g. {key!r}); it expects "
                    "diffusers (transformer.), kohya (lora_unet_joint_blocks_) or ComfyUI (diffusion_model.) SD3 keys."
                )
            continue  # looked at below: a file of plain weights is refused as "no LoRA keys"
        styles.setdefault(style, key)
    if lora_like == 0:
        raise ValueError(
            f"{label} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys, e.g. {keys[0]!r}); "
            "it looks like a full model or another kind of file, not a LoRA."
        )
    if not styles:
        raise ValueError(
            f"{label} only holds text-encoder LoRA weights (e.g. {text_encoder[0]!r}) and nothing for the MMDiT; "
            "the Studio loads SD3 LoRAs into the transformer only."
        )
    if len(styles) > 1:
        first, second = list(styles.items())[:2]
        raise ValueError(
            f"{label} mixes key styles ({STYLE_TITLES[first[0]]} {first[1]!r} and {STYLE_TITLES[second[0]]} "
            f"{second[1]!r}); save it in one style."
        )
    style = next(iter(styles))
    for key in keys:
        if key not in text_encoder_set and not _PARAM_PATTERN.match(key):
            raise ValueError(
                f"{label} holds a key that is not a LoRA weight ({key!r}); the Studio loads only plain LoRAs."
            )
    return LoraInspection(
        style=style,
        transformer_keys=len(keys) - len(text_encoder),
        text_encoder_keys=len(text_encoder),
        example_text_encoder_key=text_encoder[0] if text_encoder else "",
    )


# ----------------------------------------------------------------------------- conversion


@dataclass
class ConvertedLora:
    """A LoRA in the canonical diffusers form, ready for ``pipeline.load_lora_weights``."""

    state_dict: dict[str, torch.Tensor]  # transformer.<module>.lora_A.weight / lora_B.weight
    style: str
    warnings: list[str] = field(default_factory=list)

    @property
    def modules(self) -> list[str]:
        """The diffusers transformer modules this LoRA changes (without the ``transformer.`` prefix)."""
        suffix = ".lora_A.weight"
        return sorted(key[len("transformer.") : -len(suffix)] for key in self.state_dict if key.endswith(suffix))

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) of ``module``: its weight changes by ``lora_B @ lora_A`` at weight 1."""
        return (
            self.state_dict[f"transformer.{module}.lora_A.weight"],
            self.state_dict[f"transformer.{module}.lora_B.weight"],
        )


@dataclass
class _Factors:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def _group_by_module(tensors: dict[str, torch.Tensor], label: str) -> dict[str, _Factors]:
    groups: dict[str, _Factors] = {}
    for key, tensor in tensors.items():
        match = _PARAM_PATTERN.match(key)
        if match is None:  # inspect_lora_keys refused these already
            raise ValueError(f"{label} holds a key that is not a LoRA weight ({key!r}).")
        factors = groups.setdefault(match["module"], _Factors())
        param = match["param"]
        if param in _DOWN:
            factors.down = tensor
        elif param in _UP:
            factors.up = tensor
        else:
            if tensor.numel() != 1:
                raise ValueError(
                    f"{label}: {key!r} should hold one number (the LoRA alpha), not {tuple(tensor.shape)}."
                )
            factors.alpha = float(tensor.reshape(()).item())
    for module, factors in groups.items():
        if factors.down is None or factors.up is None:
            missing = "down/A" if factors.down is None else "up/B"
            raise ValueError(f"{label}: the LoRA of {module!r} has no {missing} matrix, so it cannot be applied.")
        if factors.down.ndim != 2 or factors.up.ndim != 2:
            raise ValueError(
                f"{label}: the LoRA of {module!r} is not for a linear layer (shapes {tuple(factors.down.shape)} and "
                f"{tuple(factors.up.shape)}); the Studio applies LoRAs to the MMDiT's linear layers only."
            )
        if factors.down.shape[0] != factors.up.shape[1]:
            raise ValueError(
                f"{label}: the LoRA of {module!r} has mismatched ranks ({factors.down.shape[0]} vs "
                f"{factors.up.shape[1]}); the file is damaged."
            )
        if factors.alpha is not None and not math.isfinite(factors.alpha):
            raise ValueError(f"{label}: the LoRA alpha of {module!r} is not a finite number; the file is damaged.")
    return groups


def _scaled_up(factors: _Factors, scale: float) -> torch.Tensor:
    """lora_up times ``scale``, computed in float32 and returned in the file's dtype."""
    if scale == 1.0:
        return factors.up
    return (factors.up.float() * scale).to(factors.up.dtype)


def _kohya_scale(factors: _Factors) -> float:
    """kohya's LoRA scale: alpha / rank, or 1 when the file stores no alpha."""
    rank = factors.down.shape[0]
    return 1.0 if factors.alpha is None else factors.alpha / rank


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    """Rows (shift, scale) -> (scale, shift): diffusers' AdaLayerNormContinuous splits the other way round."""
    shift, scale = up.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _convert_adaln(stream: str, factors: _Factors, up: torch.Tensor, module_label: str) -> torch.Tensor:
    """lora_up for an adaLN modulation, in the row order of the diffusers layer it maps to.

    Original SD3 and diffusers agree on the 6-way (shift, scale, gate x2) and MMDiT-X 9-way
    orders, which diffusers' converter copies as they are. The last block's context stream
    (and the final layer) modulate with 2 rows-blocks, (shift, scale) in SD3 but (scale, shift)
    in diffusers' AdaLayerNormContinuous: the converter swaps them, so do we.
    """
    width = factors.down.shape[1]
    chunks = up.shape[0] // width if up.shape[0] % width == 0 else 0
    if (stream == "final" and chunks == 2) or (stream == "context_block" and chunks == 2):
        return _swap_halves(up)
    if (stream in ("x_block", "context_block") and chunks == 6) or (stream == "x_block" and chunks == 9):
        return up
    raise ValueError(
        f"{module_label}: an adaLN LoRA with {up.shape[0]} outputs for width {width} matches no SD3 layer; "
        "the Studio cannot convert it."
    )


def _original_to_diffusers(
    groups: dict[str, _Factors], style: str, label: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """kohya / ComfyUI original-name LoRAs -> {diffusers module: (lora_A, lora_B)} with alpha folded in."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_id, factors in groups.items():
        if style == "kohya":
            block_match = _KOHYA_BLOCK.match(module_id)
            top = module_id[len("lora_unet_") :] if block_match is None else None
        else:
            block_match = _COMFY_BLOCK.match(module_id)
            top_match = None if block_match else _COMFY_TOP.match(module_id)
            top = top_match[1].replace(".", "_") if top_match else None
        up = _scaled_up(factors, _kohya_scale(factors))
        if block_match is not None:
            block, stream, part = int(block_match[1]), block_match[2], block_match[3].replace(".", "_")
            targets = _BLOCK_PARTS.get((stream, part))
            if targets is None:
                raise ValueError(
                    f"{label} holds a LoRA for {module_id!r}, a layer the Studio cannot map to diffusers' SD3 "
                    "transformer; it refuses the file rather than load it partly."
                )
            prefix = f"transformer_blocks.{block}."
            if part == "adaLN_modulation_1":
                up = _convert_adaln(stream, factors, up, f"{label} ({module_id})")
            if len(targets) == 3:
                if up.shape[0] % 3:
                    raise ValueError(
                        f"{label}: the qkv LoRA {module_id!r} has {up.shape[0]} outputs, not a multiple of 3."
                    )
                for target, rows in zip(targets, up.chunk(3, dim=0), strict=True):
                    out[prefix + target] = (factors.down, rows.contiguous())
            else:
                out[prefix + targets[0]] = (factors.down, up)
        elif top in _TOP_PARTS:
            if top == "final_layer_adaLN_modulation_1":
                up = _convert_adaln("final", factors, up, f"{label} ({module_id})")
            out[_TOP_PARTS[top]] = (factors.down, up)
        else:
            raise ValueError(
                f"{label} holds a LoRA for {module_id!r}, a layer the Studio cannot map to diffusers' SD3 "
                "transformer (e.g. the patch embedding's convolution); it refuses the file rather than load it partly."
            )
    return out


def _peft_alpha_for(module: str, peft_config: dict) -> float | None:
    """The lora_alpha peft would use for ``module`` under a saved LoraConfig (None: no config)."""
    if not peft_config:
        return None
    from peft.utils.other import get_pattern_key

    alpha_pattern = peft_config.get("alpha_pattern") or {}
    pattern = get_pattern_key(list(alpha_pattern), module)
    if pattern in alpha_pattern:
        return float(alpha_pattern[pattern])
    alpha = peft_config.get("lora_alpha")
    return None if alpha is None else float(alpha)


def _peft_config_from_metadata(metadata: dict[str, str], label: str) -> dict:
    """The transformer's LoraConfig saved by diffusers in the header (``lora_adapter_metadata``), or {}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{label}: its lora_adapter_metadata header is not JSON; the file is damaged.") from None
    config = {key[len("transformer.") :]: value for key, value in packed.items() if key.startswith("transformer.")}
    if config.get("use_dora"):
        raise ValueError(f"{label} is a DoRA adapter (use_dora in its header), which the Studio cannot apply exactly.")
    if config.get("lora_bias"):
        raise ValueError(f"{label} is a LoRA with bias terms (lora_bias in its header), which the Studio cannot apply.")
    return config


def _peft_to_diffusers(
    groups: dict[str, _Factors], style: str, metadata: dict[str, str], label: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers / peft / OneTrainer LoRAs -> {diffusers module: (lora_A, lora_B)} with any alpha folded in."""
    peft_config = _peft_config_from_metadata(metadata, label) if style in ("diffusers", "peft-bare") else {}
    use_rslora = bool(peft_config.get("use_rslora"))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_id, factors in groups.items():
        if style == "diffusers":
            module = module_id[len("transformer.") :]
        elif style == "peft-bare":
            module = module_id.removeprefix("base_model.model.")
        else:  # onetrainer
            module = _onetrainer_module(module_id, label)
        rank = factors.down.shape[0]
        alpha = factors.alpha if factors.alpha is not None else _peft_alpha_for(module, peft_config)
        # Without an alpha, diffusers' convention applies: lora_B @ lora_A as stored.
        scale = 1.0 if alpha is None else alpha / (math.sqrt(rank) if use_rslora else rank)
        out[module] = (factors.down, _scaled_up(factors, scale))
    return out


def _onetrainer_module(module_id: str, label: str) -> str:
    block_match = _ONETRAINER_BLOCK_KEY.match(module_id)
    if block_match and block_match[2] in _ONETRAINER_BLOCK:
        return f"transformer_blocks.{block_match[1]}.{_ONETRAINER_BLOCK[block_match[2]]}"
    top = module_id[len("lora_transformer_") :]
    if top in _ONETRAINER_TOP:
        return _ONETRAINER_TOP[top]
    raise ValueError(f"{label} holds a LoRA for {module_id!r}, a layer the Studio cannot map to the SD3 transformer.")


def convert_to_diffusers(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *, label: str = "This file"
) -> ConvertedLora:
    """Any supported SD3 LoRA -> the canonical diffusers form (see the module docstring).

    Raises ValueError, naming a key, for anything it cannot convert exactly. Text-encoder keys
    are dropped and reported in ``warnings``.
    """
    # 1. Classify and refuse what cannot be converted.
    inspection = inspect_lora_keys(tensors.keys(), label=label)
    warnings = []
    if inspection.text_encoder_keys:
        warnings.append(
            f"{label} also trains the text encoders ({inspection.text_encoder_keys} keys, e.g. "
            f"{inspection.example_text_encoder_key!r}); only its MMDiT part is loaded, so it may look weaker than intended."
        )
    kept = {key: value for key, value in tensors.items() if not key.startswith(_TEXT_ENCODER_PREFIXES)}

    # 2. Pair up/down/alpha per module.
    groups = _group_by_module(kept, label)

    # 3. Map module names and fold alpha / rank into lora_B.
    if inspection.style in ("kohya", "comfyui"):
        converted = _original_to_diffusers(groups, inspection.style, label)
    else:
        converted = _peft_to_diffusers(groups, inspection.style, metadata or {}, label)

    state_dict = {}
    for module, (down, up) in sorted(converted.items()):
        state_dict[f"transformer.{module}.lora_A.weight"] = down.contiguous()
        state_dict[f"transformer.{module}.lora_B.weight"] = up.contiguous()
    return ConvertedLora(state_dict=state_dict, style=inspection.style, warnings=warnings)


# ----------------------------------------------------------------------------- what a LoRA was made for


@dataclass(frozen=True)
class LoraShape:
    """What the keys of a converted LoRA say about the MMDiT it was made for."""

    width: int | None  # inner width (heads x head dim); None if no module reveals it
    min_blocks: int  # 1 + the highest transformer block index it touches (0: none)
    dual_attention_blocks: tuple[int, ...]  # blocks with attn2 (MMDiT-X) keys


# Which side of each block module's weight has the MMDiT's inner width: "in" (lora_A columns)
# or "out" (lora_B rows). The feed-forward's second layer takes 4x the width in.
_WIDTH_SIDE = {module: "in" for module in _DIFFUSERS_BLOCK_MODULES}
_WIDTH_SIDE.update({"ff.net.2": "out", "ff_context.net.2": "out"})
_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def lora_shape(converted: ConvertedLora) -> LoraShape:
    """Infer the inner width, the number of blocks (at least) and the dual-attention blocks a LoRA targets."""
    width = None
    blocks: set[int] = set()
    dual: set[int] = set()
    for module in converted.modules:
        match = _BLOCK_KEY.match(module)
        if match is None:
            continue
        block, rest = int(match[1]), match[2]
        blocks.add(block)
        if rest.startswith("attn2."):
            dual.add(block)
        side = _WIDTH_SIDE.get(rest)
        if width is None and side is not None:
            down, up = converted.factors(module)
            width = down.shape[1] if side == "in" else up.shape[0]
    return LoraShape(
        width=width, min_blocks=max(blocks) + 1 if blocks else 0, dual_attention_blocks=tuple(sorted(dual))
    )
