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

from dataclasses import dataclass, field

from pipelines import settings
from pipelines.architectures import (
    ComponentSize,
    component_names,
    component_sizes,
    copied_pos_embed_size,
    family,
    planned_models,
)
from pipelines.catalog import CATALOG, CONTROLNET_BASE, CONTROLNET_KEYS
from pipelines.memory.activations import (
    ATTENTION_KINDS,
    DTYPE_BYTES,
    Activation,
    activations,
    controlnet_activation,
    controlnet_residual_bytes,
    max_side,
    max_t5_tokens,
    text_tokens,
)
from pipelines.memory.gpu import gpu_memory
from pipelines.memory.modes import GIB, WEIGHT_FORMATS, MemoryMode, default_mode, get_mode, modes_for

# The three released SD3.5 Large ControlNets share one config (assets/model-configs), so one plans for all.
PLANNED_CONTROLNET = CONTROLNET_KEYS["canny"]


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
    controlnet: str | None = None  # the ControlNet's catalog key when planned with one

    @property
    def title(self) -> str:
        """The model as the System tab names it: "sd35-large", or "sd35-large + ControlNet"."""
        return self.model_key + (" + ControlNet" if self.controlnet else "")

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
            "controlnet": self.controlnet,
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
    controlnet: str | None = None,
) -> MemoryPlan:
    """Estimate ``model_key``'s GPU memory in ``mode`` for ``batch`` images of ``height`` x ``width``.

    Returns per-component weight and activation bytes, the peak and the phase
    that sets it, and which components are on the GPU then. ``dtype`` is the
    compute dtype of everything not quantized; ``attention="math"`` assumes no
    memory-efficient attention kernel; ``t5_tokens`` is the prompt length T5 is
    run at (the preset's 256 by default, at most 512). ``controlnet`` (a
    ControlNet's catalog key) adds that ControlNet, stored in the mode's MMDiT
    format, and its per-step work (see ``controlnet_activation``). Raises
    ValueError for an unknown model or mode, a size the model cannot draw, or a
    ControlNet the model does not take.
    """
    # 1. Check inputs
    _validate(model_key, height, width, batch, dtype, attention, t5_tokens)
    _check_controlnet(model_key, controlnet)
    memory_mode = get_mode(model_key, mode)
    sizes = {size.name: size for size in component_sizes(model_key)}
    estimates = activations(model_key, height, width, batch, dtype, attention, t5_tokens)
    sd3 = family(model_key) == "sd3"
    element = DTYPE_BYTES[dtype]
    names = component_names(model_key)
    if controlnet is not None:
        # The ControlNet runs each step just before the MMDiT; its 19 residuals stay alive through the MMDiT.
        names = (*names, "controlnet")
        sizes["controlnet"] = component_sizes(controlnet)[0]
        estimates["controlnet"] = controlnet_activation(model_key, controlnet, height, width, batch, dtype, attention)
        held = controlnet_residual_bytes(model_key, controlnet, height, width, batch, dtype)
        mmdit = estimates["transformer"]
        estimates["transformer"] = Activation(
            mmdit.component, mmdit.phase, mmdit.bytes + held, mmdit.formula + f" + ControlNet residuals {held:,} B"
        )

    # 2. Weights per component in this mode
    loaded = [name for name in names if name not in memory_mode.dropped]
    weights = {
        name: weight_bytes(sizes[name], memory_mode.format_for("transformer" if name == "controlnet" else name), dtype)
        for name in loaded
    }
    if controlnet is not None:  # plus the position table diffusers copies into it from the MMDiT
        weights["controlnet"] += weight_bytes(copied_pos_embed_size(model_key), "full", dtype)

    # 3. Each phase: what is on the GPU while that component runs, plus its activations
    def on_gpu(running: str) -> dict[str, int]:
        if memory_mode.offload == "none":
            return dict(weights)
        if memory_mode.offload == "model":
            if controlnet is not None:
                # The Studio keeps the ControlNet on the GPU under model offload (pipelines/sd3/controlnet.py:
                # it runs at every step, and diffusers would not offload it between steps either).
                return {running: weights[running], "controlnet": weights["controlnet"]}
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
        for name in names
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
        controlnet=controlnet,
    )


def _check_controlnet(model_key: str, controlnet: str | None) -> None:
    if controlnet is None:
        return
    spec = CATALOG.get(controlnet)
    if spec is None or spec.kind != "sd3-controlnet":
        raise ValueError(f"{controlnet!r} is not a ControlNet of the catalog.")
    if spec.requires != model_key:
        raise ValueError(f"{spec.title} fits {spec.requires} only, not {model_key}.")


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
    controlnet: str | None = None,
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
        plan(
            model_key,
            mode.key,
            height,
            width,
            batch,
            dtype=dtype,
            attention=attention,
            t5_tokens=t5_tokens,
            controlnet=controlnet,
        )
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
        f"No mode fits {model_key}{' with its ControlNet' if controlnet else ''} at {width}×{height} in {gib(free_bytes)}: even {smallest.mode.title} needs about "
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
    """Every model x mode: the SD3.5 models at ``height`` x ``width``, BLIP at each of PLAN_CAPTION_BATCHES,
    then SD3.5 Large with a ControlNet (all three share one architecture) in each mode."""
    plans = []
    keys = models if models is not None else planned_models()
    for key in keys:
        batches = (1,) if family(key) == "sd3" else settings.PLAN_CAPTION_BATCHES
        for batch in batches:
            for mode in modes_for(key):
                plans.append(plan(key, mode.key, height, width, batch, dtype=dtype, attention=attention))
    if CONTROLNET_BASE in keys:
        for mode in modes_for(CONTROLNET_BASE):
            plans.append(
                plan(
                    CONTROLNET_BASE,
                    mode.key,
                    height,
                    width,
                    dtype=dtype,
                    attention=attention,
                    controlnet=PLANNED_CONTROLNET,
                )
            )
    return plans


def load_estimate_bytes(model_key: str, mode: str | None, dtype: str = "bf16") -> int:
    """Weight bytes ``model_key`` will hold once loaded in ``mode``, for the manager's budget.

    A ControlNet is loaded in its base's memory mode and stores its weights in that mode's MMDiT
    format (plus the position table its pipeline copies in); the depth estimator stays in ``dtype``.
    """
    kind = family(model_key)
    if kind == "sd3-controlnet":
        base = CATALOG[model_key].requires
        fmt = get_mode(base, mode or default_mode(base)).format_for("transformer")
        return weight_bytes(component_sizes(model_key)[0], fmt, dtype) + weight_bytes(
            copied_pos_embed_size(base), "full", dtype
        )
    if kind == "depth-estimator":
        return weight_bytes(component_sizes(model_key)[0], "full", dtype)
    chosen = plan(model_key, mode or default_mode(model_key), dtype=dtype)
    return sum(component.weight_bytes for component in chosen.components)


def resolve_mode(
    model_key: str, requested: str, runtime, height: int, width: int, *, controlnet: str | None = None
) -> tuple[str, str]:
    """(mode, why) for a requested mode; "auto" asks ``auto_choice`` with this GPU's free memory.

    On a machine without CUDA, "auto" is full precision: quantization and
    offload need a GPU. ``controlnet`` plans that ControlNet in too. Raises
    ValueError when nothing fits.
    """
    if requested != "auto":
        get_mode(model_key, requested)  # ValueError for an unknown mode
        return requested, "chosen by hand"
    if runtime.device.type != "cuda":
        return default_mode(model_key), "auto: no CUDA GPU, so full precision (quantization and offload need one)"
    gpu = gpu_memory(runtime.device)
    mode, reason = auto_choice(
        model_key, gpu["free_bytes"], height, width, settings.PLAN_MARGIN_BYTES, controlnet=controlnet
    )
    if mode is None:
        raise ValueError(reason)
    return mode, "auto: " + reason
