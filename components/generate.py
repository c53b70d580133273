"""Generate tab: SD3.5 Large, Large Turbo and Medium text-to-image (API ``/generate``)."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

import gradio as gr

from components.common import (
    LastErrors,
    StopRequests,
    UploadedImage,
    ValidatedNumber,
    ValidatedSlider,
    generation_request,
    launch_alone,
    markdown_text,
    named_endpoint,
    on_gpu,
    parameter,
    t5_tokens_slider,
    user_errors,
    visitor_id,
)
from components.job_stream import stream_job
from components.lora_panel import build_lora_panel
from pipelines import settings, workspace
from pipelines.catalog import CATALOG
from pipelines.history import LOCAL_OWNER, History
from pipelines.memory import SD3_MODES
from pipelines.sd3.control_maps import DEPTH_TRAINING_NOTE, ControlSettings
from pipelines.sd3.png_metadata import read_png_settings
from pipelines.sd3.text_to_image import (
    ASPECT_RATIOS,
    MODEL_CHOICES,
    SIZE_MULTIPLE,
    model_key,
    size_for_aspect,
    size_limits,
    slider_range,
    snap,
)
from pipelines.studio import Studio
from pipelines.validation import as_int

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
    summary += f" · memory mode {memory_mode_label(details['memory_mode'])} ({details['memory_mode']['reason']})"
    if details["loras"]:
        fused = " (fused)" if details["lora_fused"] else ""
        loras = ", ".join(f"{markdown_text(item['name'])}:{item['weight']:g}" for item in details["loras"])
        summary += " · LoRA " + loras + fused
    if details["trigger_words_added"]:
        summary += f" · trigger words added: {', '.join(map(markdown_text, details['trigger_words_added']))}"
    if details.get("controlnet"):
        summary += f" · ControlNet {details['controlnet']['type']} {details['controlnet']['scale']:g}"
    if details["stopped"]:
        summary += f" · stopped at step {details['steps_done']}"
    if details["tiny"]:
        summary += " · tiny random model: the images are noise by design"
    return summary


_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def memory_mode_label(memory_mode: dict) -> str:
    """The memory mode as it ran: a bf16 mode is named after the dtype its weights really had.

    On a CPU the weights are float32 (bf16 there is slow and noisy), so "bf16" reads "fp32";
    on a GPU without bf16, "fp16".
    """
    mode, dtype = memory_mode["mode"], _SHORT_DTYPES.get(memory_mode.get("dtype") or "", "bf16")
    return dtype + mode.removeprefix("bf16") if mode.startswith("bf16") and dtype != "bf16" else mode


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
    """The file the session selected (the first image if none was), chosen from the server's own list.

    ``shown`` is the list the last click chose from: the gallery's images or the history's.
    """
    shown = [path for path in (shown or []) if Path(path).is_file()]
    if not shown:
        return None
    return shown[index] if isinstance(index, int) and 0 <= index < len(shown) else shown[0]


def seed_of_image(path: str | None) -> int | None:
    """The seed a generated PNG was drawn with (its settings chunk), or None for a file without one."""
    if path is None:
        return None
    try:
        _, studio_settings = read_png_settings(Path(path))
    except (OSError, ValueError):
        return None
    seed = (studio_settings or {}).get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _clamped_number(label: str, text, low: float, high: float) -> tuple[str, str | None]:
    """(text, note): a number box's text clamped to [low, high], with a sentence if it changed.

    Empty stays empty (the preset); text that is no number is left for validation to explain.
    """
    if text is None or not str(text).strip():
        return "", None
    try:
        value = float(str(text).strip())
    except ValueError:
        return str(text), None
    if low <= value <= high:
        return str(text), None
    clamped = min(max(value, low), high)
    return f"{clamped:g}", f"{label} {value:g} is outside {low:g}–{high:g}, so it is now {clamped:g}."


def _side(value) -> str:
    return f"{value:g}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def fitted_size(width, height, key: str, tiny: bool) -> tuple[int, int]:
    """``width`` x ``height`` brought within what model ``key`` draws: each side within the slider's range,
    then the area within the model's megapixels (scaled, keeping the aspect ratio), in multiples of 16."""
    spec = CATALOG[key]
    limits, (low, high) = size_limits(spec, tiny), slider_range(spec, tiny)
    try:
        width, height = float(width), float(height)
    except (TypeError, ValueError):
        return size_for_aspect("1:1", spec, tiny)
    width, height = min(max(snap(width), low), high), min(max(snap(height), low), high)
    area = width * height
    if area > limits["max_pixels"]:  # shrink, rounding down so the result stays inside
        scale = (limits["max_pixels"] / area) ** 0.5
        width, height = (max(low, math.floor(side * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE) for side in (width, height))
    elif area < limits["min_pixels"]:  # grow, rounding up
        scale = (limits["min_pixels"] / area) ** 0.5
        width, height = (min(high, math.ceil(side * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE) for side in (width, height))
    return int(width), int(height)


def settings_for_model(key: str, tiny: bool, steps, guidance, width, height) -> tuple[str, str, int, int, list[str]]:
    """The user's steps, guidance and size carried over to model ``key``: kept where valid, clamped where not.

    Empty steps and guidance stay empty, which means the new model's preset. Returns (steps, guidance,
    width, height, notes), one sentence per value changed and one reminder when a kept value is not the preset.
    """
    spec = CATALOG[key]
    preset = spec.image_preset
    title = spec.title.removeprefix("Stable Diffusion ")
    steps, steps_note = _clamped_number("Steps", steps, 1, settings.MAX_STEPS)
    guidance, guidance_note = _clamped_number("Guidance", guidance, 0.0, settings.MAX_GUIDANCE)
    notes = [note for note in (steps_note, guidance_note) if note]
    new_width, new_height = fitted_size(width, height, key, tiny)
    if (new_width, new_height) != (width, height):
        limits = size_limits(spec, tiny)
        notes.append(
            f"{_side(width)}x{_side(height)} is outside what {title} draws ({limits['min_pixels'] / 2**20:.2f}–"
            f"{limits['max_pixels'] / 2**20:.2f} megapixels, at most {limits['max_side']} px a side), "
            f"so the size is now {new_width}x{new_height}."
        )
    kept = [f"{name} {value}" for name, value in (("steps", steps), ("guidance", guidance)) if value]
    if kept:
        notes.append(
            f"Kept your {' and '.join(kept)}; empty the box to use {title}'s preset "
            f"({preset.steps} steps, guidance {preset.guidance:g})."
        )
    return steps, guidance, new_width, new_height, notes


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


def _number_or(text, default: float) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return default


def saved_history_page(history: History | None, visitor: str, page=0) -> tuple[list[str], list[dict], int]:
    """(the page's PNGs, their records, how many records in all) of the saved history, newest first.

    The PNGs are links (else copies) in the visitor's session folder, byte for byte the saved files:
    the page is served the app's own files from the work root, never a path into the outputs folder.
    A record carries every setting and the job it came from, no path. No history: nothing.
    """
    if history is None:
        return [], [], 0
    found = history.page(LOCAL_OWNER, as_int("page", 0 if page in (None, "") else page, 0, 10**6))
    folder = workspace.session_folder(visitor)
    paths, records = [], []
    for record in found.records:
        source = history.path(record)
        if not source.is_file():
            continue  # deleted by hand since: the next rebuild drops it from the index
        shown = folder / f"history-{record.id}.png"
        if not shown.exists():
            try:
                os.link(source, shown)
            except OSError:  # another file system
                shutil.copyfile(source, shown)
        paths.append(str(shown))
        records.append(record.summary())
    return paths, records, found.total


def guidance_note(model, guidance_text) -> str:
    """The sentence beside the negative prompt for ``model`` at ``guidance_text`` (empty: the preset):
    it does not apply without classifier-free guidance; "" when it does."""
    preset = CATALOG[model_key(model or "large")].image_preset
    text = "" if guidance_text is None else str(guidance_text).strip()
    if (preset.guidance if text == "" else _number_or(text, preset.guidance)) > 1.0:
        return ""
    if text == "":
        return "Large Turbo runs 4 steps without classifier-free guidance: the negative prompt does not apply."
    return "Without classifier-free guidance (guidance ≤ 1) the negative prompt does not apply."


def active_inputs(control_image, control_type, control_scale, lora) -> tuple[str, dict, dict]:
    """(the line beside Generate naming what else the next image uses, the control image's Clear button,
    the LoRAs' Clear button): a control image or LoRAs left in their fields are never applied unseen."""
    parts = []
    if control_image is not None:
        kind = control_type or settings.DEFAULT_CONTROL_TYPE
        scale = settings.DEFAULT_CONTROL_SCALE if control_scale is None else control_scale
        parts.append(
            f"ControlNet {kind} at {_number_or(scale, settings.DEFAULT_CONTROL_SCALE):g} (a control image is set)"
        )
    loras = str(lora or "").strip()
    if loras:
        parts.append(f"LoRAs {markdown_text(loras)}")
    line = ("**Also applied:** " + " · ".join(parts)) if parts else ""
    return line, gr.update(visible=control_image is not None), gr.update(visible=bool(loras))


def build_generate_tab(studio: Studio, outputs_dir: Path | None = None) -> dict:
    """Build the Generate tab inside the current Blocks; returns its main components."""
    stop_requests = StopRequests()
    last_errors = LastErrors()
    first_key = model_key("large")
    first_preset = CATALOG[first_key].image_preset
    default_width, default_height = size_for_aspect("1:1", CATALOG[first_key], studio.tiny)

    def generate_images(
        prompt, model, negative_prompt, seed, steps, guidance, width, height, max_sequence_length,
        skip_layer_guidance, num_images, preview_every, memory_mode, lora, lora_scale, lora_fuse, history,
        control_image, control_type, control_scale, preprocess, canny_low, canny_high, progress, request,
    ):  # fmt: skip
        """Yields step previews while the pipeline runs, then the PNGs, their summary and a details dict.

        ``lora`` names the LoRAs to mix ("name:0.8, other:0.5"; empty = none): a name not loaded yet
        loads from the LoRA folder or the registry, and ``<lora:name:0.8>`` tags in the prompt work too.
        ``lora_scale`` multiplies the weights of ``lora``; ``lora_fuse`` merges them into the weights first.
        ``control_image`` (SD3.5 Large only) draws with the ControlNet ``control_type`` (canny, depth, blur)
        at ``control_scale``; ``preprocess=False`` uses the image as the map as it is; ``canny_low`` and
        ``canny_high`` are cv2.Canny's thresholds. The output before the details dict is the map the ControlNet
        followed.
        """
        job = generation_request(
            prompt, model, negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance, width=width,
            height=height, max_sequence_length=max_sequence_length, skip_layer_guidance=skip_layer_guidance,
            num_images=num_images, memory_mode=memory_mode, lora=lora, lora_scale=lora_scale, lora_fuse=lora_fuse,
            preview_every=0 if preview_every is None else preview_every,
        )  # fmt: skip
        if control_image is not None:
            control = ControlSettings(
                control_image,
                settings.DEFAULT_CONTROL_TYPE if control_type is None else control_type,
                settings.DEFAULT_CONTROL_SCALE if control_scale is None else control_scale,
                True if preprocess is None else bool(preprocess),
                settings.DEFAULT_CANNY_LOW if canny_low is None else canny_low,
                settings.DEFAULT_CANNY_HIGH if canny_high is None else canny_high,
            )
            job = dataclasses.replace(job, control=control)
        visitor = visitor_id(request)  # another visitor's uploaded LoRA is "not loaded" for this one
        stop = stop_requests.start(request)

        # The service draws in a worker thread; its steps move the progress bar and its previews reach the page.
        def run(on_step):
            return studio.generation(job, owner=visitor, notify=gr.Info, on_step=on_step, should_stop=stop.is_set)

        for kind, value in stream_job(run, progress, name="sd3-generate"):
            if kind == "preview":
                yield (gr.skip(),) * 7 + (gr.update(value=value, visible=True),) + (gr.skip(),) * 3
            else:
                outcome = value
        control_map = outcome.control_map

        details = outcome.details
        for warning in details["warnings"]:
            gr.Warning(warning)
        paths = [str(path) for path in outcome.paths]
        if studio.history is not None:  # the saved history, newest first (every page of this machine's)
            history, _records, _total = saved_history_page(studio.history, visitor)
        else:
            history = session_history(paths, history, workspace.session_folder(visitor))
        hidden = gr.update(value=None, visible=False)
        shown_map = control_map if control_map is not None else gr.skip()
        yield (
            paths,
            details["seed"],
            generation_summary(details),
            history,
            history,
            paths,
            0,
            hidden,
            shown_map,
            details,  # last of what the API returns, as on every endpoint that returns one
            paths,  # gallery_images (server state)
        )

    generate_fn = on_gpu(estimated_gpu_seconds)(generate_images)

    def stop_generation(request: gr.Request):
        stop_requests.stop(request)

    def apply_model(model, steps_text, guidance_text, width_value, height_value):
        """The new model's ranges and presets; the user's values stay where valid (see settings_for_model)."""
        key = model_key(model)
        preset = CATALOG[key].image_preset
        steps_text, guidance_text, width_value, height_value, notes = settings_for_model(
            key, studio.tiny, steps_text, guidance_text, width_value, height_value
        )
        for note in notes:
            gr.Info(note)
        low, high = _slider_ranges(studio, key)
        cfg_sentence = guidance_note(model, guidance_text)
        uses_cfg = not cfg_sentence
        if cfg_sentence:
            notes.insert(0, cfg_sentence)
        return (
            gr.update(value=steps_text, placeholder=f"preset: {preset.steps}"),
            gr.update(value=guidance_text, placeholder=f"preset: {preset.guidance:g}"),
            gr.update(value=width_value, minimum=low, maximum=high),
            gr.update(value=height_value, minimum=low, maximum=high),
            gr.update(
                value=bool(preset.skip_layer_guidance_layers), interactive=bool(preset.skip_layer_guidance_layers)
            ),
            gr.update(interactive=uses_cfg),
            " ".join(notes),
        )

    def apply_aspect(ratio, model):
        width, height = size_for_aspect(ratio, CATALOG[model_key(model)], studio.tiny)
        return width, height

    gr.Markdown(
        "Text to image with Stable Diffusion 3.5. Switching the model keeps your settings where they are valid "
        "for it; empty steps and guidance use its preset. "
        "Images are PNGs that carry their settings (AUTOMATIC1111 `parameters` chunk + a JSON chunk)."
    )
    if not studio.tiny:
        gr.Markdown(
            "The SD3.5 repos are gated: accept the licence on the model page and start the app with `HF_TOKEN`. "
            "Large needs about 28 GB of GPU memory in bf16; on the CPU an image takes many minutes."
        )
    low, high = _slider_ranges(studio, first_key)
    # Three columns that app.py's CSS lays out as a grid: the prompt and the settings on the left, the
    # result on the right; on a narrow screen the result comes right under the Generate button.
    with gr.Row(elem_id="generate-layout"):
        with gr.Column(scale=1, elem_id="generate-controls"):
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
                # The class is what app.py's Ctrl+Enter handler clicks (the A1111 shortcut).
                run = gr.Button("Generate", variant="primary", scale=3, elem_classes=["ctrl-enter-runs"])
                stop = gr.Button("Stop", variant="stop", scale=1)
            gr.Markdown("Ctrl+Enter (⌘+Enter on a Mac) generates.", elem_classes=["shortcut-hint"])
            with gr.Row():
                active_note = gr.Markdown(elem_id="generate-active")
                clear_control = gr.Button("Clear the control image", size="sm", visible=False, scale=0)
                clear_loras = gr.Button("Clear the LoRAs", size="sm", visible=False, scale=0)
            # The last error's sentence stays here after its toast is closed.
            error_status = gr.Markdown(elem_id="generate-error")
        with gr.Column(scale=1, elem_id="generate-result"):
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
            # Server-side only: the images the gallery shows, and the selection as a list and an index in it
            # (the gallery's images or the history's, whichever was clicked last).
            gallery_images = gr.State([])
            shown_images = gr.State([])
            selected_index = gr.State(None)
            saved = studio.history is not None
            with gr.Accordion(
                f"History (saved in {studio.history.root.name}/)" if saved else "This session's images", open=saved
            ):
                history_gallery = gr.Gallery(label="History", format="png", columns=4, height=300)
                with gr.Row(visible=saved):
                    history_page = ValidatedNumber(value=0, precision=0, minimum=0, label="Page (0 = newest)")
                    history_refresh = gr.Button("Refresh", size="sm")
                history_records = gr.JSON(label="Records", visible=False)
            history = gr.State([])
        with gr.Column(scale=1, elem_id="generate-settings"):
            with gr.Row():
                seed = ValidatedNumber(
                    value=-1, precision=0, label="Seed (-1 = random)", minimum=-1, maximum=settings.MAX_SEED
                )
                reuse_seed = gr.Button("♻ Seed of the selected image", size="sm")
            with gr.Accordion("Settings", open=True, elem_id="generate-settings-accordion"):
                with gr.Row():
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
                    preview_every = ValidatedSlider(
                        0,
                        settings.MAX_PREVIEW_EVERY,
                        value=settings.DEFAULT_PREVIEW_EVERY,
                        step=1,
                        label="Preview every N steps (0 = off)",
                    )
                # A row of its own: its choices are long, and the dropdown is no wider than its column.
                memory_mode = gr.Dropdown(
                    choices=[("auto: the fastest that fits", "auto")]
                    + [(f"{mode.key}: {mode.title}", mode.key) for mode in SD3_MODES],
                    value=studio.memory_mode,
                    label="Memory mode (quantization / offload)",
                    info="bitsandbytes and offload need a CUDA GPU; dropping T5 weakens long prompts",
                    visible=not studio.public,  # a public instance runs the operator's --memory
                )
            lora_panel = build_lora_panel(studio, model, memory_mode)
            with gr.Accordion("ControlNet (3.5 Large)", open=False):
                gr.Markdown(
                    "Draw following the shape of an image: Stability's canny, depth and blur ControlNets, released "
                    "for SD3.5 **Large** only (Medium and Turbo refuse a control image). Each is about 4.3 GB in bf16 "
                    "(an 8.6 GB fp32 download, gated like Large). "
                    + DEPTH_TRAINING_NOTE
                    + (
                        " Tiny mode: tiny random ControlNets, so the image changes but follows nothing."
                        if studio.tiny
                        else ""
                    )
                )
                with gr.Row():
                    control_image = UploadedImage(label="Control image (empty = no ControlNet)", height=200)
                    control_map = gr.Image(label="Control map used", format="png", interactive=False, height=200)
                control_type = gr.Radio(
                    choices=list(settings.CONTROL_TYPES), value=settings.DEFAULT_CONTROL_TYPE, label="Control type"
                )
                with gr.Row():
                    control_scale = ValidatedSlider.over(
                        settings.CONTROL_SCALE,
                        settings.DEFAULT_CONTROL_SCALE,
                        "Control scale (0 = off, 1 = as trained)",
                    )
                    preprocess = gr.Checkbox(
                        value=True, label="Preprocess (off: the image already is a canny, depth or blur map)"
                    )
                with gr.Row():
                    canny_low = ValidatedSlider.over(
                        settings.CANNY_THRESHOLD, settings.DEFAULT_CANNY_LOW, "Canny low threshold"
                    )
                    canny_high = ValidatedSlider.over(
                        settings.CANNY_THRESHOLD, settings.DEFAULT_CANNY_HIGH, "Canny high threshold"
                    )
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
        parameter("control_image", None),
        parameter("control_type", settings.DEFAULT_CONTROL_TYPE),
        parameter("control_scale", settings.DEFAULT_CONTROL_SCALE),
        parameter("preprocess", True),
        parameter("canny_low", settings.DEFAULT_CANNY_LOW),
        parameter("canny_high", settings.DEFAULT_CANNY_HIGH),
        parameter("progress", gr.Progress()),
        parameter("request", None, gr.Request),
    ]
    # A new run clears the last error's sentence; a failed one puts its sentence beside the button.
    gr.on(
        triggers=[run.click, prompt.submit],
        fn=lambda: "",
        outputs=error_status,
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    generation = gr.on(
        triggers=[run.click, prompt.submit],
        fn=last_errors.watch(named_endpoint(generate_fn, parameters)),
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
            control_image,
            control_type,
            control_scale,
            preprocess,
            canny_low,
            canny_high,
        ],  # fmt: skip
        outputs=[
            gallery,
            used_seed,
            summary,
            history,
            history_gallery,
            shown_images,
            selected_index,
            preview,
            control_map,
            details,
            gallery_images,
        ],  # fmt: skip
        api_name="generate",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
        # The progress bar sits on the gallery, so the live previews above it stay in view.
        show_progress_on=[gallery],
    )
    last_errors.show_on(generation, error_status)
    stop.click(stop_generation, inputs=None, outputs=None, queue=False, api_name="generate_stop")

    def reused_seed(shown, index, last):
        # The selected image's own seed (from its PNG); the run's first seed if there is no image to read.
        seed_used = seed_of_image(selected_image(shown, index))
        if seed_used is not None:
            return seed_used
        return last if last is not None else -1

    reuse_seed.click(
        reused_seed,
        inputs=[shown_images, selected_index, used_seed],
        outputs=seed,
        queue=False,
        api_name="generate_reuse_seed",
        api_visibility="private",
    )
    preset_loaded = model.change(
        apply_model,
        inputs=[model, steps, guidance, width, height],
        outputs=[steps, guidance, width, height, skip_layer_guidance, negative_prompt, cfg_note],
        queue=False,
        api_visibility="private",
    )
    aspect.input(apply_aspect, inputs=[aspect, model], outputs=[width, height], queue=False, api_visibility="private")
    # A note describes the form as it is: an edited steps or guidance box rewrites it from the new values.
    gr.on(
        [steps.input, guidance.input],
        guidance_note,
        inputs=[model, guidance],
        outputs=cfg_note,
        queue=False,
        api_visibility="private",
    )
    # What else the next image uses stands beside the button, each with its one-click clear.
    control_inputs = [control_image, control_type, control_scale, lora_panel.lora]
    gr.on(
        [control_image.change, control_type.change, control_scale.change, lora_panel.lora.change],
        active_inputs,
        inputs=control_inputs,
        outputs=[active_note, clear_control, clear_loras],
        queue=False,
        api_visibility="private",
    )
    clear_control.click(lambda: None, outputs=control_image, queue=False, api_visibility="private")
    clear_loras.click(lambda: "", outputs=lora_panel.lora, queue=False, api_visibility="private")

    def remember_selection(images, evt: gr.SelectData):
        # Only the position is taken from the page; the file is looked up in this session's own list,
        # which becomes the list the selection indexes.
        return images, selection_index(evt.index, images)

    gallery.select(
        remember_selection,
        inputs=gallery_images,
        outputs=[shown_images, selected_index],
        queue=False,
        api_name="generate_select",
        api_visibility="private",
    )
    history_gallery.select(
        remember_selection,
        inputs=history,
        outputs=[shown_images, selected_index],
        queue=False,
        api_name="generate_history_select",
        api_visibility="private",
    )

    def show_history(page, request: gr.Request):
        """Page ``page`` (0 = newest) of the saved history: the PNGs and each one's record (settings, job,
        id; no path). Locally every page and API client sees the same history; a public instance keeps none."""
        paths, records, total = saved_history_page(studio.history, visitor_id(request), page)
        return paths, paths, {"page": page, "total": total, "records": records}

    history_shown = gr.on(
        [history_refresh.click, history_page.submit],
        user_errors(show_history),
        inputs=history_page,
        outputs=[history_gallery, history, history_records],
        queue=False,
        api_name="history",
    )
    return {
        "show_history": (show_history, [history_page], [history_gallery, history, history_records]),
        "history_shown": history_shown,
        "prompt": prompt,
        "gallery": gallery,
        "send_to_caption": send_to_caption,
        "send_to_img2img": send_to_img2img,
        "send_to_inpaint": send_to_inpaint,
        "shown_images": shown_images,
        "selected_index": selected_index,
        "preview": preview,
        "error_status": error_status,
        "run": run,
        "stop": stop,
        # The form, for other tabs to fill (PNG Info's "Send to Generate").
        "model": model,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "width": width,
        "height": height,
        "max_sequence_length": max_sequence_length,
        "skip_layer_guidance": skip_layer_guidance,
        "lora": lora_panel.lora,
        "num_images": num_images,
        "control_image": control_image,
        "preset_loaded": preset_loaded,  # the model's preset is in the form: values sent from elsewhere go after it
        "lora_panel": lora_panel,  # its model, active set and table: the Train tab's "Load the result" fills them
    }


if __name__ == "__main__":
    launch_alone(build_generate_tab, "Generate")
