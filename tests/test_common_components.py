"""The small pieces every tab shares: per-session Stop flags, empty-means-preset inputs, previewer lifetime."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest

from components.common import StopRequests, blank_to_none
from pipelines import settings
from pipelines.sd3.text_to_image import LatentPreviewer


def test_one_sessions_stop_never_ends_another_sessions_run():
    flags = StopRequests()
    alice, bob = SimpleNamespace(session_hash="alice"), SimpleNamespace(session_hash="bob")
    alice_run, bob_run = flags.start(alice), flags.start(bob)
    flags.stop(bob)
    assert bob_run.is_set() and not alice_run.is_set()
    assert not flags.start(bob).is_set()  # a new run starts cleared
    assert flags.flag(None) is flags.flag(SimpleNamespace(session_hash=None))  # API clients without a session


def test_blank_inputs_mean_the_preset_but_zero_is_a_value():
    assert blank_to_none(None) is None and blank_to_none("") is None and blank_to_none("  ") is None
    assert blank_to_none(0) == 0 and blank_to_none("0") == "0" and blank_to_none(3.5) == 3.5


def test_the_previewer_lives_and_dies_with_its_pipeline(tiny_manager):
    pipeline = tiny_manager.get("sd35-large")
    previewer = LatentPreviewer.for_pipeline(pipeline)
    assert LatentPreviewer.for_pipeline(pipeline) is previewer and previewer.vae is pipeline.vae

    class Holder:  # a stand-in pipeline that can be dropped
        vae = object()

    holder = Holder()
    gone = weakref.ref(LatentPreviewer.for_pipeline(holder))
    del holder
    gc.collect()
    assert gone() is None


def test_the_best_caption_becomes_the_prompt_and_no_caption_gets_a_sentence():
    from components.caption import caption_as_prompt

    details = {"captions": [{"text": " a dog on a beach ", "score": -0.3}, {"text": "a dog", "score": -0.9}]}
    assert caption_as_prompt(details) == "a dog on a beach"
    for empty in (None, {}, {"captions": []}, {"captions": [{"text": "  "}]}, {"captions": ["not a dict"]}):
        with pytest.raises(ValueError, match="Caption an image first"):
            caption_as_prompt(empty)
    assert len(caption_as_prompt({"captions": [{"text": "x" * 10_000}]})) == settings.MAX_PROMPT_CHARS
