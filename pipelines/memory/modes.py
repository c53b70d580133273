"""Memory modes: the weight formats and, per model family, the ways to load and run a model.

The tables only: what each mode quantizes, drops and offloads (``pipelines.sd3.loading`` turns a
mode into loading configs; ``pipelines.memory.planner`` estimates what it needs; the order of
``SD3_MODES`` is ``auto_choice``'s, explained there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.architectures import (
    family,
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
            "fp8-rowwise",
            "fp8 e4m3, row-wise scales (torchao)",
            8,
            row_bytes=4,
            source="torchao Float8Tensor, PerRow: float8_e4m3fn qdata plus one fp32 scale per output row; "
            "activations are quantized per call (dynamic), so they take no memory ahead",
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
    # Last, so auto never picks it: it changes images (lossy) and needs torchao and a GPU of compute
    # capability 8.9 or newer (Ada, Hopper), which pipelines.sd3.loading.check_mode verifies.
    MemoryMode(
        "fp8",
        "MMDiT fp8 (dynamic activations + weights, row-wise)",
        (("transformer", "fp8-rowwise"),),
        note="fp8 matmuls on compute capability 8.9+: faster than bf16 there, lossy; opt-in (--memory fp8)",
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


def default_mode(model_key: str) -> str:
    """Full precision: the first (fastest) mode of the model's family."""
    return modes_for(model_key)[0].key
