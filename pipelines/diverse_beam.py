"""Diverse (group) beam search for BLIP captioning, written for this project.

transformers 5 dropped ``num_beam_groups`` from core ``generate()`` and now points
to a Hub repository run with ``trust_remote_code``, which the Studio cannot fetch
offline and does not want to run. This module re-implements the algorithm of
Vijayakumar et al. 2016, "Diverse Beam Search: Decoding Diverse Solutions from
Neural Sequence Models", with the Hamming diversity term, on top of BLIP's text
decoder (``BlipForConditionalGeneration.text_decoder``) and its KV cache.

In short: the ``num_beams`` beams are split into ``num_beam_groups`` groups. At
every step the groups pick their next tokens one after the other; a group's
candidate scores are lowered by ``diversity_penalty`` times the number of beams
of the earlier groups that picked the same token at this same step. Inside a
group it is ordinary beam search with ``num_beams // num_beam_groups`` beams.

Scoring follows transformers' own beam search (5.x), so that one group with no
diversity penalty reproduces ``generate(num_beams=k)`` exactly:

* a beam's score is the sum of its *processed* token log-probs (log_softmax of
  the logits, then repetition penalty, n-gram ban and min-length ban) **minus the
  diversity penalties it paid**: the penalty is part of the objective, as in the
  paper, so it also shapes which finished hypotheses win;
* a finished hypothesis scores ``sum / generated_len ** length_penalty`` where
  ``generated_len`` counts the generated tokens, eos included;
* only eos candidates ranked within the group's top ``group_size`` may finish;
* at ``max_new_tokens`` the top ``group_size`` candidates of every open group are
  finished as they are.

Since the beam score mixes in penalties, every result also carries the raw
log-prob of each generated token (log_softmax of the unprocessed logits), so the
caller can report a mean token log-prob that means the same for every strategy.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DiverseBeamOutput", "diverse_beam_search"]

_NEG_INF = float("-inf")


@dataclass
class DiverseBeamOutput:
    """What :func:`diverse_beam_search` returns; rows are image-major (image 0's results first).

    Attributes:
        sequences: ``(B * R, P + L)`` token ids, the prefix followed by the generated tokens,
            right-padded with ``pad_token_id``; ``L`` is the longest returned generation.
        token_logprobs: ``(B * R, L)`` raw log-prob (log_softmax of the unprocessed logits)
            of each generated token; 0.0 at padding.
        generated_mask: ``(B * R, L)`` True where ``token_logprobs`` holds a generated
            token (the eos included).
        sequence_scores: ``(B * R,)`` the ranking score of each hypothesis: the sum of its
            processed, diversity-penalised log-probs divided by ``generated_len ** length_penalty``.
    """

    sequences: torch.LongTensor
    token_logprobs: torch.Tensor
    generated_mask: torch.BoolTensor
    sequence_scores: torch.Tensor


def _validate(
    input_ids: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    num_beams: int,
    num_beam_groups: int,
    diversity_penalty: float,
    max_new_tokens: int,
    min_new_tokens: int,
    repetition_penalty: float,
    no_repeat_ngram_size: int,
    num_return_sequences: int,
    early_stopping: bool | str,
) -> None:
    """Raise ``ValueError`` naming the fix if any argument of :func:`diverse_beam_search` is unusable."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids must have shape (batch, prefix_len) with prefix_len >= 1, "
            f"got {tuple(input_ids.shape)}; pass at least the bos token for every image."
        )
    if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"encoder_hidden_states must have shape (batch, tokens, dim) with the same batch as input_ids "
            f"({input_ids.shape[0]}), got {tuple(encoder_hidden_states.shape)}; pass the vision model's "
            "last hidden state for the same images."
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(attention_mask.shape)}; pass the mask that came with the prefix, or None."
        )
    if num_beam_groups < 1:
        raise ValueError(f"num_beam_groups must be at least 1 (got {num_beam_groups}); use 2+ for diversity.")
    if num_beams < num_beam_groups or num_beams % num_beam_groups != 0:
        raise ValueError(
            f"num_beams ({num_beams}) must be a positive multiple of num_beam_groups ({num_beam_groups}); "
            f"for example num_beams={num_beam_groups * max(1, -(-num_beams // num_beam_groups))}."
        )
    if not diversity_penalty >= 0.0:
        raise ValueError(
            f"diversity_penalty must be >= 0 (got {diversity_penalty}); 0 makes the groups independent, "
            "larger values push the groups apart."
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 (got {max_new_tokens}).")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"min_new_tokens must be between 0 and max_new_tokens ({max_new_tokens}), got {min_new_tokens}; "
            "lower it or raise max_new_tokens."
        )
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(
            f"num_return_sequences must be between 1 and num_beams ({num_beams}), "
            f"got {num_return_sequences}; raise num_beams or ask for fewer sequences."
        )
    if not repetition_penalty > 0.0:
        raise ValueError(
            f"repetition_penalty must be > 0 (got {repetition_penalty}); 1.0 disables it, values above 1 "
            "discourage repeats."
        )
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (got {no_repeat_ngram_size}); 0 disables it.")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")


def _apply_repetition_penalty(scores: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scale the scores of tokens already in ``sequences`` (rows aligned) the way transformers does.

    scores: ``(R, V)`` log-probs; sequences: ``(R, T)`` every token so far (prefix included).
    A negative score is multiplied by ``penalty``, a positive one divided, so values > 1
    always make a seen token less likely. Returns a new tensor.
    """
    seen = torch.gather(scores, 1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, sequences, seen)


def _ban_repeated_ngrams(scores: torch.Tensor, sequences: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf every token that would complete an n-gram already present in its row.

    scores: ``(R, V)``; sequences: ``(R, T)`` every token so far (prefix included).
    Returns a new tensor.
    """
    length = sequences.shape[1]
    if length < n:
        return scores
    windows = sequences.unfold(1, n, 1)  # (R, W, n): every n-gram so far
    tail = sequences[:, length - n + 1 :]  # (R, n - 1): the n-gram the next token would complete
    matches = (windows[:, :, :-1] == tail[:, None, :]).all(dim=-1)  # (R, W)
    # scatter_add, not scatter: the same last token can appear in matching and non-matching
    # windows, and scatter would keep an arbitrary one of the duplicates.
    hits = torch.zeros_like(scores).scatter_add_(1, windows[:, :, -1], matches.to(scores.dtype))
    return scores.masked_fill(hits > 0, _NEG_INF)


def _reorder_self_attention_cache(cache: object, flat_beam_idx: torch.Tensor) -> None:
    """Reorder a BLIP decoder cache in place so row ``i`` becomes old row ``flat_beam_idx[i]``.

    BLIP's decoder returns an ``EncoderDecoderCache``. Its cross-attention part holds the
    projected image tokens, identical for all beams of one image, and beams only ever move
    within their image, so reordering it would be a no-op copy of by far the largest
    tensors (577 image tokens against a few caption tokens): only the self-attention part
    is reordered. Any other cache type is reordered whole through ``Cache.reorder_cache``.
    """
    self_attention = getattr(cache, "self_attention_cache", None)
    target = self_attention if self_attention is not None else cache
    if not hasattr(target, "reorder_cache"):
        raise TypeError(f"beam search cannot reorder the decoder's {type(cache).__name__}")
    target.reorder_cache(flat_beam_idx)


@torch.inference_mode()
def diverse_beam_search(
    decoder: nn.Module,
    input_ids: torch.LongTensor,
    encoder_hidden_states: torch.Tensor,
    *,
    num_beams: int,
    num_beam_groups: int,
    diversity_penalty: float,
    max_new_tokens: int,
    min_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    num_return_sequences: int = 1,
    early_stopping: bool | str = True,
    attention_mask: torch.Tensor | None = None,
) -> DiverseBeamOutput:
    """Caption a batch of images with diverse (group) beam search.

    Args:
        decoder: BLIP's text decoder (``BlipForConditionalGeneration.text_decoder``), already in
            eval mode (dropout would make the search random).
        input_ids: ``(B, P)`` caption prefix per image, starting with the bos token. All rows share
            the length ``P``; the usual prefix is the bos token alone or a common prompt. Prepare it
            as BLIP's own ``generate`` does: tokenised prompt with [CLS] replaced by bos
            (``text_config.bos_token_id``) and the trailing [SEP] dropped.
        encoder_hidden_states: ``(B, N, D)`` the vision model's last hidden state for the images.
        num_beams: total beams per image, split evenly over the groups.
        num_beam_groups: number of groups ``G``; 1 gives plain beam search (``diversity_penalty``
            then has no effect).
        diversity_penalty: subtracted from a candidate's score once per beam of an earlier group
            that picked the same token at the same step.
        max_new_tokens: hard cap on generated tokens (eos included); open beams are finished there.
        min_new_tokens: eos is banned until this many tokens have been generated.
        eos_token_id: ends a caption (BLIP: ``text_config.sep_token_id``).
        pad_token_id: fills the right of shorter results (BLIP: ``text_config.pad_token_id``).
        length_penalty: finished score = sum of log-probs / ``generated_len ** length_penalty``.
        repetition_penalty: transformers' repetition penalty, applied to tokens of the prefix and
            the beam so far; 1.0 disables it.
        no_repeat_ngram_size: if > 0, no n-gram of this size may occur twice (prefix included).
        num_return_sequences: ``R`` results per image, at most ``num_beams``.
        early_stopping: True: a group stops once it has ``group_size`` finished hypotheses.
            False: it also waits until no open beam could still beat its worst finished one at the
            current length. "never": as False, but with ``length_penalty > 0`` it assumes open
            beams could grow to ``max_new_tokens``.
        attention_mask: optional ``(B, P)`` mask of the prefix; generated tokens are always attended.

    Returns:
        A :class:`DiverseBeamOutput` with ``B * R`` rows, image-major. Per image the rows are the
        best hypothesis of group 0, 1, ..., G-1 (in group order, so row ``g`` belongs to group
        ``g`` when ``R >= G``), then the remaining finished hypotheses of all groups by descending
        score, cut to ``R``.

    Raises:
        ValueError: if an argument is unusable; the message says what to change.
    """
    _validate(
        input_ids,
        encoder_hidden_states,
        attention_mask,
        num_beams=num_beams,
        num_beam_groups=num_beam_groups,
        diversity_penalty=diversity_penalty,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        num_return_sequences=num_return_sequences,
        early_stopping=early_stopping,
    )

    # 1. Shapes and constants. Beam k of image b lives in flat row b * K + k of every batched
    #    tensor and of the KV cache; group g owns beams [g * S, (g + 1) * S).
    device = input_ids.device
    batch = input_ids.shape[0]
    K, G = num_beams, num_beam_groups
    S = K // G
    T = max_new_tokens
    rows = torch.arange(batch, device=device)[:, None]  # (B, 1) for advanced indexing

    flat_prefix = input_ids.repeat_interleave(K, dim=0)  # (B*K, P)
    flat_encoder = encoder_hidden_states.repeat_interleave(K, dim=0)  # (B*K, N, D)
    encoder_mask = torch.ones(flat_encoder.shape[:2], dtype=torch.long, device=device)
    prefix_mask = (
        attention_mask.repeat_interleave(K, dim=0).to(torch.long)
        if attention_mask is not None
        else torch.ones_like(flat_prefix)
    )

    # 2. Search state, in fixed-size buffers of T generated positions so that beams, finished
    #    hypotheses and their raw log-probs can all be gathered with one indexing op.
    #    Running beams: generated tokens, raw log-prob per token, accumulated score.
    run_tokens = torch.full((batch, K, T), pad_token_id, dtype=torch.long, device=device)
    run_raw = torch.zeros((batch, K, T), dtype=torch.float32, device=device)
    # All beams of a group start identical, so only each group's first beam may expand at
    # step 0; otherwise a group would fill up with S copies of its best continuation.
    run_scores = torch.zeros((batch, G, S), dtype=torch.float32, device=device)
    run_scores[:, :, 1:] = _NEG_INF
    run_scores = run_scores.view(batch, K)
    #    Finished hypotheses, the best S per (image, group), sorted best first; -inf = empty slot.
    fin_tokens = torch.full((batch, G, S, T), pad_token_id, dtype=torch.long, device=device)
    fin_raw = torch.zeros((batch, G, S, T), dtype=torch.float32, device=device)
    fin_len = torch.zeros((batch, G, S), dtype=torch.long, device=device)
    fin_scores = torch.full((batch, G, S), _NEG_INF, dtype=torch.float32, device=device)
    #    A done group takes no more hypotheses and no longer counts for the diversity penalty.
    group_done = torch.zeros((batch, G), dtype=torch.bool, device=device)

    cache = None
    # transformers 5.24 names the KV cache `cache` (in and out); `past_key_values` is a deprecated
    # alias there until 5.40 that warns on every call, and the only name in earlier 5.x releases.
    cache_keyword = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    for step in range(T):
        gen_len = step + 1  # generated tokens once this step's token is appended
        last_step = gen_len == T

        # 3. One batched forward of all B*K beams. Step 0 feeds the whole prefix; later steps
        #    feed only the newest token and let the cache supply the rest.
        step_ids = flat_prefix if step == 0 else run_tokens[:, :, step - 1].reshape(batch * K, 1)
        step_mask = torch.cat([prefix_mask, prefix_mask.new_ones(batch * K, step)], dim=1)
        out = decoder(
            input_ids=step_ids,
            attention_mask=step_mask,
            encoder_hidden_states=flat_encoder,
            encoder_attention_mask=encoder_mask,
            use_cache=True,
            **{cache_keyword: cache},
        )
        cache = getattr(out, cache_keyword)
        raw_logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # (B*K, V)
        del out
        vocab = raw_logprobs.shape[-1]

        # 4. Processed log-probs, in transformers' order: repetition penalty, n-gram ban,
        #    min-length eos ban. The first two look at prefix + generated tokens.
        processed = raw_logprobs
        if repetition_penalty != 1.0 or no_repeat_ngram_size > 0:
            history = torch.cat([flat_prefix, run_tokens[:, :, :step].reshape(batch * K, step)], dim=1)
            if repetition_penalty != 1.0:
                processed = _apply_repetition_penalty(processed, history, repetition_penalty)
            if no_repeat_ngram_size > 0:
                processed = _ban_repeated_ngrams(processed, history, no_repeat_ngram_size)
        if step < min_new_tokens:
            processed = processed.clone()
            processed[:, eos_token_id] = _NEG_INF
        processed = processed.view(batch, K, vocab)
        raw_logprobs = raw_logprobs.view(batch, K, vocab)

        # Where each beam of the next step comes from, and the token it appends. Defaults
        # (stay put, append pad) are what done groups keep.
        next_src = torch.arange(K, device=device).expand(batch, K).clone()
        next_token = torch.full((batch, K), pad_token_id, dtype=torch.long, device=device)
        next_raw = torch.zeros((batch, K), dtype=torch.float32, device=device)
        next_scores = run_scores.clone()
        # How many beams of the groups processed so far picked each token at this step.
        token_counts = torch.zeros((batch, vocab), dtype=torch.float32, device=device)

        for g in range(G):
            beams = slice(g * S, (g + 1) * S)
            active = ~group_done[:, g]  # (B,)

            # 5. Candidate scores: running score + processed log-prob - Hamming diversity
            #    penalty. Keep 2*S candidates so that S open beams survive even if up to S
            #    candidates end in eos.
            cand = processed[:, beams, :] + run_scores[:, beams, None]  # (B, S, V)
            if g > 0 and diversity_penalty > 0.0:
                cand = cand - diversity_penalty * token_counts[:, None, :]
            n_cand = min(2 * S, S * vocab)
            top_scores, top_idx = torch.topk(cand.reshape(batch, S * vocab), n_cand, dim=1)  # sorted
            top_beam = top_idx // vocab + g * S  # (B, 2S) absolute beam index of the parent
            top_token = top_idx % vocab
            top_raw = raw_logprobs[rows, top_beam, top_token]

            # 6. Finished candidates: eos, or anything at the last step (max_new_tokens hit).
            #    As in transformers, only those ranked within the top S may enter the group's
            #    finished list: the lower-ranked ones only exist as spares for the open beams.
            finishing = (top_token == eos_token_id) | last_step
            rank_ok = torch.arange(n_cand, device=device) < S
            accept = finishing & rank_ok & active[:, None] & torch.isfinite(top_scores)
            if bool(accept.any()):
                new_tokens = run_tokens[rows, top_beam]  # (B, 2S, T)
                new_tokens[:, :, step] = top_token
                new_raw = run_raw[rows, top_beam]
                new_raw[:, :, step] = top_raw
                new_scores = torch.where(accept, top_scores / (gen_len**length_penalty), _NEG_INF)
                merged_scores = torch.cat([fin_scores[:, g], new_scores], dim=1)  # (B, 3S)
                keep_scores, keep = torch.topk(merged_scores, S, dim=1)
                merged_len = torch.cat([fin_len[:, g], torch.full_like(top_token, gen_len)], dim=1)
                fin_tokens[:, g] = torch.cat([fin_tokens[:, g], new_tokens], dim=1)[rows, keep]
                fin_raw[:, g] = torch.cat([fin_raw[:, g], new_raw], dim=1)[rows, keep]
                fin_len[:, g] = merged_len[rows, keep]
                fin_scores[:, g] = keep_scores
            if last_step:
                continue

            # 7. The S best non-finished candidates become the group's open beams.
            open_scores = top_scores.masked_fill(finishing, _NEG_INF)
            pick_scores, pick = torch.topk(open_scores, S, dim=1)
            pick_beam = top_beam.gather(1, pick)
            pick_token = top_token.gather(1, pick)
            keep_active = active[:, None]
            next_src[:, beams] = torch.where(keep_active, pick_beam, next_src[:, beams])
            next_token[:, beams] = torch.where(keep_active, pick_token, next_token[:, beams])
            next_raw[:, beams] = torch.where(keep_active, top_raw.gather(1, pick), next_raw[:, beams])
            next_scores[:, beams] = torch.where(keep_active, pick_scores, next_scores[:, beams])

            # 8. Record this group's picks for the later groups' diversity penalty.
            token_counts.scatter_add_(1, pick_token, keep_active.expand(batch, S).to(torch.float32))

        if last_step:
            break

        # 9. Move every beam's history (tokens, raw log-probs, KV cache) to its new slot,
        #    append the picked token.
        run_tokens = run_tokens[rows, next_src]
        run_tokens[:, :, step] = next_token
        run_raw = run_raw[rows, next_src]
        run_raw[:, :, step] = next_raw
        run_scores = next_scores
        _reorder_self_attention_cache(cache, (next_src + rows * K).reshape(-1))

        # 10. Early stopping, per (image, group): full means S finished hypotheses.
        full = torch.isfinite(fin_scores).all(dim=-1)  # (B, G)
        if early_stopping is True:
            group_done |= full
        else:
            # Could the best open beam still beat the worst finished hypothesis? transformers'
            # heuristic: judge it at the current length, or at max length for "never" when a
            # positive length penalty rewards growing.
            best_len = T if (early_stopping == "never" and length_penalty > 0) else gen_len
            best_open = run_scores.view(batch, G, S).max(dim=-1).values / (best_len**length_penalty)
            group_done |= full & (best_open <= fin_scores[:, :, -1])
        if bool(group_done.all()):
            break

    # 11. Order the results per image: each group's best (in group order), then all other
    #     finished hypotheses by descending score (stable, so ties keep group order).
    flat_scores = fin_scores.view(batch, G * S)
    group_best = torch.arange(G, device=device) * S  # (G,)
    rest_mask = torch.ones(G * S, dtype=torch.bool, device=device)
    rest_mask[group_best] = False
    rest_idx = torch.nonzero(rest_mask).squeeze(1)  # (G*(S-1),)
    rest_order = torch.sort(flat_scores[:, rest_idx], dim=1, descending=True, stable=True).indices
    order = torch.cat([group_best.expand(batch, G), rest_idx[rest_order]], dim=1)[:, :num_return_sequences]

    R = num_return_sequences
    out_len = fin_len.view(batch, G * S)[rows, order].reshape(batch * R)
    out_scores = flat_scores[rows, order].reshape(batch * R)
    width = max(int(out_len.max().item()), 1)
    out_tokens = fin_tokens.view(batch, G * S, T)[rows, order][:, :, :width].reshape(batch * R, width)
    out_raw = fin_raw.view(batch, G * S, T)[rows, order][:, :, :width].reshape(batch * R, width)
    generated_mask = torch.arange(width, device=device)[None, :] < out_len[:, None]
    # Buffers are pad/0.0 past each hypothesis' end already; enforce it anyway so the contract
    # holds even for a pad id the model happened to generate inside a caption.
    out_tokens = out_tokens.masked_fill(~generated_mask, pad_token_id)
    out_raw = out_raw.masked_fill(~generated_mask, 0.0)
    sequences = torch.cat([input_ids.repeat_interleave(R, dim=0), out_tokens], dim=1)
    return DiverseBeamOutput(
        sequences=sequences,
        token_logprobs=out_raw,
        generated_mask=generated_mask,
        sequence_scores=out_scores,
    )
