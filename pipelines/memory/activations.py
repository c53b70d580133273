"""Activation-memory estimates for the planner, from the real config files.

Weights are counted exactly (pipelines/architectures); activations are
estimated with the formulas below, each a pure function of a config so tests
can check it on small configs against a measured peak. pipelines/memory adds
them to the weights per memory mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipelines import settings
from pipelines.architectures import component_config, config_dir, family

# Bytes per element of the compute dtype the unquantized tensors are stored in.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTENTION_KINDS = ("sdpa", "math")  # memory-efficient SDPA kernel, or scores materialized

ACTIVATION_NOTES = """\
**How activations are estimated** (e = bytes per element of the compute dtype; every count below comes from
the real config files):

- **SD3 transformer** (per denoising step; one block is alive at a time): tokens N = image tokens
  (H/16 × W/16: the VAE's 8× and the 2×2 patches) + 333 text tokens (77 CLIP + 256 T5, zeros when T5 is
  dropped). The batch b doubles under classifier-free guidance (Large, Medium; not Turbo at guidance 0).
  Hidden states ≈ 10 × b × N × hidden × e: the residual stream, its normalised copy and the 4×-wide MLP
  before and after GELU (within ±25% of a peak measured on the CPU in the tests). Without a memory-efficient
  attention kernel add 2 × b × heads × N² × e (the scores and their softmax).
- **SD3.5 Large ControlNet** (per step, before the MMDiT): its blocks see the image tokens only (no text
  stream), so 10 × b × image tokens × hidden × e; its 19 residuals (b × image tokens × hidden each) stay alive
  through the MMDiT's step and are added to it. The control image's VAE encode is smaller than the decode.
- **VAE decode**: the largest decoder feature map F (channels × pixels, from block_out_channels: at 1024²
  the 256-channel map upsampled to full size) × 4 (a resnet block's input, its normalised and activated
  copies and the conv output; within ±25% of a CPU measurement) × batch × e; without a memory-efficient kernel the
  mid-block attention's 2 × (H/8 × W/8)² scores, if larger.
- **Text encoders** (CLIP-L, CLIP-G at 77 tokens, T5 at 256, up to 512): per layer 2 × L × hidden + the MLP
  (2 × L × ffn; T5's gated MLP 4 ×) + attention: T5's position bias b × heads × L² always, scores and softmax
  twice that more without a memory-efficient kernel.
- **BLIP**: the ViT (577 tokens at 384 px, eager attention: scores and softmax kept) or, if larger, beam
  search's cache: the image features repeated per beam plus every decoder layer's cross-attention keys and
  values (2 × layers × b × beams × 577 × hidden), plus the self-attention cache (within ±25% of a CPU
  measurement).

The peak is the largest phase (text encoding, denoising, VAE decode) of resident weights + that phase's
activations. Not counted: the CUDA context, cuBLAS workspaces, allocator fragmentation, other processes
(hence the margin).
"""

# --- activations ------------------------------------------------------------------------
# Each estimate is a pure function of a config (so tests can check it on small configs
# against a measured peak) with a wrapper that reads the model's real config.


@dataclass(frozen=True)
class Activation:
    """Estimated activation memory of one component's forward pass."""

    component: str
    phase: str
    bytes: int
    formula: str  # the formula with its numbers, for the UI and the JSON


def mmdit_activation(config: dict, tokens: int, rows: int, dtype: str = "bf16", attention: str = "sdpa") -> Activation:
    """One SD3 transformer step over ``tokens`` (image + text) for ``rows`` sequences (batch x 2 under CFG).

    One joint block is alive at a time. Its peak holds the residual stream, its
    normalised copy and the MLP's 4 x hidden layer before and after GELU:
    10 x rows x tokens x hidden x e. Without a memory-efficient attention kernel
    the scores and their softmax add 2 x rows x heads x tokens^2 x e. Checked on
    the CPU against a measured peak, within 25% (tests/test_memory.py).
    """
    element = DTYPE_BYTES[dtype]
    heads = config["num_attention_heads"]
    hidden = heads * config["attention_head_dim"]
    total = 10 * rows * tokens * hidden * element
    formula = f"10 × {rows} × {tokens} tokens × {hidden} × {element} B"
    if attention == "math":
        total += 2 * rows * heads * tokens**2 * element
        formula += f" + 2 × {rows} × {heads} heads × {tokens}² × {element} B"
    return Activation("transformer", "denoising", total, formula)


def vae_activation(
    config: dict, height: int, width: int, batch: int, dtype: str = "bf16", attention: str = "sdpa"
) -> Activation:
    """The VAE decode of ``batch`` images: 4 x its largest decoder feature map F, in elements x e.

    F comes from ``block_out_channels``: the decoder runs them in reverse, and
    every stage but the last upsamples 2x, so at 1024 px the largest map is the
    third stage's 256 channels upsampled to full size. A resnet block holds its
    input (for the skip), the normalised and the activated copies and the conv
    output; a peak measured on the CPU is within 25% of 4 F (tests/test_memory.py).
    Without a memory-efficient kernel the mid-block attention's scores,
    2 x (latent pixels)^2, count instead when larger.
    """
    element = DTYPE_BYTES[dtype]
    channels = list(reversed(config["block_out_channels"]))
    factor = 2 ** (len(channels) - 1)
    latent_pixels = (height // factor) * (width // factor)
    largest = 0
    for stage, stage_channels in enumerate(channels):
        pixels = latent_pixels * 4**stage
        upsampled = pixels * 4 if stage < len(channels) - 1 else pixels
        largest = max(largest, stage_channels * upsampled)
    total = 4 * largest * batch * element
    formula = f"4 × {largest:,} (largest feature map) × {batch} × {element} B"
    if attention == "math":
        scores = 2 * latent_pixels**2 * batch * element  # one head over the latent pixels
        if scores > total:
            total, formula = scores, f"2 × {latent_pixels}² mid-block scores × {batch} × {element} B"
    return Activation("vae", "VAE decode", total, formula)


def text_encoder_activation(
    config: dict, tokens: int, batch: int, dtype: str = "bf16", attention: str = "sdpa", *, component: str = ""
) -> Activation:
    """One layer of a CLIP text encoder or of T5 at ``tokens``, the largest moment of its forward pass.

    2 x tokens x hidden (residual and normalised copy) + the MLP (2 x tokens x ffn;
    T5's gated MLP 4x) + attention: T5's relative position bias (batch x heads x
    tokens^2) always; scores and softmax two more copies without a memory-efficient kernel.
    """
    element = DTYPE_BYTES[dtype]
    if "d_model" in config:  # T5
        hidden, ffn, heads, ffn_copies = config["d_model"], config["d_ff"], config["num_heads"], 4
        score_copies = 1 if attention == "sdpa" else 3
    else:  # CLIP
        hidden, ffn, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
        ffn_copies, score_copies = 2, (0 if attention == "sdpa" else 2)
    per_row = 2 * tokens * hidden + ffn_copies * tokens * ffn + score_copies * heads * tokens**2
    formula = f"{batch} × (2 × {tokens} × {hidden} + {ffn_copies} × {tokens} × {ffn}"
    formula += f" + {score_copies} × {heads} × {tokens}²)" if score_copies else ")"
    return Activation(component, "text encoding", batch * per_row * element, formula + f" × {element} B")


def blip_activation(
    config, batch: int, dtype: str = "bf16", *, num_beams: int = 0, new_tokens: int = 0, phase: str = "captioning"
) -> Activation:
    """BLIP (a ``BlipConfig``) on ``batch`` images: the ViT's largest layer, or beam search's cache if larger.

    The ViT runs eager attention (BLIP has no SDPA), so a layer holds scores and
    softmax, 2 x heads x patches^2, next to 2 x patches x hidden and the MLP's
    2 x patches x ffn. Captioning with ``num_beams`` repeats the image features
    per beam and caches every decoder layer's cross-attention keys and values over
    them, 2 x layers x rows x (patches + tokens) x hidden. The image features
    (batch x patches x hidden) stay alive throughout.
    """
    vision, text = config.vision_config, config.text_config
    element = DTYPE_BYTES[dtype]
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    heads = vision.num_attention_heads
    total = batch * (2 * patches * vision.hidden_size + 2 * patches * vision.intermediate_size + 2 * heads * patches**2)
    formula = f"ViT {batch} × (2 × {patches} × {vision.hidden_size} + 2 × {patches} × {vision.intermediate_size}"
    formula += f" + 2 × {heads} × {patches}²)"
    if num_beams:
        rows = batch * num_beams
        length = new_tokens + 1  # plus the [DEC] start token
        cache = (
            rows * patches * vision.hidden_size
            + 2 * text.num_hidden_layers * rows * (patches + length) * text.hidden_size
        )
        if cache > total:
            total = cache
            formula = f"beam cache {rows} rows × ({patches} × {vision.hidden_size} + 2 × {text.num_hidden_layers}"
            formula += f" layers × {patches + length} × {text.hidden_size})"
    total += batch * patches * vision.hidden_size
    formula += f" + features {batch} × {patches} × {vision.hidden_size}, × {element} B"
    return Activation("model", phase, total * element, formula)


def _preset(model_key: str):
    from pipelines.catalog import CATALOG

    return CATALOG[model_key].image_preset


def _uses_cfg(model_key: str) -> bool:
    preset = _preset(model_key)
    return preset is not None and preset.guidance > 1.0  # diffusers runs CFG only when guidance > 1


def _t5_tokens(model_key: str, t5_tokens: int | None = None) -> int:
    if t5_tokens is not None:
        return t5_tokens
    preset = _preset(model_key)
    return preset.max_sequence_length if preset is not None else 256


def max_t5_tokens(model_key: str) -> int:
    """T5's trained context, from the real tokenizer config (512 for SD3.5)."""
    path = config_dir(model_key) / "tokenizer_3" / "tokenizer_config.json"
    return json.loads(path.read_text())["model_max_length"]


def vae_scale_factor(model_key: str) -> int:
    return 2 ** (len(component_config(model_key, "vae")["block_out_channels"]) - 1)


def max_side(model_key: str) -> int:
    """The largest side the transformer can draw: its position table times patch and VAE factor."""
    config = component_config(model_key, "transformer")
    return config["pos_embed_max_size"] * config["patch_size"] * vae_scale_factor(model_key)


def text_tokens(model_key: str, t5_tokens: int | None = None) -> int:
    """Text tokens the SD3 transformer attends to: 77 CLIP + T5's (the preset's 256; zeros without T5)."""
    return component_config(model_key, "text_encoder")["max_position_embeddings"] + _t5_tokens(model_key, t5_tokens)


def image_tokens(model_key: str, height: int, width: int) -> int:
    step = vae_scale_factor(model_key) * component_config(model_key, "transformer")["patch_size"]
    return (height // step) * (width // step)


def controlnet_activation(
    base_key: str,
    controlnet_key: str,
    height: int,
    width: int,
    batch: int,
    dtype: str = "bf16",
    attention: str = "sdpa",
) -> Activation:
    """One ControlNet step: its blocks over the image tokens alone (the SD3.5 ControlNets take no text),
    for the same rows as the MMDiT (batch x 2 under CFG). Same per-block formula as ``mmdit_activation``."""
    rows = batch * (2 if _uses_cfg(base_key) else 1)
    config = component_config(controlnet_key, "controlnet")
    step = mmdit_activation(config, image_tokens(base_key, height, width), rows, dtype, attention)
    return Activation("controlnet", "denoising (ControlNet)", step.bytes, step.formula)


def controlnet_residual_bytes(
    base_key: str, controlnet_key: str, height: int, width: int, batch: int, dtype: str = "bf16"
) -> int:
    """The ControlNet's outputs the MMDiT adds block by block: one residual per ControlNet block,
    rows x image tokens x hidden each, alive through the MMDiT's step."""
    config = component_config(controlnet_key, "controlnet")
    rows = batch * (2 if _uses_cfg(base_key) else 1)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return config["num_layers"] * rows * image_tokens(base_key, height, width) * hidden * DTYPE_BYTES[dtype]


def activations(
    model_key: str,
    height: int,
    width: int,
    batch: int,
    dtype: str = "bf16",
    attention: str = "sdpa",
    t5_tokens: int | None = None,
) -> dict[str, Activation]:
    """Estimated activations of every component of ``model_key`` at this size and batch (and T5 length)."""
    kind = family(model_key)
    if kind != "sd3":
        from transformers import BlipConfig

        config = BlipConfig.from_pretrained(config_dir(model_key))
        if kind == "blip-caption":
            beams, new_tokens = settings.DEFAULT_NUM_BEAMS, settings.DEFAULT_MAX_NEW_TOKENS
            return {"model": blip_activation(config, batch, dtype, num_beams=beams, new_tokens=new_tokens)}
        return {"model": blip_activation(config, batch, dtype, phase="matching")}
    result = {
        name: text_encoder_activation(
            component_config(model_key, name),
            _t5_tokens(model_key, t5_tokens)
            if name == "text_encoder_3"
            else component_config(model_key, name)["max_position_embeddings"],
            batch,
            dtype,
            attention,
            component=name,
        )
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
    }
    rows = batch * (2 if _uses_cfg(model_key) else 1)
    tokens = image_tokens(model_key, height, width) + text_tokens(model_key, t5_tokens)
    result["transformer"] = mmdit_activation(component_config(model_key, "transformer"), tokens, rows, dtype, attention)
    result["vae"] = vae_activation(component_config(model_key, "vae"), height, width, batch, dtype, attention)
    return result
