"""The real architectures, built on the meta device: sizes without a single weight.

Each model the Studio knows is instantiated from its real config files in
``assets/model-configs`` (see ``SOURCES.md`` there) under
``torch.device("meta")``: every tensor has a shape and a dtype but no storage,
so even the 8B MMDiT builds in well under a second and costs no memory. From
the module tree we read what a memory plan needs: how many elements each
component stores, which of them sit in ``nn.Linear`` weights that a quantizer
would replace (and their shapes), and the largest single module, which is what
sequential CPU offload moves to the GPU at a time.

Which layers a quantizer replaces is the loaders' own rule, read off their
code (diffusers 0.42, transformers 5.24):

- diffusers (the SD3 transformer): every ``nn.Linear``; its bitsandbytes and
  torchao quantizers skip nothing by default, and SD3 has no fp32-kept modules.
- transformers (BLIP, CLIP, T5): every plain ``nn.Linear`` except the modules
  ``get_keys_to_not_convert`` names (tied weights, the output embedding, the
  module of the last parameter) and the model's ``_keep_in_fp32_modules``
  (T5's ``wo``, so a "4-bit" T5 keeps a fifth of its weights unquantized).
  We ask transformers itself for that list, so the plan follows the library.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.catalog import CATALOG, MODEL_CONFIGS_DIR

# Models the catalog does not serve (yet) but the planner covers: key -> config folder.
EXTRA_CONFIG_DIRS = {"blip-itm": "Salesforce__blip-itm-base-coco"}

SD3_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")
FAMILIES = ("sd3", "blip-caption", "blip-itm", "sd3-controlnet", "depth-estimator")
COMPONENT_TITLES = {
    "model": "whole model",
    "controlnet": "ControlNet",
    "text_encoder": "CLIP-L/14",
    "text_encoder_2": "OpenCLIP bigG/14",
    "text_encoder_3": "T5-XXL encoder",
    "transformer": "MMDiT",
    "vae": "VAE",
}


@dataclass(frozen=True)
class ComponentSize:
    """What one component of a real architecture stores, counted on the meta device.

    ``parameters`` counts each tied tensor once. ``checkpoint_elements`` adds
    the persistent buffers that the checkpoint stores (the SD3 ``pos_embed``
    table), so it matches the checkpoint index. Memory counts every parameter
    and buffer once: floating ones in the compute dtype, the others
    (``position_ids``) at their own size.
    """

    name: str  # pipeline attribute ("transformer", "text_encoder_3"), or "model" for BLIP
    title: str
    class_name: str
    library: str  # "diffusers" or "transformers": whose quantizer picks the layers
    parameters: int
    checkpoint_elements: int
    float_elements: int  # parameters + floating buffers: stored in the compute dtype
    other_buffer_bytes: int  # integer buffers, which keep their dtype
    quantized_shapes: tuple[tuple[tuple[int, int], int], ...]  # ((out, in), count) of quantizable Linear weights
    fp32_kept_elements: int  # in modules transformers keeps in fp32 when loading in fp16
    largest_module_elements: int  # the biggest module's own parameters + buffers

    @property
    def quantized_elements(self) -> int:
        return sum(rows * columns * count for (rows, columns), count in self.quantized_shapes)

    @property
    def quantized_rows(self) -> int:
        return sum(rows * count for (rows, _), count in self.quantized_shapes)

    @property
    def quantized_layers(self) -> int:
        return sum(count for _, count in self.quantized_shapes)


def planned_models() -> tuple[str, ...]:
    """Every model key the planner plans alone: the catalog's, then the extra ones.

    A ControlNet is planned with its base (``plan(base, mode, controlnet=...)``) and the depth
    estimator's weights are counted where it loads (``load_estimate_bytes``), so neither is listed.
    """
    alone = tuple(key for key, spec in CATALOG.items() if spec.kind not in ("sd3-controlnet", "depth-estimator"))
    return (*alone, *(key for key in EXTRA_CONFIG_DIRS if key not in CATALOG))


def config_dir(key: str) -> Path:
    """The folder of ``key``'s real config files."""
    if key in CATALOG:
        return MODEL_CONFIGS_DIR / CATALOG[key].config_dir
    if key in EXTRA_CONFIG_DIRS:
        return MODEL_CONFIGS_DIR / EXTRA_CONFIG_DIRS[key]
    raise ValueError(f"Unknown model {key!r}; choose one of: {', '.join(planned_models())}.")


def family(key: str) -> str:
    """ "sd3", "blip-caption" or "blip-itm": which components and activations the model has."""
    kind = CATALOG[key].kind if key in CATALOG else key
    if kind in FAMILIES:
        return kind
    config_dir(key)  # raises the "unknown model" sentence
    raise ValueError(f"The planner has no architecture for {key!r}.")


def component_names(key: str) -> tuple[str, ...]:
    kind = family(key)
    return SD3_COMPONENTS if kind == "sd3" else ("controlnet",) if kind == "sd3-controlnet" else ("model",)


@functools.cache
def component_config(key: str, component: str) -> dict[str, Any]:
    """The parsed config.json of one component (treat it as read-only: it is cached)."""
    folder = config_dir(key)
    path = folder / component / "config.json" if family(key) == "sd3" else folder / "config.json"
    return json.loads(path.read_text())


def build_on_meta(key: str, component: str = "model"):
    """``key``'s component as a torch module on the meta device (shapes only, no weights)."""
    import torch

    kind = family(key)
    folder = config_dir(key)
    with torch.device("meta"):
        if kind == "blip-caption":
            from transformers import BlipConfig, BlipForConditionalGeneration

            return BlipForConditionalGeneration(BlipConfig.from_pretrained(folder))
        if kind == "blip-itm":
            from transformers import BlipConfig, BlipForImageTextRetrieval

            return BlipForImageTextRetrieval(BlipConfig.from_pretrained(folder))
        if kind == "sd3-controlnet":
            from diffusers import SD3ControlNetModel

            return SD3ControlNetModel.from_config(component_config(key, "controlnet"))
        if kind == "depth-estimator":
            from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

            return DepthAnythingForDepthEstimation(DepthAnythingConfig.from_pretrained(folder))
        if component == "transformer":
            from diffusers import SD3Transformer2DModel

            return SD3Transformer2DModel.from_config(component_config(key, component))
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(component_config(key, component))
        if component in ("text_encoder", "text_encoder_2"):
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection

            return CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / component))
        if component == "text_encoder_3":
            from transformers import T5Config, T5EncoderModel

            return T5EncoderModel(T5Config.from_pretrained(folder / component))
    raise ValueError(f"{key} has no component {component!r}; it has: {', '.join(component_names(key))}.")


@functools.cache
def component_sizes(key: str) -> tuple[ComponentSize, ...]:
    """Sizes of every component of ``key``, built once per process on the meta device."""
    return tuple(
        measure_module(build_on_meta(key, name), name=name, title=COMPONENT_TITLES[name])
        for name in component_names(key)
    )


def component_size(key: str, component: str) -> ComponentSize:
    for size in component_sizes(key):
        if size.name == component:
            return size
    raise ValueError(f"{key} has no component {component!r}; it has: {', '.join(component_names(key))}.")


def measure_module(module, *, name: str = "model", title: str = "") -> ComponentSize:
    """Count what ``module`` stores (works on meta and on real modules alike)."""

    library = "diffusers" if type(module).__module__.startswith("diffusers") else "transformers"
    parameters = dict(module.named_parameters())  # tied tensors appear once
    buffers = dict(module.named_buffers())
    persistent = set(module.state_dict(keep_vars=True))
    float_buffers = sum(tensor.numel() for tensor in buffers.values() if tensor.is_floating_point())
    largest = 0
    for child in module.modules():
        own = [*child.parameters(recurse=False), *child.buffers(recurse=False)]
        largest = max(largest, sum(tensor.numel() for tensor in own))
    shapes = Counter(
        (layer.out_features, layer.in_features) for _, layer in quantizable_linears(module, library=library)
    )
    return ComponentSize(
        name=name,
        title=title or type(module).__name__,
        class_name=type(module).__name__,
        library=library,
        parameters=sum(tensor.numel() for tensor in parameters.values()),
        checkpoint_elements=sum(tensor.numel() for tensor in parameters.values())
        + sum(tensor.numel() for label, tensor in buffers.items() if label in persistent),
        float_elements=sum(tensor.numel() for tensor in parameters.values()) + float_buffers,
        other_buffer_bytes=sum(
            tensor.numel() * tensor.element_size() for tensor in buffers.values() if not tensor.is_floating_point()
        ),
        quantized_shapes=tuple(sorted(shapes.items())),
        fp32_kept_elements=_fp32_kept_elements(module) if library == "transformers" else 0,
        largest_module_elements=largest,
    )


def _fp32_kept_modules(model) -> list[str]:
    return sorted(getattr(model, "_keep_in_fp32_modules", None) or [])


def _fp32_kept_elements(model) -> int:
    """Parameters of the modules transformers keeps in fp32 when asked for fp16 (T5's ``wo``)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    kept = _fp32_kept_modules(model)
    if not kept:
        return 0
    return sum(
        tensor.numel()
        for label, child in model.named_modules()
        if label and not should_convert_module(label, kept)
        for tensor in child.parameters(recurse=False)
    )


def quantizable_linears(module, *, library: str) -> list[tuple[str, Any]]:
    """(name, layer) of every Linear layer the library's quantizer replaces when loading ``module``."""
    import torch

    if library == "diffusers":
        return [(label, layer) for label, layer in module.named_modules() if isinstance(layer, torch.nn.Linear)]
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skipped = [*get_keys_to_not_convert(module), *_fp32_kept_modules(module)]
    return [
        (label, layer)
        for label, layer in module.named_modules()
        if type(layer) is torch.nn.Linear and should_convert_module(label, skipped)
    ]


@functools.cache
def copied_pos_embed_size(base_key: str) -> ComponentSize:
    """The position embedding diffusers copies from the base MMDiT into an SD3.5 ControlNet.

    The released SD3.5 Large ControlNets have no position embedding of their own
    (``use_pos_embed: false``); ``StableDiffusion3ControlNetPipeline`` builds a ``PatchEmbed``
    from the transformer's config and loads the transformer's weights into it, so the
    ControlNet holds this second, small copy (the 192² x 2432 table and the patch conv).
    """
    import torch
    from diffusers.models.embeddings import PatchEmbed

    config = component_config(base_key, "transformer")
    with torch.device("meta"):
        module = PatchEmbed(
            height=config["sample_size"],
            width=config["sample_size"],
            patch_size=config["patch_size"],
            in_channels=config["in_channels"],
            embed_dim=config["num_attention_heads"] * config["attention_head_dim"],
            pos_embed_max_size=config["pos_embed_max_size"],
        )
    return measure_module(module, name="controlnet_pos_embed", title="ControlNet position table (copied)")
