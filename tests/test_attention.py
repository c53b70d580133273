"""Cross-attention heatmaps on the tiny BLIP: shapes, softmax rows, aggregation, words, drawing, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import handle_file
from PIL import Image

from pipelines.blip.attention import (
    AttentionRequest,
    colorize,
    cross_attention_maps,
    decoder_layout,
    explain_attention,
    export_maps,
    overlay,
    select_maps,
    word_groups,
    word_heatmaps,
)
from pipelines.blip.captioner import CaptionRequest

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
CAPTION = "a cat sitting on the wooden table"


@pytest.fixture(scope="module")
def cat():
    return Image.open(EXAMPLES / "chelsea.png").convert("RGB")


@pytest.fixture(scope="module")
def cat_maps(tiny_captioner, cat):
    return cross_attention_maps(tiny_captioner, cat, CAPTION)


def test_maps_have_the_models_layers_heads_and_grid(tiny_captioner, cat_maps):
    text_config = tiny_captioner.model.config.text_config
    tokens = len(CAPTION.split())
    assert cat_maps.maps.shape == (text_config.num_hidden_layers, text_config.num_attention_heads, tokens, 1 + 8 * 8)
    assert cat_maps.grid == 8 and cat_maps.maps.dtype == np.float32
    assert cat_maps.tokens == CAPTION.split()
    assert select_maps(cat_maps).shape == (tokens, 8, 8)


def test_raw_rows_are_softmax_rows_that_sum_to_one(cat_maps):
    assert np.all(cat_maps.maps >= 0)
    np.testing.assert_allclose(cat_maps.maps.sum(axis=-1), 1.0, atol=1e-5)  # [CLS] column included


def test_a_words_map_is_the_step_that_produced_it(tiny_captioner, cat, cat_maps):
    """Row 0 (the first word) is the cross-attention of the [DEC] step alone: causality makes them equal."""
    with torch.inference_mode():
        embeds = tiny_captioner.encode_images([cat])
        alone = tiny_captioner.model.text_decoder(
            input_ids=torch.tensor([[tiny_captioner.bos_token_id]]),
            encoder_hidden_states=embeds,
            output_attentions=True,
        ).cross_attentions
    for layer, attention in enumerate(alone):
        np.testing.assert_allclose(cat_maps.maps[layer, :, 0], attention[0, :, 0].numpy(), atol=1e-6)


def test_layer_and_head_selection_change_the_map(cat_maps):
    mean = select_maps(cat_maps, layer=0, head=0)
    first, second = select_maps(cat_maps, layer=1, head=0), select_maps(cat_maps, layer=2, head=0)
    assert not np.allclose(first, second)
    np.testing.assert_allclose(mean, (first + second) / 2, atol=1e-6)
    heads = [select_maps(cat_maps, layer=1, head=head) for head in (1, 2, 3, 4)]
    assert not np.allclose(heads[0], heads[1])
    np.testing.assert_allclose(first, np.mean(heads, axis=0), atol=1e-6)
    words_one = word_heatmaps(cat_maps, layer=1, head=1)
    words_two = word_heatmaps(cat_maps, layer=2, head=3)
    assert any(not np.allclose(a.heatmap, b.heatmap) for a, b in zip(words_one, words_two, strict=True))


def test_each_word_is_scaled_to_zero_one(cat_maps):
    for word in word_heatmaps(cat_maps):
        assert word.heatmap.shape == (8, 8)
        assert word.heatmap.min() == pytest.approx(0.0) and word.heatmap.max() == pytest.approx(1.0)


def test_one_overlay_per_word_for_a_typed_caption(tiny_captioner, cat, tmp_path):
    result, exported = explain_attention(tiny_captioner, cat, AttentionRequest(caption=f"  {CAPTION}  "), tmp_path)
    assert result.request.caption == CAPTION and not result.caption_generated
    assert [word.word for word in result.words] == CAPTION.split()
    assert len(result.overlays) == len(CAPTION.split())
    assert all(picture.size == (384, 255) for picture in result.overlays)  # 451x300 fitted into 384 px
    assert result.sheet.width > 384 and result.sheet.mode == "RGB"
    assert exported == tmp_path / "cross_attention.npy"


def test_word_pieces_merge_into_words_unless_kept(tiny_captioner, cat):
    maps = cross_attention_maps(tiny_captioner, cat, "Two Cats sitting near photos")
    assert maps.tokens == ["two", "cats", "sitting", "near", "photo", "##s"]
    merged = word_heatmaps(maps, merge_word_pieces=True)
    assert [word.word for word in merged] == ["Two", "Cats", "sitting", "near", "photos"]  # as typed
    assert merged[-1].token_indices == (4, 5)
    kept = word_heatmaps(maps, merge_word_pieces=False)
    assert [word.word for word in kept] == ["Two", "Cats", "sitting", "near", "photo", "##s"]
    assert word_groups(["photo", "##s", "##ed", "cat"]) == [(0, 1, 2), (3,)]
    assert word_groups(["##s", "cat"]) == [(0,), (1,)]  # a leading piece has nothing to join


def test_without_a_caption_blip_writes_one(tiny_captioner, cat):
    result, _ = explain_attention(tiny_captioner, cat, AttentionRequest())
    assert result.caption_generated
    assert result.request.caption == tiny_captioner.caption(cat, CaptionRequest()).captions[0].text
    assert len(result.overlays) == len(result.words) > 0


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (AttentionRequest(caption="\u200b\u200b"), "nothing blip can read"),
        (AttentionRequest(caption=" ".join(["cat"] * 63)), "over blip's limit of 62"),
        (AttentionRequest(caption="x" * 501), "under 500"),
        (AttentionRequest(caption="a cat", layer=3), "between 0 and 2, not 3"),
        (AttentionRequest(caption="a cat", head=5), "between 0 and 4, not 5"),
        (AttentionRequest(caption="a cat", layer=1.5), "whole number"),
        (AttentionRequest(caption="a cat", opacity=2), "opacity"),
        (AttentionRequest(caption="a cat", export_format="csv"), "npy, json"),
    ],
)
def test_bad_requests_get_a_sentence(tiny_captioner, cat, request_, words):
    with pytest.raises(ValueError) as caught:
        explain_attention(tiny_captioner, cat, request_)
    assert words in str(caught.value).lower()


def test_raw_maps_export_as_npy_and_json(cat_maps, tmp_path):
    array = np.load(export_maps(cat_maps, tmp_path / "npy", "npy"))
    np.testing.assert_array_equal(array, cat_maps.maps)
    payload = json.loads(export_maps(cat_maps, tmp_path / "json", "json").read_text())
    assert payload["tokens"] == cat_maps.tokens and payload["shape"] == list(cat_maps.maps.shape)
    np.testing.assert_allclose(np.array(payload["maps"]), cat_maps.maps, atol=1e-6)


def test_colours_run_dark_to_bright_and_opacity_zero_keeps_the_image(cat):
    dark, bright = colorize(np.array([0.0, 1.0]))
    assert dark.sum() < 20 and bright.sum() > 600
    brightness = colorize(np.linspace(0, 1, 11)).sum(axis=1)
    assert np.all(np.diff(brightness) > 0)
    small = cat.resize((64, 40))
    heat = np.random.default_rng(0).random((8, 8))
    assert np.array_equal(np.asarray(overlay(small, heat, opacity=0.0)), np.asarray(small))
    assert not np.array_equal(np.asarray(overlay(small, heat, opacity=0.8)), np.asarray(small))


def test_the_sliders_know_the_decoders_layers_and_heads_before_it_loads(tiny_manager):
    from pipelines.manager import ModelManager
    from pipelines.runtime import choose_runtime

    key = "blip-caption"
    assert decoder_layout(tiny_manager.source_for(key), tiny_manager.catalog[key]) == (2, 4)
    real = ModelManager(choose_runtime("cpu"))  # the Hub id: read from assets/model-configs, nothing loaded
    assert decoder_layout(real.source_for(key), real.catalog[key]) == (12, 12) and not real.loaded_models()


@pytest.mark.api
def test_attention_answers_through_the_api_with_only_an_image(tiny_client):
    gallery, sheet, exported, summary, details = tiny_client.predict(
        handle_file(str(EXAMPLES / "chelsea.png")), api_name="/attention"
    )
    assert details["caption_generated"] is True and details["caption"]
    assert len(gallery) == len(details["words"]) > 0
    assert [item["caption"] for item in gallery] == [word["word"] for word in details["words"]]
    assert Path(sheet).is_file() and Path(exported).suffix == ".npy"
    assert np.load(exported).shape == tuple(details["raw_shape"])
    assert "BLIP's own caption" in summary


@pytest.mark.api
def test_attention_takes_a_typed_caption_through_the_api(tiny_client):
    gallery, _, exported, _, details = tiny_client.predict(
        handle_file(str(EXAMPLES / "coffee.png")),
        caption="a cup of coffee",
        layer=2,
        head=1,
        export_format="json",
        api_name="/attention",
    )
    assert [item["caption"] for item in gallery] == ["a", "cup", "of", "coffee"]
    assert details["layer"] == 2 and details["head"] == 1 and not details["caption_generated"]
    assert json.loads(Path(exported).read_text())["tokens"] == ["a", "cup", "of", "coffee"]
