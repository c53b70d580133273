"""Claims against the Studio's own figures: each published claim the Studio can check, checked at run time.

A check reads the real architectures (built from their config files on the meta device), the
config files and presets in the catalog, the installed transformers, or the measurements from
bench/results. Each returns (what the Studio finds, verdict, where the figure comes from).
"""

from __future__ import annotations

import functools
import json
import math

import torch

from pipelines import settings
from pipelines.catalog import CATALOG, MODEL_CONFIGS_DIR
from pipelines.scoreboard.schema import NOT_CHECKED, NOT_MEASURED, ClaimCheck, Measurement, ScoreboardData


@functools.cache
def _blip_architecture() -> dict:
    """BLIP base built from its real config on the meta device: counts and the decoder's shape."""
    from pipelines.architectures import component_config

    model = _blip_meta_model()
    config = component_config("blip-caption", "model")
    return {
        "parameters": sum(tensor.numel() for tensor in model.parameters()),
        "state_dict": sum(tensor.numel() for tensor in model.state_dict().values()),
        "decoder_layers": config["text_config"]["num_hidden_layers"],
        "decoder_class": type(model.text_decoder).__name__,
        "cross_attention_layers": sum(
            1 for layer in model.text_decoder.bert.encoder.layer if getattr(layer, "crossattention", None) is not None
        ),
        "image_size": config["vision_config"]["image_size"],
        "patch_size": config["vision_config"]["patch_size"],
    }


@functools.cache
def _transformer_elements(key: str) -> int:
    """State-dict elements of an SD3.5 MMDiT (with its pos_embed table), on the meta device."""
    from pipelines.architectures import build_on_meta, measure_module

    return measure_module(build_on_meta(key, "transformer")).checkpoint_elements


def _verdict(agrees: bool) -> str:
    return "agrees" if agrees else "disagrees"


def _check_blip_size(_: list[Measurement]) -> tuple[str, str, str]:
    facts = _blip_architecture()
    agrees = round(facts["parameters"] / 1e6) == 139 and facts["decoder_layers"] == 6
    found = (
        f"{facts['parameters'] / 1e6:.1f}M unique parameters ({facts['state_dict'] / 1e6:.1f}M state-dict elements, "
        f"the LM head is tied); text decoder: {facts['decoder_layers']}-layer BERT-style {facts['decoder_class']}"
    )
    return found, _verdict(agrees), "real config on the meta device; text_config.num_hidden_layers"


def _check_blip_input_size(_: list[Measurement]) -> tuple[str, str, str]:
    config = json.loads(
        (MODEL_CONFIGS_DIR / CATALOG["blip-caption"].config_dir / "preprocessor_config.json").read_text()
    )
    size = config["size"]
    side = size if isinstance(size, int) else size.get("height")
    return f"preprocessor size {side}×{side}", _verdict(side == 384), "preprocessor_config.json"


def _check_image_to_text(_: list[Measurement]) -> tuple[str, str, str]:
    import transformers
    from transformers.pipelines import SUPPORTED_TASKS

    if "image-to-text" in SUPPORTED_TASKS:
        return "the task exists", "agrees", f"transformers {transformers.__version__} SUPPORTED_TASKS"
    found = f"transformers {transformers.__version__} has no 'image-to-text' pipeline task"
    return found, "disagrees", "transformers.pipelines.SUPPORTED_TASKS at run time"


def _check_cross_attention_layers(_: list[Measurement]) -> tuple[str, str, str]:
    layers = _blip_architecture()["cross_attention_layers"]
    return f"{layers} decoder layers with cross-attention", _verdict(layers == 6), "real config on the meta device"


def _check_patch_grid(_: list[Measurement]) -> tuple[str, str, str]:
    facts = _blip_architecture()
    side = facts["image_size"] // facts["patch_size"]
    found = f"{facts['image_size']} px / {facts['patch_size']} px patches = {side}×{side} grid (+1 CLS token)"
    return found, _verdict(side == 24), "vision_config in config.json"


def _parameter_check(key: str, published_billions: float) -> tuple[str, str, str]:
    elements = _transformer_elements(key)
    agrees = round(elements / 1e9, 1) == published_billions
    found = f"MMDiT: {elements:,} state-dict elements ({elements / 1e9:.2f}B)"
    return found, _verdict(agrees), "real transformer config on the meta device"


def _resolution_check(key: str, low_mp: float, high_mp: float) -> tuple[str, str, str]:
    preset = CATALOG[key].image_preset
    low, high = preset.min_pixels / 2**20, preset.max_pixels / 2**20
    # The Studio's bounds allow 10% over a round megapixel; the claim holds if it sits inside them.
    agrees = math.isclose(low, low_mp, rel_tol=0.01) and high_mp <= high <= high_mp * 1.1
    return f"Studio preset: {low:.2f}–{high:.2f} MP", _verdict(agrees), f"pipelines.catalog preset for {key}"


def _check_turbo_steps(_: list[Measurement]) -> tuple[str, str, str]:
    steps = CATALOG["sd35-large-turbo"].image_preset.steps
    return f"Studio preset: {steps} steps", _verdict(steps == 4), "pipelines.catalog preset for sd35-large-turbo"


def _check_turbo_speed(measured: list[Measurement]) -> tuple[str, str, str]:
    # Compare like with like: the same machine and memory mode, real-size models.
    for turbo in measured:
        if turbo.studio_model != "sd35-large-turbo" or turbo.seconds_per_image is None:
            continue
        for large in measured:
            if (
                large.studio_model == "sd35-large"
                and large.seconds_per_image is not None
                and large.machine == turbo.machine
                and large.setting.split(",")[0] == turbo.setting.split(",")[0]
            ):
                ratio = large.seconds_per_image / turbo.seconds_per_image
                found = (
                    f"Turbo {turbo.seconds_per_image:.2f} s vs Large {large.seconds_per_image:.2f} s per image "
                    f"({ratio:.1f}× faster; {turbo.setting})"
                )
                return found, _verdict(ratio > 1.5), turbo.source
    return NOT_MEASURED, NOT_MEASURED, "no results file times both Large and Large Turbo on one machine"


def _check_blip_lora_share(_: list[Measurement]) -> tuple[str, str, str]:
    """What the Studio's default BLIP caption LoRA adds, counted on the real architecture."""
    import re

    from pipelines.blip.adapters import text_decoder_targets

    facts = _blip_architecture()
    model = _blip_meta_model()
    rank = settings.BLIP_TRAIN_DEFAULT_RANK
    pattern = re.compile(text_decoder_targets())
    added = sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)
    )
    share = added / facts["parameters"]
    found = f"rank {rank} on the decoder's q/k/v/dense (self + cross): {added / 1e6:.2f}M = {share:.2%} of BLIP base"
    return (
        found,
        _verdict(0.005 <= share <= 0.02),
        "real config on the meta device; pipelines.training.train_blip_lora defaults",
    )


@functools.cache
def _blip_meta_model():
    from pipelines.architectures import build_on_meta

    return build_on_meta("blip-caption")


CLAIM_CHECKS = {
    "blip-lora-share": _check_blip_lora_share,
    "blip-size": _check_blip_size,
    "blip-input-size": _check_blip_input_size,
    "image-to-text-pipeline": _check_image_to_text,
    "blip-cross-attention-layers": _check_cross_attention_layers,
    "blip-patch-grid": _check_patch_grid,
    "sd35-large-size": lambda _: _parameter_check("sd35-large", 8.1),
    "sd35-medium-size": lambda _: _parameter_check("sd35-medium", 2.5),
    "sd35-large-resolution": lambda _: _resolution_check("sd35-large", 0.25, 1.0),
    "sd35-medium-resolution": lambda _: _resolution_check("sd35-medium", 0.25, 2.0),
    "sd35-turbo-steps": _check_turbo_steps,
    "sd35-turbo-speed": _check_turbo_speed,
}


def check_claims(data: ScoreboardData, measured: list[Measurement] | None = None) -> list[ClaimCheck]:
    """Every published claim next to what the Studio finds; claims it cannot check say so."""
    measured = [] if measured is None else measured
    checks = []
    for model in data.models:
        for capability in model.capabilities:
            for claim in capability.claims:
                if claim.check is None:
                    found, verdict, how = "—", NOT_CHECKED, "the Studio has no measurement for this claim"
                else:
                    found, verdict, how = CLAIM_CHECKS[claim.check](measured)
                checks.append(ClaimCheck(model.name, capability.name, claim.text, found, verdict, how))
    return checks
