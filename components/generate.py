"""Generate tab: SD3.5 Large, Large Turbo and Medium text-to-image (API ``/generate``)."""

from __future__ import annotations

import contextvars
import queue
import threading
from pathlib import Path

import gradio as gr

from components.common import (
    StopRequests,
    ValidatedNumber,
    ValidatedSlider,
    generation_request,
    launch_alone,
    named_endpoint,
    on_gpu,
    parameter,
    t5_tokens_slider,
    visitor_id,
)
from components.lora_panel import build_lora_panel
from pipelines import settings, workspace
from pipelines.catalog import CATALOG
from pipelines.memory import SD3_MODES
from pipelines.sd3 import ASPECT_RATIOS, MODEL_CHOICES, SIZE_MULTIPLE, model_key, size_for_aspect, slider_range
from pipelines.studio import Studio

EXAMPLE_PROMPTS = [
    # text rendering
    ["a capybara holding a sign that reads Hello World", "large"],
    ['a neon shop sign above a rainy street that says "OPEN 24 HOURS", night, reflections', "large"],
    # prompt adherence: several objects, colours and positions
    ["a red cube on top of a blue sphere, a green pyramid to the left, on a white table, studio light", "medium"],
    [
        "three yellow rubber ducks in a row on a bathtub edge, the middle one wearing a tiny black top hat",
        "large-turbo",
    ],
    ["an astronaut riding a horse on the moon, earth rising behind them, photograph", "large"],
]


def _slider_ranges(studio: Studio, key: str) -> tuple[int, int]:
    return slider_range(CATALOG[key], studio.tiny)


def generation_summary(details: dict) -> str:
    """The Generate tab's one-line summary of a details dict (prose for people; clients read the dict)."""
    seeds = details["seeds"]
    summary = (
        f"{len(details['files']) or details['num_images']} image(s), {details['size']}, "
        f"{details['steps_done']}/{details['steps']} steps, guidance {details['guidance']:g}, seed {seeds[0]}"
        + (f"–{seeds[-1]}" if len(seeds) > 1 else "")
        + f", {details['timings']['generate_seconds']:.1f} s"
    )
    summary += f" · memory mode {details['memory_mode']['mode']} ({details['memory_mode']['reason']})"
    if details["loras"]:
        fused = " (fused)" if details["lora_fused"] else ""
        summary += " · LoRA " + ", ".join(f"{item['name']}:{item['weight']:g}" for item in details["loras"]) + fused
    if details["trigger_words_added"]:
        summary += f" · trigger words added: {', '.join(details['trigger_words_added'])}"
    if details["stopped"]:
        summary += f" · stopped at step {details['steps_done']}"
    if details["tiny"]:
        summary += " · tiny random model: the images are noise by design"
    return summary


def estimated_gpu_seconds(prompt, model, negative_prompt, seed, steps, guidance, width, height, *rest, **named) -> int:
    """A generous ZeroGPU duration for one /generate call (same arguments as the event function).

    ~0.35 s per megapixel-step on an H100-class GPU for Medium and Turbo, 2.5x that for Large,
    plus 30 s for loading; capped at 300 s.
    """
    num_images = named.get("num_images", rest[2] if len(rest) > 2 else 1)
    try:
        megapixels = float(width or 1024) * float(height or 1024) / 2**20
        work = float(steps or 40) * megapixels * float(num_images or 1)
    except (TypeError, ValueError):
        return 120
    return int(min(300, 30 + 0.35 * work * (2.5 if model == "large" else 1.0)))


def selection_index(index, shown: list[str] | None) -> int | None:
    """A gallery position the page sent, if it names one of the images shown; else None.

    The page sends an index and a value; only the index is kept, and only if it is a whole
    number within this session's own list of images, so no path from the client is ever used.
    """
    if isinstance(index, list | tuple) and len(index) == 1:
        index = index[0]
    if isinstance(index, bool) or not isinstance(index, int):
        return None
    return index if 0 <= index < len(shown or []) else None


def selected_image(shown: list[str] | None, index: int | None) -> str | None:
    """The file the session selected (the first image if none was), chosen from the server's own list."""
    shown = [path for path in (shown or []) if Path(path).is_file()]
    if not shown:
        return None
    return shown[index] if isinstance(index, int) and 0 <= index < len(shown) else shown[0]


def session_history(new: list[str], history: list[str] | None, folder: Path) -> list[str]:
    """The session's history, newest first, capped; files that drop off it (or went missing) are deleted.

    Only files inside the session's own ``folder`` are kept or deleted: the history is server state,
    but it is checked anyway.
    """
    folder = folder.resolve()
    own = [path for path in [*new, *(history or [])] if Path(path).resolve().parent == folder]
    kept = [path for path in own if Path(path).is_file()][: settings.MAX_HISTORY_IMAGES]
    for path in set(own) - set(kept):
        Path(path).unlink(missing_ok=True)
    return kept


def build_generate_tab(studio: Studio, outputs_dir: Path | None = None) -> dict:
    """Build the Generate tab inside the current Blocks; returns its main components."""
    stop_requests = StopRequests()
    first_key = model_key("large")
    first_preset = CATALOG[first_key].image_preset
    default_width, default_height = size_for_aspect("1:1", CATALOG[first_key], studio.tiny)

    def generate_images(
        prompt, model, negative_prompt, seed, steps, guidance, width, height, max_sequence_length,
        skip_layer_guidance, num_images, preview_every, memory_mode, lora, lora_scale, lora_fuse, history, progress,
        request,
    ):  # fmt: skip
        """Yields step previews while the pipeline runs, then the PNGs, their summary and a details dict.

        ``lora`` names the LoRAs to mix ("name:0.8, other:0.5"; empty = none): a name not loaded yet
        loads from the LoRA folder or the registry, and ``<lora:name:0.8>`` tags in the prompt work too.
        ``lora_scale`` multiplies the weights of ``lora``; ``lora_fuse`` merges them into the weights first.
        """
        job = generation_request(
            prompt, model, negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance, width=width,
            height=height, max_sequence_length=max_sequence_length, skip_layer_guidance=skip_layer_guidance,
            num_images=num_images, memory_mode=memory_mode, lora=lora, lora_scale=lora_scale, lora_fuse=lora_fuse,
            preview_every=0 if preview_every is None else preview_every,
        )  # fmt: skip
        visitor = visitor_id(request)  # another visitor's uploaded LoRA is "not loaded" for this one
        stop = stop_requests.start(request)

        # The service runs in a worker thread (in this request's context, so its notes reach the page);
        # this generator relays its steps to the progress bar and its previews to the page.
        events: queue.Queue = queue.Queue()

        def run():
            try:
                outcome = studio.generation.run(
                    job,
                    visitor=visitor,
                    notify=gr.Info,
                    on_step=lambda step, total, previews: events.put(("step", step, total, previews)),
                    should_stop=stop.is_set,
                )
                events.put(("done", outcome))
            except BaseException as error:  # re-raised below, in the request's thread
                events.put(("error", error))

        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(run,), name="sd3-generate", daemon=True).start()
        while True:
            event = events.get()
            if event[0] == "error":
                raise event[1]
            if event[0] == "done":
                outcome = event[1]
                break
            _, step, total, previews = event
            progress((step, total), desc="denoising", unit="steps")
            if previews:
                yield (gr.skip(),) * 7 + (gr.update(value=previews[0], visible=True), gr.skip())

        details = outcome.details
        for warning in details["warnings"]:
            gr.Warning(warning)
        paths = [str(path) for path in outcome.paths]
        history = session_history(paths, history, workspace.session_folder(visitor))
        hidden = gr.update(value=None, visible=False)
        yield paths, details["seed"], generation_summary(details), history, history, paths, 0, hidden, details

    generate_fn = on_gpu(estimated_gpu_seconds)(generate_images)

    def stop_generation(request: gr.Request):
        stop_requests.stop(request)

    def apply_preset(model):
        key = model_key(model)
        preset = CATALOG[key].image_preset
        width, height = size_for_aspect("1:1", CATALOG[key], studio.tiny)
        low, high = _slider_ranges(studio, key)
        note = ""
        if preset.guidance <= 1.0:
            note = "Large Turbo runs 4 steps without classifier-free guidance: the negative prompt does not apply."
        return (
            gr.update(value="", placeholder=f"preset: {preset.steps}"),
            gr.update(value="", placeholder=f"preset: {preset.guidance:g}"),
            gr.update(value=width, minimum=low, maximum=high),
            gr.update(value=height, minimum=low, maximum=high),
            gr.update(
                value=bool(preset.skip_layer_guidance_layers), interactive=bool(preset.skip_layer_guidance_layers)
            ),
            gr.update(interactive=preset.guidance > 1.0),
            gr.update(value="1:1"),
            note,
        )

    def apply_aspect(ratio, model):
        width, height = size_for_aspect(ratio, CATALOG[model_key(model)], studio.tiny)
        return width, height

    gr.Markdown(
        "Text to image with Stable Diffusion 3.5. Switching the model loads its preset. "
        "Images are PNGs that carry their settings (AUTOMATIC1111 `parameters` chunk + a JSON chunk)."
    )
    if not studio.tiny:
        gr.Markdown(
            "The SD3.5 repos are gated: accept the licence on the model page and start the app with `HF_TOKEN`. "
            "Large needs about 28 GB of GPU memory in bf16; on the CPU an image takes many minutes."
        )
    low, high = _slider_ranges(studio, first_key)
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", lines=3, max_length=settings.MAX_PROMPT_CHARS, value="")
            negative_prompt = gr.Textbox(
                label="Negative prompt", lines=1, value="", max_length=settings.MAX_PROMPT_CHARS
            )
            cfg_note = gr.Markdown()
            model = gr.Radio(
                choices=[
                    (CATALOG[key].title.removeprefix("Stable Diffusion "), name) for name, key in MODEL_CHOICES.items()
                ],
                value="large",
                label="Model",
            )
            with gr.Row():
                run = gr.Button("Generate", variant="primary", scale=3)
                stop = gr.Button("Stop", variant="stop", scale=1)
            with gr.Row():
                seed = ValidatedNumber(
                    value=-1, precision=0, label="Seed (-1 = random)", minimum=-1, maximum=settings.MAX_SEED
                )
                reuse_seed = gr.Button("♻ Reuse last seed", size="sm")
            with gr.Accordion("Settings", open=True):
                with gr.Row():
                    # Empty means "the model's preset", in the UI and in the API alike.
                    # Empty means "the model's preset", in the UI and in the API alike. Text boxes,
                    # because an empty number box sends 0, which is a real guidance value.
                    steps = gr.Textbox(
                        value="", label="Steps (empty = preset)", placeholder=f"preset: {first_preset.steps}"
                    )
                    guidance = gr.Textbox(
                        value="",
                        label="Guidance / CFG (empty = preset)",
                        placeholder=f"preset: {first_preset.guidance:g}",
                    )
                aspect = gr.Radio(choices=list(ASPECT_RATIOS), value="1:1", label="Aspect ratio")
                with gr.Row():
                    width = ValidatedSlider(low, high, value=default_width, step=SIZE_MULTIPLE, label="Width")
                    height = ValidatedSlider(low, high, value=default_height, step=SIZE_MULTIPLE, label="Height")
                with gr.Row():
                    num_images = ValidatedSlider(1, settings.MAX_IMAGES_PER_REQUEST, value=1, step=1, label="Images")
                    max_sequence_length = t5_tokens_slider()
                with gr.Row():
                    skip_layer_guidance = gr.Checkbox(
                        value=False, interactive=False, label="Skip-layer guidance (Medium: layers 7, 8, 9)"
                    )
                    memory_mode = gr.Dropdown(
                        choices=[("auto: the fastest that fits", "auto")]
                        + [(f"{mode.key}: {mode.title}", mode.key) for mode in SD3_MODES],
                        value=studio.memory_mode,
                        label="Memory mode (quantization / offload)",
                        info="bitsandbytes and offload need a CUDA GPU; dropping T5 weakens long prompts",
                        visible=not studio.public,  # a public instance runs the operator's --memory
                    )
                    preview_every = ValidatedSlider(
                        0,
                        settings.MAX_PREVIEW_EVERY,
                        value=settings.DEFAULT_PREVIEW_EVERY,
                        step=1,
                        label="Preview every N steps (0 = off)",
                    )
            lora_panel = build_lora_panel(studio, model, memory_mode)
        with gr.Column(scale=1):
            preview = gr.Image(label="Preview", format="png", interactive=False, height=256, visible=False)
            gallery = gr.Gallery(label="Images", format="png", columns=2, height=520, preview=True)
            summary = gr.Markdown()
            with gr.Accordion("Details (JSON)", open=False):
                details = gr.JSON(label="Details")
            used_seed = ValidatedNumber(visible=False, precision=0)
            with gr.Row():
                send_to_caption = gr.Button("Caption the selected image with BLIP →")
                send_to_img2img = gr.Button("Send to img2img →")
                send_to_inpaint = gr.Button("Send to inpaint →")
            # Server-side only: the files the gallery shows now, and which one is selected (an index).
            shown_images = gr.State([])
            selected_index = gr.State(None)
            with gr.Accordion("This session's images", open=False):
                history_gallery = gr.Gallery(label="History", format="png", columns=4, height=300)
            history = gr.State([])
    gr.Examples(examples=EXAMPLE_PROMPTS, inputs=[prompt, model], label="Example prompts")

    parameters = [
        parameter("prompt"),
        parameter("model", "large"),
        parameter("negative_prompt", ""),
        parameter("seed", -1),
        parameter("steps", ""),
        parameter("guidance", ""),
        parameter("width", default_width),
        parameter("height", default_height),
        parameter("max_sequence_length", settings.DEFAULT_T5_TOKENS),
        parameter("skip_layer_guidance", False),
        parameter("num_images", 1),
        parameter("preview_every", settings.DEFAULT_PREVIEW_EVERY),
        parameter("memory_mode", studio.memory_mode),
        parameter("lora", ""),
        parameter("lora_scale", 1.0),
        parameter("lora_fuse", False),
        parameter("history", None),
        parameter("progress", gr.Progress()),
        parameter("request", None, gr.Request),
    ]
    gr.on(
        triggers=[run.click, prompt.submit],
        fn=named_endpoint(generate_fn, parameters),
        inputs=[
            prompt,
            model,
            negative_prompt,
            seed,
            steps,
            guidance,
            width,
            height,
            max_sequence_length,
            skip_layer_guidance,
            num_images,
            preview_every,
            memory_mode,
            lora_panel.lora,
            lora_panel.lora_scale,
            lora_panel.lora_fuse,
            history,
        ],  # fmt: skip
        outputs=[gallery, used_seed, summary, history, history_gallery, shown_images, selected_index, preview, details],
        api_name="generate",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    stop.click(stop_generation, inputs=None, outputs=None, queue=False, api_name="generate_stop")
    reuse_seed.click(
        lambda last: last if last is not None else -1,
        inputs=used_seed,
        outputs=seed,
        queue=False,
        api_visibility="private",
    )
    model.change(
        apply_preset,
        inputs=model,
        outputs=[steps, guidance, width, height, skip_layer_guidance, negative_prompt, aspect, cfg_note],
        queue=False,
        api_visibility="private",
    )
    aspect.input(apply_aspect, inputs=[aspect, model], outputs=[width, height], queue=False, api_visibility="private")

    def remember_selection(shown, evt: gr.SelectData):
        # Only the position is taken from the page; the file is looked up in this session's own list.
        return selection_index(evt.index, shown)

    gallery.select(
        remember_selection,
        inputs=shown_images,
        outputs=selected_index,
        queue=False,
        api_name="generate_select",
        api_visibility="private",
    )
    return {
        "prompt": prompt,
        "gallery": gallery,
        "send_to_caption": send_to_caption,
        "send_to_img2img": send_to_img2img,
        "send_to_inpaint": send_to_inpaint,
        "shown_images": shown_images,
        "selected_index": selected_index,
        "preview": preview,
        "run": run,
        "stop": stop,
    }


if __name__ == "__main__":
    launch_alone(build_generate_tab, "Generate")
