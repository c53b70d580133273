"""Tests for pipelines.blip.diverse_beam on a tiny, seeded, random BLIP (CPU, offline, a few seconds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration

from pipelines.blip.diverse_beam import DiverseBeamOutput, diverse_beam_search

BOS, EOS, PAD = 118, 3, 0


@dataclass
class TinyBlip:
    """The tiny model, its images and what the search needs from them."""

    model: BlipForConditionalGeneration
    pixel_values: torch.Tensor  # (3, 3, 64, 64)
    image_embeds: torch.Tensor  # (3, 65, 32) vision model's last hidden state
    prefix: torch.LongTensor  # (3, 1) the bos token per image

    @property
    def decoder(self) -> torch.nn.Module:
        return self.model.text_decoder


@pytest.fixture(scope="module")
def tiny() -> TinyBlip:
    """A 2-layer BLIP with random weights, nudged so that its captions depend on the image."""
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(
            vocab_size=120,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=32,
            max_position_embeddings=64,
            bos_token_id=BOS,
            sep_token_id=EOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
            is_decoder=True,
        ),
        # BLIP's vision default initializer_range is 1e-10: every image would embed to ~0 and all
        # images would get the same captions, which hides batching bugs. 0.02 like the text side.
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            initializer_range=0.02,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Random-init logits are nearly uniform; sharpen them (scaling the head's LayerNorm gain
        # leaves the tied word embeddings alone) and let the image matter more through the
        # cross-attention values, so that beams differ per image and ties are impossible.
        model.text_decoder.cls.predictions.transform.LayerNorm.weight.mul_(8.0)
        for layer in model.text_decoder.bert.encoder.layer:
            layer.crossattention.self.value.weight.mul_(30.0)
        pixel_values = torch.randn(3, 3, 64, 64)
        image_embeds = model.vision_model(pixel_values=pixel_values)[0]
    prefix = torch.full((3, 1), BOS, dtype=torch.long)
    return TinyBlip(model=model, pixel_values=pixel_values, image_embeds=image_embeds, prefix=prefix)


def search(
    tiny: TinyBlip, images: slice = slice(None), prefix: torch.Tensor | None = None, **overrides: Any
) -> DiverseBeamOutput:
    """Run diverse_beam_search on some of the tiny model's images with test defaults + overrides.

    ``prefix`` replaces the images' own prompt ids (to test mismatched inputs).
    """
    kwargs: dict[str, Any] = dict(
        num_beams=6,
        num_beam_groups=3,
        diversity_penalty=1.0,
        max_new_tokens=12,
        min_new_tokens=0,
        eos_token_id=EOS,
        pad_token_id=PAD,
        num_return_sequences=6,
    )
    kwargs.update(overrides)
    prefix = tiny.prefix[images] if prefix is None else prefix
    return diverse_beam_search(tiny.decoder, prefix, tiny.image_embeds[images], **kwargs)


def hf_beam_search(tiny: TinyBlip, num_beams: int, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own beam search through BLIP's generate(); returns (sequences, sequence scores).

    transformers fills the tail of short beams with ``pad_token_id or eos_token_id``, which is the
    eos when pad is 0 (BLIP's case): rewrite everything after the first eos to pad, as we emit it.
    """
    with torch.no_grad():
        out = tiny.model.generate(
            pixel_values=tiny.pixel_values,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            return_dict_in_generate=True,
            output_scores=True,
            **kwargs,
        )
    sequences = out.sequences.clone()
    generated = sequences[:, 1:]
    is_eos = (generated == EOS).long()
    generated[(is_eos.cumsum(dim=1) - is_eos) > 0] = PAD
    return sequences, out.sequences_scores


def pad_to(tensor: torch.Tensor, width: int, value: int | float) -> torch.Tensor:
    """Right-pad the last dim of ``tensor`` to ``width``."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]), value=value)


def lengths(out: DiverseBeamOutput) -> list[int]:
    return out.generated_mask.sum(dim=1).tolist()


def generated_tokens(out: DiverseBeamOutput, row: int) -> list[int]:
    """The generated tokens of one result row, eos included, padding excluded."""
    prefix_len = out.sequences.shape[1] - out.token_logprobs.shape[1]
    return out.sequences[row, prefix_len:][out.generated_mask[row]].tolist()


# ----------------------------------------------------------------------------- agreement with transformers


@pytest.mark.parametrize(
    "num_beams, options",
    [
        (4, dict(max_new_tokens=12, min_new_tokens=0, length_penalty=1.0, early_stopping=True)),
        (
            3,
            dict(
                max_new_tokens=10,
                min_new_tokens=3,
                length_penalty=2.0,
                repetition_penalty=1.5,
                no_repeat_ngram_size=2,
                early_stopping=True,
            ),
        ),
        (5, dict(max_new_tokens=8, min_new_tokens=0, length_penalty=-0.5, early_stopping=False)),
        (2, dict(max_new_tokens=9, min_new_tokens=2, length_penalty=0.0, early_stopping="never")),
    ],
)
def test_one_group_equals_hf_beam_search(tiny: TinyBlip, num_beams: int, options: dict[str, Any]) -> None:
    """G=1 is plain beam search: every returned beam and its score must match transformers' exactly."""
    expected_sequences, expected_scores = hf_beam_search(tiny, num_beams, **options)
    out = search(
        tiny,
        num_beams=num_beams,
        num_beam_groups=1,
        diversity_penalty=0.0,
        num_return_sequences=num_beams,
        **options,
    )
    width = max(expected_sequences.shape[1], out.sequences.shape[1])
    assert torch.equal(pad_to(out.sequences, width, PAD), pad_to(expected_sequences, width, PAD))
    torch.testing.assert_close(out.sequence_scores, expected_scores, atol=1e-5, rtol=0)


def test_groups_without_penalty_are_independent_beam_searches(tiny: TinyBlip) -> None:
    """diversity 0, G=2, S=2: each group is transformers' num_beams=2 search, so they coincide."""
    expected_sequences, expected_scores = hf_beam_search(tiny, 2, max_new_tokens=12, early_stopping=True)
    out = search(tiny, num_beams=4, num_beam_groups=2, diversity_penalty=0.0, num_return_sequences=4)
    width = max(expected_sequences.shape[1], out.sequences.shape[1])
    got = pad_to(out.sequences, width, PAD).view(3, 4, width)
    want = pad_to(expected_sequences, width, PAD).view(3, 2, width)
    # Per image: group 0's best, group 1's best, then the rest by score: a, a, b, b.
    assert torch.equal(got, want.repeat_interleave(2, dim=1))
    torch.testing.assert_close(
        out.sequence_scores.view(3, 4),
        expected_scores.view(3, 2).repeat_interleave(2, dim=1),
        atol=1e-5,
        rtol=0,
    )


def test_diversity_penalty_separates_the_groups(tiny: TinyBlip) -> None:
    """With a penalty the groups' first tokens differ, while group 0 (never penalised) is unchanged."""
    # min_new_tokens=1: an eos first token is a finished hypothesis, never an open beam, so it is
    # never penalised and two groups could both return the empty caption.
    plain = search(tiny, diversity_penalty=0.0, min_new_tokens=1).sequences.view(3, 6, -1)
    diverse = search(tiny, diversity_penalty=5.0, min_new_tokens=1).sequences.view(3, 6, -1)
    for image in range(3):
        group_bests = plain[image, :3]
        assert (group_bests == group_bests[0]).all(), "without penalty all groups find the same best"
        first_tokens = diverse[image, :3, 1].tolist()
        assert len(set(first_tokens)) == 3, f"image {image}: groups start alike: {first_tokens}"
        width = max(plain.shape[-1], diverse.shape[-1])
        assert torch.equal(pad_to(diverse[image, 0], width, PAD), pad_to(plain[image, 0], width, PAD))


def test_group_zero_best_equals_transformers_top_beam(tiny: TinyBlip) -> None:
    """Group 0 pays no penalty, so its best is transformers' best with num_beams = group size."""
    expected_sequences, _ = hf_beam_search(tiny, 2, max_new_tokens=12, early_stopping=True)
    out = search(tiny, num_beams=6, num_beam_groups=3, diversity_penalty=2.0, num_return_sequences=1)
    width = max(expected_sequences.shape[1], out.sequences.shape[1])
    assert torch.equal(pad_to(out.sequences, width, PAD), pad_to(expected_sequences[::2], width, PAD))


# ----------------------------------------------------------------------------- determinism and batching


def test_repeat_calls_are_identical(tiny: TinyBlip) -> None:
    first = search(tiny, repetition_penalty=1.2, no_repeat_ngram_size=2)
    second = search(tiny, repetition_penalty=1.2, no_repeat_ngram_size=2)
    assert torch.equal(first.sequences, second.sequences)
    assert torch.equal(first.token_logprobs, second.token_logprobs)
    assert torch.equal(first.generated_mask, second.generated_mask)
    assert torch.equal(first.sequence_scores, second.sequence_scores)


def test_batch_equals_each_image_alone(tiny: TinyBlip) -> None:
    batched = search(tiny)
    assert not torch.equal(batched.sequences[0], batched.sequences[6]), "images should caption differently"
    for image in range(3):
        alone = search(tiny, images=slice(image, image + 1))
        rows = slice(image * 6, (image + 1) * 6)
        width = max(alone.sequences.shape[1], batched.sequences.shape[1])
        assert torch.equal(pad_to(alone.sequences, width, PAD), pad_to(batched.sequences[rows], width, PAD))
        torch.testing.assert_close(alone.sequence_scores, batched.sequence_scores[rows], atol=1e-5, rtol=0)


def test_explicit_prefix_mask_changes_nothing(tiny: TinyBlip) -> None:
    without = search(tiny)
    with_mask = search(tiny, attention_mask=torch.ones_like(tiny.prefix))
    assert torch.equal(without.sequences, with_mask.sequences)


def test_fewer_results_than_groups_returns_the_first_groups_bests(tiny: TinyBlip) -> None:
    full = search(tiny)
    two = search(tiny, num_return_sequences=2)
    width = two.sequences.shape[1]
    want = full.sequences.view(3, 6, -1)[:, :2].reshape(6, -1)
    assert torch.equal(two.sequences, want[:, :width])
    assert (want[:, width:] == PAD).all()


# ----------------------------------------------------------------------------- raw log-probs


def test_token_logprobs_match_teacher_forcing(tiny: TinyBlip) -> None:
    """Each token's raw log-prob equals a cache-free forward over the finished sequence."""
    out = search(tiny, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=2, length_penalty=0.7)
    prefix_len = tiny.prefix.shape[1]
    encoder = tiny.image_embeds.repeat_interleave(6, dim=0)
    with torch.no_grad():
        logits = tiny.decoder(
            input_ids=out.sequences,
            encoder_hidden_states=encoder,
            encoder_attention_mask=torch.ones(encoder.shape[:2], dtype=torch.long),
            use_cache=False,
        ).logits
    logprobs = torch.log_softmax(logits[:, prefix_len - 1 : -1].float(), dim=-1)
    expected = logprobs.gather(2, out.sequences[:, prefix_len:, None]).squeeze(2)
    mask = out.generated_mask
    torch.testing.assert_close(out.token_logprobs[mask], expected[mask], atol=1e-4, rtol=0)
    assert (out.token_logprobs[~mask] == 0).all()
    assert (out.sequences[:, prefix_len:][~mask] == PAD).all()
    # The mask is a left-aligned run, and only its last token may be eos.
    assert torch.equal(mask, torch.arange(mask.shape[1])[None, :] < mask.sum(dim=1, keepdim=True))
    for row in range(out.sequences.shape[0]):
        assert EOS not in generated_tokens(out, row)[:-1]


def test_score_is_length_normalised_sum_of_logprobs_minus_paid_penalties(tiny: TinyBlip) -> None:
    """Without processors, score * len**lp = sum of raw log-probs - penalty * (collisions paid)."""
    length_penalty, penalty = 0.8, 0.3
    plain = search(tiny, num_beam_groups=1, diversity_penalty=0.0, length_penalty=length_penalty)
    n = plain.generated_mask.sum(dim=1).float()
    torch.testing.assert_close(
        plain.sequence_scores * n**length_penalty, plain.token_logprobs.sum(dim=1), atol=1e-4, rtol=0
    )

    diverse = search(tiny, diversity_penalty=penalty, length_penalty=length_penalty)
    n = diverse.generated_mask.sum(dim=1).float()
    collisions = (diverse.token_logprobs.sum(dim=1) - diverse.sequence_scores * n**length_penalty) / penalty
    # Each time a beam picked a token an earlier group's beam had picked, it paid one penalty.
    torch.testing.assert_close(collisions, collisions.round(), atol=1e-3, rtol=0)
    assert (collisions.round() >= 0).all()
    assert (collisions.view(3, 6)[:, 0].round() == 0).all(), "group 0 never pays"
    assert collisions.max() >= 1, "a small penalty should leave some collisions"


# ----------------------------------------------------------------------------- constraints


def test_min_new_tokens_delays_eos(tiny: TinyBlip) -> None:
    assert min(lengths(search(tiny))) < 6, "the tiny model must end some captions early for this test"
    out = search(tiny, min_new_tokens=6)
    assert min(lengths(out)) >= 6
    for row in range(out.sequences.shape[0]):
        assert EOS not in generated_tokens(out, row)[:6]


def test_max_new_tokens_caps_length(tiny: TinyBlip) -> None:
    out = search(tiny, max_new_tokens=5)
    assert out.token_logprobs.shape[1] <= 5
    for row in range(out.sequences.shape[0]):
        tokens = generated_tokens(out, row)
        assert tokens[-1] == EOS or len(tokens) == 5


def _repeats(tokens: list[int], n: int) -> int:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_no_repeat_ngram_size_bans_repeated_bigrams(tiny: TinyBlip) -> None:
    def bigram_repeats(out: DiverseBeamOutput) -> int:
        return sum(_repeats([BOS, *generated_tokens(out, row)], 2) for row in range(out.sequences.shape[0]))

    assert bigram_repeats(search(tiny, max_new_tokens=20)) > 0, "baseline must repeat a bigram"
    assert bigram_repeats(search(tiny, max_new_tokens=20, no_repeat_ngram_size=2)) == 0


def test_strong_repetition_penalty_stops_repeated_tokens(tiny: TinyBlip) -> None:
    def token_repeats(out: DiverseBeamOutput) -> int:
        return sum(_repeats([BOS, *generated_tokens(out, row)], 1) for row in range(out.sequences.shape[0]))

    assert token_repeats(search(tiny, max_new_tokens=20)) > 0, "baseline must repeat a token"
    assert token_repeats(search(tiny, max_new_tokens=20, repetition_penalty=100.0)) == 0


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_beams=5, num_beam_groups=2), r"multiple of num_beam_groups.*num_beams=6"),
        (dict(num_beams=2, num_beam_groups=3), r"multiple of num_beam_groups"),
        (dict(num_beam_groups=0), r"num_beam_groups must be at least 1"),
        (dict(num_return_sequences=7), r"num_return_sequences must be between 1 and num_beams"),
        (dict(num_return_sequences=0), r"num_return_sequences"),
        (dict(diversity_penalty=-1.0), r"diversity_penalty must be >= 0"),
        (dict(max_new_tokens=0), r"max_new_tokens must be at least 1"),
        (dict(min_new_tokens=13), r"min_new_tokens must be between 0 and max_new_tokens"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be > 0"),
        (dict(no_repeat_ngram_size=-1), r"no_repeat_ngram_size must be >= 0"),
        (dict(early_stopping="sometimes"), r"early_stopping must be True, False or 'never'"),
        (dict(attention_mask=torch.ones(3, 2)), r"attention_mask must have the shape of input_ids"),
    ],
)
def test_bad_arguments_raise_value_error(tiny: TinyBlip, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        search(tiny, **overrides)


def test_mismatched_inputs_raise_value_error(tiny: TinyBlip) -> None:
    few_beams = dict(num_beams=4, num_beam_groups=2, max_new_tokens=5, num_return_sequences=1)
    with pytest.raises(ValueError, match="same batch as input_ids"):
        search(tiny, prefix=tiny.prefix[:2], **few_beams)
    with pytest.raises(ValueError, match="prefix_len >= 1"):
        search(tiny, prefix=tiny.prefix[:, :0], **few_beams)
