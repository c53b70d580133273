"""BLIP x SD3.5 Studio: the Blocks assembled from components/, the queue, launch (flags: pipelines/startup.py).

python app.py                 # the real models, downloaded from the Hub on first use
python app.py --tiny          # tiny offline models: no network, no GPU, seconds to start
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from components.attention import build_attention_tab
from components.batch import build_batch_tab
from components.caption import build_caption_tab
from components.common import visitor_id
from components.generate import build_generate_tab, selected_image
from components.image_to_image import build_image_to_image_tab
from components.match import build_match_tab
from components.roundtrip import build_roundtrip_tab
from components.scoreboard import build_scoreboard_tab
from components.system import build_system_tab
from components.train import build_train_tab
from pipelines import settings, workspace
from pipelines.startup import TITLE, parse_args, studio_from_args
from pipelines.studio import TINY_MODE_NOTICE, Studio

APP_DIR = Path(__file__).resolve().parent


def blocked_paths(studio: Studio) -> list[str]:
    """Folders Gradio must never serve, whatever an event returns: run logs, training datasets, the
    LoRA and adapter folders, and the app's git folder. (Session folders under the work root are
    served only as files the app itself returned: no event takes a path from the client.)
    """
    folders = [
        studio.lora_dir,
        studio.adapter_dir,
        studio.training_runs.runs_dir,
        workspace.datasets_root(),
        APP_DIR / ".git",
    ]
    return sorted({str(Path(folder).resolve()) for folder in folders})


def forget_visitor(request: gr.Request) -> None:
    """Delete the files a session kept (its generated images) when its page closes."""
    workspace.forget_session(visitor_id(request))


def build_app(studio: Studio) -> gr.Blocks:
    """Assemble one tab per module."""
    with gr.Blocks(title=TITLE, delete_cache=settings.DELETE_CACHE) as demo:
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
            with gr.Tab("Image to image", id="image_to_image"):
                image_to_image = build_image_to_image_tab(studio)
            with gr.Tab("Round trip", id="roundtrip"):
                build_roundtrip_tab(studio)
            if studio.training_enabled:
                with gr.Tab("Train", id="train"):
                    build_train_tab(studio)
            with gr.Tab("Scoreboard", id="scoreboard") as scoreboard_tab:
                build_scoreboard_tab(studio, scoreboard_tab)
            with gr.Tab("System", id="system") as system_tab:
                build_system_tab(studio, system_tab)
        # Close the loop: a generated image goes to BLIP. The file is the one the session selected,
        # looked up by index in the session's own list (server state): the page never sends a path.
        generate["send_to_caption"].click(
            lambda shown, index: (selected_image(shown, index), gr.Tabs(selected="caption")),
            inputs=[generate["shown_images"], generate["selected_index"]],
            outputs=[caption["image"], tabs],
            queue=False,
            api_name="send_to_caption",
            api_visibility="private",
        )
        # The same selected file (server state, by index) goes to img2img or to the inpainting editor.
        generate["send_to_img2img"].click(
            lambda shown, index: (
                selected_image(shown, index),
                gr.Tabs(selected="image_to_image"),
                gr.Tabs(selected="img2img"),
            ),
            inputs=[generate["shown_images"], generate["selected_index"]],
            outputs=[image_to_image["image"], tabs, image_to_image["modes"]],
            queue=False,
            api_name="send_to_img2img",
            api_visibility="private",
        )
        generate["send_to_inpaint"].click(
            lambda shown, index: (
                selected_image(shown, index),
                gr.Tabs(selected="image_to_image"),
                gr.Tabs(selected="inpaint"),
            ),
            inputs=[generate["shown_images"], generate["selected_index"]],
            outputs=[image_to_image["editor"], tabs, image_to_image["modes"]],
            queue=False,
            api_name="send_to_inpaint",
            api_visibility="private",
        )
        # A closed page's files go at once; sessions that never close are swept by age (see generate).
        demo.unload(forget_visitor)
    return demo


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    studio = studio_from_args(args)
    studio.training_runs.stop_on_exit()  # no trainer outlives the app (atexit, SIGTERM, SIGINT)
    if not args.no_preload:
        studio.manager.preload("blip-caption")  # BLIP is small; the first click should not wait for it
    demo = build_app(studio)
    demo.queue(max_size=settings.QUEUE_MAX_SIZE, default_concurrency_limit=settings.CONCURRENCY_LIMIT)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=settings.MAX_UPLOAD_BYTES,
        blocked_paths=blocked_paths(studio),
        theme=gr.themes.Soft(),
    )


if __name__ == "__main__":
    main()
