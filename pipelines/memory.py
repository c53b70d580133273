"""The memory planner: how much GPU memory each model needs in each mode, and which mode to pick.

Everything here is arithmetic on the real architectures (``pipelines.architectures``
builds them on the meta device from the real config files), so it runs in a second
on any machine and needs no weights and no GPU. The figures are **estimates**:

- **Weights** are exact counts of stored elements times the bytes of their format
  (``WEIGHT_FORMATS`` below). For formats this machine can produce (bitsandbytes
  8-bit and 4-bit through transformers, torchao int8), ``tests/test_memory.py``
  checks them against models quantized for real.
- **Activations** come from simple formulas, one per component, explained in
  each function's docstring and in ``ACTIVATION_NOTES``; they ignore allocator
  slack, CUDA context and library workspaces, which ``settings.PLAN_MARGIN_BYTES``
  covers.

A plan walks the pipeline's phases (text encoders, the denoising transformer, the
VAE decode) and takes the phase whose resident weights plus activations are
largest: that is the estimated peak, and the plan says which components are on
the GPU at that moment for the chosen offload mode.

``auto_choice`` picks the first mode of ``SD3_MODES`` that fits. That order is an
assumption about speed, stated here because it has not been measured on a GPU
yet (the lead's benchmark will):

1. Offload level first: nothing offloaded, then model CPU offload (each
   component crosses PCIe once per image), then sequential offload (every weight
   crosses PCIe at every step; diffusers' SD3 blog measured SD3 Medium with
   offload and no T5 at 19.1 s against 4.76 s all on an A100).
2. Within a level, modes that keep T5 before modes that drop it (dropping T5
   saves its one forward per image, but prompts with text or many details are
   followed less closely).
3. Then by matmul speed: bf16 and NF4 alike (diffusers measured Flux-dev NF4 at
   the same speed as bf16 on an H100), then LLM.int8, whose outlier
   decomposition runs a second fp16 matmul per layer (assumed slower, not
   measured). Between bf16 and NF4 at equal speed, bf16 first (it changes nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipelines import settings
from pipelines.activations import (
    ATTENTION_KINDS,
    DTYPE_BYTES,
    Activation,
    activations,
    max_side,
    max_t5_tokens,
    text_tokens,
)
from pipelines.architectures import (
    ComponentSize,
    component_names,
    component_sizes,
    family,
    planned_models,
)

GIB = 1024**3


@dataclass(frozen=True)
class WeightFormat:
    """How a quantized ``nn.Linear`` weight is stored; every other tensor stays in the compute dtype.

    A weight of ``rows x columns`` takes ``weight_bits`` per element, plus
    ``row_bytes`` per output row (scales, zero points), plus ``block_bytes`` per
    block of ``block`` elements (absmax), plus ``super_block_bytes`` per
    ``super_block`` blocks (double quantization). Per-tensor constants (a code
    table of at most 1 KiB, an offset) are left out.
    """

    key: str
    title: str
    weight_bits: int | None  # None: not quantized, the compute dtype
    row_bytes: int = 0
    block: int = 0
    block_bytes: int = 0
    super_block: int = 0
    super_block_bytes: int = 0
    source: str = ""

    def tensor_bytes(self, rows: int, columns: int, dtype_bytes: int) -> int:
        elements = rows * columns
        if self.weight_bits is None:
            return elements * dtype_bytes
        total = math.ceil(elements * self.weight_bits / 8) + rows * self.row_bytes
        if self.block:
            blocks = math.ceil(elements / self.block)
            total += blocks * self.block_bytes
            if self.super_block:
                total += math.ceil(blocks / self.super_block) * self.super_block_bytes
        return total

    def bits_per_weight(self, rows: int, columns: int, dtype_bytes: int = 2) -> float:
        return 8 * self.tensor_bytes(rows, columns, dtype_bytes) / (rows * columns)


# The quantization rules, as data. Where each number comes from is checked on this
# machine in tests/test_memory.py (bitsandbytes 0.50 and torchao 0.18 on the CPU).
WEIGHT_FORMATS: dict[str, WeightFormat] = {
    fmt.key: fmt
    for fmt in (
        WeightFormat("full", "compute dtype", None, source="no quantization: the compute dtype (bf16 on CUDA)"),
        WeightFormat(
            "int8",
            "8-bit (bitsandbytes LLM.int8)",
            8,
            row_bytes=4,
            source="Int8Params: an int8 weight plus SCB, one fp32 absmax per output row",
        ),
        WeightFormat(
            "int8-torchao",
            "int8 weight-only (torchao)",
            8,
            row_bytes=5,
            source="torchao Int8Tensor: int8 qdata plus an fp32 scale and an int8 zero point per output row",
        ),
        WeightFormat(
            "nf4",
            "NF4 (bitsandbytes 4-bit)",
            4,
            block=64,
            block_bytes=4,
            source="Params4bit: two weights per byte plus one fp32 absmax per 64-weight block (4.5 bits)",
        ),
        WeightFormat(
            "nf4-dq",
            "NF4 + double quantization",
            4,
            block=64,
            block_bytes=1,
            super_block=256,
            super_block_bytes=4,
            source="the absmax itself quantized to uint8, plus one fp32 absmax per 256 blocks (~4.127 bits)",
        ),
    )
}


@dataclass(frozen=True)
class MemoryMode:
    """One way to load and run a model: weight formats per component, dropped components, offload."""

    key: str
    title: str
    formats: tuple[tuple[str, str], ...] = ()  # (component, WEIGHT_FORMATS key); the rest stay "full"
    dropped: tuple[str, ...] = ()  # components not loaded at all (SD3: text_encoder_3=None)
    offload: str = "none"  # "none", "model" (enable_model_cpu_offload), "sequential"
    note: str = ""  # what it costs, in a few words

    def format_for(self, component: str) -> str:
        return dict(self.formats).get(component, "full")


_NF4_MMDIT = (("transformer", "nf4"),)
_NF4_BOTH = (("transformer", "nf4"), ("text_encoder_3", "nf4"))
_NO_T5 = ("text_encoder_3",)

# In auto_choice's order: the fastest expected first (see the module docstring).
SD3_MODES: tuple[MemoryMode, ...] = (
    MemoryMode("bf16", "bf16, all on the GPU", note="the reference: fastest, unchanged images"),
    MemoryMode("nf4", "MMDiT NF4", _NF4_MMDIT, note="same speed as bf16 in published tests; images change slightly"),
    MemoryMode("nf4-t5nf4", "MMDiT NF4 + T5 NF4", _NF4_BOTH, note="T5 runs once per image, so its NF4 costs little"),
    MemoryMode("int8", "MMDiT 8-bit", (("transformer", "int8"),), note="LLM.int8 matmuls: assumed slower than NF4"),
    MemoryMode("bf16-no-t5", "bf16, no T5", dropped=_NO_T5, note="prompts followed less closely without T5"),
    MemoryMode("nf4-no-t5", "MMDiT NF4, no T5", _NF4_MMDIT, _NO_T5, note="NF4 and no T5"),
    MemoryMode(
        "bf16-offload", "bf16 + model CPU offload", offload="model", note="each component crosses PCIe per image"
    ),
    MemoryMode(
        "nf4-t5nf4-offload",
        "MMDiT NF4 + T5 NF4 + model offload",
        _NF4_BOTH,
        offload="model",
        note="smaller transfers than bf16 offload",
    ),
    MemoryMode(
        "nf4-no-t5-offload",
        "MMDiT NF4, no T5 + model offload",
        _NF4_MMDIT,
        _NO_T5,
        offload="model",
        note="the smallest footprint that keeps whole components",
    ),
    MemoryMode(
        "bf16-sequential",
        "bf16 + sequential CPU offload",
        offload="sequential",
        note="every weight crosses PCIe at every step: slowest",
    ),
)
BLIP_MODES: tuple[MemoryMode, ...] = (
    MemoryMode("bf16", "bf16, on the GPU", note="the reference"),
    MemoryMode("int8", "8-bit (bitsandbytes)", (("model", "int8"),), note="LLM.int8 matmuls: assumed slower"),
    MemoryMode("nf4", "NF4 (bitsandbytes 4-bit)", (("model", "nf4"),), note="small model: little to save"),
)


def modes_for(model_key: str) -> tuple[MemoryMode, ...]:
    """The modes the planner knows for ``model_key``, in auto_choice's order."""
    return SD3_MODES if family(model_key) == "sd3" else BLIP_MODES


def get_mode(model_key: str, mode: str) -> MemoryMode:
    for candidate in modes_for(model_key):
        if candidate.key == mode:
            return candidate
    keys = ", ".join(candidate.key for candidate in modes_for(model_key))
    raise ValueError(f"Unknown memory mode {mode!r} for {model_key}; choose one of: {keys}.")


def weight_bytes(size: ComponentSize, fmt: str = "full", dtype: str = "bf16") -> int:
    """Bytes of ``size``'s weights and buffers when its quantizable Linear weights use ``fmt``.

    Everything else (norms, embeddings, biases, convolutions, the SD3 ``pos_embed``)
    stays in ``dtype``; under fp16, transformers keeps ``_keep_in_fp32_modules`` in fp32.
    """
    element = DTYPE_BYTES[dtype]
    total = size.float_elements * element + size.other_buffer_bytes
    if dtype == "fp16":
        total += size.fp32_kept_elements * (4 - element)
    weight_format = WEIGHT_FORMATS[fmt]
    if weight_format.weight_bits is None:
        return total
    quantized = sum(
        count * weight_format.tensor_bytes(rows, columns, element) for (rows, columns), count in size.quantized_shapes
    )
    return total - size.quantized_elements * element + quantized


# --- plans ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentPlan:
    name: str
    title: str
    format: str  # WEIGHT_FORMATS key, or "dropped"
    weight_bytes: int  # 0 when dropped
    activation: Activation | None  # None when dropped
    gpu_bytes_at_peak: int  # of its weights, what is on the GPU at the peak (0 = offloaded or dropped)


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated GPU memory of one model in one mode at one size and batch."""

    model_key: str
    mode: MemoryMode
    height: int
    width: int
    batch: int
    dtype: str
    attention: str
    text_tokens: int | None  # SD3: CLIP's 77 + T5's; None for BLIP
    components: tuple[ComponentPlan, ...]
    peak_phase: str
    peak_component: str  # whose forward pass sets the peak
    peak_bytes: int
    notes: tuple[str, ...] = field(default=())

    @property
    def weight_bytes(self) -> int:
        """Every loaded component's weights, wherever they live."""
        return sum(part.weight_bytes for part in self.components)

    @property
    def activation_bytes(self) -> int:
        """The activations of the phase that sets the peak."""
        return next(part.activation.bytes for part in self.components if part.name == self.peak_component)

    @property
    def resident_at_peak(self) -> tuple[str, ...]:
        return tuple(part.name for part in self.components if part.gpu_bytes_at_peak > 0)

    def fits(self, gpu_bytes: int, margin: int | None = None) -> bool:
        margin = settings.PLAN_MARGIN_BYTES if margin is None else margin
        return self.peak_bytes + margin <= gpu_bytes

    def as_dict(self) -> dict:
        return {
            "model": self.model_key,
            "mode": self.mode.key,
            "mode_title": self.mode.title,
            "height": self.height,
            "width": self.width,
            "batch": self.batch,
            "dtype": self.dtype,
            "attention": self.attention,
            "text_tokens": self.text_tokens,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "resident_at_peak": list(self.resident_at_peak),
            "components": [
                {
                    "name": part.name,
                    "title": part.title,
                    "format": part.format,
                    "weight_bytes": part.weight_bytes,
                    "activation_bytes": part.activation.bytes if part.activation else 0,
                    "activation_formula": part.activation.formula if part.activation else "",
                    "gpu_bytes_at_peak": part.gpu_bytes_at_peak,
                }
                for part in self.components
            ],
            "notes": list(self.notes),
        }


def _validate(
    model_key: str, height: int, width: int, batch: int, dtype: str, attention: str, t5_tokens: int | None
) -> None:
    if model_key not in planned_models():
        raise ValueError(f"Unknown model {model_key!r}; choose one of: {', '.join(planned_models())}.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not planned for; use one of: {', '.join(DTYPE_BYTES)}.")
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention {attention!r} is unknown; use 'sdpa' (memory-efficient) or 'math'.")
    if not 1 <= batch <= settings.PLAN_MAX_BATCH:
        raise ValueError(f"batch must be between 1 and {settings.PLAN_MAX_BATCH}, not {batch}.")
    if family(model_key) != "sd3":
        return  # BLIP resizes every image to its own 384 px
    largest = max_side(model_key)
    for name, side in (("height", height), ("width", width)):
        if side % 16 or not settings.PLAN_MIN_SIDE <= side <= largest:
            raise ValueError(
                f"{name} {side} cannot be drawn by {model_key}: use a multiple of 16 between "
                f"{settings.PLAN_MIN_SIDE} and {largest}."
            )
    if t5_tokens is not None and not 1 <= t5_tokens <= max_t5_tokens(model_key):
        raise ValueError(f"t5_tokens must be between 1 and {max_t5_tokens(model_key)} (T5's context), not {t5_tokens}.")


def plan(
    model_key: str,
    mode: str,
    height: int = settings.PLAN_DEFAULT_SIDE,
    width: int = settings.PLAN_DEFAULT_SIDE,
    batch: int = 1,
    *,
    dtype: str = "bf16",
    attention: str = "sdpa",
    t5_tokens: int | None = None,
) -> MemoryPlan:
    """Estimate ``model_key``'s GPU memory in ``mode`` for ``batch`` images of ``height`` x ``width``.

    Returns per-component weight and activation bytes, the peak and the phase
    that sets it, and which components are on the GPU then. ``dtype`` is the
    compute dtype of everything not quantized; ``attention="math"`` assumes no
    memory-efficient attention kernel; ``t5_tokens`` is the prompt length T5 is
    run at (the preset's 256 by default, at most 512). Raises ValueError for an
    unknown model or mode, or a size the model cannot draw.
    """
    # 1. Check inputs
    _validate(model_key, height, width, batch, dtype, attention, t5_tokens)
    memory_mode = get_mode(model_key, mode)
    sizes = {size.name: size for size in component_sizes(model_key)}
    estimates = activations(model_key, height, width, batch, dtype, attention, t5_tokens)
    sd3 = family(model_key) == "sd3"
    element = DTYPE_BYTES[dtype]

    # 2. Weights per component in this mode
    loaded = [name for name in component_names(model_key) if name not in memory_mode.dropped]
    weights = {name: weight_bytes(sizes[name], memory_mode.format_for(name), dtype) for name in loaded}

    # 3. Each phase: what is on the GPU while that component runs, plus its activations
    def on_gpu(running: str) -> dict[str, int]:
        if memory_mode.offload == "none":
            return dict(weights)
        if memory_mode.offload == "model":
            return {running: weights[running]}
        return {running: sizes[running].largest_module_elements * element}  # sequential: one module at a time

    phases = [(name, sum(on_gpu(name).values()) + estimates[name].bytes) for name in loaded]
    peak_component, peak_bytes = max(phases, key=lambda phase: phase[1])
    resident = on_gpu(peak_component)

    # 4. The plan
    components = tuple(
        ComponentPlan(
            name=name,
            title=sizes[name].title,
            format="dropped" if name in memory_mode.dropped else memory_mode.format_for(name),
            weight_bytes=weights.get(name, 0),
            activation=estimates[name] if name in weights else None,
            gpu_bytes_at_peak=resident.get(name, 0),
        )
        for name in component_names(model_key)
    )
    notes = []
    if "text_encoder_3" in memory_mode.dropped:
        notes.append(
            f"Without T5 the transformer still sees {text_tokens(model_key, t5_tokens)} text tokens: "
            "diffusers feeds zeros in T5's place."
        )
    if memory_mode.format_for("text_encoder_3") != "full" and sizes["text_encoder_3"].fp32_kept_elements:
        kept = sizes["text_encoder_3"].fp32_kept_elements
        notes.append(
            f"transformers never quantizes T5's `wo` layers ({kept:,} weights, its _keep_in_fp32_modules): "
            f"they stay in {dtype}."
        )
    return MemoryPlan(
        model_key=model_key,
        mode=memory_mode,
        height=height,
        width=width,
        batch=batch,
        dtype=dtype,
        attention=attention,
        text_tokens=text_tokens(model_key, t5_tokens) if sd3 else None,
        components=components,
        peak_phase=estimates[peak_component].phase,
        peak_component=peak_component,
        peak_bytes=peak_bytes,
        notes=tuple(notes),
    )


def auto_choice(
    model_key: str,
    free_bytes: int,
    height: int = settings.PLAN_DEFAULT_SIDE,
    width: int = settings.PLAN_DEFAULT_SIDE,
    margin: int | None = None,
    *,
    batch: int = 1,
    dtype: str = "bf16",
    attention: str = "sdpa",
    t5_tokens: int | None = None,
) -> tuple[str | None, str]:
    """The fastest mode whose estimated peak plus ``margin`` fits in ``free_bytes``, and why, in one sentence.

    Modes are tried in ``modes_for(model_key)`` order (the module docstring says
    why that order). Returns ``(None, sentence)`` when even the smallest mode does
    not fit.
    """
    margin = settings.PLAN_MARGIN_BYTES if margin is None else margin
    if free_bytes <= 0:
        raise ValueError(f"free_bytes must be positive, not {free_bytes}.")
    plans = [
        plan(model_key, mode.key, height, width, batch, dtype=dtype, attention=attention, t5_tokens=t5_tokens)
        for mode in modes_for(model_key)
    ]
    for index, candidate in enumerate(plans):
        if candidate.fits(free_bytes, margin):
            reason = (
                f"{candidate.mode.title} is the fastest mode that fits: estimated peak "
                f"{gib(candidate.peak_bytes)} + {gib(margin)} margin ≤ {gib(free_bytes)} free"
            )
            if index:
                faster = plans[index - 1]
                reason += f" ({faster.mode.title} would need {gib(faster.peak_bytes)})"
            return candidate.mode.key, reason + "."
    smallest = min(plans, key=lambda candidate: candidate.peak_bytes)
    return None, (
        f"No mode fits {model_key} at {width}×{height} in {gib(free_bytes)}: even {smallest.mode.title} needs about "
        f"{gib(smallest.peak_bytes + margin)} with the margin; use a smaller size or a GPU with more memory."
    )


def gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def plan_table(
    height: int = settings.PLAN_DEFAULT_SIDE,
    width: int = settings.PLAN_DEFAULT_SIDE,
    *,
    models: tuple[str, ...] | None = None,
    dtype: str = "bf16",
    attention: str = "sdpa",
) -> list[MemoryPlan]:
    """Every model x mode: the SD3.5 models at ``height`` x ``width``, BLIP at each of PLAN_CAPTION_BATCHES."""
    plans = []
    for key in models if models is not None else planned_models():
        batches = (1,) if family(key) == "sd3" else settings.PLAN_CAPTION_BATCHES
        for batch in batches:
            for mode in modes_for(key):
                plans.append(plan(key, mode.key, height, width, batch, dtype=dtype, attention=attention))
    return plans


# --- this machine ---------------------------------------------------------------------------


def gpu_memory(device=None) -> dict | None:
    """Name, total and free bytes of the CUDA GPU ``device`` (the current one by default); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    return {
        "name": torch.cuda.get_device_name(device),
        "total_bytes": int(total),
        "free_bytes": int(free),
        "allocated_bytes": int(torch.cuda.memory_allocated(device)),
    }


def machine_report(runtime) -> dict:
    """Device, dtype, library versions and GPU memory of the machine serving the Studio."""
    import os
    import platform

    import torch

    report = {
        "device": str(runtime.device),
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "description": runtime.description,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": gpu_memory(runtime.device),
    }
    try:  # Linux and macOS; absent elsewhere
        report["ram_total_bytes"] = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        report["ram_total_bytes"] = None
    return report


# --- what the model manager needs --------------------------------------------------------


def default_mode(model_key: str) -> str:
    """Full precision: the first (fastest) mode of the model's family."""
    return modes_for(model_key)[0].key


def load_estimate_bytes(model_key: str, mode: str | None, dtype: str = "bf16") -> int:
    """Weight bytes ``model_key`` will hold once loaded in ``mode``, for the manager's budget."""
    chosen = plan(model_key, mode or default_mode(model_key), dtype=dtype)
    return sum(component.weight_bytes for component in chosen.components)


def memory_budget_bytes(runtime) -> int:
    """What all loaded models may hold together: 95% of the GPU, or 80% of the RAM on a CPU machine."""
    import os

    gpu = gpu_memory(runtime.device) if runtime.device.type == "cuda" else None
    if gpu is not None:
        return int(gpu["total_bytes"] * 0.95)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.8)


def resolve_mode(model_key: str, requested: str, runtime, height: int, width: int) -> tuple[str, str]:
    """(mode, why) for a requested mode; "auto" asks ``auto_choice`` with this GPU's free memory.

    On a machine without CUDA, "auto" is full precision: quantization and
    offload need a GPU. Raises ValueError when nothing fits.
    """
    if requested != "auto":
        get_mode(model_key, requested)  # ValueError for an unknown mode
        return requested, "chosen by hand"
    if runtime.device.type != "cuda":
        return default_mode(model_key), "auto: no CUDA GPU, so full precision (quantization and offload need one)"
    gpu = gpu_memory(runtime.device)
    mode, reason = auto_choice(model_key, gpu["free_bytes"], height, width, settings.PLAN_MARGIN_BYTES)
    if mode is None:
        raise ValueError(reason)
    return mode, "auto: " + reason
