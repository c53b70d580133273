"""Cross-attention heatmaps: where BLIP's text decoder looked in the image for each word.

``generate()`` returns no cross-attentions for BLIP (its decoder is not an
encoder-decoder model), so the caption is run once more, teacher-forced, with
``output_attentions=True``. Every decoder layer gives a map of shape
``(heads, tokens, 1 + grid²)``: one softmax row per token over the image's
[CLS] embedding and its grid of patches (BLIP base: 12 layers, 12 heads, a
24 x 24 grid).

The map of a caption token is the attention of the decoding step that
*produced* it: the query sits on the previous token (``[DEC]`` for the first
word), exactly as when BLIP wrote the caption. Heatmaps then take one layer or
the mean of all, one head or the mean of heads, leave the [CLS] column out,
merge word pieces (``##``) into words, scale each word to [0, 1] and colour it
over the image. Maps and BLIP's own caption are always the base model's, even
while LoRA adapters are loaded for captioning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipelines import settings
from pipelines.blip.captioner import BlipCaptioner, CaptionRequest
from pipelines.catalog import MODEL_CONFIGS_DIR, ModelSpec
from pipelines.validation import as_float, as_int, strip_control_characters


@dataclass(frozen=True)
class AttentionRequest:
    """What to show. ``layer`` and ``head`` count from 1; 0 means the mean of all of them."""

    caption: str = ""  # empty: BLIP captions the image first (the Caption tab's defaults)
    layer: int = 0
    head: int = 0
    merge_word_pieces: bool = True  # False: one heatmap per word piece (cat ##s)
    opacity: float = settings.DEFAULT_ATTENTION_OPACITY
    export_format: str = settings.ATTENTION_EXPORT_FORMATS[0]  # npy (the array alone) or json

    def validated(self, num_layers: int, num_heads: int) -> AttentionRequest:
        """This request with the caption tidied and numbers checked against a decoder of that size.

        Raises ValueError naming the bad value and the allowed range.
        """
        caption = " ".join(strip_control_characters(str(self.caption or "")).split())
        if len(caption) > settings.MAX_ATTENTION_CAPTION_CHARS:
            raise ValueError(
                f"The caption has {len(caption)} characters; keep it under {settings.MAX_ATTENTION_CAPTION_CHARS} "
                "(a sentence or two), or leave it empty to let BLIP write one."
            )
        if self.export_format not in settings.ATTENTION_EXPORT_FORMATS:
            raise ValueError(
                f"Unknown export format {self.export_format!r}; choose one of: "
                f"{', '.join(settings.ATTENTION_EXPORT_FORMATS)}."
            )
        return dataclasses.replace(
            self,
            caption=caption,
            layer=as_int("layer (0 = the mean of all layers)", self.layer, 0, num_layers),
            head=as_int("head (0 = the mean of all heads)", self.head, 0, num_heads),
            merge_word_pieces=bool(self.merge_word_pieces),
            opacity=as_float("opacity", self.opacity, 0.0, 1.0),
        )


@dataclass(frozen=True)
class CrossAttentionMaps:
    """The raw maps of one caption, as the decoder produced them."""

    caption: str
    tokens: list[str]  # the caption's word pieces, in order
    spans: list[tuple[int, int]] | None  # each token's character span in ``caption`` (None: tokenizer gives none)
    maps: np.ndarray  # (layers, heads, tokens, 1 + grid²) float32; row k: the step that produced token k
    grid: int  # the image is grid x grid patches; key 0 is the image's [CLS] embedding

    @property
    def num_layers(self) -> int:
        return self.maps.shape[0]

    @property
    def num_heads(self) -> int:
        return self.maps.shape[1]


@dataclass(frozen=True)
class WordHeatmap:
    word: str  # as typed (or as decoded, for a generated caption); a piece keeps its ## when not merged
    token_indices: tuple[int, ...]  # which rows of the raw maps it averages
    heatmap: np.ndarray  # (grid, grid) in [0, 1]: the word's attention over the patches, scaled per word


@dataclass(frozen=True)
class AttentionResult:
    maps: CrossAttentionMaps
    words: list[WordHeatmap]
    overlays: list[Image.Image]  # one per word, the heatmap coloured over the image
    sheet: Image.Image  # the image and every overlay laid out with its word underneath
    caption_generated: bool  # True when BLIP wrote the caption because none was given
    request: AttentionRequest  # validated, with the caption actually used
    seconds: float


@torch.inference_mode()
def cross_attention_maps(captioner: BlipCaptioner, image: Image.Image, caption: str) -> CrossAttentionMaps:
    """One teacher-forced decoder pass over ``[DEC] + caption`` with ``output_attentions=True``.

    Raises ValueError when the caption tokenises to nothing or is longer than the model reads.
    """
    ids = captioner.text_ids(caption, "The caption")
    check_token_count(len(ids))
    spans = _token_spans(captioner.processor.tokenizer, caption, len(ids))
    image_embeds = captioner.encode_images([image])  # cached: the Caption tab may have encoded it already
    input_ids = torch.tensor([[captioner.bos_token_id, *ids]], dtype=torch.long, device=captioner.device)
    with captioner.using_adapter(None):  # the base model's attention, even while LoRA adapters are loaded
        output = captioner.model.text_decoder(
            input_ids=input_ids,
            encoder_hidden_states=image_embeds,
            output_attentions=True,
            use_cache=False,
        )
    # Per layer (1, heads, 1 + T, keys); row t is the step whose query sits on input t and
    # which predicts input t + 1, so rows 0..T-1 belong to the caption's T tokens.
    stacked = torch.stack([layer[0, :, : len(ids)] for layer in output.cross_attentions])
    maps = stacked.float().cpu().numpy()
    grid = math.isqrt(maps.shape[-1] - 1)
    if grid * grid != maps.shape[-1] - 1:
        raise ValueError(f"The vision model gives {maps.shape[-1] - 1} patches, not a square grid; heatmaps need one.")
    tokens = captioner.processor.tokenizer.convert_ids_to_tokens(ids)
    return CrossAttentionMaps(caption=caption, tokens=tokens, spans=spans, maps=maps, grid=grid)


def _token_spans(tokenizer, caption: str, count: int) -> list[tuple[int, int]] | None:
    """Each token's (start, end) in ``caption``, from a fast tokenizer; None where there is none."""
    try:
        offsets = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):
        return None
    return [tuple(span) for span in offsets] if len(offsets) == count else None


def select_maps(maps: CrossAttentionMaps, layer: int = 0, head: int = 0) -> np.ndarray:
    """(tokens, grid, grid): one layer (1-based) or the mean of all (0), one head or the mean (0); no [CLS]."""
    if not 0 <= layer <= maps.num_layers:
        raise ValueError(f"layer must be 0 (mean of all) or 1 to {maps.num_layers} for this model, not {layer}.")
    if not 0 <= head <= maps.num_heads:
        raise ValueError(f"head must be 0 (mean of all) or 1 to {maps.num_heads} for this model, not {head}.")
    chosen = maps.maps.mean(axis=0) if layer == 0 else maps.maps[layer - 1]
    chosen = chosen.mean(axis=0) if head == 0 else chosen[head - 1]
    patches = chosen[:, 1:]  # column 0 is the image's [CLS] embedding, not a place in the image
    return patches.reshape(len(maps.tokens), maps.grid, maps.grid)


def word_groups(tokens: list[str], merge_word_pieces: bool = True) -> list[tuple[int, ...]]:
    """Token indices per word: a ``##`` piece joins the word before it (unless ``merge_word_pieces`` is False)."""
    groups: list[list[int]] = []
    for index, token in enumerate(tokens):
        if merge_word_pieces and token.startswith("##") and groups:
            groups[-1].append(index)
        else:
            groups.append([index])
    return [tuple(group) for group in groups]


def word_heatmaps(
    maps: CrossAttentionMaps, layer: int = 0, head: int = 0, merge_word_pieces: bool = True
) -> list[WordHeatmap]:
    """One heatmap per word (or per piece): the mean of its pieces' maps, scaled to [0, 1] per word."""
    patches = select_maps(maps, layer, head)
    heatmaps = []
    for group in word_groups(maps.tokens, merge_word_pieces):
        values = patches[list(group)].mean(axis=0)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        heatmaps.append(WordHeatmap(word=_word_text(maps, group), token_indices=group, heatmap=scaled))
    return heatmaps


def _word_text(maps: CrossAttentionMaps, group: tuple[int, ...]) -> str:
    """The word as written in the caption when spans are known, else its pieces joined."""
    if maps.spans is not None:
        start, end = maps.spans[group[0]][0], maps.spans[group[-1]][1]
        if end > start:
            # A piece shown on its own keeps its ## so it reads as the end of a word.
            return ("##" if maps.tokens[group[0]].startswith("##") else "") + maps.caption[start:end]
    pieces = [maps.tokens[index] for index in group]
    return pieces[0] + "".join(piece.removeprefix("##") for piece in pieces[1:])


def decoder_layout(source: str | Path, spec: ModelSpec) -> tuple[int, int]:
    """(layers, heads) of a BLIP model's text decoder, read from its config.json without loading it.

    ``source`` is where the model loads from (``ModelManager.source_for``), ``spec`` its catalog
    entry. A local source (a tiny model, a ``--model`` folder) is read where it is; a Hub
    id from the catalog's copy of the real config in ``assets/model-configs``.
    The UI sizes its sliders with this; requests are still checked against the
    loaded model.
    """
    config_path = Path(source).expanduser() / "config.json"
    if not config_path.is_file():
        config_path = MODEL_CONFIGS_DIR / spec.config_dir / "config.json"
    text_config = json.loads(config_path.read_text())["text_config"]
    return int(text_config["num_hidden_layers"]), int(text_config["num_attention_heads"])


# ----------------------------------------------------------------------------- drawing

# A perceptual dark-to-bright colour scale like matplotlib's "inferno": anchor colours
# at even steps, linearly interpolated. Dark where the word did not look, yellow where it did.
_ANCHORS = np.array(
    [
        (0, 0, 4),
        (22, 11, 57),
        (66, 10, 104),
        (106, 23, 110),
        (147, 38, 103),
        (188, 55, 84),
        (221, 81, 58),
        (243, 120, 25),
        (252, 165, 10),
        (246, 215, 70),
        (252, 255, 164),
    ],
    dtype=np.float64,
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, channel]) for channel in range(3)],
    axis=1,
).astype(np.uint8)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) to uint8 RGB through the inferno-like scale."""
    indices = np.clip(np.rint(np.nan_to_num(values) * 255), 0, 255).astype(np.uint8)
    return _LUT[indices]


def overlay(
    image: Image.Image, heatmap: np.ndarray, opacity: float = settings.DEFAULT_ATTENTION_OPACITY
) -> Image.Image:
    """``heatmap`` (grid x grid, in [0, 1]) upsampled to ``image`` and blended over it.

    Each pixel's opacity grows with its heat, so where the word did not look the
    photo shows through unchanged. BLIP squashes every image to a square, so the
    grid is stretched back over the image's own aspect ratio.
    """
    width, height = image.size
    upsampled = Image.fromarray(heatmap.astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC)
    heat = np.clip(np.asarray(upsampled), 0.0, 1.0)[..., None]
    alpha = opacity * heat
    blended = np.asarray(image.convert("RGB"), dtype=np.float32) * (1 - alpha) + colorize(heat[..., 0]) * alpha
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def fit_within(image: Image.Image, side: int) -> Image.Image:
    """A copy of ``image`` whose longest side is at most ``side`` (aspect kept)."""
    copy = image.convert("RGB")
    if max(copy.size) > side:
        copy.thumbnail((side, side), Image.Resampling.LANCZOS)
    return copy


def token_sheet(
    image: Image.Image,
    overlays: list[Image.Image],
    words: list[str],
    *,
    cell: int = settings.ATTENTION_SHEET_CELL,
    columns: int = settings.ATTENTION_SHEET_COLUMNS,
) -> Image.Image:
    """The image and each word's overlay in a grid, in caption order, with the word written under each."""
    font = ImageFont.load_default(size=max(10, cell // 12))
    label_height = font.size + 10
    tiles = [(image, "(image)"), *zip(overlays, words, strict=True)]
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    picture_height = fit_within(image, cell - 8).height + 8  # every overlay has the image's aspect
    row_height = picture_height + label_height
    sheet = Image.new("RGB", (columns * cell, rows * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    for position, (picture, word) in enumerate(tiles):
        left, top = (position % columns) * cell, (position // columns) * row_height
        thumbnail = fit_within(picture, cell - 8)
        sheet.paste(thumbnail, (left + (cell - thumbnail.width) // 2, top + (picture_height - thumbnail.height) // 2))
        label = _fit_label(draw, word, font, cell - 8)
        width = draw.textlength(label, font=font)
        draw.text((left + (cell - width) / 2, top + picture_height + 2), label, fill="black", font=font)
    return sheet


def _fit_label(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


# ----------------------------------------------------------------------------- export


JSON_BYTES_PER_NUMBER = 10  # "0.123456, ": six decimals never print longer (1.2e-05 and 1e-06 are shorter)
JSON_TEXT_BYTES = 64 * 1024  # the caption, its tokens and the layout note, generously


def check_token_count(tokens: int) -> None:
    """ValueError when a caption has more word pieces than one request computes maps for."""
    if tokens > settings.MAX_ATTENTION_TOKENS:
        raise ValueError(
            f"The caption is {tokens} word pieces long; attention maps are made for at most "
            f"{settings.MAX_ATTENTION_TOKENS}. Shorten it."
        )


def export_size_bytes(shape: tuple[int, ...], export_format: str) -> int:
    """An upper bound on the bytes ``export_maps`` writes for maps of ``shape``, known before writing."""
    numbers = math.prod(shape)
    if export_format == "npy":
        return 128 + 4 * numbers  # the .npy header, then float32
    rows = math.prod(shape[:-1])  # every innermost list adds "[", "]" and ", "
    return JSON_TEXT_BYTES + JSON_BYTES_PER_NUMBER * numbers + 4 * rows + 4 * math.prod(shape[:-2])


def check_export_size(shape: tuple[int, ...], export_format: str) -> int:
    """The export's size bound; ValueError past ``settings.MAX_ATTENTION_EXPORT_BYTES``."""
    size = export_size_bytes(shape, export_format)
    limit = settings.MAX_ATTENTION_EXPORT_BYTES
    if size > limit:
        other = " or export .npy (a third of the size)" if export_format == "json" else ""
        raise ValueError(
            f"The raw maps of this caption would take {size / 2**20:,.1f} MB as .{export_format}, over the "
            f"{limit / 2**20:,.0f} MB export limit; shorten the caption{other}."
        )
    return size


def export_maps(maps: CrossAttentionMaps, directory: Path, export_format: str = "npy") -> Path:
    """Write the raw maps to ``directory`` as ``cross_attention.npy`` or ``.json``; return the path.

    The .npy holds the float32 array ``(layers, heads, tokens, 1 + grid²)`` alone;
    the .json holds the same numbers, rounded to six decimals, with the tokens, the
    caption and the layout. An export past ``settings.MAX_ATTENTION_EXPORT_BYTES``
    is refused (ValueError) before anything is written.
    """
    if export_format not in settings.ATTENTION_EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {export_format!r}; choose one of: npy, json.")
    check_export_size(maps.maps.shape, export_format)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if export_format == "npy":
        path = directory / "cross_attention.npy"
        np.save(path, maps.maps.astype(np.float32))
        return path
    if export_format == "json":
        path = directory / "cross_attention.json"
        payload = {
            "caption": maps.caption,
            "tokens": maps.tokens,
            "shape": list(maps.maps.shape),
            "grid": maps.grid,
            "layout": (
                "maps[layer][head][token][key]: the softmax row of the decoding step that produced the token "
                "(its query sits on the previous token); key 0 is the image's [CLS] embedding, keys 1.. the "
                "patches row by row, top left first"
            ),
            "maps": np.round(maps.maps.astype(np.float64), 6).tolist(),  # float64: 0.123456, not 0.12345600128
        }
        path.write_text(json.dumps(payload))
        return path
    raise ValueError(f"Unknown export format {export_format!r}; choose one of: npy, json.")


# ----------------------------------------------------------------------------- all together


def explain_attention(
    captioner: BlipCaptioner, image: Image.Image, request: AttentionRequest, export_dir: Path | None = None
) -> tuple[AttentionResult, Path | None]:
    """Heatmaps for every word of the request's caption (BLIP's own when it is empty) over ``image``.

    Returns the result and, with ``export_dir``, the path of the exported raw maps.
    """
    # 1. Check inputs, the layer and head against this model's decoder.
    text_config = captioner.model.config.text_config
    request = request.validated(text_config.num_hidden_layers, text_config.num_attention_heads)
    started = time.perf_counter()

    # 2. The caption: the user's, or BLIP's own with the Caption tab's defaults.
    generated = not request.caption
    caption = request.caption or captioner.caption(image, CaptionRequest()).captions[0].text
    if not caption:
        raise ValueError("BLIP wrote an empty caption for this image; type a caption to see its attention.")

    # 3. The request's size: word pieces, and the export's bytes from the maps' shape, before any pass.
    tokens = len(captioner.text_ids(caption, "The caption"))
    check_token_count(tokens)
    if export_dir is not None:
        vision = captioner.model.config.vision_config
        keys = 1 + (vision.image_size // vision.patch_size) ** 2
        check_export_size(
            (text_config.num_hidden_layers, text_config.num_attention_heads, tokens, keys), request.export_format
        )

    # 4. One teacher-forced pass; then aggregate, colour and lay out.
    maps = cross_attention_maps(captioner, image, caption)
    words = word_heatmaps(maps, request.layer, request.head, request.merge_word_pieces)
    shown = fit_within(image, settings.ATTENTION_OVERLAY_SIDE)
    overlays = [overlay(shown, word.heatmap, request.opacity) for word in words]
    sheet = token_sheet(shown, overlays, [word.word for word in words])
    exported = export_maps(maps, export_dir, request.export_format) if export_dir is not None else None
    result = AttentionResult(
        maps=maps,
        words=words,
        overlays=overlays,
        sheet=sheet,
        caption_generated=generated,
        request=dataclasses.replace(request, caption=caption),
        seconds=time.perf_counter() - started,
    )
    return result, exported
