"""Match tab: rank candidate texts for an image, or images for a text (API ``/match``)."""

from __future__ import annotations

import os

import gradio as gr

from components.common import UploadedImage, example_photos, launch_alone, markdown_text, named_endpoint, parameter
from pipelines import settings
from pipelines.blip.matching import RANKING_LABELS, MatchRequest, MatchResult, TextScore
from pipelines.images import describe_image, load_image
from pipelines.studio import Studio

TEXT_TABLE_HEADERS = ["#", "text", "mean log-prob", "total log-prob", "tokens", "ITM P(match)", "ITC cosine"]
TEXT_TABLE_TYPES = ["number", "str", "number", "number", "number", "str", "str"]
IMAGE_TABLE_HEADERS = ["text", "#", "image", "mean log-prob", "total log-prob", "ITM P(match)", "ITC cosine"]
IMAGE_TABLE_TYPES = ["str", "number", "str", "number", "number", "str", "str"]
SECOND_OPINION_HEADERS = ("ITM P(match)", "ITC cosine")  # shown only when the retrieval model answered (last)

SCORES_EXPLAINED = """
**What the scores mean.** *Mean log-prob* is the average log-probability per token that the
captioning model gives the text when it looks at this image (the text's word pieces plus the
end-of-caption token): the same number as a caption's score in the Caption tab, so a caption
BLIP finished before the token limit scores here what it scored there. 0 is the maximum; higher means the text is what BLIP
would more readily say about the image. *Total log-prob* is the whole text's log-probability:
it ranks the same as the mean for one text across images, but across texts it favours short ones.
The optional **second opinion** comes from BLIP's retrieval model (`Salesforce/blip-itm-base-coco`):
*ITM* is its probability (0 to 1) that image and text match, *ITC* the cosine similarity
(-1 to 1) of their embeddings.
"""


def _optional(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _score_cells(score: TextScore) -> list:
    return [
        round(score.mean_logprob, 4),
        round(score.total_logprob, 4),
        _optional(score.itm_probability),
        _optional(score.itc_similarity),
    ]


def text_table(result: MatchResult) -> list[list]:
    """The texts ranked for the main image, best first."""
    rows = []
    for rank, (_, score) in enumerate(result.ranked_texts(0), start=1):
        mean, total, itm, itc = _score_cells(score)
        rows.append([rank, score.text, mean, total, score.num_tokens, itm, itc])
    return rows


def image_table(result: MatchResult) -> list[list]:
    """For each text, the images ranked best first; empty for a single image."""
    if len(result.image_names) < 2:
        return []
    rows = []
    for text_index, text in enumerate(result.texts):
        for rank, (image_index, score) in enumerate(result.ranked_images(text_index), start=1):
            rows.append([text, rank, result.image_names[image_index], *_score_cells(score)])
    return rows


def shown_table(rows: list[list], headers: list[str], second_opinion: bool):
    """The table as a DataFrame (its columns are the headers shown), without the ITM and ITC columns when the
    retrieval model gave no scores."""
    import pandas as pd

    keep = [index for index, header in enumerate(headers) if second_opinion or header not in SECOND_OPINION_HEADERS]
    return pd.DataFrame([[row[i] for i in keep] for row in rows], columns=[headers[i] for i in keep])


def match_details(result: MatchResult, studio: Studio, descriptions: list[str], cache_counts: dict) -> dict:
    """Everything an API client may want to keep: every score, both rankings, where they came from."""
    return {
        "texts": list(result.texts),
        "images": [
            {"name": name, "image": description}
            for name, description in zip(result.image_names, descriptions, strict=True)
        ],
        "rank_by": result.rank_by,
        "scores": [
            [
                {
                    "text": score.text,
                    "mean_logprob": score.mean_logprob,
                    "total_logprob": score.total_logprob,
                    "tokens": score.num_tokens,
                    "itm_probability": score.itm_probability,
                    "itc_similarity": score.itc_similarity,
                }
                for score in row
            ]
            for row in result.scores
        ],
        "text_ranking": [index for index, _ in result.ranked_texts(0)],
        "image_ranking": [[index for index, _ in result.ranked_images(text)] for text in range(len(result.texts))],
        "second_opinion": {"asked": result.request.second_opinion, "note": result.second_opinion_note},
        "seconds": round(result.seconds, 4),
        "model": studio.manager.source_for("blip-caption"),
        "retrieval_model": studio.manager.source_for("blip-itm") if result.request.second_opinion else None,
        "feature_cache": cache_counts,
        "tiny_mode": studio.tiny,
    }


def _name(source, fallback: str) -> str:
    return os.path.basename(source) if isinstance(source, (str, os.PathLike)) and os.fspath(source) else fallback


def make_match_function(studio: Studio):
    """The `/match` endpoint: ``image`` is required; texts default to one candidate per example photo."""

    def match(image, texts, more_images, rank_by, second_opinion):
        if image is None:
            raise ValueError("Upload an image (PNG, JPEG, WebP, GIF, BMP or TIFF) first.")
        request = MatchRequest(texts=texts, rank_by=rank_by, second_opinion=second_opinion).validated()
        sources = [image, *(more_images or [])]
        if len(sources) > settings.MAX_MATCH_IMAGES:
            raise ValueError(f"{len(sources)} images were given; rank at most {settings.MAX_MATCH_IMAGES} at a time.")
        pictures = [load_image(source) for source in sources]
        names = [_name(source, f"image {n}") for n, source in enumerate(sources, start=1)]
        matcher = studio.matcher()
        result = matcher.match(pictures, request, image_names=names)
        cache = matcher.captioner.feature_cache
        details = match_details(
            result,
            studio,
            [describe_image(picture) for picture in pictures],
            {"hits": cache.hits, "misses": cache.misses},
        )
        best = result.ranked_texts(0)[0][1]
        summary = (
            f"{len(result.texts)} text(s) × {len(pictures)} image(s) in {result.seconds:.2f} s, ranked by "
            f"{RANKING_LABELS[result.rank_by]}. Best text for the main image: **{markdown_text(best.text)}**"
        )
        if result.second_opinion_note:
            summary += f"\n\nSecond opinion unavailable, ranked by the captioner alone: {result.second_opinion_note}"
        if studio.tiny:
            summary += "\n\nTiny random models: the scores are real computations, the rankings mean nothing."
        answered = any(score.itm_probability is not None for row in result.scores for score in row)
        return (
            shown_table(text_table(result), TEXT_TABLE_HEADERS, answered),
            shown_table(image_table(result), IMAGE_TABLE_HEADERS, answered),
            summary,
            details,
        )

    return named_endpoint(
        match,
        [
            parameter("image"),
            parameter("texts", settings.DEFAULT_MATCH_TEXTS),
            parameter("more_images", None),
            parameter("rank_by", settings.DEFAULT_MATCH_RANKING),
            parameter("second_opinion", False),
        ],
    )


def build_match_tab(studio: Studio) -> dict:
    """Build the Match tab inside the current Blocks; returns its main components."""
    gr.Markdown(
        "How well does each text fit the image, in BLIP's own words? Type candidate texts, one per line, "
        "to rank them for an image; add more images to also rank the images for each text."
    )
    with gr.Row():
        with gr.Column(scale=1):
            image = UploadedImage(label="Image", sources=["upload", "clipboard", "webcam"], height=320)
            texts = gr.Textbox(
                value=settings.DEFAULT_MATCH_TEXTS,
                label=f"Candidate texts, one per line (up to {settings.MAX_MATCH_TEXTS})",
                lines=6,
                max_lines=settings.MAX_MATCH_TEXTS,
            )
            more_images = gr.File(
                label=f"More images (optional, up to {settings.MAX_MATCH_IMAGES - 1}): rank the images for each text",
                file_count="multiple",
                file_types=["image"],
                type="filepath",
            )
            with gr.Row():
                rank_by = gr.Radio(
                    choices=[(label, key) for key, label in RANKING_LABELS.items()],
                    value=settings.DEFAULT_MATCH_RANKING,
                    label="Rank by",
                )
                second_opinion = gr.Checkbox(
                    value=False, label="Second opinion from BLIP's retrieval model (ITM + ITC; loads on first use)"
                )
            run = gr.Button("Match", variant="primary")
        with gr.Column(scale=2):
            summary = gr.Markdown()
            texts_ranked = gr.Dataframe(
                headers=[header for header in TEXT_TABLE_HEADERS if header not in SECOND_OPINION_HEADERS],
                datatype=TEXT_TABLE_TYPES,
                label="Texts ranked for the image",
                interactive=False,
                wrap=True,
            )
            images_ranked = gr.Dataframe(
                headers=[header for header in IMAGE_TABLE_HEADERS if header not in SECOND_OPINION_HEADERS],
                datatype=IMAGE_TABLE_TYPES,
                label="Images ranked for each text (with more images)",
                interactive=False,
                wrap=True,
            )
            gr.Markdown(SCORES_EXPLAINED)
            with gr.Accordion("Raw result (JSON)", open=False):
                details = gr.JSON(label="Result")
    example_photos(image)
    run.click(
        make_match_function(studio),
        inputs=[image, texts, more_images, rank_by, second_opinion],
        outputs=[texts_ranked, images_ranked, summary, details],
        api_name="match",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    return {"image": image, "texts": texts, "texts_ranked": texts_ranked, "details": details}


if __name__ == "__main__":
    launch_alone(build_match_tab, "Match")
