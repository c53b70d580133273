"""/generate through gradio_client against `python app.py --tiny`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipelines.sd3.png_metadata import parse_a1111_parameters, read_png_settings

pytestmark = pytest.mark.api


def test_generate_answers_with_only_a_prompt_and_returns_pngs_with_parameters(tiny_client):
    gallery, seed, summary, history, *_ = tiny_client.predict("a capybara holding a sign", api_name="/generate")
    (item,) = gallery
    path = item["image"]
    assert path.endswith(".png")
    text, studio = read_png_settings(path)
    prompt, _, settings = parse_a1111_parameters(text)
    assert prompt == "a capybara holding a sign"
    assert settings["Steps"] == "28" and settings["CFG scale"] == "3.5" and settings["Seed"] == str(int(seed))
    assert settings["Model"] == "stable-diffusion-3.5-large" and studio["model_key"] == "sd35-large"
    assert "28/28 steps" in summary and "noise by design" in summary


def test_generate_presets_by_model_and_named_parameters(tiny_client):
    gallery, seed, summary, *_ = tiny_client.predict(
        "three yellow ducks",
        model="large-turbo",
        steps=None,
        guidance=None,
        seed=12,
        num_images=2,
        api_name="/generate",
    )
    assert seed == 12 and len(gallery) == 2 and "4/4 steps, guidance 0" in summary
    seeds = sorted(parse_a1111_parameters(read_png_settings(item["image"])[0])[2]["Seed"] for item in gallery)
    assert seeds == ["12", "13"]


def test_out_of_range_sizes_are_refused_with_the_range(tiny_client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="megapixels"):
        tiny_client.predict("a cat", width=4096, height=4096, api_name="/generate")


def test_stop_ends_the_run_and_the_queue_moves_on(tiny_client):
    job = tiny_client.submit("a slow picture", steps=100, width=512, height=512, preview_every=0, api_name="/generate")
    deadline = time.monotonic() + 60
    while job.status().code.name not in ("PROGRESS", "PROCESSING", "ITERATING") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    tiny_client.predict(api_name="/generate_stop")
    _, _, summary, *_ = job.result(timeout=120)
    assert "stopped at step" in summary
    steps_done = int(summary.split("steps")[0].split(", ")[-1].split("/")[0])
    assert 0 < steps_done < 100
    _, _, after, *_ = tiny_client.predict("the next one", steps=2, api_name="/generate")
    assert "2/2 steps" in after and "stopped" not in after


def test_generate_returns_a_details_dict_as_its_last_output(tiny_client):
    gallery, seed, *_, details = tiny_client.predict(
        "two cats", model="medium", seed=40, steps=2, width=64, height=96, num_images=2, api_name="/generate"
    )
    assert details["seeds"] == [40, 41] and details["seed"] == seed == 40 and details["num_images"] == 2
    assert (details["steps"], details["steps_done"], details["stopped"]) == (2, 2, False)
    assert (
        details["guidance"] == 4.5 and details["size"] == "64x96" and (details["width"], details["height"]) == (64, 96)
    )
    assert details["skip_layer_guidance_layers"] == []  # the API's default is off; the page turns it on for Medium
    assert details["model"]["key"] == "sd35-medium" and details["model"]["repo_id"].endswith(
        "stable-diffusion-3.5-medium"
    )
    assert details["memory_mode"]["mode"] == "bf16" and "no CUDA GPU" in details["memory_mode"]["reason"]
    assert details["memory_mode"]["dtype"] == "float32"  # what a "bf16" mode really runs in on the CPU
    assert details["loras"] == [] and details["tiny"] is True and details["warnings"] == []
    assert details["files"] == [Path(item["image"]).name for item in gallery]
    assert (
        details["timings"]["generate_seconds"] > 0
        and details["timings"]["total_seconds"] >= details["timings"]["generate_seconds"]
    )
    for item, image_seed, parameters in zip(gallery, details["seeds"], details["parameters"], strict=True):
        text, studio = read_png_settings(item["image"])
        assert text == parameters and studio["seed"] == image_seed


def test_the_sliders_ranges_are_the_limits_validation_uses(tiny_app_url, tiny_client):
    """One source per limit: the Generate tab's sliders read the constants /generate checks against."""
    import json
    import urllib.request

    from gradio_client.exceptions import AppError

    from pipelines import settings
    from pipelines.catalog import CATALOG
    from pipelines.sd3.text_to_image import SIZE_MULTIPLE, slider_range

    with urllib.request.urlopen(tiny_app_url + "config", timeout=10) as response:
        components = json.load(response)["components"]

    def sliders(label: str) -> list[tuple]:
        found = [
            item["props"]
            for item in components
            if item.get("type") == "slider" and item.get("props", {}).get("label") == label
        ]
        assert found, label
        return sorted({(props["minimum"], props["maximum"], props.get("step")) for props in found})

    low, high = slider_range(CATALOG["sd35-large"], tiny=True)
    assert sliders("Width") == sliders("Height") == [(low, high, SIZE_MULTIPLE)]
    assert sliders("Images") == [(1, settings.MAX_IMAGES_PER_REQUEST, 1)]
    assert sliders("T5 tokens (max_sequence_length)") == [(settings.MIN_T5_TOKENS, settings.MAX_T5_TOKENS, 1)]
    assert sliders("Preview every N steps (0 = off)") == [(0, settings.MAX_PREVIEW_EVERY, 1)]
    with pytest.raises(AppError, match=f"preview_every must be between 0 and {settings.MAX_PREVIEW_EVERY}"):
        tiny_client.predict("a cat", steps=2, preview_every=settings.MAX_PREVIEW_EVERY + 1, api_name="/generate")
    with pytest.raises(AppError, match="megapixels"):  # the slider's top on both sides is past the area limit
        tiny_client.predict("a cat", steps=2, width=high, height=high + SIZE_MULTIPLE, api_name="/generate")


def test_the_summary_on_a_cpu_names_the_precision_the_weights_really_have(tiny_client):
    _, _, summary, *_, details = tiny_client.predict("a cat", steps=2, api_name="/generate")
    assert details["memory_mode"]["dtype"] == "float32"
    assert "memory mode fp32 (auto: no CUDA GPU, so full precision" in summary and "bf16" not in summary
