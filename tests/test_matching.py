"""Image-text matching on the tiny models: scores, rankings, batching, the feature cache, the second opinion."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import handle_file
from PIL import Image

from pipelines.blip.captioner import CaptionRequest
from pipelines.blip.feature_cache import ImageFeatureCache
from pipelines.blip.matching import ImageTextMatcher, MatchRequest, split_texts
from pipelines.catalog import CATALOG, MODEL_CONFIGS_DIR
from pipelines.errors import ModelLoadError
from tests.tolerances import SCORE_ATOL, same_score

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
TEXTS = ["a cat sitting on a wooden table", "a cup of coffee", "two dogs", "a rocket launch into the sky with smoke"]


@pytest.fixture(scope="module")
def cat():
    return Image.open(EXAMPLES / "chelsea.png").convert("RGB")


@pytest.fixture(scope="module")
def coffee():
    return Image.open(EXAMPLES / "coffee.png").convert("RGB")


@pytest.fixture(scope="module")
def matcher(tiny_manager, tiny_captioner):
    return ImageTextMatcher(tiny_captioner, retrieval=lambda: tiny_manager.get("blip-itm"))


def one_text_score(captioner, image, text: str) -> tuple[float, float]:
    """(mean, total) log-prob of one text, from its own unpadded teacher-forced pass."""
    ids = [captioner.bos_token_id, *captioner.text_ids(text), captioner.eos_token_id]
    with torch.inference_mode():
        embeds = captioner.encode_pixels(captioner.pixel_values([image]), cache=False)
        logits = captioner.model.text_decoder(input_ids=torch.tensor([ids]), encoder_hidden_states=embeds).logits
    logprobs = logits[0, :-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    return float(logprobs.mean()), float(logprobs.sum())


@pytest.mark.parametrize("rank_by", ["mean", "total"])
def test_scores_are_finite_and_the_ranking_follows_them(matcher, cat, rank_by):
    result = matcher.match([cat], MatchRequest(texts="\n".join(TEXTS), rank_by=rank_by))
    scores = result.scores[0]
    assert [score.text for score in scores] == TEXTS
    for score in scores:
        assert math.isfinite(score.mean_logprob) and score.mean_logprob <= 0
        assert score.total_logprob == pytest.approx(score.mean_logprob * score.num_tokens, rel=1e-5)
        assert score.itm_probability is None and score.itc_similarity is None
    ranked = [score.value(rank_by) for _, score in result.ranked_texts(0)]
    assert ranked == sorted(ranked, reverse=True)
    assert sorted(index for index, _ in result.ranked_texts(0)) == list(range(len(TEXTS)))


def test_the_same_text_twice_gets_the_same_score(matcher, cat):
    scores = matcher.match([cat], MatchRequest(texts=["a cup of coffee", "two dogs", "a cup of coffee"])).scores[0]
    # Two rows of one batch: the kernels may tile them differently, so equal within the stated tolerance.
    assert same_score(scores[0].mean_logprob, scores[2].mean_logprob)
    assert scores[0].total_logprob == pytest.approx(scores[2].total_logprob, abs=SCORE_ATOL * scores[0].num_tokens)


def test_batched_scores_equal_one_by_one_scores(matcher, tiny_captioner, cat):
    """Texts of different lengths share one padded pass; each scores as it does alone."""
    scores = matcher.match([cat], MatchRequest(texts=TEXTS)).scores[0]
    for score in scores:
        mean, total = one_text_score(tiny_captioner, cat, score.text)
        assert score.mean_logprob == pytest.approx(mean, abs=1e-5)
        assert score.total_logprob == pytest.approx(total, abs=1e-4)


def test_a_captions_own_score_equals_its_match_score(matcher, tiny_captioner, cat):
    """Same definition as the captioner: a finished caption (ended by [SEP]) scores the same in both places."""
    # The random tiny model rarely stops by itself: sample until some captions did.
    tokenizer = tiny_captioner.processor.tokenizer
    comparable = []
    for seed in range(10):
        request = CaptionRequest(strategy="sampling", num_captions=10, seed=seed, min_new_tokens=0, max_new_tokens=40)
        for caption in tiny_captioner.caption(cat, request).captions:
            finished = caption.num_tokens < request.max_new_tokens
            # Decoded text that re-tokenises to other pieces would be another text.
            same_pieces = len(tokenizer(caption.text, add_special_tokens=False)["input_ids"]) + 1 == caption.num_tokens
            if finished and same_pieces and caption.text:
                comparable.append(caption)
        if len(comparable) >= 2:
            break
    assert comparable, "no sampled caption ended with [SEP]"
    comparable = comparable[:5]
    scores = matcher.match([cat], MatchRequest(texts=[caption.text for caption in comparable])).scores[0]
    for caption, score in zip(comparable, scores, strict=True):
        assert score.num_tokens == caption.num_tokens
        assert score.mean_logprob == pytest.approx(caption.score, abs=1e-4)


def test_images_are_ranked_for_each_text(matcher, cat, coffee):
    result = matcher.match(
        [cat, coffee, cat], MatchRequest(texts="a cup of coffee\ntwo dogs"), ["cat", "coffee", "cat"]
    )
    assert result.image_names == ["cat", "coffee", "cat"]
    for text_index in range(2):
        ranked = result.ranked_images(text_index)
        values = [score.mean_logprob for _, score in ranked]
        assert values == sorted(values, reverse=True)
        twice = result.scores[0][text_index], result.scores[2][text_index]  # the same picture, two batch rows
        assert same_score(twice[0].mean_logprob, twice[1].mean_logprob) and twice[0].text == twice[1].text
    assert result.scores[0][0] != result.scores[1][0]  # the score depends on the image


def test_the_image_features_cache_is_hit_by_caption_match_and_attention(tiny_captioner, matcher):
    from pipelines.blip.attention import AttentionRequest, explain_attention

    # An image no other test uses, so its first encoding is certainly a miss.
    image = Image.fromarray(np.random.default_rng(1234).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    cache = tiny_captioner.feature_cache
    hits, misses = cache.hits, cache.misses
    tiny_captioner.caption(image, CaptionRequest(strategy="greedy"))
    assert (cache.hits, cache.misses) == (hits, misses + 1)
    matcher.match([image], MatchRequest(texts="a rocket launch"))
    assert (cache.hits, cache.misses) == (hits + 1, misses + 1)
    explain_attention(tiny_captioner, image, AttentionRequest(caption="a rocket"))
    assert (cache.hits, cache.misses) == (hits + 2, misses + 1)
    # the same pixels from another object (a copy) are the same key
    tiny_captioner.encode_images([image.copy()])
    assert cache.hits == hits + 3


def test_cached_features_equal_fresh_ones(tiny_captioner, coffee):
    pixels = tiny_captioner.pixel_values([coffee])
    with torch.inference_mode():
        cached = tiny_captioner.encode_pixels(pixels)
        again = tiny_captioner.encode_pixels(pixels)
        fresh = tiny_captioner.encode_pixels(pixels, cache=False)
    assert again is cached
    assert torch.equal(cached, fresh)


def test_batches_bypass_the_cache_unless_asked(tiny_captioner, cat, coffee):
    cache = tiny_captioner.feature_cache
    before = (cache.hits, cache.misses, len(cache))
    tiny_captioner.caption_batch([cat, coffee], CaptionRequest(strategy="greedy"))
    assert (cache.hits, cache.misses, len(cache)) == before
    pixels = tiny_captioner.pixel_values([cat, coffee])
    with torch.inference_mode():
        features = tiny_captioner.encode_pixels(pixels, cache=True)
        fresh = tiny_captioner.encode_pixels(pixels, cache=False)
    assert torch.allclose(features, fresh, atol=1e-6)
    assert cache.hits + cache.misses == before[0] + before[1] + 2


def test_the_cache_is_capped_and_drops_the_least_recently_used():
    cache = ImageFeatureCache(max_entries=2)
    first, second, third = (torch.full((1, 2), float(value)) for value in (1, 2, 3))
    cache.put("a", first)
    cache.put("b", second)
    assert cache.get("a") is first  # "a" is now the most recent
    cache.put("c", third)
    assert len(cache) == 2 and cache.get("b") is None and cache.get("a") is first and cache.get("c") is third
    assert (cache.hits, cache.misses) == (3, 1)
    disabled = ImageFeatureCache(max_entries=0)
    disabled.put("a", first)
    assert disabled.get("a") is None


def test_the_second_opinion_equals_the_library_forward(matcher, tiny_manager, cat):
    result = matcher.match([cat], MatchRequest(texts=TEXTS, rank_by="itm", second_opinion=True))
    assert result.second_opinion_note == "" and result.rank_by == "itm"
    retrieval = tiny_manager.get("blip-itm")
    for score in result.scores[0]:
        inputs = retrieval.processor(images=cat, text=score.text, return_tensors="pt")
        with torch.inference_mode():
            itm = retrieval.model(**inputs, use_itm_head=True).itm_score.softmax(-1)[0, 1]
            itc = retrieval.model(**inputs, use_itm_head=False).itm_score[0, 0]
        assert 0 <= score.itm_probability <= 1 and -1 <= score.itc_similarity <= 1
        assert score.itm_probability == pytest.approx(float(itm), abs=1e-5)
        assert score.itc_similarity == pytest.approx(float(itc), abs=1e-5)
    ranked = [score.itm_probability for _, score in result.ranked_texts(0)]
    assert ranked == sorted(ranked, reverse=True)


def test_a_missing_retrieval_model_never_breaks_matching(tiny_captioner, cat):
    def unavailable():
        raise ModelLoadError("BLIP base (image-text retrieval) is not in the local Hugging Face cache.")

    matcher = ImageTextMatcher(tiny_captioner, retrieval=unavailable)
    result = matcher.match([cat], MatchRequest(texts=TEXTS, rank_by="itc", second_opinion=True))
    assert "not in the local Hugging Face cache" in result.second_opinion_note
    assert result.rank_by == "mean"
    assert all(score.itc_similarity is None and math.isfinite(score.mean_logprob) for score in result.scores[0])


@pytest.mark.parametrize(
    ("texts", "rank_by", "words"),
    [
        ("", "mean", "at least one candidate"),
        ("\n  \n", "mean", "at least one candidate"),
        ("\n".join(f"text {n}" for n in range(21)), "mean", "at most 20"),
        ("x" * 301, "mean", "under 300"),
        ("a cat", "itm", "turn on second_opinion"),
        ("a cat", "best", "unknown ranking"),
        ("a cat\n\u200b\u200b", "mean", "text 2"),
        (" ".join(["cat"] * 63), "mean", "over blip's limit of 62"),
    ],
)
def test_bad_requests_get_a_sentence(matcher, cat, texts, rank_by, words):
    with pytest.raises(ValueError) as caught:
        matcher.match([cat], MatchRequest(texts=texts, rank_by=rank_by))
    assert words in str(caught.value).lower()


def test_texts_are_one_per_line_with_blanks_dropped():
    assert split_texts("  a  cat \n\n a dog\r\na cat") == ("a cat", "a dog", "a cat")
    assert split_texts(["a cat", "b\nc"]) == ("a cat", "b", "c")


def test_the_catalogs_retrieval_entry_matches_the_real_architecture():
    from transformers import BlipConfig, BlipForImageTextRetrieval

    spec = CATALOG["blip-itm"]
    config = BlipConfig.from_pretrained(MODEL_CONFIGS_DIR / spec.config_dir)
    with torch.device("meta"):
        model = BlipForImageTextRetrieval(config)
    assert sum(tensor.numel() for tensor in model.state_dict().values()) == spec.parameters
    assert spec.repo_id == "Salesforce/blip-itm-base-coco" and not spec.gated


@pytest.mark.api
def test_match_answers_through_the_api_with_only_an_image(tiny_client):
    texts, images, summary, details = tiny_client.predict(handle_file(str(EXAMPLES / "chelsea.png")), api_name="/match")
    rows = texts["data"]
    assert len(rows) == 4 and [row[0] for row in rows] == [1, 2, 3, 4]
    means = [row[2] for row in rows]
    assert means == sorted(means, reverse=True) and all(math.isfinite(value) for value in means)
    assert images["data"] == []  # one image: nothing to rank images by
    assert details["rank_by"] == "mean" and details["tiny_mode"] is True
    assert "Best text" in summary


@pytest.mark.api
def test_match_ranks_images_and_asks_the_retrieval_model_through_the_api(tiny_client):
    texts, images, _, details = tiny_client.predict(
        handle_file(str(EXAMPLES / "chelsea.png")),
        texts="a cat\na cup of coffee",
        more_images=[handle_file(str(EXAMPLES / "coffee.png"))],
        rank_by="itm",
        second_opinion=True,
        api_name="/match",
    )
    assert len(texts["data"]) == 2 and len(images["data"]) == 4
    assert details["second_opinion"] == {"asked": True, "note": ""}
    assert all(0 <= score["itm_probability"] <= 1 for row in details["scores"] for score in row)
    assert [image["name"] for image in details["images"]] == ["chelsea.png", "coffee.png"]


@pytest.mark.api
def test_the_itm_and_itc_columns_show_only_with_the_second_opinion(tiny_client):
    photo = handle_file(str(EXAMPLES / "chelsea.png"))
    texts, _, _, _ = tiny_client.predict(photo, texts="a cat\na dog", api_name="/match")
    assert texts["headers"] == ["#", "text", "mean log-prob", "total log-prob", "tokens"]
    assert all(len(row) == 5 for row in texts["data"])
    texts, _, _, details = tiny_client.predict(photo, texts="a cat\na dog", second_opinion=True, api_name="/match")
    assert texts["headers"][-2:] == ["ITM P(match)", "ITC cosine"]
    assert [float(row[-2]) for row in texts["data"]] == [
        pytest.approx(details["scores"][0][index]["itm_probability"], abs=1e-4) for index in details["text_ranking"]
    ]
