"""BLIP's precision on the CPU (``--precision``): the variants, what each was measured to cost, and the choice.

On a GPU nothing here applies: the runtime already runs bf16 (or fp16). On the
CPU BLIP loads in fp32, and a variant then converts parts of it:

- ``bf16``: the whole model in bfloat16 (oneDNN kernels; fast only on CPUs with
  native bf16 instructions, avx512_bf16 or amx_bf16);
- ``vision-bf16``: the ViT in bf16, the text decoder in fp32;
- ``int8``: every ``nn.Linear`` dynamically quantized to int8 (weights int8,
  activations quantized per call);
- ``vision-bf16-int8``: the ViT in bf16, the text decoder's Linears in dynamic int8.

``auto`` picks the fastest variant whose measured deviation from fp32 stays at
most ``settings.MAX_BLIP_LOGIT_DEVIATION`` (relative L2 of the first decode
step's logits), among those this CPU runs natively. Deviations were measured on
the real-size architecture with random weights; perceptual caption quality with
the real weights is not measured here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import settings
from pipelines.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecisionVariant:
    """One way to run BLIP on the CPU, with its measured cost and benefit."""

    name: str
    vision: str  # fp32 | bf16
    decoder: str  # fp32 | bf16 | int8
    time_ratio: float  # seconds per greedy 20-token caption, relative to fp32 (lower is faster)
    logit_deviation: float  # relative L2 of the first decode step's logits against fp32
    same_tokens: bool  # whether its greedy 20 tokens equalled fp32's on the bench photo

    @property
    def needs_native_bf16(self) -> bool:
        return "bf16" in (self.vision, self.decoder)


# Measured by `python -m bench.bench_blip_precision --repeats 7` (its in-process rows) on this
# project's 2-core AMD EPYC Zen 4 (avx512_bf16, avx512_vnni), torch 2.13.0+cpu, 2 threads, real-size
# BLIP base with random weights, greedy 20 tokens, medians of 7 interleaved runs, 2026-12-06T00:17Z;
# bf16 parts with packed weights (PackedBf16Linear). The run's rows are in
# bench/results/blip-precision-cpu.json; rerun it on the target CPU to refresh these.
VARIANTS: dict[str, PrecisionVariant] = {
    variant.name: variant
    for variant in (
        PrecisionVariant("fp32", "fp32", "fp32", time_ratio=1.0, logit_deviation=0.0, same_tokens=True),
        PrecisionVariant("bf16", "bf16", "bf16", time_ratio=0.37, logit_deviation=0.0157, same_tokens=False),
        PrecisionVariant("vision-bf16", "bf16", "fp32", time_ratio=0.69, logit_deviation=0.0043, same_tokens=False),
        PrecisionVariant("int8", "int8", "int8", time_ratio=0.31, logit_deviation=0.0608, same_tokens=False),
        PrecisionVariant(
            "vision-bf16-int8", "bf16", "int8", time_ratio=0.30, logit_deviation=0.0552, same_tokens=False
        ),
    )
}
PRECISION_CHOICES = ("auto", *VARIANTS)


@dataclass(frozen=True)
class BlipPrecision:
    """The variant BLIP runs in and why. ``variant`` None: the runtime's own dtype (a GPU)."""

    variant: str | None
    reason: str

    @property
    def label(self) -> str:
        """One line for the Caption tab and /system."""
        if self.variant is None:
            return f"BLIP precision: the GPU runtime's dtype ({self.reason})"
        if self.variant == "fp32":
            return f"BLIP precision: fp32, exact ({self.reason})"
        deviation = VARIANTS[self.variant].logit_deviation
        return f"BLIP precision: {self.variant} ({deviation:.1%} logit deviation from fp32; --precision fp32 for exact)"

    def as_dict(self) -> dict:
        known = VARIANTS.get(self.variant or "")
        return {
            "variant": self.variant,
            "reason": self.reason,
            "logit_deviation": known.logit_deviation if known else None,
            "time_ratio_vs_fp32": known.time_ratio if known else None,
            "max_logit_deviation": settings.MAX_BLIP_LOGIT_DEVIATION,
            "label": self.label,
        }


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when this CPU computes bf16 in hardware (avx512_bf16 or amx_bf16) and oneDNN will use it.

    Linux lists the CPU's flags in /proc/cpuinfo; elsewhere torch's own oneDNN check decides alone.
    """
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        flags = None
    if flags is not None and not flags & {"avx512_bf16", "amx_bf16"}:
        return False
    return onednn_bf16_supported()


def onednn_bf16_supported() -> bool:
    """torch's check that its oneDNN build has fast bf16 kernels for this CPU."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def choose_blip_precision(
    requested: str, device_type: str, *, tiny: bool = False, native_bf16: bool | None = None
) -> BlipPrecision:
    """Resolve ``--precision`` for a device ("cpu", "cuda", "mps"); ValueError for an unknown value.

    ``native_bf16`` None: detect it (``cpu_has_native_bf16``).
    """
    # 1. Check the value.
    requested = str(requested or "").strip().lower()
    if requested not in PRECISION_CHOICES:
        raise ValueError(
            f"--precision {requested!r} is not a BLIP precision; use one of: {', '.join(PRECISION_CHOICES)} "
            "(auto picks the fastest within the stated deviation; fp32 is exact)."
        )
    # 2. GPUs keep the runtime's bf16/fp16.
    if device_type != "cpu":
        note = "" if requested == "auto" else f"; --precision {requested} applies to the CPU only"
        return BlipPrecision(None, f"{device_type} runs BLIP in bf16/fp16{note}")
    if native_bf16 is None:
        native_bf16 = cpu_has_native_bf16()
    # 3. An explicit variant is honoured, with a warning where the CPU would emulate bf16.
    if requested != "auto":
        reason = "asked for with --precision"
        if VARIANTS[requested].needs_native_bf16 and not native_bf16:
            reason += "; this CPU has no native bf16, so it may be slower than fp32"
            logger.warning("--precision %s: this CPU has no native bf16 (avx512_bf16/amx_bf16)", requested)
        return BlipPrecision(requested, reason)
    # 4. auto.
    if tiny:
        return BlipPrecision("fp32", "tiny models are latency-bound, so auto keeps fp32 under --tiny")
    limit = settings.MAX_BLIP_LOGIT_DEVIATION
    allowed = [
        variant
        for variant in VARIANTS.values()
        if variant.logit_deviation <= limit and (native_bf16 or not variant.needs_native_bf16)
    ]
    best = min(allowed, key=lambda variant: variant.time_ratio)  # fp32 always qualifies
    if best.name == "fp32":
        why = "no native bf16 on this CPU" if not native_bf16 else "no faster variant within the deviation"
        return BlipPrecision("fp32", f"auto: {why}")
    native = ", on a CPU with native bf16" if best.needs_native_bf16 else ""
    return BlipPrecision(
        best.name,
        f"auto: fastest measured variant ({best.time_ratio:.2f}x fp32's time) within {limit:.0%} logit deviation{native}",
    )


class PackedBf16Linear(torch.nn.Linear):
    """An ``nn.Linear`` whose bf16 weight is also held in oneDNN's blocked layout, packed once.

    torch's bf16 ``linear`` on the CPU hands oneDNN the plain weight on every call, which
    (as far as measured) it reorders each time; at one token that costs more than the
    product itself. Packing once gave the same output bit for bit, 2.4x faster for BLIP's 768x768 layers at one
    token, 2.3x for its LM head and 1.5x for the ViT's 577-token layers (2 threads, Zen 4).
    The Parameters stay (the tied LM head, peft adapters and state_dict see a plain Linear);
    an in-place change of the weight (e.g. a merged LoRA) packs it again. Outside
    inference (gradients wanted) or for non-bf16 input it is a plain Linear.
    """

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> PackedBf16Linear:
        packed = cls.__new__(cls)
        torch.nn.Module.__init__(packed)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.weight, packed.bias = linear.weight, linear.bias  # the same Parameters: ties survive
        packed._pack()
        return packed

    def _pack(self) -> None:
        with torch.no_grad():
            self._packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        self._packed_version = self.weight._version

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype != torch.bfloat16 or self.weight.dtype != torch.bfloat16 or torch.is_grad_enabled():
            return super().forward(input)
        if self.weight._version != self._packed_version:
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(input.contiguous(), self._packed_weight, self.bias, "none", [], "")


def pack_bf16_linears(module: torch.nn.Module) -> int:
    """Replace every bf16 ``nn.Linear`` under ``module`` by a PackedBf16Linear; returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, PackedBf16Linear.from_linear(child))
                count += 1
    return count


def apply_blip_precision(model: torch.nn.Module, variant: str | None) -> torch.nn.Module:
    """Convert a BLIP model loaded in fp32 to ``variant`` in place (None or fp32: unchanged); returns it.

    bf16 parts get their Linear weights packed once for oneDNN where the CPU has native bf16.
    """
    if variant is None or variant == "fp32":
        return model
    spec = VARIANTS[variant]
    bf16_parts = []
    if spec.vision == "bf16":
        bf16_parts.append(model.vision_model.to(torch.bfloat16))
    if spec.decoder == "bf16":
        bf16_parts.append(model.text_decoder.to(torch.bfloat16))
    if bf16_parts and model.device.type == "cpu" and onednn_bf16_supported():
        for part in bf16_parts:
            pack_bf16_linears(part)
    if "int8" in (spec.vision, spec.decoder):
        import warnings

        from torch.ao.quantization import quantize_dynamic

        targets = [model] if spec.vision == "int8" else [model.text_decoder]
        with warnings.catch_warnings():  # torch deprecates quantized tensors in favour of torchao, whose
            warnings.simplefilter("ignore")  # eager int8 kernels were slower on this CPU
            for target in targets:
                quantize_dynamic(target, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def with_blip_precision(runtime: Runtime, requested: str, *, tiny: bool = False) -> Runtime:
    """``runtime`` carrying the resolved ``--precision`` (the BLIP loader applies it); ValueError if unknown."""
    return dataclasses.replace(runtime, blip_precision=choose_blip_precision(requested, runtime.device.type, tiny=tiny))


def runtime_blip_precision(runtime: Runtime) -> BlipPrecision:
    """The precision BLIP's captioner runs in under ``runtime``, also when no ``--precision`` was resolved."""
    if runtime.blip_precision is not None:
        return runtime.blip_precision
    if runtime.device.type == "cpu":
        return BlipPrecision("fp32", "the CPU default")
    return BlipPrecision(None, f"{runtime.device.type} runs BLIP in {runtime.dtype_name}")
