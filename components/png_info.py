"""PNG Info tab: the generation settings an image carries, and "Send to Generate" (API ``/png_info``).

Reads the Studio's PNGs (their JSON chunk, else the ``parameters`` text), A1111-format text (A1111,
Forge, SD.Next, Civitai, ComfyUI's savers) in PNG chunks, EXIF or JPEG comments, and the formats of
SwarmUI, Fooocus, RuinedFooocus, InvokeAI, NovelAI and ComfyUI. The parsing is
``pipelines.sd3.png_info``; app.py wires "Send to Generate" to the Generate tab's controls.
"""

from __future__ import annotations

import re

import gradio as gr

from components.common import UploadedImage, launch_alone, named_endpoint, parameter
from pipelines import settings
from pipelines.sd3.handoff import generate_resets
from pipelines.sd3.png_info import generate_form_values, read_generation_settings
from pipelines.studio import Studio

# The Generate tab's controls "Send to Generate" fills, in the order of ``generate_form_update``'s values.
GENERATE_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
    "max_sequence_length",
    "skip_layer_guidance",
    "lora",
    "num_images",  # reset: the image was one (pipelines/sd3/handoff.generate_resets)
    "control_image",  # reset: an earlier run's control image never applies unseen
)
_SHOWN = [  # (label, key) rows of the summary table
    ("Prompt", "prompt"),
    ("Negative prompt", "negative_prompt"),
    ("Model", "model"),
    ("Seed", "seed"),
    ("Steps", "steps"),
    ("Guidance (CFG)", "guidance"),
    ("Size", "size"),
    ("Sampler", "sampler"),
    ("LoRAs", "loras"),
]


def settings_summary(info: dict) -> str:
    """Markdown for people: the sentence when nothing was found, else a table and the notes."""
    if not info.get("found"):
        return _plain(info["message"])
    values = {
        **info,
        "size": f"{info['width']}x{info['height']}" if info.get("width") else None,
        "loras": ", ".join(f"{lora['name']}:{lora['weight']:g}" for lora in info["loras"]) or None,
        "model": info["model"] if info.get("model_key") else f"{info.get('model') or '—'} (not served here)",
    }
    rows = ["| | |", "|---|---|"]
    for label, key in _SHOWN:
        shown = "—" if values.get(key) in (None, "") else str(values[key])
        rows.append(f"| {label} | {_cell(shown)} |")
    source = {"studio-json": "the Studio's JSON chunk"}.get(info["source"], info["source"].replace("-", " "))
    tool = info.get("tool")
    lines = [f"Written by {_plain(tool)}; read from {source}." if tool else f"Read from {source}.", "", *rows]
    lines += [f"- {_plain(note)}" for note in info["notes"]]
    return "\n".join(lines)


def _plain(text: str) -> str:
    """``text`` from an image file shown literally in Markdown: ``<lora:x:1>`` is no HTML tag, ``*`` no emphasis."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_\[\]|~#])", r"\\\1", text)


def _cell(text: str) -> str:
    return _plain(text).replace("\n", "<br>")


def generate_form_update(info: dict | None, current_model: str, tiny: bool) -> tuple[str, dict, list[str]]:
    """(model, pending form values, notes) for the Generate tab from the settings last read.

    The pending dict holds the GENERATE_FIELDS ``values`` and ``after_preset``: whether the model
    changes, so that its preset loads into the form first and these values must land after it.
    """
    if not info or not info.get("found"):
        raise ValueError("There are no settings to send; upload an image that carries them first.")
    values, notes = generate_form_values(info, current_model, tiny=tiny)
    resets, reset_notes = generate_resets(info)
    values, notes = {**values, **resets}, [*notes, *reset_notes]
    pending = {
        "values": {name: values[name] for name in GENERATE_FIELDS},
        "after_preset": values["model"] != current_model,
    }
    return values["model"], pending, notes


def send_to_generate(info: dict | None, current_model: str, tiny: bool) -> tuple[str, dict, str]:
    """``generate_form_update`` for the page: each clamped value also pops up on the Generate tab."""
    model, pending, notes = generate_form_update(info, current_model, tiny)
    for note in notes:
        gr.Warning(note)
    return model, pending, "Sent to Generate." + "".join(f"\n- {_plain(note)}" for note in notes)


def pending_form_values(pending: dict | None, after_preset: bool) -> tuple:
    """(the GENERATE_FIELDS values in order, None) when ``pending`` waits for this moment; else no change.

    Called right after Send to Generate (``after_preset=False``) and after the Generate tab loads a
    model's preset (``after_preset=True``), so the values always land last; the None clears ``pending``.
    """
    if not pending or pending["after_preset"] != after_preset:
        return tuple(gr.skip() for _ in range(len(GENERATE_FIELDS) + 1))
    return (*(pending["values"][name] for name in GENERATE_FIELDS), None)


def build_png_info_tab(studio: Studio) -> dict:
    """Build the PNG Info tab inside the current Blocks; returns its main components."""

    def png_info(image):
        """The generation settings ``image`` carries: a summary, the raw text and the details dict.

        Studio PNGs give every setting (their JSON chunk); other tools' files their own text (A1111
        format, SwarmUI, Fooocus, InvokeAI, NovelAI, ...), with ``tool`` naming the writer. An image
        without settings gets ``found: False`` and one sentence in ``message`` naming its tool where
        the file says (ComfyUI, GIMP, ChatGPT, ...).
        """
        if image is None:  # the upload was cleared
            return "", "", None, None
        info = read_generation_settings(image)
        return settings_summary(info), info.get("raw", ""), info, info

    gr.Markdown(
        "Drop an image made by the Studio, AUTOMATIC1111, Forge, SD.Next, SwarmUI, Fooocus, InvokeAI, NovelAI, "
        "Civitai or ComfyUI to read the prompt and settings it was made with; **Send to Generate** fills the "
        "Generate tab with them. A Studio PNG redraws the same pixels; another tool's settings carry over, but "
        "its sampler and noise differ."
    )
    with gr.Row():
        with gr.Column(scale=1):
            image = UploadedImage(label="Image (PNG, JPEG or WebP)", sources=["upload", "clipboard"], height=360)
            send_to_generate = gr.Button("Send to Generate →", variant="primary")
            sent_note = gr.Markdown()
        with gr.Column(scale=1):
            summary = gr.Markdown()
            raw = gr.Textbox(label="Raw parameters text", lines=6, interactive=False, buttons=["copy"])
            with gr.Accordion("Details (JSON)", open=False):
                details = gr.JSON(label="Details")
            settings_read = gr.State(None)  # server-side: what Send to Generate sends, never the page's copy
            form_pending = gr.State(None)  # the Generate form's values, between Send to Generate's two steps

    # "Sent to Generate." describes the image that was sent: a new image clears it.
    image.change(lambda: "", outputs=sent_note, queue=False, api_visibility="private")
    image.change(
        named_endpoint(png_info, [parameter("image")]),
        inputs=image,
        outputs=[summary, raw, details, settings_read],
        api_name="png_info",
        # Queued like every event that reads an upload, on the CPU's own id and limit (it runs no model,
        # so it never waits for a generation); unqueued, a burst of uploads would bypass every limit.
        concurrency_id=settings.CPU_CONCURRENCY_ID,
        concurrency_limit=settings.CPU_CONCURRENCY_LIMIT,
        show_progress="minimal",
    )
    return {
        "image": image,
        "summary": summary,
        "raw": raw,
        "details": details,
        "settings": settings_read,
        "form_pending": form_pending,
        "send_to_generate": send_to_generate,
        "sent_note": sent_note,
    }


if __name__ == "__main__":
    launch_alone(build_png_info_tab, "PNG Info")
