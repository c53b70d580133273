"""Stated tolerances for numbers that two legitimately different computations produce.

A batch of images and the same images one at a time, padded and unpadded
rows, one thread and two, AVX-512 and AVX2 kernels, a CPU and a GPU: each pair
adds the same products in another order, so float32 results differ in the
last bits (observed: 5e-7 on a caption score between batch sizes 3 and 1 on an
AMD EPYC). Comparing such floats with ``==`` makes a test pass on one machine
and fail on another, so tests compare them here, with a tolerance that says
why it is right. Token ids, texts and file names are compared exactly: a
different token is a different decision, not rounding. ``==`` stays only
where the very same computation runs twice.
"""

from __future__ import annotations

import math

import numpy as np

# A caption score is a mean of token log-probabilities (each a log-softmax over the 30k-word
# vocabulary, in float32). Reordered sums move it by ~1e-6; a single different token moves it by
# more than 1e-2 on the tiny and the real models. 1e-4 leaves two orders of magnitude on both sides.
SCORE_ATOL = 1e-4

# Pixels decoded from SD3 latents by another kernel set or batch layout: 8-bit values, where float
# noise of ~1e-6 in the VAE output flips at most a rounding step. Two steps of 255 allow that and
# nothing a real change (a different seed, a LoRA, a ControlNet) could hide behind.
PIXEL_ATOL = 2


def same_score(a: float | None, b: float | None) -> bool:
    """Two caption scores equal within SCORE_ATOL (None only equals None)."""
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=0.0, abs_tol=SCORE_ATOL)


def assert_same_captions(first, second) -> None:
    """Two lists of CaptionedImage/FailedImage agree: names, texts and reasons exactly, scores within SCORE_ATOL."""
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert type(a) is type(b) and a.file_name == b.file_name
        if hasattr(a, "text"):
            assert a.text == b.text, a.file_name
            assert same_score(a.score, b.score), (a.file_name, a.score, b.score)
        else:
            assert a.reason == b.reason


def assert_close_pixels(a, b, atol: int = PIXEL_ATOL) -> None:
    """Two 8-bit images of the same size agree within ``atol`` levels per channel."""
    a, b = np.asarray(a).astype(np.int16), np.asarray(b).astype(np.int16)
    assert a.shape == b.shape
    worst = int(np.abs(a - b).max()) if a.size else 0
    assert worst <= atol, f"pixels differ by up to {worst} levels (tolerance {atol})"
