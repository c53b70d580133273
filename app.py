"""BLIP x SD3.5 Studio: the Blocks assembled from components/, the queue, launch (flags: pipelines/startup.py).

python app.py                 # the real models, downloaded from the Hub on first use
python app.py --tiny          # tiny offline models: no network, no GPU, seconds to start
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import gradio as gr

from components.attention import build_attention_tab
from components.batch import build_batch_tab
from components.caption import build_caption_tab, caption_as_prompt
from components.common import user_errors, visitor_id
from components.generate import build_generate_tab, selected_image
from components.image_to_image import build_image_to_image_tab, sent_image
from components.match import build_match_tab
from components.png_info import GENERATE_FIELDS, build_png_info_tab, pending_form_values, send_to_generate
from components.queue_limits import install_client_limits
from components.roundtrip import build_roundtrip_tab
from components.scoreboard import build_scoreboard_tab
from components.system import build_system_tab
from components.train import build_train_tab, send_results_to_generate
from pipelines import settings, workspace
from pipelines.images import load_image
from pipelines.startup import TITLE, parse_args, studio_from_args
from pipelines.studio import TINY_MODE_NOTICE, Studio

APP_DIR = Path(__file__).resolve().parent
NARROW_SCREEN_PX = 768  # below this width the page is laid out for a phone

STUDIO_CSS = f"""
/* Generate: prompt and settings on the left, the result on the right, as in A1111; on a phone the
   result comes right under the Generate button, and the settings follow it. */
#generate-layout {{
    display: grid;
    grid-template-columns: minmax(0, 1fr) minmax(0, 1fr);
    grid-template-rows: auto 1fr;
    grid-template-areas: "controls result" "settings result";
    align-items: start;
}}
#generate-controls {{ grid-area: controls; }}
#generate-result {{ grid-area: result; }}
#generate-settings {{ grid-area: settings; }}
.shortcut-hint {{ font-size: var(--text-sm); opacity: 0.75; }}
#generate-error p {{ color: var(--error-text-color); }}
@media (max-width: {NARROW_SCREEN_PX}px) {{
    #generate-layout {{
        grid-template-columns: minmax(0, 1fr);
        grid-template-rows: auto;
        grid-template-areas: "controls" "result" "settings";
    }}
    .shortcut-hint {{ display: none; }}  /* a phone has no Ctrl key */
    /* Room for more tabs in the bar before the rest go under its "..." menu. */
    .tab-wrapper button[role="tab"] {{ padding-left: var(--size-2); padding-right: var(--size-2); }}
}}
"""

# Ctrl+Enter (Cmd+Enter on a Mac) clicks the visible tab's button marked "ctrl-enter-runs", as in A1111;
# on a narrow screen the Generate settings start closed, so the result is close to the button.
STUDIO_JS = f"""
() => {{
    document.addEventListener("keydown", (event) => {{
        if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey) || event.isComposing) return;
        const button = [...document.querySelectorAll("button.ctrl-enter-runs")].find(
            (candidate) => candidate.offsetParent !== null && !candidate.disabled
        );
        if (!button) return;
        event.preventDefault();
        event.stopPropagation();
        button.click();
    }}, true);
    if (window.matchMedia("(max-width: {NARROW_SCREEN_PX}px)").matches) {{
        // The tab mounts when first opened, and its accordion answers clicks a moment later: once it
        // appears, click it until it is closed (a few tries at most), then leave it to the user.
        const watcher = new MutationObserver(() => {{
            const toggle = document.querySelector("#generate-settings-accordion > button.label-wrap");
            if (!toggle) return;
            watcher.disconnect();
            let tries = 0;
            const close = () => {{
                if (!toggle.classList.contains("open") || tries++ >= 20) return;
                toggle.click();
                setTimeout(close, 100);
            }};
            setTimeout(close, 0);
        }});
        watcher.observe(document.body, {{ childList: true, subtree: true }});
    }}
}}
"""

# "Caption the selected image" then runs the caption: the Caption tab's own button is clicked, so the
# caption uses that tab's settings and shows its progress and errors there. The tab may still be
# mounting when this runs, hence the short wait for the button.
CLICK_CAPTION_JS = """
async (image) => {
    if (!image) return;  // nothing generated yet: nothing to caption
    for (let attempt = 0; attempt < 50; attempt++) {
        const button = [...document.querySelectorAll("#caption-tab button")].find(
            (candidate) => candidate.textContent.trim() === "Caption" && candidate.offsetParent !== null
        );
        if (button) { button.click(); return; }
        await new Promise((resolve) => setTimeout(resolve, 100));
    }
}
"""


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


def send_selected_image(shown, index, current_model, *, form, target, note, tabs, modes, mode, tiny) -> dict:
    """The selected generated image (by index in the session's own list) into img2img or inpaint, with its
    settings in ``form``'s fields and a ``note`` of what they could not carry; the tab opens on it."""
    path = selected_image(shown, index)
    values, sentence = sent_image(path, current_model, tiny)
    return {
        target: path,
        **{form[name]: value for name, value in values.items()},
        note: sentence,
        tabs: gr.Tabs(selected="image_to_image"),
        modes: gr.Tabs(selected=mode),
    }


def build_app(studio: Studio) -> gr.Blocks:
    """Assemble one tab per module."""
    with gr.Blocks(title=TITLE, delete_cache=settings.DELETE_CACHE) as demo:
        gr.Markdown(f"# {TITLE}\nBLIP captions images; Stable Diffusion 3.5 draws them. Every tab is also an API.")
        if studio.tiny:
            gr.Markdown(f"**{TINY_MODE_NOTICE}**")
        with gr.Tabs() as tabs:
            # Caption and Generate first: on a phone the tab bar shows only the first few.
            with gr.Tab("Caption", id="caption", elem_id="caption-tab"):
                caption = build_caption_tab(studio)
            with gr.Tab("Generate", id="generate"):
                generate = build_generate_tab(studio, outputs_dir=studio.outputs_dir)
            with gr.Tab("Image to image", id="image_to_image"):
                image_to_image = build_image_to_image_tab(studio)
            with gr.Tab("Batch", id="batch"):
                build_batch_tab(studio)
            with gr.Tab("Match", id="match"):
                build_match_tab(studio)
            with gr.Tab("Attention", id="attention"):
                build_attention_tab(studio)
            with gr.Tab("PNG Info", id="png_info"):
                png_info = build_png_info_tab(studio)
            with gr.Tab("Round trip", id="roundtrip"):
                build_roundtrip_tab(studio)
            if studio.training_enabled:
                with gr.Tab("Train", id="train"):
                    train = build_train_tab(studio)
            with gr.Tab("Scoreboard", id="scoreboard") as scoreboard_tab:
                build_scoreboard_tab(studio, scoreboard_tab)
            with gr.Tab("System", id="system") as system_tab:
                build_system_tab(studio, system_tab)
        # Close the loop: a generated image goes to BLIP, which captions it. The file is the one the session
        # selected (gallery or history), looked up by index in the session's own list (server state): the page
        # never sends a path.
        generate["send_to_caption"].click(
            lambda shown, index: (selected_image(shown, index), gr.Tabs(selected="caption")),
            inputs=[generate["shown_images"], generate["selected_index"]],
            outputs=[caption["image"], tabs],
            queue=False,
            api_name="send_to_caption",
            api_visibility="private",
        ).success(None, inputs=caption["image"], js=CLICK_CAPTION_JS, queue=False, api_visibility="private")
        # The best caption becomes a prompt (A1111's Interrogate): in Generate, or in img2img beside its image.
        caption["use_in_generate"].click(
            user_errors(lambda details: (caption_as_prompt(details), gr.Tabs(selected="generate"))),
            inputs=caption["details"],
            outputs=[generate["prompt"], tabs],
            queue=False,
            api_visibility="private",
        )
        img2img_form = image_to_image["img2img_form"]
        caption["use_in_img2img"].click(
            user_errors(
                lambda details, image: (
                    caption_as_prompt(details),
                    None if image is None else load_image(image),  # decoded anew: never the client's file back
                    gr.Tabs(selected="image_to_image"),
                    gr.Tabs(selected="img2img"),
                )
            ),
            inputs=[caption["details"], caption["image"]],
            outputs=[img2img_form["prompt"], image_to_image["image"], tabs, image_to_image["modes"]],
            queue=False,
            api_visibility="private",
        )
        # An image's settings go to the Generate form, values the model cannot take clamped with a note.
        # A new model first loads its preset into the form, so then the values land after the preset.
        form = [*(generate[name] for name in GENERATE_FIELDS), png_info["form_pending"]]
        png_info["send_to_generate"].click(
            user_errors(
                lambda info, model: (*send_to_generate(info, model, studio.tiny), gr.Tabs(selected="generate"))
            ),
            inputs=[png_info["settings"], generate["model"]],
            outputs=[generate["model"], png_info["form_pending"], png_info["sent_note"], tabs],
            queue=False,
            api_name="png_info_send_to_generate",
            api_visibility="private",
        ).success(
            lambda pending: pending_form_values(pending, after_preset=False),
            inputs=png_info["form_pending"],
            outputs=form,
            queue=False,
            api_visibility="private",
        )
        generate["preset_loaded"].then(
            lambda pending: pending_form_values(pending, after_preset=True),
            inputs=png_info["form_pending"],
            outputs=form,
            queue=False,
            api_visibility="private",
        )
        # Train's "Load the result" switches Generate to the run's model with its LoRA active.
        if studio.training_enabled:
            send_results_to_generate(train, generate["lora_panel"], tabs)
        # The same selected file (server state, by index) goes to img2img or to the inpainting editor, with
        # the settings its PNG carries in the fields that mode has, and a note of what it could not carry.
        for mode, target in (("img2img", image_to_image["image"]), ("inpaint", image_to_image["editor"])):
            form = image_to_image[f"{mode}_form"]
            generate[f"send_to_{mode}"].click(
                functools.partial(
                    send_selected_image, form=form, target=target, note=image_to_image[f"{mode}_note"],
                    tabs=tabs, modes=image_to_image["modes"], mode=mode, tiny=studio.tiny,
                ),
                inputs=[generate["shown_images"], generate["selected_index"], form["model"]],
                outputs=[target, *form.values(), image_to_image[f"{mode}_note"], tabs, image_to_image["modes"]],
                queue=False,
                api_name=f"send_to_{mode}",
                api_visibility="private",
            )  # fmt: skip
        # The saved history shows as the page opens (and after a reload): the newest page.
        show_history, history_inputs, history_outputs = generate["show_history"]
        demo.load(show_history, inputs=history_inputs, outputs=history_outputs, api_visibility="private")
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
    install_client_limits(demo, settings.MAX_PENDING_PER_CLIENT)  # one client cannot fill the queue
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=settings.MAX_UPLOAD_BYTES,
        blocked_paths=blocked_paths(studio),
        theme=gr.themes.Soft(),
        css=STUDIO_CSS,
        js=STUDIO_JS,
    )


if __name__ == "__main__":
    main()
