"""Attention tab: where BLIP looked in the image for each word of a caption (API ``/attention``)."""

from __future__ import annotations

import gradio as gr

from components.common import (
    UploadedImage,
    ValidatedSlider,
    example_photos,
    launch_alone,
    markdown_text,
    named_endpoint,
    parameter,
    visitor_id,
)
from pipelines import settings, workspace
from pipelines.blip.attention import AttentionRequest, AttentionResult, decoder_layout, explain_attention
from pipelines.images import describe_image, load_image
from pipelines.studio import Studio

MAPS_EXPLAINED = """
**How to read the maps.** For each word, the colour shows how much BLIP's text decoder attended to
each patch of the image at the step that produced the word (yellow most, dark least; each word is
scaled on its own, so compare places within one map, not heat across maps). Pick one decoder layer
or the mean of all, one attention head or the mean of heads. The image's global [CLS] entry is left
out of the maps; the exported raw maps keep it (key 0 of each row).
"""


def attention_details(result: AttentionResult, studio: Studio, image_description: str) -> dict:
    """What an API client may want next to the pictures: the tokens, the words and the settings."""
    request = result.request
    return {
        "caption": request.caption,
        "caption_generated": result.caption_generated,
        "tokens": result.maps.tokens,
        "words": [{"word": word.word, "tokens": list(word.token_indices)} for word in result.words],
        "layer": request.layer,
        "head": request.head,
        "merge_word_pieces": request.merge_word_pieces,
        "grid": result.maps.grid,
        "raw_shape": list(result.maps.maps.shape),
        "raw_layout": "(layers, heads, tokens, 1 + grid²); key 0 is the image's [CLS] embedding",
        "seconds": round(result.seconds, 4),
        "model": studio.manager.source_for("blip-caption"),
        "image": image_description,
        "tiny_mode": studio.tiny,
    }


def blip_decoder_layout(studio: Studio) -> tuple[int, int]:
    """(layers, heads) of the captioning BLIP's text decoder, before it loads."""
    return decoder_layout(studio.manager.source_for("blip-caption"), studio.manager.catalog["blip-caption"])


def make_attention_function(studio: Studio):
    """The `/attention` endpoint: ``image`` is required; without a caption BLIP writes one."""
    layers, heads = blip_decoder_layout(studio)  # from config.json, so requests are checked before loading

    # A generator: the export is written into a folder of this request and yielded; Gradio copies it
    # to its cache, then the folder is deleted.
    def attention(image, caption, layer, head, merge_word_pieces, opacity, export_format, http_request):
        if image is None:
            raise ValueError("Upload an image (PNG, JPEG, WebP, GIF, BMP or TIFF) first.")
        request = AttentionRequest(
            caption=caption,
            layer=layer,
            head=head,
            merge_word_pieces=merge_word_pieces,
            opacity=opacity,
            export_format=export_format,
        ).validated(layers, heads)
        picture = load_image(image)
        with workspace.request_folder(visitor_id(http_request), prefix="attention-") as export_dir:
            result, exported = explain_attention(studio.captioner(), picture, request, export_dir=export_dir)
            gallery = [(overlay, word.word) for overlay, word in zip(result.overlays, result.words, strict=True)]
            layer_text = "mean of all layers" if request.layer == 0 else f"layer {request.layer}"
            head_text = "mean of heads" if request.head == 0 else f"head {request.head}"
            source = "BLIP's own caption" if result.caption_generated else "your caption"
            summary = (
                f"{len(result.words)} word(s) of {source}: **{markdown_text(result.request.caption)}** · {layer_text}, {head_text} · "
                f"{result.maps.grid}×{result.maps.grid} patches · {result.seconds:.2f} s"
            )
            if studio.tiny:
                summary += "\n\nTiny random model: the maps are real computations of a model that has learnt nothing."
            details = attention_details(result, studio, describe_image(picture))
            yield gallery, result.sheet, str(exported), summary, details

    defaults = AttentionRequest()
    return named_endpoint(
        attention,
        [
            parameter("image"),
            parameter("caption", defaults.caption),
            parameter("layer", defaults.layer),
            parameter("head", defaults.head),
            parameter("merge_word_pieces", defaults.merge_word_pieces),
            parameter("opacity", defaults.opacity),
            parameter("export_format", defaults.export_format),
            parameter("http_request", None, gr.Request),
        ],
    )


def build_attention_tab(studio: Studio) -> dict:
    """Build the Attention tab inside the current Blocks; returns its main components."""
    layers, heads = blip_decoder_layout(studio)
    defaults = AttentionRequest()
    gr.Markdown(
        "Where did BLIP look for each word? Upload an image and type a caption (or leave it empty and "
        "BLIP writes one); every word gets a heatmap of the decoder's cross-attention over the image."
    )
    with gr.Row():
        with gr.Column(scale=1):
            image = UploadedImage(label="Image", sources=["upload", "clipboard", "webcam"], height=320)
            caption = gr.Textbox(
                value=defaults.caption,
                label="Caption (any text)",
                placeholder="leave empty: BLIP captions the image first",
                max_length=settings.MAX_ATTENTION_CAPTION_CHARS,
            )
            with gr.Row():
                layer = ValidatedSlider(
                    0, layers, value=defaults.layer, step=1, label=f"Layer (0 = mean of all {layers})"
                )
                head = ValidatedSlider(0, heads, value=defaults.head, step=1, label=f"Head (0 = mean of all {heads})")
            merge_word_pieces = gr.Checkbox(
                value=defaults.merge_word_pieces, label="Merge word pieces (##) into whole words"
            )
            with gr.Accordion("Display and export", open=False):
                opacity = ValidatedSlider(0.0, 1.0, value=defaults.opacity, step=0.05, label="Heatmap opacity")
                export_format = gr.Radio(
                    choices=list(settings.ATTENTION_EXPORT_FORMATS),
                    value=defaults.export_format,
                    label="Raw maps file (.npy: the array alone; .json: with tokens and layout)",
                )
            run = gr.Button("Show attention", variant="primary")
        with gr.Column(scale=2):
            summary = gr.Markdown()
            gallery = gr.Gallery(label="Word → where BLIP looked", columns=4, height=420, preview=False)
            sheet = gr.Image(label="All words laid out", type="pil", format="png", interactive=False)
            exported = gr.File(label="Raw cross-attention maps")
            gr.Markdown(MAPS_EXPLAINED)
            with gr.Accordion("Raw result (JSON)", open=False):
                details = gr.JSON(label="Result")
    example_photos(image)
    gr.on(
        triggers=[run.click, caption.submit],
        fn=make_attention_function(studio),
        inputs=[image, caption, layer, head, merge_word_pieces, opacity, export_format],
        outputs=[gallery, sheet, exported, summary, details],
        api_name="attention",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    return {"image": image, "caption": caption, "gallery": gallery, "sheet": sheet, "details": details}


if __name__ == "__main__":
    launch_alone(build_attention_tab, "Attention")
