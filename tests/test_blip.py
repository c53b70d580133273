"""BLIP captioning on the tiny model: every strategy, scores, seeds, limits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.blip.captioner import CaptionRequest

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


@pytest.fixture(scope="module")
def cat():
    return Image.open(EXAMPLES / "chelsea.png").convert("RGB")


@pytest.fixture(scope="module")
def coffee():
    return Image.open(EXAMPLES / "coffee.png").convert("RGB")


def teacher_forced_mean_logprob(captioner, image, sequence: torch.Tensor, prompt_length: int) -> float:
    """The mean log-prob of ``sequence``'s generated tokens (up to the first eos), recomputed in one pass."""
    generated = sequence[prompt_length:].tolist()
    if captioner.eos_token_id in generated:
        generated = generated[: generated.index(captioner.eos_token_id) + 1]
    ids = sequence[: prompt_length + len(generated)].unsqueeze(0)
    with torch.inference_mode():
        embeds = captioner.encode_images([image])
        logits = captioner.model.text_decoder(input_ids=ids, encoder_hidden_states=embeds).logits
    logprobs = logits[0, prompt_length - 1 : -1].log_softmax(-1)
    picked = logprobs.gather(-1, torch.tensor(generated).unsqueeze(-1)).squeeze(-1)
    return float(picked.mean())


STRATEGY_REQUESTS = {
    "greedy": CaptionRequest(strategy="greedy"),
    "beam": CaptionRequest(strategy="beam", num_beams=4, num_captions=3),
    "diverse_beam": CaptionRequest(strategy="diverse_beam", num_beams=4, num_beam_groups=2, num_captions=3),
    "sampling": CaptionRequest(strategy="sampling", num_captions=3, seed=7, top_k=20, top_p=0.95),
}


@pytest.mark.parametrize("strategy", list(STRATEGY_REQUESTS))
def test_every_strategy_gives_the_asked_number_of_scored_sorted_captions(tiny_captioner, cat, strategy):
    request = STRATEGY_REQUESTS[strategy]
    result = tiny_captioner.caption(cat, request)
    assert len(result.captions) == request.num_captions
    scores = [caption.score for caption in result.captions]
    assert scores == sorted(scores, reverse=True)
    for caption in result.captions:
        assert caption.text.strip(), "an empty caption"
        assert math.isfinite(caption.score) and caption.score <= 0
        assert request.min_new_tokens <= caption.num_tokens <= request.max_new_tokens
    assert result.seconds > 0


@pytest.mark.parametrize("strategy", ["greedy", "sampling"])
def test_scores_equal_a_teacher_forced_recomputation(tiny_captioner, cat, strategy):
    """The reported score is the model's own mean token log-prob (beam searches: tests/test_diverse_beam.py)."""
    request = STRATEGY_REQUESTS[strategy].validated()
    prompt = tiny_captioner.prompt_ids(request.prefix)
    with torch.inference_mode():
        sequences, token_logprobs, mask = tiny_captioner._generate(prompt, tiny_captioner.encode_images([cat]), request)
    for row in range(sequences.shape[0]):
        reported = float(token_logprobs[row][mask[row]].mean())
        recomputed = teacher_forced_mean_logprob(tiny_captioner, cat, sequences[row], prompt.shape[1])
        assert reported == pytest.approx(recomputed, abs=1e-4)


def test_beam_matches_the_bare_library_generate(tiny_captioner, cat):
    """Beam search runs through our own loop; its captions are transformers' own, in the same order."""
    processor, model = tiny_captioner.processor, tiny_captioner.model
    inputs = processor(images=cat, return_tensors="pt")
    with torch.inference_mode():
        bare = model.generate(**inputs, num_beams=4, num_return_sequences=4, max_new_tokens=20, min_new_tokens=5)
    bare_texts = [" ".join(text.split()) for text in processor.batch_decode(bare, skip_special_tokens=True)]
    studio = tiny_captioner.caption(cat, CaptionRequest(strategy="beam", num_beams=4, num_captions=4))
    assert sorted(caption.text for caption in studio.captions) == sorted(bare_texts)


def test_greedy_matches_the_bare_library_generate(tiny_captioner, cat):
    """The Studio's greedy caption is exactly what `model.generate(**processor(...))` gives."""
    processor, model = tiny_captioner.processor, tiny_captioner.model
    inputs = processor(images=cat, return_tensors="pt")
    with torch.inference_mode():
        bare = model.generate(**inputs, max_new_tokens=20, min_new_tokens=5)
    bare_text = " ".join(processor.decode(bare[0], skip_special_tokens=True).split())
    studio = tiny_captioner.caption(cat, CaptionRequest(strategy="greedy")).captions[0].text
    assert studio == bare_text


def test_sampling_is_reproducible_by_seed(tiny_captioner, cat):
    first = tiny_captioner.caption(cat, CaptionRequest(strategy="sampling", seed=123, num_captions=2))
    again = tiny_captioner.caption(cat, CaptionRequest(strategy="sampling", seed=123, num_captions=2))
    other = tiny_captioner.caption(cat, CaptionRequest(strategy="sampling", seed=124, num_captions=2))
    texts = [caption.text for caption in first.captions]
    assert texts == [caption.text for caption in again.captions]
    assert texts != [caption.text for caption in other.captions]


def test_random_seed_is_reported_and_reproduces(tiny_captioner, cat):
    result = tiny_captioner.caption(cat, CaptionRequest(strategy="sampling", seed=-1))
    assert 0 <= result.request.seed < 2**32
    replay = tiny_captioner.caption(cat, CaptionRequest(strategy="sampling", seed=result.request.seed))
    assert replay.captions[0].text == result.captions[0].text


def test_seeded_sampling_leaves_the_global_rng_alone(tiny_captioner, cat):
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    tiny_captioner.caption(cat, CaptionRequest(strategy="sampling", seed=5))
    assert torch.equal(torch.rand(3), expected)


def test_conditional_caption_starts_with_the_prefix(tiny_captioner, cat):
    result = tiny_captioner.caption(cat, CaptionRequest(strategy="beam", prefix="A   picture of"))
    assert result.request.prefix == "A picture of"
    assert result.captions[0].text.startswith("a picture of ")
    unconditional = tiny_captioner.caption(cat, CaptionRequest(strategy="beam"))
    assert not unconditional.captions[0].text.startswith("a picture of ")


def test_token_limits_are_honoured(tiny_captioner, cat):
    short = tiny_captioner.caption(cat, CaptionRequest(strategy="greedy", max_new_tokens=3, min_new_tokens=3))
    assert short.captions[0].num_tokens == 3
    long = tiny_captioner.caption(cat, CaptionRequest(strategy="greedy", max_new_tokens=30, min_new_tokens=25))
    assert long.captions[0].num_tokens >= 25


def test_no_repeat_ngram_blocks_repeated_bigrams(tiny_captioner, cat):
    result = tiny_captioner.caption(
        cat, CaptionRequest(strategy="greedy", min_new_tokens=30, max_new_tokens=30, no_repeat_ngram_size=2)
    )
    words = result.captions[0].text.split()
    bigrams = list(zip(words, words[1:], strict=False))
    assert len(bigrams) == len(set(bigrams))


def test_a_batch_equals_captioning_one_by_one(tiny_captioner, cat, coffee):
    request = CaptionRequest(strategy="beam", num_beams=3, num_captions=2)
    batch = tiny_captioner.caption_batch([cat, coffee], request)
    alone = [tiny_captioner.caption(image, request) for image in (cat, coffee)]
    for batched, single in zip(batch, alone, strict=True):
        assert [c.text for c in batched.captions] == [c.text for c in single.captions]
        for a, b in zip(batched.captions, single.captions, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-4)


def test_numbers_from_the_api_are_coerced():
    request = CaptionRequest(strategy="beam", num_beams=4.0, num_captions="2", length_penalty="1.5").validated()
    assert (request.num_beams, request.num_captions, request.length_penalty) == (4, 2, 1.5)
    assert isinstance(request.num_beams, int)


@pytest.mark.parametrize(
    ("request_fields", "words"),
    [
        ({"strategy": "contrastive"}, "choose one of"),
        ({"strategy": "greedy", "num_captions": 3}, r"Greedy always gives one caption; set Captions \(num_captions\)"),
        ({"strategy": "beam", "num_beams": 2, "num_captions": 4}, r"raise Beams \(num_beams\) to 4"),
        ({"strategy": "diverse_beam", "num_beams": 5, "num_beam_groups": 2}, r"multiple of Beam groups"),
        ({"num_captions": 11}, r"Captions \(num_captions\) must be between 1 and 10"),
        ({"max_new_tokens": 0}, r"Max tokens \(max_new_tokens\) must be between 1 and"),
        ({"min_new_tokens": 30, "max_new_tokens": 20}, r"Min tokens \(min_new_tokens\) must be between 0 and 20"),
        ({"strategy": "sampling", "temperature": 0}, r"Temperature \(temperature\) must be above 0"),
        ({"strategy": "sampling", "top_p": float("nan")}, r"Top-p \(top_p\) must be a number"),
        ({"strategy": "sampling", "seed": 2**40}, r"Seed \(seed\) must be between"),
        ({"num_beams": "three"}, r"Beams \(num_beams\) must be a whole number"),
        ({"num_beams": 2.5}, r"Beams \(num_beams\) must be a whole number"),
        ({"prefix": "word " * 100}, "keep it under 300"),
    ],
)
def test_bad_requests_are_refused_with_a_sentence(request_fields, words):
    with pytest.raises(ValueError, match=words):
        CaptionRequest(**request_fields).validated()


@pytest.mark.parametrize(
    ("request_fields", "beams", "captions", "words"),
    [
        ({"strategy": "beam", "num_captions": 5}, 5, 5, "Beams raised from 3 to 5"),
        ({"strategy": "beam", "num_captions": 10, "num_beams": 4}, 10, 10, "Beams raised from 4 to 10"),
        ({"strategy": "diverse_beam", "num_captions": 5, "num_beam_groups": 3}, 6, 5, "multiple of the 3 beam groups"),
        ({"strategy": "greedy", "num_captions": 4}, 3, 1, "so Captions was set to 1 instead of 4"),
        ({"strategy": "beam", "num_captions": 2}, 3, 2, None),  # enough beams already: unchanged, no sentence
        ({"strategy": "sampling", "num_captions": 10}, 3, 10, None),
    ],
)
def test_the_beams_rule_makes_room_for_the_captions_and_says_so(request_fields, beams, captions, words):
    from pipelines.blip.captioner import FIELD_LABELS, STRATEGY_LABELS

    request, notes = CaptionRequest(**request_fields).with_room_for_captions()
    request = request.validated()  # what comes out is always a valid request
    assert (request.num_beams, request.num_captions) == (beams, captions)
    if words is None:
        assert notes == []
        return
    assert len(notes) == 1 and words in notes[0]
    assert "num_beams" not in notes[0] and "num_captions" not in notes[0]  # on-screen labels, not parameters
    assert any(label in notes[0] for label in FIELD_LABELS.values())
    assert STRATEGY_LABELS[request.strategy] in notes[0] or request.strategy == "greedy"


def test_the_beams_rule_leaves_what_it_cannot_fix_to_validation():
    request, notes = CaptionRequest(
        strategy="diverse_beam", num_captions=10, num_beam_groups=3
    ).with_room_for_captions()
    assert notes == [] and request.num_beams == 3
    with pytest.raises(ValueError, match=r"raise Beams \(num_beams\) to 10"):
        request.validated()
    request, notes = CaptionRequest(strategy="beam", num_captions="many").with_room_for_captions()
    assert notes == [] and request.num_captions == "many"
