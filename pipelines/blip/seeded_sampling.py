"""Sampling in which every row draws from its own seeded random stream.

``generate(do_sample=True)`` samples with ``torch.multinomial`` on the global
random generator, so a row's draws depend on how many rows came before it in
the batch: the same image captioned alone, third in a batch of eight, in
another process or after a resume would get another caption. Here each row
(an image's caption *i*) owns a CPU ``torch.Generator`` seeded with
``seed + i``, so a sampled caption depends only on the image, the seed and the
settings, as ``/generate``'s image *i* does with seed + *i*.

How it plugs into ``generate``: ``SeededSampler`` is a logits processor that
applies transformers' own temperature, top-k and top-p warpers, draws the next
token of every row from that row's stream, and returns scores that are 0 for
the drawn token and -inf elsewhere. ``generate`` then runs with
``do_sample=False``, so its greedy step picks exactly the drawn token and the
global random generator is never touched. Raw logits (``output_logits``) are
unaffected, so scores mean the same as for every other strategy.

The uniform numbers come from CPU generators whatever the model's device, so
a CPU and a GPU draw the same stream; the token picked from it can differ only
when a draw lands within float rounding of a boundary between two tokens'
cumulative probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


class SeededSampler(LogitsProcessor):
    """Sample one token per row from that row's own generator; see the module docstring.

    ``seeds[r]`` seeds row ``r`` of the batch that ``generate`` decodes (rows are
    image-major: image 0's captions first). ``top_k`` 0 and ``top_p`` 1 disable
    those filters, as in ``generate``.
    """

    def __init__(self, seeds: Sequence[int], *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        self.generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
        self.warpers: list[LogitsProcessor] = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"SeededSampler has {len(self.generators)} row seeds but got {scores.shape[0]} rows.")
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        picked = self.draw(scores)
        onehot = torch.full_like(scores, float("-inf"))
        onehot.scatter_(1, picked.to(scores.device).unsqueeze(1), 0.0)
        return onehot

    def draw(self, scores: torch.Tensor) -> torch.LongTensor:
        """One token id per row by inverse-CDF sampling with a uniform number from the row's generator."""
        probabilities = scores.detach().double().softmax(dim=-1).cpu()
        cumulative = probabilities.cumsum(dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=generator, dtype=torch.float64) for generator in self.generators])
        # The first token whose cumulative probability passes the draw; the clamp keeps a draw
        # above the (rounded) total on the last token that has any probability.
        picked = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1]).unsqueeze(1), right=True).squeeze(1)
        last_possible = probabilities.shape[1] - 1 - (probabilities > 0).flip(dims=[1]).long().argmax(dim=1)
        return torch.minimum(picked, last_possible)


def row_seeds(seed: int, num_images: int, captions_per_image: int) -> list[int]:
    """The seed of every row ``generate`` decodes: caption *i* of every image uses ``seed + i``."""
    return [seed + caption for _ in range(num_images) for caption in range(captions_per_image)]
