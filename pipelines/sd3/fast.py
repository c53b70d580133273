"""SD3.5's fast path (``--fast``): regional compilation, fused QKV, a channels-last VAE, a persisted
compile cache, ahead-of-time compilation on ZeroGPU, and an optional lossy step cache.

``auto`` (the default) turns the fast path on for CUDA GPUs that Triton compiles for (compute
capability 7.0 and up) and leaves every other machine eager; ``off`` (``--no-fast``) keeps the
plain diffusers pipeline; ``on`` forces it, on the CPU too (Inductor then compiles C++; the tests use
this). Each part that cannot apply falls back on its own, with one logged sentence in
``FastPathReport.notes``, and the images keep their shapes and seeds:

1. ``fuse_qkv_projections``: one matmul for Q, K and V, where it computes the same thing. It does
   not on SD3.5: diffusers 0.42's fused SD3 processor leaves out the QK RMS norms that SD3.5 uses
   (``qk_norm="rms_norm"``), so the fast path keeps the projections separate there and says so.
   Also skipped for a quantized transformer (its packed weights cannot be concatenated). A LoRA
   attaching after a fuse unfuses first (``prepare_for_lora``): peft wraps ``to_q``/``to_k``/``to_v``,
   which the fused processor no longer calls.
2. A channels-last VAE (its convolutions are the decode's cost). Tiling stays as
   ``pipelines.sd3.text_to_image.configure_vae`` decides by size; it was not measured to help below that size.
3. Regional compilation: diffusers' ``compile_repeated_blocks`` where the transformer declares
   ``_repeated_blocks`` (SD3Transformer2DModel in diffusers 0.42 does not), else ``torch.compile`` of
   each ``transformer_blocks`` entry: the 38 (Large) or 24 (Medium) MMDiT blocks share one graph, so
   compiling takes one block's time, not the whole model's. ``dynamic=True``: the UI's sizes reuse
   one graph instead of recompiling per size (``recompile_count`` counts what still recompiles).
4. The compile cache persists in ``compile_cache_dir()`` (Inductor's own cache via
   ``TORCHINDUCTOR_CACHE_DIR``, plus torch's mega-cache artifacts saved after the first draw and
   loaded before the next start), so a restarted Space does not recompile for minutes.
5. On a ZeroGPU Space (``SPACES_ZERO_GPU`` set and the ``spaces`` package present), the
   transformer is compiled ahead of time instead, through ``spaces.aoti_capture``/``aoti_compile``/
   ``aoti_apply`` (``compile_ahead_of_time``); its weights then live in the compiled artifact, so
   LoRAs cannot attach afterwards.
6. Optional, off by default, lossy: diffusers' First Block Cache (``--step-cache THRESHOLD``)
   skips the remaining blocks of a step whose first block changed less than the threshold.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines import settings

logger = logging.getLogger(__name__)

FAST_CHOICES = ("auto", "on", "off")
COMPILE_CACHE_ENV = "STUDIO_COMPILE_CACHE_DIR"
MEGA_CACHE_FILE = "sd3-fast-mega-cache.bin"
MIN_TRITON_CAPABILITY = (7, 0)  # Triton (Inductor's GPU backend) compiles for Volta and newer


@dataclass(frozen=True)
class FastPathOptions:
    """What ``--fast`` and ``--step-cache`` asked for; ``enabled`` is the decision for this machine."""

    requested: str = settings.DEFAULT_FAST_PATH
    enabled: bool = False
    reason: str = ""
    step_cache_threshold: float | None = None  # First Block Cache threshold; None: off (exact)
    cache_dir: Path | None = None  # None: compile_cache_dir()


@dataclass
class FastPathReport:
    """What ``apply_fast_path`` did to one pipeline, and each fallback's sentence."""

    compiled: str = "no"  # "compile_repeated_blocks", "per-block torch.compile", "ahead-of-time (ZeroGPU)", "no"
    compiled_blocks: int = 0
    fused_qkv: bool = False
    vae_channels_last: bool = False
    step_cache_threshold: float | None = None
    cache_dir: str | None = None
    loaded_cache_artifacts: bool = False
    saved_cache_artifacts: bool = False
    notes: list[str] = field(default_factory=list)

    def note(self, sentence: str) -> None:
        self.notes.append(sentence)
        logger.info("fast path: %s", sentence)

    def as_dict(self) -> dict:
        return {
            "compiled": self.compiled,
            "compiled_blocks": self.compiled_blocks,
            "fused_qkv": self.fused_qkv,
            "vae_channels_last": self.vae_channels_last,
            "step_cache_threshold": self.step_cache_threshold,
            "step_cache_lossy": self.step_cache_threshold is not None,
            "cache_dir": self.cache_dir,
            "loaded_cache_artifacts": self.loaded_cache_artifacts,
            "notes": list(self.notes),
        }


# --- 1. the decision ----------------------------------------------------------------------


def choose_fast_path(
    requested: str,
    device: torch.device | str,
    *,
    step_cache_threshold: float | None = None,
    capability: tuple[int, int] | None = None,
    triton_available: bool | None = None,
) -> FastPathOptions:
    """Resolve ``--fast`` for ``device``; ValueError for an unknown value or a bad threshold.

    ``capability`` and ``triton_available`` None: read from this machine.
    """
    requested = str(requested or "").strip().lower()
    if requested not in FAST_CHOICES:
        raise ValueError(f"--fast {requested!r} is not a choice; use auto (default), on or off.")
    if step_cache_threshold is not None:
        threshold = float(step_cache_threshold)
        if not 0.0 <= threshold <= settings.MAX_STEP_CACHE_THRESHOLD:
            raise ValueError(
                f"--step-cache {threshold:g} is out of range; use 0 (off) up to {settings.MAX_STEP_CACHE_THRESHOLD:g} "
                f"(diffusers suggests {settings.SUGGESTED_STEP_CACHE_THRESHOLD:g})."
            )
        step_cache_threshold = threshold or None
    device = torch.device(device)

    def options(enabled: bool, reason: str) -> FastPathOptions:
        return FastPathOptions(requested, enabled, reason, step_cache_threshold)

    if requested == "off":
        return options(False, "off (--fast off): the plain diffusers pipeline")
    if requested == "on":
        return options(True, f"on (--fast on) on {device.type}")
    if device.type != "cuda":
        return options(False, f"auto: eager on {device.type}, since the fast path compiles for CUDA GPUs")
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if triton_available is None:
        from torch.utils._triton import has_triton

        triton_available = has_triton()
    if tuple(capability) < MIN_TRITON_CAPABILITY or not triton_available:
        return options(False, f"auto: eager, since Triton does not compile for this GPU (capability {capability})")
    return options(True, f"auto: on for this CUDA GPU (capability {capability[0]}.{capability[1]})")


def compile_cache_dir(options: FastPathOptions | None = None, environ: dict[str, str] = os.environ) -> Path:
    """Where compiled kernels persist across restarts: ``$STUDIO_COMPILE_CACHE_DIR``, else a
    ``compile-cache`` folder beside the work roots (``$STUDIO_WORK_DIR`` or the system temp), which
    outlives each process's own root."""
    if options is not None and options.cache_dir is not None:
        return options.cache_dir
    from pipelines import workspace

    if environ.get(COMPILE_CACHE_ENV):
        return Path(environ[COMPILE_CACHE_ENV])
    base = Path(environ.get(workspace.WORK_DIR_ENV) or Path(tempfile.gettempdir()) / workspace.DEFAULT_BASE_NAME)
    return base / "compile-cache"


def on_zerogpu(environ: dict[str, str] = os.environ) -> bool:
    """True on a Hugging Face ZeroGPU Space with the ``spaces`` package installed."""
    flag = str(environ.get("SPACES_ZERO_GPU", "")).strip().lower()
    return flag in ("1", "true") and importlib.util.find_spec("spaces") is not None


def fast_path_details(manager: Any) -> dict:
    """For /system: the decision for this machine and, per loaded SD3.5 pipeline, what was applied."""
    options: FastPathOptions | None = getattr(manager.runtime, "fast_path", None)
    loaded = {
        item.key: item.model.studio_fast_path.as_dict()
        for item in manager.loaded_models()
        if isinstance(getattr(item.model, "studio_fast_path", None), FastPathReport)
    }
    if options is None:
        return {
            "requested": None,
            "enabled": False,
            "reason": "not resolved (eager)",
            "label": "SD3.5 fast path: off (eager)",
            "pipelines": loaded,
        }
    label = f"SD3.5 fast path: {'on' if options.enabled else 'off'} ({options.reason})"
    if options.step_cache_threshold is not None:
        label += f"; step cache {options.step_cache_threshold:g} on: LOSSY, images differ from uncached"
    return {
        "label": label,
        "requested": options.requested,
        "enabled": options.enabled,
        "reason": options.reason,
        "step_cache_threshold": options.step_cache_threshold,
        "step_cache_lossy": options.step_cache_threshold is not None,
        "pipelines": loaded,
    }


# --- 2. applying it -----------------------------------------------------------------------


def _is_quantized(module: Any) -> bool:
    return bool(getattr(module, "is_quantized", False) or getattr(module, "hf_quantizer", None) is not None)


def _has_lora(transformer: Any) -> bool:
    return bool(getattr(transformer, "peft_config", None))


def _has_qk_norm(transformer: Any) -> bool:
    return any(getattr(module, "norm_q", None) is not None for module in transformer.modules())


def fuse_qkv(transformer: Any, report: FastPathReport) -> None:
    """``fuse_qkv_projections`` where it is safe (see the module docstring)."""
    if _is_quantized(transformer):
        report.note("QKV projections stay separate: a quantized transformer's weights cannot be concatenated.")
    elif _has_lora(transformer):
        report.note("QKV projections stay separate: LoRA adapters wrap the separate projections.")
    elif _has_qk_norm(transformer):
        # diffusers 0.42's FusedJointAttnProcessor2_0 never applies norm_q/norm_k: on SD3.5 (qk_norm
        # rms_norm) fusing changed the tiny model's latents by 1.1% (relative L2), not by rounding.
        report.note(
            "QKV projections stay separate: diffusers' fused SD3 attention skips SD3.5's QK RMS norms, "
            "which would change the images."
        )
    elif not hasattr(transformer, "fuse_qkv_projections"):
        report.note(f"QKV projections stay separate: {type(transformer).__name__} cannot fuse them.")
    else:
        transformer.fuse_qkv_projections()
        report.fused_qkv = True


def raise_recompile_limit() -> None:
    """Let the blocks' shared ``forward`` keep more graphs than Dynamo's default 8.

    Every block runs the same code object, and each variant is one cache entry: SD3's last block
    (``context_pre_only``) is one, each LoRA adapter set is another (peft's active adapter names are
    guarded). Past the limit Dynamo silently runs that code eager (seen on the tiny bench after two
    LoRA switches), losing the fast path; ``settings.FAST_PATH_RECOMPILE_LIMIT`` bounds it instead.
    """
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, settings.FAST_PATH_RECOMPILE_LIMIT)


def compile_blocks(transformer: Any, report: FastPathReport) -> None:
    """Regional compilation of the repeated MMDiT blocks (``dynamic=True``: one graph for every size)."""
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(dynamic=True)
        report.compiled = "compile_repeated_blocks"
        names = set(transformer._repeated_blocks)
        report.compiled_blocks = sum(type(module).__name__ in names for module in transformer.modules())
        return
    blocks = getattr(transformer, "transformer_blocks", None)
    if not blocks:
        report.note(f"Not compiled: {type(transformer).__name__} has no repeated blocks to compile.")
        return
    for block in blocks:
        block.compile(dynamic=True)
    report.compiled = "per-block torch.compile"
    report.compiled_blocks = len(blocks)


def load_cache_artifacts(folder: Path, report: FastPathReport) -> None:
    """Point Inductor's cache at ``folder`` and load the mega-cache saved by an earlier process."""
    folder.mkdir(parents=True, exist_ok=True)
    # Inductor reads this each time it looks for its cache; set before the first compile.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    report.cache_dir = str(folder)
    artifacts = folder / MEGA_CACHE_FILE
    if not artifacts.is_file():
        return
    try:
        torch.compiler.load_cache_artifacts(artifacts.read_bytes())
        report.loaded_cache_artifacts = True
    except Exception as error:  # a cache from another torch or GPU: compile afresh
        report.note(f"The saved compile cache could not be loaded ({type(error).__name__}); compiling afresh.")


def save_cache_artifacts(folder: Path) -> bool:
    """Save what this process compiled (torch's mega-cache) to ``folder``; False when there was nothing."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return False
    artifacts, _info = saved
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / (MEGA_CACHE_FILE + ".part")
    temporary.write_bytes(artifacts)
    temporary.replace(folder / MEGA_CACHE_FILE)  # a reader never sees half a file
    return True


def _name_cache_context(transformer: Any, args: tuple, kwargs: dict) -> None:
    """Before each MMDiT forward: the step cache's state for this kind of pass.

    The SD3 pipeline batches CFG's two halves into one forward; skip-layer guidance (Medium's
    preset) adds a second forward per step without some blocks. Each kind keeps its own cached
    residuals, so one never decides for the other.
    """
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(transformer, CacheContext("skip-layer-guidance" if kwargs.get("skip_layers") else "denoise"))


def enable_step_cache(transformer: Any, threshold: float, report: FastPathReport) -> None:
    """diffusers' First Block Cache on the MMDiT (lossy; see ``fast_call`` for its per-call state)."""
    try:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    except ImportError:
        report.note("No step cache: this diffusers has no First Block Cache.")
        return
    # SD3Transformer2DModel has no CacheMixin.enable_cache in diffusers 0.42: apply the hooks directly.
    # The hooks attach to the blocks themselves. SD3's last block (context_pre_only) returns no text
    # stream, which the cache's tail hook subtracts from (TypeError in diffusers 0.42), so the cache
    # spans the blocks before it and that last block runs every step.
    blocks = list(transformer.transformer_blocks)
    if getattr(blocks[-1], "context_pre_only", False):
        blocks = blocks[:-1]
    if len(blocks) < 2:
        report.note("No step cache: the transformer has too few blocks to cache between.")
        return
    span = torch.nn.Module()
    span.transformer_blocks = torch.nn.ModuleList(blocks)
    apply_first_block_cache(span, FirstBlockCacheConfig(threshold=threshold))
    transformer.register_forward_pre_hook(_name_cache_context, with_kwargs=True)
    report.step_cache_threshold = threshold
    report.note(f"Step cache on (First Block Cache, threshold {threshold:g}): lossy, images differ from uncached.")


def apply_fast_path(pipeline: Any, options: FastPathOptions | None, *, offload: str = "none") -> FastPathReport:
    """Put ``pipeline`` (a loaded StableDiffusion3Pipeline) on the fast path that ``options`` allow.

    Returns the report, also kept as ``pipeline.studio_fast_path``. Nothing happens when the options
    are None or disabled, except the optional step cache (which works eager too).
    """
    report = FastPathReport()
    pipeline.studio_fast_path = report
    if options is None:
        return report
    transformer = pipeline.transformer
    if options.step_cache_threshold is not None:
        enable_step_cache(transformer, options.step_cache_threshold, report)
    if not options.enabled:
        return report
    # 1. Fused QKV.
    fuse_qkv(transformer, report)
    # 2. The VAE.
    pipeline.vae.to(memory_format=torch.channels_last)
    report.vae_channels_last = True
    # 3-5. Compilation.
    if offload == "sequential":
        report.note("Not compiled: sequential offload moves every weight per call, which breaks every graph.")
        return report
    if on_zerogpu():
        aot_on_zerogpu(pipeline, report)
        return report
    load_cache_artifacts(compile_cache_dir(options), report)
    raise_recompile_limit()
    compile_blocks(transformer, report)
    return report


# --- 3. each call -------------------------------------------------------------------------


@contextlib.contextmanager
def fast_call(pipeline: Any) -> Iterator[None]:
    """Wrap one pipeline call: a fresh step-cache state, and the compile cache saved after the first draw."""
    report: FastPathReport | None = getattr(pipeline, "studio_fast_path", None)
    if report is None:
        yield
        return
    transformer = pipeline.transformer
    try:
        yield
    finally:
        if report.step_cache_threshold is not None:  # each pass names its context (_name_cache_context)
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()
    if report.cache_dir is not None and not report.saved_cache_artifacts and report.compiled != "no":
        report.saved_cache_artifacts = save_cache_artifacts(Path(report.cache_dir))


def recompile_count() -> int:
    """Graphs Dynamo has compiled in this process so far (a new size that recompiles adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def prepare_for_lora(pipeline: Any) -> None:
    """Before a LoRA attaches: unfuse QKV (peft wraps the separate projections); ValueError after AoT."""
    report: FastPathReport | None = getattr(pipeline, "studio_fast_path", None)
    if report is None:
        return
    if report.compiled.startswith("ahead-of-time"):
        raise ValueError(
            "This transformer was compiled ahead of time (ZeroGPU), which bakes its weights in, so a LoRA cannot "
            "attach; restart with --fast off to use LoRAs."
        )
    if report.fused_qkv:
        pipeline.transformer.unfuse_qkv_projections()
        report.fused_qkv = False
        report.note("QKV projections unfused so that LoRAs apply to them (one recompile).")


# --- 4. ZeroGPU ahead-of-time compilation ---------------------------------------------------


def export_dynamic_shapes(kwargs: dict) -> dict:
    """``torch.export`` dynamic shapes for a captured call's keyword arguments: every tensor dimension
    AUTO (export keeps the dimensions that never vary static), everything else None."""
    from torch.export import Dim

    def spec(value: Any) -> Any:
        return dict.fromkeys(range(value.dim()), Dim.AUTO) if isinstance(value, torch.Tensor) else None

    return {name: spec(value) for name, value in kwargs.items()}


def capture_and_compile(pipeline: Any, example_call: dict, spaces_module: Any) -> Any:
    """Capture the transformer's inputs from one ``pipeline(**example_call)``, export the transformer
    with sizes left dynamic and compile it ahead of time; returns ``spaces.aoti_compile``'s result.

    On ZeroGPU this is the part that runs inside ``spaces.GPU`` (in the GPU worker): the compiled
    model comes back to the main process, where ``aoti_apply`` puts it in place.
    """
    import inspect

    transformer = pipeline.transformer
    # 1. One call, stopped at the transformer: its arguments are what the compiled model will take.
    with spaces_module.aoti_capture(transformer) as captured:
        pipeline(**example_call)
    # 2. Every argument by name, every tensor dimension free to vary; export and compile.
    bound = inspect.signature(transformer.forward).bind_partial(*captured.args, **captured.kwargs)
    kwargs = dict(bound.arguments)
    exported = torch.export.export(transformer, args=(), kwargs=kwargs, dynamic_shapes=export_dynamic_shapes(kwargs))
    return spaces_module.aoti_compile(exported)


def compile_ahead_of_time(pipeline: Any, example_call: dict, spaces_module: Any = None, gpu=None) -> FastPathReport:
    """``capture_and_compile`` (inside ``gpu``, e.g. ``spaces.GPU(duration=...)``, when given), then
    ``spaces.aoti_apply`` of the result onto the transformer. ``spaces_module`` None: ``import spaces``."""
    if spaces_module is None:
        import spaces as spaces_module
    report: FastPathReport = getattr(pipeline, "studio_fast_path", None) or FastPathReport()
    pipeline.studio_fast_path = report
    compile_step = capture_and_compile if gpu is None else gpu(capture_and_compile)
    compiled = compile_step(pipeline, example_call, spaces_module)
    spaces_module.aoti_apply(compiled, pipeline.transformer)
    report.compiled = "ahead-of-time (ZeroGPU)"
    report.compiled_blocks = len(getattr(pipeline.transformer, "transformer_blocks", ()))
    return report


def aot_on_zerogpu(pipeline: Any, report: FastPathReport, spaces_module: Any = None) -> None:
    """``compile_ahead_of_time`` inside ``spaces.GPU`` with one 2-step draw at the default size; on any
    failure the transformer stays eager, with one sentence in the report."""
    if spaces_module is None:
        import spaces as spaces_module
    side = settings.PLAN_DEFAULT_SIDE
    example = {"prompt": "a photograph", "num_inference_steps": 2, "height": side, "width": side}
    try:
        gpu = spaces_module.GPU(duration=settings.AOT_COMPILE_SECONDS)
        compile_ahead_of_time(pipeline, example, spaces_module, gpu=gpu)
    except Exception as error:  # never lose the pipeline over a faster path
        report.compiled = "no"
        report.note(f"Ahead-of-time compilation failed ({type(error).__name__}: {error}); the transformer runs eager.")
