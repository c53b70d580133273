"""Tiny offline stand-ins for every model the Studio serves.

The real checkpoints cannot be downloaded where the Studio is developed and
tested, so `--tiny` mode and the test suite run on miniature models with the
same classes, the same file layout and the same `from_pretrained` code path as
the real ones. Their weights are random (fixed seeds), so their captions are
gibberish and their images are noise: they prove the plumbing, not the quality.

    python -m pipelines.tiny --out DIR     # build them anywhere
    python -m pipelines.tiny               # build them into the cache dir

Next to the models, ``loras/`` holds a few tiny LoRA files (diffusers/peft keys
for the tiny Large and the tiny Medium, kohya keys for the tiny Large) and a
registry ``loras.json`` pointing at them, so LoRA loading can be tried offline.

The cache dir is ``$STUDIO_TINY_DIR`` or ``~/.cache/blip-sd3-studio/tiny-v<N>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipelines.catalog import CATALOG, CONTROLNET_KEYS, DEPTH_ESTIMATOR_KEY, SD3_SHORT_NAMES

# Bump when anything below changes, so stale caches are rebuilt, never reused.
TINY_BUILD_VERSION = 5

# Where each tiny stand-in lives under the tiny root: the catalog says (ModelSpec.tiny_dir).
TINY_BLIP_DIR = CATALOG["blip-caption"].tiny_dir
TINY_BLIP_ITM_DIR = CATALOG["blip-itm"].tiny_dir
TINY_SD3_DIRS = {short: CATALOG[key].tiny_dir for short, key in SD3_SHORT_NAMES.items()}
TINY_CONTROLNET_DIRS = {control_type: CATALOG[key].tiny_dir for control_type, key in CONTROLNET_KEYS.items()}
TINY_DEPTH_DIR = CATALOG[DEPTH_ESTIMATOR_KEY].tiny_dir
TINY_LORA_DIR = "loras"
TINY_LORA_REGISTRY = "loras.json"

# A small caption vocabulary: enough words that the tiny BLIP's gibberish reads as
# words, and that common prompts ("a picture of") tokenise without [UNK].
_CAPTION_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "with",
    "and",
    "at",
    "by",
    "to",
    "from",
    "near",
    "under",
    "over",
    "next",
    "behind",
    "front",
    "picture",
    "photo",
    "photograph",
    "image",
    "painting",
    "drawing",
    "close",
    "up",
    "view",
    "top",
    "cat",
    "cats",
    "dog",
    "dogs",
    "kitten",
    "person",
    "man",
    "woman",
    "child",
    "people",
    "astronaut",
    "rocket",
    "launch",
    "cup",
    "coffee",
    "mug",
    "table",
    "wooden",
    "plate",
    "food",
    "sky",
    "cloud",
    "clouds",
    "smoke",
    "fire",
    "building",
    "sitting",
    "standing",
    "lying",
    "holding",
    "wearing",
    "looking",
    "flying",
    "sleeping",
    "drinking",
    "white",
    "black",
    "brown",
    "red",
    "blue",
    "green",
    "yellow",
    "orange",
    "gray",
    "grey",
    "large",
    "small",
    "big",
    "little",
    "two",
    "three",
    "one",
    "is",
    "are",
    "there",
    "it",
    "its",
    "his",
    "her",
    "suit",
    "helmet",
    "space",
    "flag",
    "sign",
    "reads",
    "hello",
    "world",
    "capybara",
    "tree",
    "grass",
    "road",
    "street",
    "car",
    "window",
    "room",
    "wall",
    "floor",
    "bed",
    "couch",
]
_WORDPIECE_SUFFIXES = ["##s", "##ing", "##ed", "##er", "##ly"]
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def default_tiny_root() -> Path:
    """Where tiny models are cached when no ``--out`` is given."""
    configured = os.environ.get("STUDIO_TINY_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "blip-sd3-studio" / f"tiny-v{TINY_BUILD_VERSION}"


# ----------------------------------------------------------------------------- BLIP


def _tiny_blip_processor_and_config():
    """The tiny BLIP's processor and config, shared by the captioning and retrieval stand-ins.

    The layout mirrors Salesforce/blip-image-captioning-base: the tokenizer holds
    only BERT's specials, and ``[DEC]`` (bos) lives in the model just past the
    tokenizer's vocabulary, as 30522 does in the real model.
    """
    from transformers import BertTokenizer, BlipConfig, BlipImageProcessor, BlipProcessor

    vocab_tokens = _BERT_SPECIALS + sorted(set(_CAPTION_WORDS)) + _WORDPIECE_SUFFIXES
    vocab = {token: index for index, token in enumerate(vocab_tokens)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    image_processor = BlipImageProcessor(
        size={"height": 64, "width": 64},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    text_config = {
        "vocab_size": len(vocab) + 2,  # + [DEC] and [ENC], as 30522/30523 in the real model
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "encoder_hidden_size": 32,
        "max_position_embeddings": 64,
        "bos_token_id": len(vocab),  # [DEC]
        "sep_token_id": vocab["[SEP]"],
        "eos_token_id": vocab["[SEP]"],
        "pad_token_id": vocab["[PAD]"],
        # True for retrieval too, as on the Hub: it is what gives the text encoder cross-attention.
        "is_decoder": True,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,  # an 8x8 grid, so attention maps have some resolution
        # BLIP's vision default (1e-10) embeds every image to ~0, so every image would get
        # the same caption; a normal init makes captions depend on the image.
        "initializer_range": 0.02,
    }
    config = BlipConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=32,
        image_text_hidden_size=32,
    )
    return processor, config


def build_tiny_blip(out_dir: Path) -> None:
    """Save a tiny ``BlipForConditionalGeneration`` + ``BlipProcessor`` in the Hub layout."""
    from transformers import BlipForConditionalGeneration

    processor, config = _tiny_blip_processor_and_config()
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    # A random init gives near-uniform next-token distributions that barely depend on
    # the image. Sharpen the output head and amplify what cross-attention carries, so
    # captions differ per image and beams differ from greedy, as with a trained model.
    with torch.no_grad():
        model.text_decoder.cls.predictions.transform.LayerNorm.weight.mul_(8.0)
        for layer in model.text_decoder.bert.encoder.layer:
            layer.crossattention.self.value.weight.mul_(30.0)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_tiny_blip_itm(out_dir: Path) -> None:
    """Save a tiny ``BlipForImageTextRetrieval`` (Salesforce/blip-itm-base-coco's class) with its processor.

    Same sizes and tokenizer as the tiny captioner, its own random weights.
    """
    from transformers import BlipForImageTextRetrieval

    processor, config = _tiny_blip_processor_and_config()
    torch.manual_seed(4)
    model = BlipForImageTextRetrieval(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- SD3


def tiny_clip_tokenizer(pad_token: str):
    """A byte-level BPE CLIP tokenizer whose merges spell out the caption words."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    byte_chars = sorted(ByteLevel.alphabet())
    vocab_list = specials + byte_chars + [char + "</w>" for char in byte_chars]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(_CAPTION_WORDS)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merge = (merged, piece)
            merged += piece
            if merge not in merges:
                merges.append(merge)
            if merged not in vocab_list:
                vocab_list.append(merged)
    vocab = {token: index for index, token in enumerate(vocab_list)}
    # A tokenizer built from a small vocab defaults to model_max_length ~1e30; CLIP needs 77.
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def tiny_t5_tokenizer():
    """A Unigram T5 tokenizer: whole caption words, then single characters as a fallback."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -2.0) for word in sorted(set(_CAPTION_WORDS))]
    pieces += [("\u2581", -3.0)]
    pieces += [(chr(code), -5.0) for code in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# Per variant: what makes each tiny pipeline shaped like its real counterpart.
# Widths differ as the real ones do (Large 38 heads x 64 = 2432 wide, Medium 24 x 64 =
# 1536), so a LoRA made for one does not fit the other, exactly as with the real models.
_TINY_SD3_SHAPES = {
    # Large and Large Turbo share one MMDiT architecture (38 plain joint blocks).
    "large": {"num_layers": 2, "num_attention_heads": 2, "dual_attention_layers": (), "seed": 1},
    "large-turbo": {"num_layers": 2, "num_attention_heads": 2, "dual_attention_layers": (), "seed": 2},
    # Medium is MMDiT-X: dual attention in its first blocks. Ten layers so that
    # skip-layer guidance's real layers (7, 8, 9) exist and act.
    "medium": {"num_layers": 10, "num_attention_heads": 3, "dual_attention_layers": (0, 1, 2), "seed": 3},
}
_TINY_HEAD_DIM = 16


def tiny_transformer(variant: str):
    """The tiny ``SD3Transformer2DModel`` of ``variant``, with its fixed-seed random weights."""
    from diffusers import SD3Transformer2DModel

    shape = _TINY_SD3_SHAPES[variant]
    torch.manual_seed(shape["seed"])
    inner_dim = shape["num_attention_heads"] * _TINY_HEAD_DIM
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=shape["num_layers"],
        attention_head_dim=_TINY_HEAD_DIM,
        num_attention_heads=shape["num_attention_heads"],
        joint_attention_dim=64,  # must equal T5's d_model
        caption_projection_dim=inner_dim,  # the MMDiT's context stream is as wide as its image stream
        pooled_projection_dim=64,  # CLIP-L projection + CLIP-G projection
        pos_embed_max_size=64,
        qk_norm="rms_norm",
        dual_attention_layers=shape["dual_attention_layers"],
    )


def tiny_base_names() -> dict[int, tuple[str, int]]:
    """Inner width -> (name, blocks) of the tiny MMDiTs, for LoRA base-model messages (``LoraLibrary(known_bases=)``)."""
    large, medium = _TINY_SD3_SHAPES["large"], _TINY_SD3_SHAPES["medium"]
    return {
        large["num_attention_heads"] * _TINY_HEAD_DIM: ("SD3.5 Large / Large Turbo (tiny)", large["num_layers"]),
        medium["num_attention_heads"] * _TINY_HEAD_DIM: ("SD3.5 Medium (tiny)", medium["num_layers"]),
    }


def build_tiny_sd3(out_dir: Path, variant: str) -> None:
    """Save a tiny ``StableDiffusion3Pipeline`` shaped like the given SD3.5 variant.

    Latents have the real 16 channels, the MMDiT uses patch size 2 and RMS
    qk-norm, and the scheduler is the real one (flow matching, shift 3.0). The
    VAE downsamples 4x (the real one 8x), so with ``pos_embed_max_size=64`` the
    tiny pipelines draw at most 512x512.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    transformer = tiny_transformer(variant)
    clip_config = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
    }
    tokenizer = tiny_clip_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")  # the real CLIP-G tokenizer pads with "!"
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
    }
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(**clip_config, **special_ids, pad_token_id=tokenizer.pad_token_id)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**clip_config, **special_ids, pad_token_id=tokenizer_2.pad_token_id)
    )
    tokenizer_3 = tiny_t5_tokenizer()
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=64,
            d_ff=64,
            d_kv=16,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,  # the real SD3 VAE's latent statistics
        scaling_factor=1.5305,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3.eval(),
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- ControlNet


_TINY_CONTROLNET_SEEDS = {"canny": 21, "depth": 22, "blur": 23}


def tiny_controlnet(control_type: str):
    """A tiny ``SD3ControlNetModel`` shaped like the released SD3.5 Large ControlNets, random weights.

    The real config (assets/model-configs) shrunk as the tiny Large is: half the base's blocks
    (19 of 38 there, 1 of 2 here), the base's width, no text stream (``joint_attention_dim`` None),
    no position table of its own (the pipeline copies the MMDiT's), the pooled text projection kept.
    A new ControlNet starts with zeroed output layers (it adds nothing until trained), so the
    zero-initialised ``controlnet_blocks`` and ``pos_embed_input`` get random weights here: a tiny
    ControlNet that changes the image, as a trained one does.
    """
    from diffusers import SD3ControlNetModel

    large = _TINY_SD3_SHAPES["large"]
    torch.manual_seed(_TINY_CONTROLNET_SEEDS[control_type])
    inner_dim = large["num_attention_heads"] * _TINY_HEAD_DIM
    controlnet = SD3ControlNetModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=large["num_layers"] // 2,
        attention_head_dim=_TINY_HEAD_DIM,
        num_attention_heads=large["num_attention_heads"],
        joint_attention_dim=None,  # the SD3.5 ControlNets see no text tokens
        caption_projection_dim=inner_dim,
        pooled_projection_dim=64,  # the tiny CLIP-L + CLIP-G projections, as the tiny MMDiT's
        out_channels=16,
        pos_embed_max_size=None,
        pos_embed_type=None,
        use_pos_embed=False,
        force_zeros_for_pooled_projection=False,
        qk_norm=None,
    )
    with torch.no_grad():
        for module in [*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj]:
            torch.nn.init.normal_(module.weight, std=0.3)
            torch.nn.init.normal_(module.bias, std=0.1)
    return controlnet.eval()


def build_tiny_controlnet(out_dir: Path, control_type: str) -> None:
    """Save a tiny SD3.5 Large ControlNet (``control_type``: canny, depth or blur) in the Hub layout."""
    tiny_controlnet(control_type).save_pretrained(out_dir)


def build_tiny_depth_estimator(out_dir: Path) -> None:
    """Save a tiny ``DepthAnythingForDepthEstimation`` with its ``DPTImageProcessor`` in the Hub layout.

    Depth Anything V2 Small's config (a DINOv2-S/14 backbone read out at 4 layers, a DPT neck and
    head) shrunk: 4 backbone layers of width 32, 56 px inputs, narrow neck and head. Same classes,
    same processor settings (keep the aspect ratio, multiples of 14, ImageNet mean/std).
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=4,
        mlp_ratio=4,
        image_size=56,
        patch_size=14,
        out_indices=[1, 2, 3, 4],  # the real model reads layers 3, 6, 9, 12 of 12
        apply_layernorm=True,
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        patch_size=14,
        fusion_hidden_size=16,
        neck_hidden_sizes=[8, 16, 32, 32],
        head_hidden_size=8,
        depth_estimation_type="relative",
        max_depth=1,  # relative depth: transformers multiplies the head's output by it, and so stores 1
    )
    torch.manual_seed(24)
    model = DepthAnythingForDepthEstimation(config).eval()
    processor = DPTImageProcessor(
        do_resize=True,
        size={"height": 56, "width": 56},
        ensure_multiple_of=14,
        keep_aspect_ratio=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- LoRAs


def tiny_lora_dir(root: Path) -> Path:
    """The folder of tiny LoRA files under the tiny-model root (the ``--lora-dir`` of ``--tiny``)."""
    return Path(root) / TINY_LORA_DIR


def tiny_registry_path(root: Path) -> Path:
    """The tiny LoRA registry (same schema as ``assets/loras.json``, with local ``file`` entries)."""
    return tiny_lora_dir(root) / TINY_LORA_REGISTRY


def _peft_lora_file(variant: str, seed: int, rank: int, alpha: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA made by peft on the tiny transformer, as diffusers saves one: ``transformer.``-prefixed
    keys, and (as diffusers' training scripts write it) the adapter's config in the header."""
    import json

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = tiny_transformer(variant)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        # Attention (attn2 too, in Medium's dual-attention blocks) and the image stream's MLP.
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "ff.net.0.proj", "ff.net.2"],
        init_lora_weights=False,  # random A and B: peft's default zero B would change nothing
    )
    transformer.add_adapter(config, adapter_name="tiny")
    state_dict = get_peft_model_state_dict(transformer, adapter_name="tiny")
    tensors = {f"transformer.{key}": value.detach().clone().contiguous() for key, value in state_dict.items()}
    config_dict = {
        f"transformer.{key}": sorted(value) if isinstance(value, set) else value
        for key, value in config.to_dict().items()
    }
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(config_dict, sort_keys=True, default=str)}


def _kohya_lora_state_dict(variant: str, seed: int, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """A LoRA in sd-scripts' SD3 layout (``lora_unet_joint_blocks_{i}_{stream}_{part}``), random weights."""
    shape = _TINY_SD3_SHAPES[variant]
    width = shape["num_attention_heads"] * _TINY_HEAD_DIM
    generator = torch.Generator().manual_seed(seed)
    parts = {  # part -> (in features, out features) of the original SD3 layer
        "attn_qkv": (width, 3 * width),
        "attn_proj": (width, width),
        "mlp_fc1": (width, 4 * width),
        "mlp_fc2": (4 * width, width),
    }
    state_dict = {}
    for block in range(shape["num_layers"]):
        for stream in ("x_block", "context_block"):
            for part, (fan_in, fan_out) in parts.items():
                if stream == "context_block" and block == shape["num_layers"] - 1 and part != "attn_qkv":
                    continue  # the last block's context stream only feeds keys and values (pre-only)
                name = f"lora_unet_joint_blocks_{block}_{stream}_{part}"
                state_dict[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
                state_dict[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.2
                state_dict[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state_dict


def build_tiny_loras(out_dir: Path) -> None:
    """Write the tiny LoRA files and their registry ``loras.json`` into ``out_dir``."""
    import json

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    kohya = _kohya_lora_state_dict("large", seed=13, rank=4, alpha=2.0)
    files = {
        "tiny-large-style": _peft_lora_file("large", seed=11, rank=4, alpha=4),
        # alpha 8 over rank 4: the header's config doubles every delta, as diffusers reads it.
        "tiny-medium-detail": _peft_lora_file("medium", seed=12, rank=4, alpha=8),
        "tiny-large-kohya": (kohya, {"format": "pt"}),
    }
    for stem, (state_dict, metadata) in files.items():
        save_file(state_dict, str(out_dir / f"{stem}.safetensors"), metadata=metadata)
    licence = "bsd-3-clause"  # the Studio's own licence: these are random numbers it generated
    source = "built offline by pipelines/tiny.py (random weights)"
    registry = {
        "version": 1,
        "loras": [
            {
                "name": "tiny_large_style",
                "file": "tiny-large-style.safetensors",
                "trigger_words": ["tinystyle"],
                "default_scale": 1.0,
                "bases": ["sd35-large", "sd35-large-turbo"],
                "source": source,
                "licence": licence,
            },
            {
                "name": "tiny_medium_detail",
                "file": "tiny-medium-detail.safetensors",
                "trigger_words": ["tinydetail"],
                "default_scale": 0.8,
                "bases": ["sd35-medium"],
                "source": source,
                "licence": licence,
            },
            {
                "name": "tiny_large_kohya",
                "file": "tiny-large-kohya.safetensors",
                "trigger_words": [],
                "default_scale": 1.0,
                "bases": ["sd35-large", "sd35-large-turbo"],
                "source": source,
                "licence": licence,
            },
        ],
    }
    (out_dir / TINY_LORA_REGISTRY).write_text(json.dumps(registry, indent=2) + "\n")


# ----------------------------------------------------------------------------- building


def _builders() -> dict[str, callable]:
    builders = {TINY_BLIP_DIR: build_tiny_blip, TINY_BLIP_ITM_DIR: build_tiny_blip_itm}
    for variant, dirname in TINY_SD3_DIRS.items():
        builders[dirname] = lambda out_dir, variant=variant: build_tiny_sd3(out_dir, variant)
    for control_type, dirname in TINY_CONTROLNET_DIRS.items():
        builders[dirname] = lambda out_dir, control_type=control_type: build_tiny_controlnet(out_dir, control_type)
    builders[TINY_DEPTH_DIR] = build_tiny_depth_estimator
    builders[TINY_LORA_DIR] = build_tiny_loras
    return builders


def ensure_tiny_models(root: Path | None = None) -> Path:
    """Build every tiny model that is missing under ``root``; return ``root``.

    Each model is built in a temporary folder and renamed into place, so a
    concurrent or interrupted build never leaves a half-written model behind.
    """
    root = Path(root) if root is not None else default_tiny_root()
    root.mkdir(parents=True, exist_ok=True)
    for dirname, build in _builders().items():
        target = root / dirname
        if (target / ".complete").exists():
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".{dirname}-", dir=root))
        try:
            build(staging)
            (staging / ".complete").write_text(f"tiny build v{TINY_BUILD_VERSION}\n")
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            try:
                staging.rename(target)
            except OSError:
                # Another process finished the same model first; keep theirs.
                if not (target / ".complete").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"target folder (default: {default_tiny_root()})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    root = ensure_tiny_models(args.out)
    print(f"tiny models ready in {root} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
