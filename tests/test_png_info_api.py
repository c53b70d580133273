"""/png_info through gradio_client against `python app.py --tiny`: read a Studio PNG's settings, redraw it."""

from __future__ import annotations

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image, PngImagePlugin

from tests.tolerances import PIXEL_ATOL

pytestmark = pytest.mark.api


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_a_studio_png_redraws_the_same_pixels_from_its_own_settings(tiny_client):
    gallery, *_ = tiny_client.predict(
        "a lighthouse on a cliff",
        model="medium",
        negative_prompt="fog",
        seed=31337,
        steps=3,
        guidance=6,
        width=128,
        height=96,
        max_sequence_length=120,
        api_name="/generate",
    )
    original = gallery[0]["image"]
    summary, raw, info = tiny_client.predict(handle_file(original), api_name="/png_info")
    assert info["found"] and info["source"] == "studio-json" and "lighthouse" in summary
    assert info["prompt"] == "a lighthouse on a cliff" and info["negative_prompt"] == "fog"
    assert (info["seed"], info["steps"], info["guidance"], info["width"], info["height"]) == (31337, 3, 6.0, 128, 96)
    assert info["model"] == "medium" and raw.startswith("a lighthouse on a cliff\nNegative prompt: fog\n")

    settings = {
        "model": info["model"],
        "negative_prompt": info["negative_prompt"],
        "steps": info["steps"],
        "guidance": info["guidance"],
        "width": info["width"],
        "height": info["height"],
        "max_sequence_length": info["max_sequence_length"],
        "skip_layer_guidance": bool(info["skip_layer_guidance_layers"]),
    }
    again, *_ = tiny_client.predict(info["prompt"], seed=info["seed"], **settings, api_name="/generate")
    # Same server, same settings, one image per call: the same computation, within the stated tolerance.
    assert np.abs(pixels(again[0]["image"]) - pixels(original)).max() <= PIXEL_ATOL
    other, *_ = tiny_client.predict(info["prompt"], seed=info["seed"] + 1, **settings, api_name="/generate")
    assert np.abs(pixels(other[0]["image"]) - pixels(original)).max() > PIXEL_ATOL  # the seed matters


def test_an_a1111_parameters_chunk_is_read_through_the_api(tiny_client, tmp_path):
    text = (
        "a cat in a hat <lora:ink:0.6>,\nwatercolor\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 77, Size: 512x768, Model: sd3.5_large_turbo"
    )
    info_chunk = PngImagePlugin.PngInfo()
    info_chunk.add_text("parameters", text)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (16, 24), "navy").save(path, pnginfo=info_chunk)
    summary, raw, info = tiny_client.predict(handle_file(path), api_name="/png_info")
    assert raw == text and info["source"] == "png-parameters"
    assert info["prompt"] == "a cat in a hat <lora:ink:0.6>,\nwatercolor" and info["negative_prompt"] == "blurry"
    assert (info["steps"], info["guidance"], info["seed"], info["width"], info["height"]) == (20, 7.0, 77, 512, 768)
    assert info["model"] == "large-turbo" and info["loras"] == [{"name": "ink", "weight": 0.6}]


def test_a_png_without_settings_gets_one_sentence(tiny_client, tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (16, 16), "white").save(path)
    summary, raw, info = tiny_client.predict(handle_file(path), api_name="/png_info")
    assert not info["found"] and raw == ""
    assert summary == info["message"] and summary.startswith("'plain.png' carries no generation settings")


def test_garbage_gets_a_sentence_and_the_app_keeps_serving(tiny_client, tmp_path):
    from gradio_client.exceptions import AppError

    path = tmp_path / "fake.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(AppError, match="damaged|not a PNG"):
        tiny_client.predict(handle_file(path), api_name="/png_info")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert tiny_client.predict(handle_file(plain), api_name="/png_info")[2]["found"] is False


@pytest.mark.slow
def test_a_studio_png_drawn_with_a_lora_redraws_through_its_prompt_tag(tiny_client):
    draw = {"model": "large", "steps": 2, "width": 64, "height": 64}
    gallery, *_ = tiny_client.predict("a red kite", seed=5, lora="tiny_large_style:0.8", **draw, api_name="/generate")
    original = gallery[0]["image"]
    _, _, info = tiny_client.predict(handle_file(original), api_name="/png_info")
    assert info["loras"] == [{"name": "tiny_large_style", "weight": 0.8}]
    # The encoders' prompt (the LoRA's trigger word added once), then the tag that carries the LoRA to /generate.
    assert info["prompt"].startswith("a red kite") and info["prompt"].endswith(" <lora:tiny_large_style:0.8>")
    again, *_ = tiny_client.predict(info["prompt"], seed=info["seed"], **draw, api_name="/generate")
    assert np.abs(pixels(again[0]["image"]) - pixels(original)).max() <= PIXEL_ATOL
    plain, *_ = tiny_client.predict("a red kite", seed=info["seed"], **draw, api_name="/generate")
    assert np.abs(pixels(plain[0]["image"]) - pixels(original)).max() > PIXEL_ATOL  # the LoRA matters
