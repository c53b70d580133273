"""One entry per model the Studio serves: where it comes from and how to run it.

Parameter counts are state-dict elements of the real architecture, built from
the real config files in ``assets/model-configs`` on the meta device (see
``assets/model-configs/SOURCES.md``); they are facts about the architecture,
not about any download. Presets are the settings each model was tuned for,
with a one-line reason per value. BLIP's decoding defaults are the BLIP
paper's and live with the other limits in ``pipelines/settings.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "assets" / "model-configs"


@dataclass(frozen=True)
class ImagePreset:
    """SD3.5 sampling defaults per checkpoint, following Stability AI's reference settings."""

    steps: int
    guidance: float
    min_pixels: int  # width x height bounds; sizes snap to multiples of 16
    max_pixels: int
    default_size: int = 1024  # square side used when the user gives no size
    max_sequence_length: int = 256  # T5 tokens; the pipeline's default, 512 is the encoder's limit
    skip_layer_guidance_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """What the Studio knows about one model before loading it."""

    key: str  # the name the app, the CLI flags and the API use
    repo_id: str  # Hugging Face Hub repo id
    kind: str  # which loader builds it: "blip-caption", "blip-itm", "sd3", "sd3-controlnet" or "depth-estimator"
    title: str
    parameters: int  # state-dict elements of the real architecture (meta-device count)
    licence: str
    gated: bool  # True: the Hub asks the user to accept the licence first (needs HF_TOKEN)
    tiny_dir: str  # folder of its tiny stand-in under the tiny-model root
    config_dir: str  # folder of its real config files under assets/model-configs
    image_preset: ImagePreset | None = None
    notes: str = ""
    requires: str | None = None  # the model it only works with (a ControlNet's base): unloaded with it

    @property
    def hub_url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


_MEGAPIXEL = 1024 * 1024

# The short SD3.5 names the UI, the API, the CLIs and the tiny builder use; values are catalog keys.
# The one map: pipelines.sd3.text_to_image, the trainers and pipelines.tiny import it from here.
SD3_SHORT_NAMES = {"large": "sd35-large", "large-turbo": "sd35-large-turbo", "medium": "sd35-medium"}

# control_type -> the ControlNet's catalog key. Stability released these for SD3.5 Large (8B) only.
CONTROLNET_KEYS = {
    "canny": "sd35-large-controlnet-canny",
    "depth": "sd35-large-controlnet-depth",
    "blur": "sd35-large-controlnet-blur",
}
CONTROLNET_BASE = "sd35-large"  # the one model every released SD3.5 ControlNet fits
DEPTH_ESTIMATOR_KEY = "depth-anything-v2-small"  # makes depth maps for the depth ControlNet


def _large_controlnet(control_type: str, shown: str, notes: str) -> ModelSpec:
    """One of Stability's three SD3.5 Large ControlNets: same size, licence and base; trained on ``notes``."""
    key = CONTROLNET_KEYS[control_type]
    return ModelSpec(
        key=key,
        repo_id=f"stabilityai/stable-diffusion-3.5-large-controlnet-{control_type}",
        kind="sd3-controlnet",
        title=f"SD3.5 Large ControlNet ({shown})",
        parameters=2_153_518_976,  # 19 blocks of Large's width; the Hub file (8.61 GB) stores them in fp32
        licence="stabilityai-ai-community",
        gated=True,  # the Stability Community License is accepted on the Hub first, as for the base model
        tiny_dir=key,
        config_dir=f"stabilityai__stable-diffusion-3.5-large-controlnet-{control_type}",
        notes=notes,
        requires=CONTROLNET_BASE,
    )


CATALOG: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        ModelSpec(
            key="blip-caption",
            repo_id="Salesforce/blip-image-captioning-base",
            kind="blip-caption",
            title="BLIP base (captioning)",
            parameters=247_444_600,  # 223,971,644 unique; the LM head is tied to the embeddings
            licence="bsd-3-clause",
            gated=False,
            tiny_dir="blip-caption",
            config_dir="Salesforce__blip-image-captioning-base",
            notes="ViT-B/16 at 384 px + a 12-layer BERT-style text decoder.",
        ),
        ModelSpec(
            key="blip-itm",
            repo_id="Salesforce/blip-itm-base-coco",
            kind="blip-itm",
            title="BLIP base (image-text retrieval)",
            parameters=223_744_258,  # no tied head here: parameters and state dict agree
            licence="bsd-3-clause",
            gated=False,
            tiny_dir="blip-itm",
            config_dir="Salesforce__blip-itm-base-coco",
            notes="The same ViT-B/16 + BERT text encoder, fine-tuned on COCO for ITM and ITC: the Match tab's second opinion.",
        ),
        ModelSpec(
            key="sd35-large",
            repo_id="stabilityai/stable-diffusion-3.5-large",
            kind="sd3",
            title="Stable Diffusion 3.5 Large",
            parameters=13_810_721_251,  # 8.15B MMDiT + T5-XXL 4.76B + CLIP-G + CLIP-L + VAE
            licence="stabilityai-ai-community",
            gated=True,
            tiny_dir="sd35-large",
            config_dir="stabilityai__stable-diffusion-3.5-large",
            image_preset=ImagePreset(
                steps=28,  # Stability's reference uses 28-40; 28 is where quality plateaus
                guidance=3.5,  # 3.5-4.5 recommended; higher burns colours
                min_pixels=_MEGAPIXEL // 4,  # trained from 0.25 MP upwards
                max_pixels=int(1.1 * _MEGAPIXEL),  # ~1 MP; larger sizes repeat subjects
            ),
        ),
        ModelSpec(
            key="sd35-large-turbo",
            repo_id="stabilityai/stable-diffusion-3.5-large-turbo",
            kind="sd3",
            title="Stable Diffusion 3.5 Large Turbo",
            parameters=13_810_721_251,  # same architecture as Large, distilled weights
            licence="stabilityai-ai-community",
            gated=True,
            tiny_dir="sd35-large-turbo",
            config_dir="stabilityai__stable-diffusion-3.5-large-turbo",
            image_preset=ImagePreset(
                steps=4,  # adversarially distilled for 4 steps
                guidance=0.0,  # distilled without CFG: guidance 0, so no negative prompt
                min_pixels=_MEGAPIXEL // 4,
                max_pixels=int(1.1 * _MEGAPIXEL),
            ),
        ),
        ModelSpec(
            key="sd35-medium",
            repo_id="stabilityai/stable-diffusion-3.5-medium",
            kind="sd3",
            title="Stable Diffusion 3.5 Medium",
            parameters=8_134_104_419,  # 2.47B MMDiT-X + the same text encoders and VAE
            licence="stabilityai-ai-community",
            gated=True,
            tiny_dir="sd35-medium",
            config_dir="stabilityai__stable-diffusion-3.5-medium",
            image_preset=ImagePreset(
                steps=40,  # Stability's reference setting for Medium
                guidance=4.5,
                min_pixels=_MEGAPIXEL // 4,
                max_pixels=2 * _MEGAPIXEL,  # Medium was trained up to 1440 px (~2 MP)
                skip_layer_guidance_layers=(7, 8, 9),  # SLG helps Medium's anatomy; ruins Large
            ),
        ),
        _large_controlnet("canny", "Canny", "Trained on Canny edge maps (white edges on black)."),
        _large_controlnet(
            "depth",
            "Depth",
            "Trained on DepthFM depth maps; the Studio makes depth maps with Depth Anything V2 Small instead.",
        ),
        _large_controlnet(
            "blur", "Blur", "Trained on Gaussian-blurred images: for detail-preserving re-renders and tiled upscaling."
        ),
        ModelSpec(
            key="depth-anything-v2-small",
            repo_id="depth-anything/Depth-Anything-V2-Small-hf",
            kind="depth-estimator",
            title="Depth Anything V2 Small",
            parameters=24_785_089,  # DINOv2-S/14 backbone + DPT head; the model card says 24.8M
            licence="apache-2.0",
            gated=False,
            tiny_dir="depth-anything-v2-small",
            config_dir="depth-anything__Depth-Anything-V2-Small-hf",
            notes="Relative depth (near is bright) for the depth ControlNet.",
        ),
    )
}

# What every tab calls the SD3.5 models ("3.5 Large", ...): short name -> label. Generate's and Train's
# model choices are (label, short name) pairs from this one map.
SD3_LABELS = {short: CATALOG[key].title.removeprefix("Stable Diffusion ") for short, key in SD3_SHORT_NAMES.items()}


def sd3_model_choices() -> list[tuple[str, str]]:
    """(label, short name) for a Radio or Dropdown of the SD3.5 models, in catalog order."""
    return [(label, short) for short, label in SD3_LABELS.items()]


def get_spec(key: str) -> ModelSpec:
    """The catalog entry for ``key``; ValueError listing the valid keys otherwise."""
    try:
        return CATALOG[key]
    except KeyError:
        raise ValueError(f"Unknown model {key!r}; choose one of: {', '.join(CATALOG)}.") from None
