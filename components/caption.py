"""Caption tab: any image in, BLIP captions out, with every decoding strategy (API ``/caption``)."""

from __future__ import annotations

from dataclasses import fields

import gradio as gr

from components.common import UploadedImage, example_photos, launch_alone, named_endpoint, parameter
from components.decoding import build_decoding_controls, decoding_parameters, request_from_values
from pipelines.blip import CaptionRequest, CaptionResult
from pipelines.images import describe_image, load_image
from pipelines.studio import Studio

CAPTION_TABLE_HEADERS = ["#", "caption", "score", "tokens"]


def caption_table(result: CaptionResult) -> list[list]:
    """One row per caption, best first."""
    return [
        [rank, caption.text, round(caption.score, 4), caption.num_tokens]
        for rank, caption in enumerate(result.captions, start=1)
    ]


def caption_details(result: CaptionResult, studio: Studio, image_description: str) -> dict:
    """Everything an API client may want to keep next to the captions."""
    request = result.request
    return {
        "captions": [
            {"text": caption.text, "score": caption.score, "tokens": caption.num_tokens} for caption in result.captions
        ],
        "seconds": round(result.seconds, 4),
        "seed": request.seed if request.strategy == "sampling" else None,
        "request": {field.name: getattr(request, field.name) for field in fields(CaptionRequest)},
        "model": studio.manager.source_for("blip-caption"),
        "image": image_description,
        "tiny_mode": studio.tiny,
    }


def make_caption_function(studio: Studio):
    """The `/caption` endpoint: ``image`` is required, every decoding setting has a default."""

    def caption(image, **settings):
        if image is None:
            raise ValueError("Upload an image (PNG, JPEG, WebP, GIF, BMP or TIFF) first.")
        picture = load_image(image)
        request = request_from_values(settings).validated()
        result = studio.captioner().caption(picture, request)
        details = caption_details(result, studio, describe_image(picture))
        summary = f"{len(result.captions)} caption(s) in {result.seconds:.2f} s · {request.strategy}"
        if request.strategy == "sampling":
            summary += f" · seed {request.seed}"
        if studio.tiny:
            summary += " · tiny random model: the words are gibberish by design"
        return caption_table(result), summary, details

    return named_endpoint(caption, [parameter("image"), *decoding_parameters()])


def build_caption_tab(studio: Studio) -> dict:
    """Build the Caption tab inside the current Blocks; returns its main components."""
    gr.Markdown(
        "Caption any image with BLIP base. Each caption's **score** is the mean log-probability "
        "the model gives its own tokens (0 is the maximum; higher is more confident)."
    )
    with gr.Row():
        with gr.Column(scale=1):
            image = UploadedImage(label="Image", sources=["upload", "clipboard", "webcam"], height=360)
            controls = build_decoding_controls()
            run = gr.Button("Caption", variant="primary")
        with gr.Column(scale=1):
            table = gr.Dataframe(
                headers=CAPTION_TABLE_HEADERS,
                datatype=["number", "str", "number", "number"],
                label="Captions",
                interactive=False,
                wrap=True,
                column_widths=["7%", "65%", "15%", "13%"],
            )
            summary = gr.Markdown()
            with gr.Accordion("Raw result (JSON)", open=False):
                details = gr.JSON(label="Result")
    example_photos(image)
    gr.on(
        triggers=[run.click],
        fn=make_caption_function(studio),
        inputs=[image, *controls.inputs()],
        outputs=[table, summary, details],
        api_name="caption",
        concurrency_id="blip",
    )
    return {"image": image, "controls": controls, "table": table, "details": details}


if __name__ == "__main__":
    launch_alone(build_caption_tab, "Caption")
