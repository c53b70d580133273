"""One source per limit: the caption controls and the caption validation read the same ranges,
the caption strategies are one enum, and the SD3 short names are one map (issue 16)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import gradio as gr
import pytest

from components.decoding import build_decoding_controls
from pipelines import settings
from pipelines.blip.captioner import CaptionRequest
from pipelines.catalog import CATALOG, SD3_SHORT_NAMES
from pipelines.settings import CAPTION_RANGES, CaptionStrategy

ROOT = Path(__file__).resolve().parent.parent
NUMBER_FIELDS = [
    field.name
    for field in dataclasses.fields(CaptionRequest)
    if field.name not in ("strategy", "prefix", "early_stopping")
]


@pytest.fixture(scope="module")
def controls():
    with gr.Blocks():
        return build_decoding_controls()


def test_every_number_field_of_a_caption_request_has_one_range():
    assert sorted(CAPTION_RANGES) == sorted(NUMBER_FIELDS)


@pytest.mark.parametrize("name", NUMBER_FIELDS)
def test_each_control_spans_exactly_what_validation_accepts(controls, name):
    control, limits = getattr(controls, name), CAPTION_RANGES[name]
    assert (control.minimum, control.maximum) == (limits.slider_minimum, limits.high)
    if isinstance(control, gr.Slider):
        assert control.step == limits.step


def _request(name: str, value) -> CaptionRequest:
    """A request that changes only ``name``, under a strategy where no other rule gets in the way."""
    strategy = "diverse_beam" if name == "num_beam_groups" else "sampling"
    others = {"num_beams": 10} if name == "num_beam_groups" else {}
    if name == "min_new_tokens":
        others = {"max_new_tokens": settings.MAX_NEW_TOKENS}
    if name == "max_new_tokens":
        others = {"min_new_tokens": 0}
    return CaptionRequest(strategy=strategy, **{**others, name: value})


@pytest.mark.parametrize("name", [name for name in NUMBER_FIELDS if name not in ("num_captions", "num_beam_groups")])
def test_validation_accepts_both_ends_of_every_control_and_refuses_past_them(name):
    limits = CAPTION_RANGES[name]
    for end in (limits.slider_minimum, limits.high):
        validated = getattr(_request(name, end).validated(), name)
        assert validated == pytest.approx(end) or (name == "seed" and end == -1 and validated >= 0)  # -1: random
    below = limits.low if limits.low_open else limits.low - limits.step
    for outside in (below, limits.high + limits.step):
        with pytest.raises(ValueError, match=name):
            _request(name, outside).validated()


def test_num_captions_and_beam_groups_keep_their_ends():
    top = settings.MAX_CAPTIONS_PER_IMAGE
    assert CaptionRequest(num_captions=top, num_beams=top).validated().num_captions == top
    with pytest.raises(ValueError, match="num_captions"):
        CaptionRequest(num_captions=top + 1, num_beams=top).validated()
    groups = CAPTION_RANGES["num_beam_groups"]
    assert CaptionRequest(strategy="diverse_beam", num_beams=4, num_beam_groups=groups.low).validated()
    with pytest.raises(ValueError, match="num_beam_groups"):
        CaptionRequest(strategy="diverse_beam", num_beams=4, num_beam_groups=groups.low - 1).validated()


def test_the_strategy_is_one_enum_that_the_radio_and_validation_share(controls):
    assert [value for _, value in controls.strategy.choices] == [strategy.value for strategy in CaptionStrategy]
    request = CaptionRequest(strategy="diverse_beam", num_beams=4, num_beam_groups=2).validated()
    assert request.strategy is CaptionStrategy.DIVERSE_BEAM
    with pytest.raises(ValueError, match="choose one of: greedy, beam, diverse_beam, sampling"):
        CaptionRequest(strategy="topk").validated()


def test_no_module_spells_a_strategy_name_in_a_check():
    """Checks compare with CaptionStrategy members, never with the bare strings."""
    names = {strategy.value for strategy in CaptionStrategy}
    spelled = []
    for path in [
        ROOT / "app.py",
        *sorted((ROOT / "components").rglob("*.py")),
        *sorted((ROOT / "pipelines").rglob("*.py")),
    ]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                for constant in ast.walk(node):
                    if isinstance(constant, ast.Constant) and constant.value in names:
                        spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} {constant.value!r}")
    assert not spelled, f"compare with settings.CaptionStrategy instead: {spelled}"


def test_the_sd3_short_names_are_one_map_that_the_tiny_models_follow():
    from pipelines.tiny import TINY_SD3_DIRS

    assert set(SD3_SHORT_NAMES.values()) == {key for key, spec in CATALOG.items() if spec.kind == "sd3"}
    assert {short: CATALOG[key].tiny_dir for short, key in SD3_SHORT_NAMES.items()} == TINY_SD3_DIRS
