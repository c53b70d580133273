"""From command-line flags to the Studio the tabs share: flag parsing, model overrides, offline mode.

Below components/ and app.py in the import graph (no gradio here), so a tab run alone
(``components.common.launch_alone``) builds its Studio the same way ``app.py`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from pipelines import settings
from pipelines.blip.precision import PRECISION_CHOICES, with_blip_precision
from pipelines.catalog import CATALOG
from pipelines.hub_access import HubProbe, set_hub_timeouts
from pipelines.manager import ModelManager
from pipelines.runtime import choose_runtime
from pipelines.sd3.fast import choose_fast_path
from pipelines.studio import Studio

APP_ROOT = Path(__file__).resolve().parent.parent  # the folder app.py is in

TITLE = "BLIP × SD3.5 Studio"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The Studio's command-line flags (``python app.py --help``)."""
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--tiny", action="store_true", help="serve tiny offline models (no network, no GPU)")
    parser.add_argument("--tiny-dir", type=Path, default=None, help="where tiny models are built/cached")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--memory",
        default="auto",
        metavar="MODE",
        help="SD3.5 memory mode: auto (the fastest that fits this GPU), bf16, nf4, nf4-t5nf4, int8, bf16-no-t5, "
        "nf4-no-t5, bf16-offload, nf4-t5nf4-offload, nf4-no-t5-offload, bf16-sequential, fp8 (lossy; compute "
        "capability 8.9+ and torchao)",
    )
    parser.add_argument(
        "--precision",
        default=settings.DEFAULT_BLIP_PRECISION,
        metavar="VARIANT",
        help="BLIP on the CPU: auto (default: the fastest variant within "
        f"{settings.MAX_BLIP_LOGIT_DEVIATION * 100:.0f}%% logit deviation that this CPU runs natively; fp32 under --tiny), "
        f"or one of {', '.join(PRECISION_CHOICES[1:])}; fp32 is exact. GPUs keep bf16/fp16.",
    )
    parser.add_argument(
        "--fast",
        default=settings.DEFAULT_FAST_PATH,
        choices=("auto", "on", "off"),
        help="SD3.5 fast path: regional torch.compile of the MMDiT blocks, fused QKV, channels-last VAE, a "
        "compile cache kept across restarts. auto (default): on for CUDA GPUs that support it; off: plain "
        "diffusers; on: forced (the CPU too)",
    )
    parser.add_argument("--no-fast", dest="fast", action="store_const", const="off", help="the same as --fast off")
    parser.add_argument(
        "--step-cache",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="SD3.5 step cache (First Block Cache), LOSSY, off by default: skip a step's remaining MMDiT "
        f"blocks when its first block changed less than THRESHOLD (e.g. {settings.SUGGESTED_STEP_CACHE_THRESHOLD:g}; "
        "0 = off). Images differ from uncached ones",
    )
    parser.add_argument(
        "--outputs",
        type=Path,
        default=None,
        help="where every SD3.5 image is saved with its settings, a folder per mode and day as in A1111, and "
        f"indexed for the History (default: {settings.DEFAULT_OUTPUTS_DIR}/ beside the app, "
        f"{settings.DEFAULT_TINY_OUTPUTS_DIR}/ with --tiny; a public instance saves nothing unless given)",
    )
    parser.add_argument("--no-outputs", action="store_true", help="save no image to disk beyond the page's own copy")
    parser.add_argument(
        "--no-preload",
        action="store_true",
        help="do not load BLIP in the background at start (it then loads on the first request)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=SOURCE",
        help=f"load KEY from a local folder or another repo id; keys: {', '.join(CATALOG)}. "
        "Also STUDIO_MODEL_<KEY> (e.g. STUDIO_MODEL_BLIP_CAPTION=/models/blip).",
    )
    parser.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        help=f"SD3.5 LoRA files are read from (and trained into) this folder (default: {settings.DEFAULT_LORA_DIR}/; "
        "the tiny LoRAs under --tiny)",
    )
    parser.add_argument(
        "--adapter-dir",
        type=Path,
        default=None,
        help="BLIP LoRA adapters are read from (and trained into) this folder (default: adapters/, "
        "or $STUDIO_BLIP_ADAPTER_DIR; the tiny adapters under --tiny)",
    )
    parser.add_argument(
        "--no-train", action="store_true", help="leave out the Train tab (e.g. on a public instance with one GPU)"
    )
    parser.add_argument(
        "--public",
        action="store_true",
        help="serve anonymous visitors: unload, evaluation runs, memory-mode changes and training become the "
        "operator's (on by default when SPACE_ID is set; STUDIO_PUBLIC=0 turns it off)",
    )
    return parser.parse_args(argv)


def model_overrides(pairs: list[str], environ: dict[str, str] = os.environ) -> dict[str, str]:
    """KEY=SOURCE pairs from the environment, then the command line (which wins)."""
    overrides = {}
    for key in CATALOG:
        value = environ.get("STUDIO_MODEL_" + key.upper().replace("-", "_"))
        if value:
            overrides[key] = value
    for pair in pairs:
        key, separator, source = pair.partition("=")
        if not separator or not source:
            raise SystemExit(f"--model {pair!r}: write KEY=SOURCE, e.g. --model blip-caption=/models/blip.")
        overrides[key.strip()] = source.strip()
    return overrides


def enter_offline_mode(environ: dict[str, str] = os.environ) -> None:
    """HF_HUB_OFFLINE=1 from here on: for this process's Hub calls and for the trainers it starts.

    huggingface_hub reads the variable once, when it is first imported (gradio imports it
    before any flag is parsed), so its constant is set as well.
    """
    from huggingface_hub import constants

    environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message contains any of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# (logger, message fragment, why it says nothing the user can act on). Each filter sits on the
# logger that emits the line, so every other message of that logger still shows. The loggers are
# created here before their libraries import them, so the filters are in place for the first line.
KNOWN_NOISE = (
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        # On a CPU with AVX512-BF16, bitsandbytes tries to fetch an optional 4-bit kernel through the
        # `kernels` package (from the Hub) when it is imported. NF4 runs only on CUDA here (memory modes
        # refuse it on a CPU), so the kernel would never run; the Studio does not install `kernels`.
    ),
    (
        "transformers.utils.import_utils",
        "requires torchvision (not installed)",
        # transformers 5 names its torchvision image processors first and falls back to the PIL ones
        # (BlipImageProcessorPil, CLIPImageProcessorPil, ...) with this warning, once per processor.
        # The PIL processors are the ones this install uses on purpose: no torchvision build imports
        # beside the pinned torch 2.13.0 CPU wheel, so it is not installed.
    ),
)


def silence_known_noise() -> None:
    """Keep the start-up log to what matters: drop the KNOWN_NOISE lines at their source loggers."""
    for logger_name, fragment in KNOWN_NOISE:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(item, _DropMessages) and fragment in item.fragments for item in logger.filters):
            logger.addFilter(_DropMessages(fragment))


def build_studio(argv: list[str] | None = None) -> Studio:
    """The shared state for the tabs, from command-line flags."""
    args = parse_args(argv)
    return studio_from_args(args)


def outputs_dir(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Path | None:
    """Where the saved images go: ``--outputs``, else (locally) ``outputs/`` beside the app, ``outputs-tiny/``
    with ``--tiny`` so tiny noise never mixes with real work; None with ``--no-outputs`` or on a public
    instance that names no folder (its visitors' images are theirs, not the operator's)."""
    if args.no_outputs:
        return None
    if args.outputs is not None:
        return args.outputs
    if settings.public_mode(args.public, environ):
        return None
    return APP_ROOT / (settings.DEFAULT_TINY_OUTPUTS_DIR if args.tiny else settings.DEFAULT_OUTPUTS_DIR)


def studio_from_args(args: argparse.Namespace) -> Studio:
    """The Studio for parsed flags; SystemExit with one sentence for a bad flag (unknown mode, device)."""
    silence_known_noise()
    try:
        runtime = with_blip_precision(choose_runtime(args.device), args.precision, tiny=args.tiny)
        fast_path = choose_fast_path(
            getattr(args, "fast", settings.DEFAULT_FAST_PATH),
            runtime.device,
            step_cache_threshold=getattr(args, "step_cache", None),
        )
        runtime = dataclasses.replace(runtime, fast_path=fast_path)
        tiny_root = None
        if args.tiny:
            import torch

            from pipelines.tiny import ensure_tiny_models

            enter_offline_mode()  # tiny mode never reaches the Hub, whatever a visitor names

            # Tiny models are latency-bound: one intra-op thread is faster than several
            # and leaves the other cores to concurrent requests.
            torch.set_num_threads(1)
            tiny_root = ensure_tiny_models(args.tiny_dir)
        else:
            set_hub_timeouts()
        from pipelines.memory.gpu import memory_budget_bytes
        from pipelines.memory.modes import get_mode
        from pipelines.memory.planner import load_estimate_bytes

        if args.memory != "auto":
            get_mode("sd35-large", args.memory)  # refuse an unknown mode at start, with the list
        manager = ModelManager(
            runtime,
            tiny_root=tiny_root,
            source_overrides=model_overrides(args.model),
            # Tiny models need no budget; real ones unload the least recently used to fit.
            memory_budget_bytes=None if args.tiny else memory_budget_bytes(runtime),
            estimate_bytes=lambda key, variant: load_estimate_bytes(key, variant, runtime.dtype_name),
            # Real models come from the Hub: ask once, briefly, whether it answers before each load.
            hub_probe=None if args.tiny else HubProbe(),
        )
    except ValueError as error:
        raise SystemExit(str(error)) from None
    return Studio(
        manager=manager,
        outputs_dir=outputs_dir(args),
        memory_mode=args.memory,
        lora_dir=args.lora_dir,
        blip_adapter_dir=args.adapter_dir,
        training_enabled=not args.no_train,
        public=settings.public_mode(args.public),
        public_training=settings.public_training_allowed(),
    )
