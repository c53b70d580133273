"""BLIP x SD3.5 Studio: flags, the Blocks assembled from components/, the queue, launch.

python app.py                 # the real models, downloaded from the Hub on first use
python app.py --tiny          # tiny offline models: no network, no GPU, seconds to start
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import gradio as gr

from components.attention import build_attention_tab
from components.batch import build_batch_tab
from components.caption import build_caption_tab
from components.generate import build_generate_tab
from components.match import build_match_tab
from components.roundtrip import build_roundtrip_tab
from components.scoreboard import build_scoreboard_tab
from components.system import build_system_tab
from components.train import build_train_tab
from pipelines import settings
from pipelines.blip_precision import PRECISION_CHOICES, with_blip_precision
from pipelines.catalog import CATALOG
from pipelines.manager import ModelManager
from pipelines.runtime import choose_runtime
from pipelines.studio import TINY_MODE_NOTICE, Studio

TITLE = "BLIP × SD3.5 Studio"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
        "nf4-no-t5, bf16-offload, nf4-t5nf4-offload, nf4-no-t5-offload, bf16-sequential",
    )
    parser.add_argument(
        "--precision",
        default=settings.DEFAULT_BLIP_PRECISION,
        metavar="VARIANT",
        help="BLIP on the CPU: auto (default: the fastest variant within "
        f"{settings.MAX_BLIP_LOGIT_DEVIATION:.0%} logit deviation that this CPU runs natively; fp32 under --tiny), "
        f"or one of {', '.join(PRECISION_CHOICES[1:])}; fp32 is exact. GPUs keep bf16/fp16.",
    )
    parser.add_argument("--outputs", type=Path, default=None, help="also save every generated PNG in this folder")
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


def build_studio(argv: list[str] | None = None) -> Studio:
    """The shared state for the tabs, from command-line flags."""
    args = parse_args(argv)
    return _studio_from_args(args)


def _studio_from_args(args: argparse.Namespace) -> Studio:
    try:
        runtime = with_blip_precision(choose_runtime(args.device), args.precision, tiny=args.tiny)
        tiny_root = None
        if args.tiny:
            import torch

            from pipelines.tiny import ensure_tiny_models

            # Tiny models are latency-bound: one intra-op thread is faster than several
            # and leaves the other cores to concurrent requests.
            torch.set_num_threads(1)
            tiny_root = ensure_tiny_models(args.tiny_dir)
        from pipelines.memory import get_mode, load_estimate_bytes, memory_budget_bytes

        if args.memory != "auto":
            get_mode("sd35-large", args.memory)  # refuse an unknown mode at start, with the list
        manager = ModelManager(
            runtime,
            tiny_root=tiny_root,
            source_overrides=model_overrides(args.model),
            # Tiny models need no budget; real ones unload the least recently used to fit.
            memory_budget_bytes=None if args.tiny else memory_budget_bytes(runtime),
            estimate_bytes=lambda key, variant: load_estimate_bytes(key, variant, runtime.dtype_name),
        )
    except ValueError as error:
        raise SystemExit(str(error)) from None
    return Studio(
        manager=manager,
        outputs_dir=args.outputs,
        memory_mode=args.memory,
        lora_dir=args.lora_dir,
        blip_adapter_dir=args.adapter_dir,
        training_enabled=not args.no_train,
        public=settings.public_mode(args.public),
        public_training=settings.public_training_allowed(),
    )


def build_app(studio: Studio) -> gr.Blocks:
    """Assemble one tab per module."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nBLIP captions images; Stable Diffusion 3.5 draws them. Every tab is also an API.")
        if studio.tiny:
            gr.Markdown(f"**{TINY_MODE_NOTICE}**")
        with gr.Tabs() as tabs:
            with gr.Tab("Caption", id="caption"):
                caption = build_caption_tab(studio)
            with gr.Tab("Batch", id="batch"):
                build_batch_tab(studio)
            with gr.Tab("Match", id="match"):
                build_match_tab(studio)
            with gr.Tab("Attention", id="attention"):
                build_attention_tab(studio)
            with gr.Tab("Generate", id="generate"):
                generate = build_generate_tab(studio, outputs_dir=studio.outputs_dir)
            with gr.Tab("Round trip", id="roundtrip"):
                build_roundtrip_tab(studio)
            if studio.training_enabled:
                with gr.Tab("Train", id="train"):
                    build_train_tab(studio)
            with gr.Tab("Scoreboard", id="scoreboard") as scoreboard_tab:
                build_scoreboard_tab(studio, scoreboard_tab)
            with gr.Tab("System", id="system") as system_tab:
                build_system_tab(studio, system_tab)
        # Close the loop: a generated image goes to BLIP.
        generate["send_to_caption"].click(
            lambda path: (path, gr.Tabs(selected="caption")),
            inputs=generate["selected_image"],
            outputs=[caption["image"], tabs],
            queue=False,
            api_visibility="private",
        )
    return demo


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    studio = _studio_from_args(args)
    if not args.no_preload:
        studio.manager.preload("blip-caption")  # BLIP is small; the first click should not wait for it
    demo = build_app(studio)
    demo.queue(max_size=settings.QUEUE_MAX_SIZE, default_concurrency_limit=settings.CONCURRENCY_LIMIT)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=settings.MAX_UPLOAD_BYTES,
        theme=gr.themes.Soft(),
    )


if __name__ == "__main__":
    main()
