"""Loading SD3.5 in a memory mode: quantization per component, dropped T5, CPU offload.

Each mode (``pipelines.memory.SD3_MODES``) is turned into the declarative
configs diffusers and transformers take in ``from_pretrained``, in the
diffusers way: full precision stays the default, and every saving is opt-in.
A mode that cannot work on this machine is refused with one sentence before
anything is loaded.
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.memory.modes import MemoryMode, get_mode
from pipelines.runtime import Runtime
from pipelines.sd3.fast import apply_fast_path

FP8_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
TORCHAO_FORMATS = frozenset({"fp8-rowwise"})


def torchao_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def check_fp8(runtime: Runtime, *, capability: tuple[int, int] | None = None, has_torchao: bool | None = None) -> None:
    """ValueError, in one sentence, when fp8 cannot run here (``capability``/``has_torchao`` None: this machine)."""
    if runtime.device.type != "cuda":
        raise ValueError(
            "Memory mode 'fp8' needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); this machine has "
            "none, so use 'bf16'."
        )
    if capability is None:
        capability = torch.cuda.get_device_capability(runtime.device)
    if tuple(capability) < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"Memory mode 'fp8' needs compute capability 8.9 or newer; this GPU has {capability[0]}.{capability[1]}, "
            "so use 'bf16' or 'nf4'."
        )
    if has_torchao is None:
        has_torchao = torchao_available()
    if not has_torchao:
        raise ValueError(
            "Memory mode 'fp8' quantizes with torchao, which is not installed: pip install torchao==0.18.0, "
            "or use 'bf16' or 'nf4'."
        )


def check_mode(mode: MemoryMode, runtime: Runtime) -> None:
    """ValueError, in one sentence, when ``mode`` cannot run on ``runtime``."""
    if any(fmt in TORCHAO_FORMATS for _, fmt in mode.formats):
        check_fp8(runtime)
    quantized = [component for component, fmt in mode.formats if fmt != "full" and fmt not in TORCHAO_FORMATS]
    if quantized and runtime.device.type != "cuda":
        raise ValueError(
            f"Memory mode '{mode.key}' quantizes with bitsandbytes, which needs a CUDA GPU (diffusers refuses "
            "the SD3 transformer without one); on this machine use 'bf16' or 'bf16-no-t5'."
        )
    if mode.offload != "none" and runtime.device.type != "cuda":
        raise ValueError(
            f"Memory mode '{mode.key}' offloads to the CPU between uses on the GPU; this machine has no CUDA GPU, "
            "so everything already runs on the CPU: use 'bf16' or 'bf16-no-t5'."
        )
    if mode.offload != "none" and any(fmt == "int8" for _, fmt in mode.formats):
        raise ValueError(
            "8-bit (LLM.int8) weights cannot be moved by CPU offload; use NF4 with offload, or 8-bit without offload."
        )


def _bitsandbytes_config(config_class, fmt: str, compute_dtype: torch.dtype, component: str):
    if fmt == "nf4":
        return config_class(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if fmt == "int8":
        return config_class(load_in_8bit=True)
    raise ValueError(f"Unknown weight format {fmt!r} for {component}; use nf4 or int8.")


def _torchao_config(fmt: str, component: str):
    """diffusers' TorchAoConfig for the MMDiT: fp8 dynamic activations and weights, one scale per row."""
    import diffusers

    if component != "transformer":
        raise ValueError(f"{fmt} applies to the transformer only, not {component}.")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    except ImportError:
        raise ValueError(
            "Memory mode 'fp8' quantizes with torchao, which is not installed: pip install torchao==0.18.0, "
            "or use 'bf16' or 'nf4'."
        ) from None
    return diffusers.TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def pipeline_quantization(mode: MemoryMode, compute_dtype: torch.dtype):
    """The ``PipelineQuantizationConfig`` that loads ``mode``'s quantized components, or None (full precision).

    One bitsandbytes config per quantized component, in ``quant_mapping``: diffusers' class for the
    MMDiT, transformers' for T5 (each library quantizes its own models); fp8 is diffusers'
    TorchAoConfig. Dropped components are not loaded, so they get none.
    """
    import diffusers
    import transformers

    mapping = {}
    for component, fmt in mode.formats:
        if fmt == "full" or component in mode.dropped:
            continue
        if fmt in TORCHAO_FORMATS:
            mapping[component] = _torchao_config(fmt, component)
            continue
        library = diffusers if component == "transformer" else transformers
        mapping[component] = _bitsandbytes_config(library.BitsAndBytesConfig, fmt, compute_dtype, component)
    return diffusers.PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None


def load_sd3_pipeline(source: str, runtime: Runtime, mode_key: str = "bf16") -> Any:
    """A StableDiffusion3Pipeline from a repo id or a Hub-layout folder, in memory mode ``mode_key``."""
    from diffusers import StableDiffusion3Pipeline

    mode = get_mode("sd35-large", mode_key)  # the three SD3.5 models share one set of modes
    check_mode(mode, runtime)
    dtype = runtime.dtype
    components: dict[str, Any] = {}

    # 1. What the mode leaves out.
    if "text_encoder_3" in mode.dropped:
        components["text_encoder_3"] = None  # CLIP-L and CLIP-G alone condition the image
        components["tokenizer_3"] = None

    # 2. Every component in one load: the quantized ones by the mode's per-component config,
    #    the rest in the compute dtype.
    pipeline = StableDiffusion3Pipeline.from_pretrained(
        source, dtype=dtype, quantization_config=pipeline_quantization(mode, dtype), **components
    )
    pipeline.set_progress_bar_config(disable=True)

    # 3. Placement.
    if mode.offload == "model":
        pipeline.enable_model_cpu_offload(device=runtime.device)
    elif mode.offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=runtime.device)
    else:
        for module in pipeline.components.values():
            quantized = getattr(module, "is_quantized", False) or getattr(module, "hf_quantizer", None) is not None
            if isinstance(module, torch.nn.Module) and not quantized:
                module.to(runtime.device)  # quantized modules were placed on the GPU when loaded
    if mode.offload != "none":
        pipeline.vae.enable_tiling()  # as pipelines.sd3.text_to_image.configure_vae does per call for offloaded modes
    pipeline.studio_memory_mode = mode.key

    # 4. The fast path (--fast): compiled blocks, fused QKV, channels-last VAE; a report either way.
    apply_fast_path(pipeline, runtime.fast_path, offload=mode.offload)
    return pipeline


def load_sd3_controlnet(source: str, runtime: Runtime, mode_key: str = "bf16"):
    """An SD3ControlNetModel from a repo id or folder, stored as memory mode ``mode_key`` stores the MMDiT.

    A quantized mode quantizes the ControlNet (an MMDiT of 19 blocks) with the same bitsandbytes
    format. It sits on the GPU in every mode but sequential offload, model offload included: it
    runs at every step (``sd3.controlnet.controlnet_pipeline`` hands it to accelerate under sequential offload).
    """
    from diffusers import SD3ControlNetModel

    mode = get_mode("sd35-large", mode_key)
    check_mode(mode, runtime)
    quantization = pipeline_quantization(mode, runtime.dtype)
    config = quantization.quant_mapping.get("transformer") if quantization is not None else None
    controlnet = SD3ControlNetModel.from_pretrained(source, torch_dtype=runtime.dtype, quantization_config=config)
    if config is None:
        controlnet.to(runtime.device)
    controlnet.eval()
    controlnet.studio_memory_mode = mode.key
    return controlnet
