"""pipelines/startup: the flags and the Studio they build, below app.py and the tabs."""

from __future__ import annotations

import pytest

from pipelines.startup import model_overrides, parse_args


def test_model_overrides_come_from_the_environment_and_the_command_line_wins():
    environ = {"STUDIO_MODEL_BLIP_CAPTION": "/models/blip", "STUDIO_MODEL_SD35_LARGE": "/models/large"}
    overrides = model_overrides(["sd35-large=/elsewhere/large", "blip-itm = /models/itm"], environ)
    assert overrides == {"blip-caption": "/models/blip", "sd35-large": "/elsewhere/large", "blip-itm": "/models/itm"}


@pytest.mark.parametrize("pair", ["blip-caption", "blip-caption="])
def test_a_model_flag_without_a_source_says_how_to_write_it(pair):
    with pytest.raises(SystemExit, match="write KEY=SOURCE"):
        model_overrides([pair], {})


def test_the_flags_have_the_defaults_users_expect():
    args = parse_args([])
    assert (args.tiny, args.share, args.memory, args.device, args.model) == (False, False, "auto", "auto", [])
