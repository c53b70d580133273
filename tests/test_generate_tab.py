"""The Generate tab's own logic, in-process: what a model switch keeps, the selected image's seed,
the memory mode as it ran, and the last error kept beside the button (issue 19)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest
from markdown_it import MarkdownIt
from PIL import Image

from components.common import LastErrors, markdown_text, named_endpoint, parameter, user_errors
from components.generate import (
    active_inputs,
    fitted_size,
    guidance_note,
    memory_mode_label,
    seed_of_image,
    settings_for_model,
)
from pipelines import settings
from pipelines.catalog import CATALOG
from pipelines.sd3.png_metadata import save_png
from pipelines.sd3.text_to_image import size_limits

LARGE, MEDIUM, TURBO = "sd35-large", "sd35-medium", "sd35-large-turbo"


def test_a_model_switch_keeps_values_the_new_model_accepts():
    steps, guidance, width, height, notes = settings_for_model(TURBO, True, "12", "5", 256, 256)
    assert (steps, guidance, width, height) == ("12", "5", 256, 256)
    assert notes == [
        "Kept your steps 12 and guidance 5; empty the box to use 3.5 Large Turbo's preset (4 steps, guidance 0)."
    ]


def test_empty_steps_and_guidance_stay_empty_so_the_new_preset_fills_them():
    steps, guidance, width, height, notes = settings_for_model(MEDIUM, False, "", None, 1024, 1024)
    assert (steps, guidance, width, height, notes) == ("", "", 1024, 1024, [])


def test_out_of_range_values_are_clamped_and_said():
    steps, guidance, _, _, notes = settings_for_model(LARGE, True, "500", "-2", 128, 128)
    assert steps == str(settings.MAX_STEPS) and guidance == "0"
    assert f"Steps 500 is outside 1–{settings.MAX_STEPS}, so it is now {settings.MAX_STEPS}." in notes
    assert "Guidance -2 is outside 0–20, so it is now 0." in notes


def test_a_size_too_large_for_the_new_model_shrinks_and_keeps_its_shape():
    # Medium draws up to 2 MP; Large up to 1.1 MP, so Medium's 1440x1440 is too much for Large.
    _, _, width, height, notes = settings_for_model(LARGE, False, "", "", 1440, 1440)
    limits = size_limits(CATALOG[LARGE], False)
    assert width == height and width % 16 == 0 and width * height <= limits["max_pixels"]
    assert (width + 16) ** 2 > limits["max_pixels"]  # the largest square that fits, not just any
    assert notes == [f"1440x1440 is outside what 3.5 Large draws (0.25–1.10 megapixels, at most 2048 px a side), "
                     f"so the size is now {width}x{height}."]  # fmt: skip
    wide_width, wide_height = fitted_size(1920, 1080, LARGE, False)
    assert wide_width * wide_height <= limits["max_pixels"] and abs(wide_width / wide_height - 16 / 9) < 0.05


def test_a_size_too_small_grows_to_the_models_minimum():
    width, height = fitted_size(256, 256, MEDIUM, False)
    assert width * height >= size_limits(CATALOG[MEDIUM], False)["min_pixels"] and width == height


def test_the_seed_of_a_selected_image_is_read_from_its_png(tmp_path):
    path = save_png(Image.new("RGB", (16, 16)), tmp_path / "a.png", "a cat\nSteps: 2, Seed: 78", {"seed": 78})
    assert seed_of_image(str(path)) == 78
    Image.new("RGB", (16, 16)).save(tmp_path / "plain.png")
    assert seed_of_image(str(tmp_path / "plain.png")) is None and seed_of_image(None) is None


@pytest.mark.parametrize(
    ("mode", "dtype", "label"),
    [
        ("bf16", "float32", "fp32"),  # a CPU: full precision, not bf16
        ("bf16-no-t5", "float32", "fp32-no-t5"),
        ("bf16", "float16", "fp16"),  # a GPU without bf16
        ("bf16", "bfloat16", "bf16"),
        ("nf4", "bfloat16", "nf4"),
        ("bf16", None, "bf16"),  # a details dict from before the dtype was recorded
    ],
)
def test_the_memory_mode_is_named_after_the_dtype_it_ran_in(mode, dtype, label):
    assert memory_mode_label({"mode": mode, "reason": "", "dtype": dtype}) == label


def test_user_errors_stay_on_screen_until_closed():
    def refuse():
        raise ValueError("Write a prompt first: describe the image you want.")

    with pytest.raises(gr.Error) as raised:
        user_errors(refuse)()
    assert raised.value.duration is None and raised.value.message.startswith("Write a prompt first")


def test_the_last_error_is_kept_per_session_and_shown_once():
    errors = LastErrors()
    alice, bob = gr.Request(session_hash="alice"), gr.Request(session_hash="bob")

    def draw(prompt="", request=None):
        if not prompt:
            raise ValueError("Write a prompt first: describe the image you want.")
        yield prompt

    endpoint = errors.watch(named_endpoint(draw, [parameter("prompt", ""), parameter("request", None, gr.Request)]))
    with pytest.raises(gr.Error):
        list(endpoint("", alice))
    assert list(endpoint("a cat", bob)) == ["a cat"]
    assert errors.take(bob) == ""  # Bob's run went well: nothing to show him
    assert errors.take(alice) == "⚠️ " + markdown_text("Write a prompt first: describe the image you want.")
    assert errors.take(alice) == ""  # shown once


def test_a_last_error_naming_a_link_is_shown_as_text():
    errors = LastErrors()
    visitor = SimpleNamespace(session_hash="mallory")
    errors.record(visitor, "No LoRA named '[x](http://evil)' is loaded.")
    shown = errors.take(visitor)
    tokens = [token for block in MarkdownIt().parse(shown) for token in (block.children or [])]
    assert not any(token.type == "link_open" for token in tokens) and "[x](http://evil)" in shown.replace("\\", "")


def test_the_last_errors_are_bounded():
    errors = LastErrors()
    for number in range(errors.limit + 5):
        errors.record(SimpleNamespace(session_hash=f"visitor-{number}"), "Something failed.")
    assert len(errors._sentences) == errors.limit
    assert errors.take(SimpleNamespace(session_hash="visitor-0")) == ""  # the oldest went first


def test_the_negative_prompt_note_follows_the_guidance_box():
    assert guidance_note("large-turbo", "").startswith("Large Turbo runs 4 steps without classifier-free guidance")
    assert guidance_note("large-turbo", "4.5") == ""  # with CFG the negative prompt applies: no note
    assert guidance_note("large", "1").startswith("Without classifier-free guidance (guidance ≤ 1)")
    assert guidance_note("large", "") == ""
    assert guidance_note("medium", "not a number") == ""  # the preset's guidance until validation explains


def test_a_control_image_or_loras_left_in_their_fields_are_named_beside_generate():
    line, clear_control, clear_loras = active_inputs(None, "canny", 1.0, "")
    assert line == "" and clear_control["visible"] is False and clear_loras["visible"] is False
    line, clear_control, clear_loras = active_inputs("/tmp/edges.png", "depth", 0.7, "style:0.8, [x](http://e)")
    assert "ControlNet depth at 0.7" in line and clear_control["visible"] is True and clear_loras["visible"] is True
    assert "style:0.8" in line.replace("\\", "") and "[x](http" not in line  # a visitor's text, escaped
