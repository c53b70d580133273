"""PNG parameters: written in the AUTOMATIC1111 format and read back losslessly."""

from __future__ import annotations

import pytest
from PIL import Image

from pipelines.sd3.png_metadata import a1111_parameters, parse_a1111_parameters, read_png_settings, save_png


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a capybara holding a sign that reads Hello World", "blurry, low quality"),
        ("line one\nline two: with a colon, and a comma", ""),
        ('a "quoted" word', "Negative words\nover two lines"),
    ],
)
def test_parameters_round_trip_through_a_png(tmp_path, prompt, negative):
    settings = {
        "Steps": 28,
        "Sampler": "Euler",
        "CFG scale": "3.5",
        "Seed": 42,
        "Size": "1024x768",
        "Model": "stable-diffusion-3.5-large",
        "SLG layers": "[7, 8, 9]",
    }
    text = a1111_parameters(prompt, negative, settings)
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "image.png", text, {"seed": 42, "loras": []})
    stored, studio = read_png_settings(path)
    assert stored == text and studio == {"seed": 42, "loras": []}
    parsed_prompt, parsed_negative, parsed = parse_a1111_parameters(stored)
    assert parsed_prompt == prompt and parsed_negative == negative
    assert parsed == {key: str(value) for key, value in settings.items()}


def test_the_settings_line_reads_like_automatic1111():
    text = a1111_parameters("a cat", "dog", {"Steps": 4, "CFG scale": "0", "Seed": 7, "Size": "512x512"})
    assert text == "a cat\nNegative prompt: dog\nSteps: 4, CFG scale: 0, Seed: 7, Size: 512x512"


def test_a_prompt_with_colons_alone_is_not_taken_for_settings():
    prompt, negative, settings = parse_a1111_parameters("style: watercolor, subject: cat")
    assert prompt == "style: watercolor, subject: cat" and negative == "" and settings == {}
