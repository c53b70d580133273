"""SD3.5 LoRAs through the API of `python app.py --tiny`: /lora_load, /lora_list, /lora_unload, /generate's lora."""

from __future__ import annotations

import numpy as np
import pytest
from gradio_client.exceptions import AppError
from PIL import Image

from pipelines.sd3.png_metadata import parse_a1111_parameters, read_png_settings

pytestmark = pytest.mark.api

DRAW = {"model": "large", "seed": 7, "steps": 2, "width": 64, "height": 64, "preview_every": 0}


def _draw(client, **overrides) -> tuple[np.ndarray, str, str]:
    """(pixels, summary, png path) of one tiny image."""
    gallery, _, summary, *_ = client.predict("a red fox", **{**DRAW, **overrides}, api_name="/generate")
    path = gallery[0]["image"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16), summary, path


def _names(rows) -> list[str]:
    data = rows["data"] if isinstance(rows, dict) else rows
    return [row[1] for row in data]


@pytest.fixture()
def clean_loras(tiny_client):
    tiny_client.predict(name="", model="large", active="", api_name="/lora_unload")
    yield tiny_client
    tiny_client.predict(name="", model="large", active="", api_name="/lora_unload")


@pytest.mark.slow  # over 3 s: the full suite runs it, the fast lane does not
def test_load_mix_fuse_and_unload_change_exactly_what_they_should(clean_loras):
    client = clean_loras
    base, _, _ = _draw(client)

    table, note, active = client.predict(source="tiny_large_style", model="large", api_name="/lora_load")
    assert "tiny_large_style" in _names(table) and "layers changed" in note and "tinystyle" in note
    assert active == "tiny_large_style:1"
    assert _names(client.predict(api_name="/lora_list")) == ["tiny_large_style"]

    # Loading alone draws nothing new; choosing it does, and records it in the PNG.
    assert np.array_equal(_draw(client)[0], base)
    styled, details, path = _draw_with_details(client, lora="tiny_large_style:1")
    assert np.abs(styled - base).max() > 0
    assert [(lora["name"], lora["weight"]) for lora in details["loras"]] == [("tiny_large_style", 1.0)]
    assert details["trigger_words_added"] == ["tinystyle"]
    prompt, _, pairs = parse_a1111_parameters(read_png_settings(path)[0])
    assert prompt == "a red fox, tinystyle <lora:tiny_large_style:1>"
    assert pairs["Lora hashes"].startswith("tiny_large_style: ") and len(pairs["Lora hashes"].split(": ")[1]) == 12
    assert read_png_settings(path)[1]["loras"][0]["name"] == "tiny_large_style"

    # Weight 0 (directly or through lora_scale) is the base model, pixel for pixel.
    zero, _, _ = _draw(client, lora="tiny_large_style:0")
    assert np.array_equal(zero, base)
    scaled_zero, _, _ = _draw(client, lora="tiny_large_style", lora_scale=0)
    assert np.array_equal(scaled_zero, base)

    # Kohya keys are converted; two LoRAs mix; the mix is deterministic.
    client.predict(source="tiny_large_kohya", model="large", api_name="/lora_load")
    mix = "tiny_large_style:0.5, tiny_large_kohya:0.5"
    mixed, _, _ = _draw(client, lora=mix)
    assert np.array_equal(_draw(client, lora=mix)[0], mixed)
    assert np.abs(mixed - styled).max() > 0

    # Fused draws what unfused draws (to rounding); leaving fuse restores the weights exactly.
    fused, fused_details, _ = _draw_with_details(client, lora=mix, lora_fuse=True)
    assert fused_details["lora_fused"] is True and np.abs(fused - mixed).max() <= 2
    assert np.array_equal(_draw(client)[0], base)

    table, note, active = client.predict(name="", model="large", active=mix, api_name="/lora_unload")
    assert _names(table) == [] and active == ""
    assert np.array_equal(_draw(client)[0], base)
    with pytest.raises(AppError, match="No LoRA is loaded, so 'no_such_style' cannot be used"):
        _draw(client, lora="no_such_style")


@pytest.mark.parametrize(
    ("source", "model", "message"),
    [
        ("../../etc/passwd.safetensors", "large", "inside the LoRA folder|outside"),
        ("/etc/hosts.safetensors", "large", "inside the LoRA folder|outside|absolute"),
        ("evil.bin", "large", "pickled files can run code"),
        ("tiny_medium_detail", "large", "made for .*Medium.*Large"),
        ("no_such_lora", "large", "no_such_lora"),
        ("", "large", "Choose a LoRA"),
    ],
)
@pytest.mark.slow  # over 3 s: the full suite runs it, the fast lane does not
def test_refused_sources_get_a_sentence_and_leave_the_model_as_it_was(clean_loras, source, model, message):
    client = clean_loras
    before, _, _ = _draw(client)
    with pytest.raises(AppError, match=message):
        client.predict(source=source, model=model, api_name="/lora_load")
    assert _names(client.predict(api_name="/lora_list")) == []
    assert np.array_equal(_draw(client)[0], before)


def test_a_pickle_renamed_to_safetensors_is_refused_as_an_upload(clean_loras, tmp_path):
    import pickle

    from gradio_client import handle_file

    fake = tmp_path / "style.safetensors"
    fake.write_bytes(pickle.dumps({"lora": [1, 2, 3]}))
    with pytest.raises(AppError, match="safetensors"):
        clean_loras.predict(upload=handle_file(str(fake)), model="large", api_name="/lora_load")


def test_medium_lora_loads_on_medium_and_is_listed_per_model(clean_loras):
    client = clean_loras
    try:
        table, _, active = client.predict(source="tiny_medium_detail", model="medium", api_name="/lora_load")
        assert active == "tiny_medium_detail:0.8"
        assert [row[0] for row in table["data"]] == ["sd35-medium"]
        assert _names(client.predict(api_name="/lora_list")) == ["tiny_medium_detail"]
        with pytest.raises(AppError, match="made for .*Medium.*Large"):
            _draw(client, lora="tiny_medium_detail")  # loaded on Medium; on demand on Large, it does not fit
        assert _names(client.predict(api_name="/lora_list")) == ["tiny_medium_detail"]
    finally:
        client.predict(name="", model="medium", active="", api_name="/lora_unload")


def _draw_with_details(client, prompt: str = "a red fox", **overrides) -> tuple[np.ndarray, dict, str]:
    """(pixels, details dict, png path) of one tiny image: the details are /generate's last output."""
    gallery, *_, details = client.predict(prompt, **{**DRAW, **overrides}, api_name="/generate")
    path = gallery[0]["image"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16), details, path


@pytest.mark.slow  # over 3 s: the full suite runs it, the fast lane does not
def test_a_lora_by_name_loads_on_demand_and_a_prompt_tag_draws_the_same_pixels(clean_loras):
    client = clean_loras
    assert _names(client.predict(api_name="/lora_list")) == []  # nothing loaded first
    named, details, path = _draw_with_details(client, lora="tiny_large_style:0.7")
    (lora,) = details["loras"]
    assert (lora["name"], lora["weight"], lora["loaded_now"]) == ("tiny_large_style", 0.7, True)
    assert lora["source"] == "registry:tiny_large_style" and details["trigger_words_added"] == ["tinystyle"]
    assert parse_a1111_parameters(read_png_settings(path)[0])[2]["Lora hashes"] == f"tiny_large_style: {lora['hash']}"
    assert _names(client.predict(api_name="/lora_list")) == ["tiny_large_style"]  # it stays loaded, shared

    tagged, tagged_details, _ = _draw_with_details(client, "a red fox <lora:tiny_large_style:0.7>")
    assert np.array_equal(tagged, named)
    assert tagged_details["loras"][0]["loaded_now"] is False and tagged_details["prompt"] == details["prompt"]
    base, base_details, _ = _draw_with_details(client)
    assert base_details["loras"] == [] and np.abs(base - named).max() > 0


@pytest.mark.slow  # over 3 s: the full suite runs it, the fast lane does not
def test_a_studio_png_prompt_and_settings_redraw_the_same_pixels(clean_loras):
    client = clean_loras
    first, _, path = _draw_with_details(client, lora="tiny_large_style:0.7", seed=21)
    client.predict(name="", model="large", active="", api_name="/lora_unload")  # the redraw loads it again itself
    prompt, negative, pairs = parse_a1111_parameters(read_png_settings(path)[0])
    assert prompt == "a red fox, tinystyle <lora:tiny_large_style:0.7>"
    width, height = pairs["Size"].split("x")
    again, details, again_path = _draw_with_details(
        client,
        prompt,
        negative_prompt=negative,
        seed=int(pairs["Seed"]),
        steps=pairs["Steps"],
        guidance=pairs["CFG scale"],
        width=int(width),
        height=int(height),
    )
    assert np.array_equal(again, first)
    assert details["loras"][0]["loaded_now"] is True and details["trigger_words_added"] == []
    assert parse_a1111_parameters(read_png_settings(again_path)[0])[0] == prompt  # tag and trigger word once
