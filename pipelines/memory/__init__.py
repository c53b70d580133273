"""GPU memory: the mode tables, the planner, and this machine's memory.

- ``pipelines.memory.modes``: weight formats and memory modes per model family;
- ``pipelines.memory.planner``: how much memory a model needs in a mode, and which mode fits;
- ``pipelines.memory.activations``: the activations' share of that, from the real config files;
- ``pipelines.memory.gpu``: what this machine has (free GPU memory, the System tab's report, the
  manager's budget).

Callers import the public names from ``pipelines.memory`` as before.
"""

from __future__ import annotations

from pipelines.memory.gpu import gpu_memory, machine_report, memory_budget_bytes
from pipelines.memory.modes import (
    BLIP_MODES,
    GIB,
    SD3_MODES,
    WEIGHT_FORMATS,
    MemoryMode,
    WeightFormat,
    default_mode,
    get_mode,
    modes_for,
)
from pipelines.memory.planner import (
    ComponentPlan,
    MemoryPlan,
    auto_choice,
    gib,
    load_estimate_bytes,
    plan,
    plan_table,
    resolve_mode,
    weight_bytes,
)

__all__ = [
    "BLIP_MODES",
    "GIB",
    "SD3_MODES",
    "WEIGHT_FORMATS",
    "ComponentPlan",
    "MemoryMode",
    "MemoryPlan",
    "WeightFormat",
    "auto_choice",
    "default_mode",
    "get_mode",
    "gib",
    "gpu_memory",
    "load_estimate_bytes",
    "machine_report",
    "memory_budget_bytes",
    "modes_for",
    "plan",
    "plan_table",
    "resolve_mode",
    "weight_bytes",
]
