"""Diverse (group) beam search for BLIP captioning, written for this project.

Why the Studio has its own search rather than ``generate()``: it is faster. Every
beam search of the Studio (plain beam search is the one-group case) runs here,
because ``generate()`` reorders the whole ``EncoderDecoderCache`` after every
step, the cross-attention part included: BLIP's 577 projected image tokens per
beam and layer, identical for all beams of an image. This search reorders only
the self-attention cache (a few caption tokens), so plain beam search takes
0.87-0.92x the time of ``generate(num_beams=k)`` with the same results
(``bench/bench_caption.py``; ``tests/test_diverse_beam.py`` checks the equality).
transformers 5 also moved ``num_beam_groups`` out of core ``generate()`` into a
``custom_generate`` method; that accepts a local folder or a callable, so the
library version would not need ``trust_remote_code`` either: speed, not
availability, is the reason this module exists.

It implements the algorithm of Vijayakumar et al. 2016, "Diverse Beam Search:
Decoding Diverse Solutions from Neural Sequence Models", with the Hamming
diversity term, on top of BLIP's text decoder
(``BlipForConditionalGeneration.text_decoder``) and its KV cache.

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

    # 1. Shapes, inputs repeated per beam, and empty search buffers.
    search = _SearchState.start(
        input_ids, encoder_hidden_states, attention_mask, num_beams, num_beam_groups, max_new_tokens, pad_token_id
    )
    cache = None
    # transformers 5.24 names the KV cache `cache` (in and out); `past_key_values` is a deprecated
    # alias there until 5.40 that warns on every call, and the only name in earlier 5.x releases.
    cache_keyword = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    for step in range(search.T):
        # 2. One batched forward of every beam, then transformers' logits processors.
        raw_logprobs, processed, cache = _step_logprobs(
            decoder,
            search,
            step,
            cache,
            cache_keyword,
            eos_token_id=eos_token_id,
            min_new_tokens=min_new_tokens,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        # 3. The groups pick in turn; each is penalised for the tokens the earlier ones picked.
        picks = _StepPicks.unchanged(search, pad_token_id, raw_logprobs.shape[-1])
        for group in range(search.G):
            _advance_group(
                search,
                picks,
                group,
                step,
                raw_logprobs,
                processed,
                diversity_penalty=diversity_penalty,
                eos_token_id=eos_token_id,
                length_penalty=length_penalty,
            )
        if step + 1 == search.T:
            break
        # 4. Every beam moves to its new slot (history and KV cache) and appends its token.
        _move_beams(search, picks, step)
        _reorder_self_attention_cache(cache, (picks.source + search.rows * search.K).reshape(-1))
        # 5. Early stopping, per (image, group).
        if _update_done_groups(search, step, early_stopping=early_stopping, length_penalty=length_penalty):
            break

    # 6. The results, ordered per image.
    return _collect_results(search, input_ids, num_return_sequences, pad_token_id)


@dataclass
class _SearchState:
    """The search's buffers. Beam k of image b lives in flat row b * K + k of every batched tensor and
    of the KV cache; group g owns beams [g * S, (g + 1) * S). Buffers hold T generated positions so
    beams, finished hypotheses and their raw log-probs can all be gathered with one indexing op."""

    batch: int
    K: int  # beams per image
    G: int  # groups
    S: int  # beams per group
    T: int  # max_new_tokens
    rows: torch.Tensor  # (B, 1) for advanced indexing
    flat_prefix: torch.Tensor  # (B*K, P)
    prefix_mask: torch.Tensor  # (B*K, P)
    flat_encoder: torch.Tensor  # (B*K, N, D)
    encoder_mask: torch.Tensor  # (B*K, N)
    run_tokens: torch.Tensor  # (B, K, T) running beams: generated tokens
    run_raw: torch.Tensor  # (B, K, T) raw log-prob per token
    run_scores: torch.Tensor  # (B, K) accumulated score
    fin_tokens: torch.Tensor  # (B, G, S, T) finished hypotheses, best S per (image, group), best first
    fin_raw: torch.Tensor  # (B, G, S, T)
    fin_len: torch.Tensor  # (B, G, S)
    fin_scores: torch.Tensor  # (B, G, S); -inf = empty slot
    group_done: torch.Tensor  # (B, G): takes no more hypotheses, no longer counts for diversity

    @classmethod
    def start(
        cls, input_ids, encoder_hidden_states, attention_mask, num_beams, num_beam_groups, max_new_tokens, pad_token_id
    ) -> _SearchState:
        device = input_ids.device
        batch = input_ids.shape[0]
        K, G = num_beams, num_beam_groups
        S, T = K // G, max_new_tokens
        flat_prefix = input_ids.repeat_interleave(K, dim=0)
        flat_encoder = encoder_hidden_states.repeat_interleave(K, dim=0)
        prefix_mask = (
            attention_mask.repeat_interleave(K, dim=0).to(torch.long)
            if attention_mask is not None
            else torch.ones_like(flat_prefix)
        )
        # All beams of a group start identical, so only each group's first beam may expand at
        # step 0; otherwise a group would fill up with S copies of its best continuation.
        run_scores = torch.zeros((batch, G, S), dtype=torch.float32, device=device)
        run_scores[:, :, 1:] = _NEG_INF
        return cls(
            batch=batch,
            K=K,
            G=G,
            S=S,
            T=T,
            rows=torch.arange(batch, device=device)[:, None],
            flat_prefix=flat_prefix,
            prefix_mask=prefix_mask,
            flat_encoder=flat_encoder,
            encoder_mask=torch.ones(flat_encoder.shape[:2], dtype=torch.long, device=device),
            run_tokens=torch.full((batch, K, T), pad_token_id, dtype=torch.long, device=device),
            run_raw=torch.zeros((batch, K, T), dtype=torch.float32, device=device),
            run_scores=run_scores.view(batch, K),
            fin_tokens=torch.full((batch, G, S, T), pad_token_id, dtype=torch.long, device=device),
            fin_raw=torch.zeros((batch, G, S, T), dtype=torch.float32, device=device),
            fin_len=torch.zeros((batch, G, S), dtype=torch.long, device=device),
            fin_scores=torch.full((batch, G, S), _NEG_INF, dtype=torch.float32, device=device),
            group_done=torch.zeros((batch, G), dtype=torch.bool, device=device),
        )


@dataclass
class _StepPicks:
    """Where each beam of the next step comes from and what it appends. The defaults (stay put,
    append pad) are what done groups keep."""

    source: torch.Tensor  # (B, K) the parent beam
    token: torch.Tensor  # (B, K)
    raw: torch.Tensor  # (B, K)
    scores: torch.Tensor  # (B, K)
    token_counts: torch.Tensor  # (B, V) beams of the groups so far that picked each token this step

    @classmethod
    def unchanged(cls, search: _SearchState, pad_token_id: int, vocab: int) -> _StepPicks:
        device, batch, K = search.run_scores.device, search.batch, search.K
        return cls(
            source=torch.arange(K, device=device).expand(batch, K).clone(),
            token=torch.full((batch, K), pad_token_id, dtype=torch.long, device=device),
            raw=torch.zeros((batch, K), dtype=torch.float32, device=device),
            scores=search.run_scores.clone(),
            token_counts=torch.zeros((batch, vocab), dtype=torch.float32, device=device),
        )


def _step_logprobs(
    decoder,
    search: _SearchState,
    step: int,
    cache,
    cache_keyword: str,
    *,
    eos_token_id: int,
    min_new_tokens: int,
    repetition_penalty: float,
    no_repeat_ngram_size: int,
):
    """One batched forward of all B*K beams: (raw log-probs, processed log-probs, the cache), both
    (B, K, V). Step 0 feeds the whole prefix; later steps feed only the newest token."""
    batch, K = search.batch, search.K
    step_ids = search.flat_prefix if step == 0 else search.run_tokens[:, :, step - 1].reshape(batch * K, 1)
    step_mask = torch.cat([search.prefix_mask, search.prefix_mask.new_ones(batch * K, step)], dim=1)
    out = decoder(
        input_ids=step_ids,
        attention_mask=step_mask,
        encoder_hidden_states=search.flat_encoder,
        encoder_attention_mask=search.encoder_mask,
        use_cache=True,
        **{cache_keyword: cache},
    )
    cache = getattr(out, cache_keyword)
    raw_logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # (B*K, V)
    del out
    vocab = raw_logprobs.shape[-1]

    # Processed log-probs, in transformers' order: repetition penalty, n-gram ban, min-length
    # eos ban. The first two look at prefix + generated tokens.
    processed = raw_logprobs
    if repetition_penalty != 1.0 or no_repeat_ngram_size > 0:
        history = torch.cat([search.flat_prefix, search.run_tokens[:, :, :step].reshape(batch * K, step)], dim=1)
        if repetition_penalty != 1.0:
            processed = _apply_repetition_penalty(processed, history, repetition_penalty)
        if no_repeat_ngram_size > 0:
            processed = _ban_repeated_ngrams(processed, history, no_repeat_ngram_size)
    if step < min_new_tokens:
        processed = processed.clone()
        processed[:, eos_token_id] = _NEG_INF
    return raw_logprobs.view(batch, K, vocab), processed.view(batch, K, vocab), cache


def _advance_group(
    search: _SearchState,
    picks: _StepPicks,
    g: int,
    step: int,
    raw_logprobs: torch.Tensor,
    processed: torch.Tensor,
    *,
    diversity_penalty: float,
    eos_token_id: int,
    length_penalty: float,
) -> None:
    """Group ``g``'s step: score its candidates, file the finished ones, pick its open beams into
    ``picks`` and count its tokens for the later groups' diversity penalty."""
    batch, S, rows = search.batch, search.S, search.rows
    gen_len = step + 1  # generated tokens once this step's token is appended
    last_step = gen_len == search.T
    beams = slice(g * S, (g + 1) * S)
    active = ~search.group_done[:, g]  # (B,)
    vocab = processed.shape[-1]

    # Candidate scores: running score + processed log-prob - Hamming diversity penalty. Keep 2*S
    # candidates so that S open beams survive even if up to S candidates end in eos.
    cand = processed[:, beams, :] + search.run_scores[:, beams, None]  # (B, S, V)
    if g > 0 and diversity_penalty > 0.0:
        cand = cand - diversity_penalty * picks.token_counts[:, None, :]
    n_cand = min(2 * S, S * vocab)
    top_scores, top_idx = torch.topk(cand.reshape(batch, S * vocab), n_cand, dim=1)  # sorted
    top_beam = top_idx // vocab + g * S  # (B, 2S) absolute beam index of the parent
    top_token = top_idx % vocab
    top_raw = raw_logprobs[rows, top_beam, top_token]

    # Finished candidates: eos, or anything at the last step (max_new_tokens hit). As in
    # transformers, only those ranked within the top S may enter the group's finished list: the
    # lower-ranked ones only exist as spares for the open beams.
    finishing = (top_token == eos_token_id) | last_step
    rank_ok = torch.arange(n_cand, device=top_token.device) < S
    accept = finishing & rank_ok & active[:, None] & torch.isfinite(top_scores)
    if bool(accept.any()):
        new_tokens = search.run_tokens[rows, top_beam]  # (B, 2S, T)
        new_tokens[:, :, step] = top_token
        new_raw = search.run_raw[rows, top_beam]
        new_raw[:, :, step] = top_raw
        new_scores = torch.where(accept, top_scores / (gen_len**length_penalty), _NEG_INF)
        merged_scores = torch.cat([search.fin_scores[:, g], new_scores], dim=1)  # (B, 3S)
        keep_scores, keep = torch.topk(merged_scores, S, dim=1)
        merged_len = torch.cat([search.fin_len[:, g], torch.full_like(top_token, gen_len)], dim=1)
        search.fin_tokens[:, g] = torch.cat([search.fin_tokens[:, g], new_tokens], dim=1)[rows, keep]
        search.fin_raw[:, g] = torch.cat([search.fin_raw[:, g], new_raw], dim=1)[rows, keep]
        search.fin_len[:, g] = merged_len[rows, keep]
        search.fin_scores[:, g] = keep_scores
    if last_step:
        return

    # The S best non-finished candidates become the group's open beams.
    open_scores = top_scores.masked_fill(finishing, _NEG_INF)
    pick_scores, pick = torch.topk(open_scores, S, dim=1)
    pick_beam = top_beam.gather(1, pick)
    pick_token = top_token.gather(1, pick)
    keep_active = active[:, None]
    picks.source[:, beams] = torch.where(keep_active, pick_beam, picks.source[:, beams])
    picks.token[:, beams] = torch.where(keep_active, pick_token, picks.token[:, beams])
    picks.raw[:, beams] = torch.where(keep_active, top_raw.gather(1, pick), picks.raw[:, beams])
    picks.scores[:, beams] = torch.where(keep_active, pick_scores, picks.scores[:, beams])
    picks.token_counts.scatter_add_(1, pick_token, keep_active.expand(batch, S).to(torch.float32))


def _move_beams(search: _SearchState, picks: _StepPicks, step: int) -> None:
    """Move every beam's history (tokens, raw log-probs) to its new slot and append the picked token."""
    search.run_tokens = search.run_tokens[search.rows, picks.source]
    search.run_tokens[:, :, step] = picks.token
    search.run_raw = search.run_raw[search.rows, picks.source]
    search.run_raw[:, :, step] = picks.raw
    search.run_scores = picks.scores


def _update_done_groups(search: _SearchState, step: int, *, early_stopping: bool | str, length_penalty: float) -> bool:
    """Mark the (image, group) pairs that are done; True once all are. Full means S finished."""
    full = torch.isfinite(search.fin_scores).all(dim=-1)  # (B, G)
    if early_stopping is True:
        search.group_done |= full
    else:
        # Could the best open beam still beat the worst finished hypothesis? transformers'
        # heuristic: judge it at the current length, or at max length for "never" when a
        # positive length penalty rewards growing.
        gen_len = step + 1
        best_len = search.T if (early_stopping == "never" and length_penalty > 0) else gen_len
        best_open = search.run_scores.view(search.batch, search.G, search.S).max(dim=-1).values
        search.group_done |= full & (best_open / (best_len**length_penalty) <= search.fin_scores[:, :, -1])
    return bool(search.group_done.all())


def _collect_results(
    search: _SearchState, input_ids: torch.Tensor, num_return_sequences: int, pad_token_id: int
) -> DiverseBeamOutput:
    """Per image: each group's best (in group order), then all other finished hypotheses by
    descending score (stable, so ties keep group order), cut to ``num_return_sequences``."""
    batch, G, S, T, rows = search.batch, search.G, search.S, search.T, search.rows
    device = input_ids.device
    flat_scores = search.fin_scores.view(batch, G * S)
    group_best = torch.arange(G, device=device) * S  # (G,)
    rest_mask = torch.ones(G * S, dtype=torch.bool, device=device)
    rest_mask[group_best] = False
    rest_idx = torch.nonzero(rest_mask).squeeze(1)  # (G*(S-1),)
    rest_order = torch.sort(flat_scores[:, rest_idx], dim=1, descending=True, stable=True).indices
    order = torch.cat([group_best.expand(batch, G), rest_idx[rest_order]], dim=1)[:, :num_return_sequences]

    R = num_return_sequences
    out_len = search.fin_len.view(batch, G * S)[rows, order].reshape(batch * R)
    out_scores = flat_scores[rows, order].reshape(batch * R)
    width = max(int(out_len.max().item()), 1)
    out_tokens = search.fin_tokens.view(batch, G * S, T)[rows, order][:, :, :width].reshape(batch * R, width)
    out_raw = search.fin_raw.view(batch, G * S, T)[rows, order][:, :, :width].reshape(batch * R, width)
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
