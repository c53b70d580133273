"""BLIP LoRA adapters on a loaded captioner: checked against its layers, attached with peft, detached.

Why peft itself rather than transformers' PEFT integration: with transformers
5.24 and peft 0.21, ``model.load_adapter`` works (with a load report that lists
every base weight as missing), but ``set_adapter``, ``enable_adapters``,
``disable_adapters`` and ``delete_adapter`` refuse to run (they want peft >= 0.22).
peft's ``inject_adapter_in_model`` and its LoRA layers' ``set_adapter`` /
``enable_adapters`` / ``delete_adapter`` are what transformers calls underneath,
and they work in place on the loaded model.

The checks against the model: target modules that exist in the text decoder and
none in the vision encoder (adapters must leave the image features alone: that is
what lets one cached image encoding serve the base model and every adapter); the
matrices' shapes against the loaded BLIP (an adapter for a BLIP with other widths
names both); at least one LoRA layer that the adapter really changes.
Attached adapters rest inactive; ``BlipCaptioner.using_adapter`` switches one on per decode.
"""

from __future__ import annotations

import warnings

import torch

from pipelines.blip.adapter_files import ADAPTER_CONFIG_FILE, AdapterFiles, vision_encoder_sentence
from pipelines.blip.captioner import BlipCaptioner, switch_adapter_layers


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
        raise ValueError(vision_encoder_sentence(label, vision[0]))
    elsewhere = sorted(prefix + path for path in targeted if not (prefix + path).startswith("text_decoder."))
    if elsewhere:
        raise ValueError(f"{label} targets {elsewhere[0]}, outside BLIP's text decoder; only text-decoder LoRAs load.")
    if not targeted:
        raise ValueError(
            f"{label}'s target_modules ({describe_targets(files.config)}) match no layer of this BLIP's text decoder; "
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


def describe_targets(config) -> str:
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
