"""/generate through gradio_client against `python app.py --tiny`."""

from __future__ import annotations

import time

import pytest

from pipelines.png_metadata import parse_a1111_parameters, read_png_settings

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
