"""Caption tab: any image in, BLIP captions out, with every decoding strategy (API ``/caption``).

The "Adapter" accordion loads BLIP LoRA adapters (``/blip_adapter_load``, listed
by ``/blip_adapter_list``) and picks the one a caption uses; the Batch tab sees
the same adapters.
"""

from __future__ import annotations

from dataclasses import fields

import gradio as gr

from components.common import (
    LastErrors,
    UploadedImage,
    example_photos,
    launch_alone,
    named_endpoint,
    parameter,
    visitor_id,
)
from components.decoding import build_decoding_controls, decoding_parameters, request_from_values
from pipelines import settings
from pipelines.blip.captioner import STRATEGY_LABELS, CaptionRequest, CaptionResult
from pipelines.blip.precision import runtime_blip_precision
from pipelines.images import describe_image, load_image
from pipelines.settings import CaptionStrategy
from pipelines.studio import Studio

CAPTION_TABLE_HEADERS = ["#", "caption", "score", "tokens", "adapter"]
BASE_MODEL_LABEL = "base model"  # what the UI calls "no adapter"; the API sends ""


def adapter_label(adapter: str | None) -> str:
    return adapter or BASE_MODEL_LABEL


def requested_adapter(adapter) -> str | None:
    """The adapter a request names: None for an empty value or the base-model label."""
    text = str(adapter or "").strip()
    return None if not text or text.lower() == BASE_MODEL_LABEL else text


def adapter_choices(studio: Studio, visitor: str | None = None) -> list[tuple[str, str]]:
    """Dropdown choices: the base model, then every loaded adapter ``visitor`` may use."""
    return [(BASE_MODEL_LABEL, ""), *((name, name) for name in studio.blip_adapters.names(visitor))]


def caption_table(result: CaptionResult) -> list[list]:
    """One row per caption, best first, each with the adapter that wrote it."""
    return [
        [rank, caption.text, round(caption.score, 4), caption.num_tokens, adapter_label(result.adapter)]
        for rank, caption in enumerate(result.captions, start=1)
    ]


def caption_details(result: CaptionResult, studio: Studio, image_description: str) -> dict:
    """Everything an API client may want to keep next to the captions; server paths are placeholders
    (``model`` is ``<models>/blip-caption`` in tiny mode, a Hub id otherwise)."""
    request = result.request
    return {
        "captions": [
            {"text": caption.text, "score": caption.score, "tokens": caption.num_tokens} for caption in result.captions
        ],
        "seconds": round(result.seconds, 4),
        "seed": request.seed if request.strategy == CaptionStrategy.SAMPLING else None,
        "request": {field.name: getattr(request, field.name) for field in fields(CaptionRequest)},
        "model": studio.shown(studio.manager.source_for("blip-caption")),
        "adapter": result.adapter,
        "image": image_description,
        "tiny_mode": studio.tiny,
        "precision": studio.shown(runtime_blip_precision(studio.manager.runtime).as_dict()),  # --precision
    }


def last_seed(details, current):
    """The sampling seed the last caption used (from its result), or ``current`` when it used none."""
    seed = details.get("seed") if isinstance(details, dict) else None
    low, high = settings.CAPTION_RANGES["seed"].low, settings.CAPTION_RANGES["seed"].high
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and low <= seed <= high else current


def make_caption_function(studio: Studio):
    """The `/caption` endpoint: ``image`` is required, every decoding setting and the adapter have a default."""

    def caption(image, adapter="", request=None, **decoding):
        if image is None:
            raise ValueError("Upload an image (PNG, JPEG, WebP, GIF, BMP or TIFF) first.")
        adapter = studio.blip_adapters.use(requested_adapter(adapter), visitor_id(request))  # another's upload: no such
        picture = load_image(image)
        # More captions than beams (or several greedy ones) is adjusted, and said, rather than refused.
        request, notes = request_from_values(decoding).with_room_for_captions()
        request = request.validated()
        result = studio.captioner().caption(picture, request, adapter=adapter)
        details = caption_details(result, studio, describe_image(picture))
        details["notes"] = notes
        summary = f"{len(result.captions)} caption(s) in {result.seconds:.2f} s · {STRATEGY_LABELS[request.strategy]}"
        if request.strategy == CaptionStrategy.SAMPLING:
            summary += f" · seed {request.seed}"
        summary += f" · {'adapter ' + result.adapter if result.adapter else BASE_MODEL_LABEL}"
        if details["precision"]["variant"] not in (None, "fp32"):
            summary += f" · {details['precision']['variant']}"
        if studio.tiny:
            summary += " · tiny random model: the words are gibberish by design"
        summary += "".join(f"\n\n{note}" for note in notes)
        return caption_table(result), summary, details

    # New parameters go at the end, so positional API callers keep working.
    return named_endpoint(
        caption,
        [parameter("image"), *decoding_parameters(), parameter("adapter", ""), parameter("request", None, gr.Request)],
    )


def make_adapter_load_function(studio: Studio):
    """The `/blip_adapter_load` endpoint: a folder name or Hub id in ``source``, or uploaded files.

    Returns the adapter's name (what ``/caption``'s ``adapter`` takes), a status
    line and the listing of ``/blip_adapter_list``. An uploaded adapter is the
    caller's own: other visitors neither see nor use it.
    """

    def blip_adapter_load(source="", upload=None, request=None):
        uploads = [getattr(file, "name", file) for file in (upload or [])]
        visitor = visitor_id(request)
        info = studio.load_blip_adapter(str(source or ""), uploads, visitor=visitor)
        base = f" (made for {info.base_model})" if info.base_model else ""
        status = (
            f"Loaded **{info.name}**{base}: LoRA rank {info.rank}, alpha {info.alpha:g}, on {info.lora_layers} "
            "text-decoder layers. Pick it above to caption with it."
        )
        return info.name, status, studio.shown(studio.blip_adapters.describe(visitor))

    return named_endpoint(
        blip_adapter_load, [parameter("source", ""), parameter("upload", None), parameter("request", None, gr.Request)]
    )


def make_adapter_list_function(studio: Studio):
    """The `/blip_adapter_list` endpoint: the adapters folder's name, the adapters the caller may use, the
    folders there; no server path."""

    def blip_adapter_list(request=None):
        return studio.shown(studio.blip_adapters.describe(visitor_id(request)))

    return named_endpoint(blip_adapter_list, [parameter("request", None, gr.Request)])


def make_adapter_unload_function(studio: Studio):
    """The `/blip_adapter_unload` endpoint: remove one of the caller's uploaded adapters by name.

    Locally, folder and Hub adapters may be removed too; on a public instance they are the
    operator's (shared by every visitor) and a visitor gets a sentence instead.
    """

    def blip_adapter_unload(name="", request=None):
        name = str(name or "").strip()
        if not name:
            raise ValueError("Give the name of the adapter to remove (the Adapters list shows them).")
        visitor = visitor_id(request)
        studio.blip_adapters.remove(studio.captioner(), name, visitor=visitor, shared=not studio.public)
        return f"Removed the adapter **{name}**.", studio.shown(studio.blip_adapters.describe(visitor))

    return named_endpoint(blip_adapter_unload, [parameter("name", ""), parameter("request", None, gr.Request)])


def build_adapter_picker(studio: Studio, label: str = "Adapter") -> gr.Dropdown:
    """A dropdown of the base model and the loaded adapters, refreshed whenever it is opened."""
    picker = gr.Dropdown(
        choices=adapter_choices(studio),
        value="",
        label=label,
        info="LoRA adapter on BLIP's text decoder; load more in the Caption tab",
        allow_custom_value=True,  # adapters loaded after the page was built; the pipeline checks the name
    )

    def visible_choices(request: gr.Request):
        return gr.update(choices=adapter_choices(studio, visitor_id(request)))

    picker.focus(visible_choices, outputs=picker, queue=False, api_visibility="private")
    return picker


def build_caption_tab(studio: Studio) -> dict:
    """Build the Caption tab inside the current Blocks; returns its main components."""
    gr.Markdown(
        "Caption any image with BLIP base. Each caption's **score** is the mean log-probability "
        "the model gives its own tokens (0 is the maximum; higher is more confident)."
    )
    with gr.Row():
        with gr.Column(scale=1):
            image = UploadedImage(label="Image", sources=["upload", "clipboard", "webcam"], height=360)
            controls = build_decoding_controls(show_reuse_seed=True)
            with gr.Accordion("Adapter (BLIP LoRA)", open=False):
                adapter = build_adapter_picker(studio)
                source = gr.Textbox(
                    label="Load: folder name or Hub id",
                    placeholder=f"a folder in {studio.blip_adapters.shown_dir}, or owner/name on the Hub",
                )
                upload = gr.File(
                    label="…or upload adapter_config.json + adapter_model.safetensors, or a .zip of the folder",
                    file_count="multiple",
                    file_types=[".json", ".safetensors", ".zip"],
                    type="filepath",
                )
                with gr.Row():
                    load = gr.Button("Load adapter")
                    refresh = gr.Button("List adapters", size="sm")
                with gr.Row():
                    unload_name = gr.Textbox(label="Remove (name of your uploaded adapter)", scale=3)
                    unload = gr.Button("Remove", variant="stop", size="sm", scale=1)
                adapter_status = gr.Markdown()
                loaded_name = gr.Textbox(visible=False)  # the API's first output; the picker follows it
                adapter_list = gr.JSON(label="Adapters")
            run = gr.Button("Caption", variant="primary")
            error_status = gr.Markdown(elem_id="caption-error")  # the last error's sentence stays here
        with gr.Column(scale=1):
            table = gr.Dataframe(
                headers=CAPTION_TABLE_HEADERS,
                datatype=["number", "str", "number", "number", "str"],
                label="Captions",
                interactive=False,
                wrap=True,
                column_widths=["7%", "55%", "13%", "10%", "15%"],
            )
            summary = gr.Markdown()
            with gr.Row():  # A1111's Interrogate: the caption becomes the prompt
                use_in_generate = gr.Button("Use as prompt in Generate →", size="sm")
                use_in_img2img = gr.Button("Use as prompt in img2img (with this image) →", size="sm")
            gr.Markdown(runtime_blip_precision(studio.manager.runtime).label)  # --precision, fixed at start
            with gr.Accordion("Raw result (JSON)", open=False):
                details = gr.JSON(label="Result")
    example_photos(image)

    def picked_adapter(name: str = "", request: gr.Request = None):
        return gr.update(choices=adapter_choices(studio, visitor_id(request)), value=name or "")

    last_errors = LastErrors()
    captioning = gr.on(
        triggers=[run.click],
        fn=last_errors.watch(make_caption_function(studio)),
        inputs=[image, *controls.inputs(), adapter],
        outputs=[table, summary, details],
        api_name="caption",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    last_errors.show_on(captioning, error_status)
    controls.reuse_seed.click(
        last_seed, inputs=[details, controls.seed], outputs=controls.seed, queue=False, api_visibility="private"
    )
    load.click(
        make_adapter_load_function(studio),
        inputs=[source, upload],
        outputs=[loaded_name, adapter_status, adapter_list],
        api_name="blip_adapter_load",
        concurrency_id=settings.GPU_CONCURRENCY_ID,  # it changes the model a running caption uses
    ).success(
        picked_adapter,
        inputs=loaded_name,
        outputs=adapter,
        queue=False,
        api_visibility="private",
    )
    refresh.click(make_adapter_list_function(studio), outputs=adapter_list, queue=False, api_name="blip_adapter_list")
    unload.click(
        make_adapter_unload_function(studio),
        inputs=unload_name,
        outputs=[adapter_status, adapter_list],
        api_name="blip_adapter_unload",
        concurrency_id=settings.GPU_CONCURRENCY_ID,  # it changes the model a running caption uses
    ).success(picked_adapter, inputs=None, outputs=adapter, queue=False, api_visibility="private")
    return {
        "image": image,
        "controls": controls,
        "table": table,
        "details": details,
        "adapter": adapter,
        "use_in_generate": use_in_generate,
        "use_in_img2img": use_in_img2img,
    }


def caption_as_prompt(details: dict | None) -> str:
    """The best caption of the last run (its details), to use as a prompt; a sentence when there is none."""
    captions = (details or {}).get("captions") if isinstance(details, dict) else None
    if not captions or not isinstance(captions[0], dict) or not str(captions[0].get("text") or "").strip():
        raise ValueError("Caption an image first: its best caption becomes the prompt.")
    return str(captions[0]["text"]).strip()[: settings.MAX_PROMPT_CHARS]


if __name__ == "__main__":
    launch_alone(build_caption_tab, "Caption")
