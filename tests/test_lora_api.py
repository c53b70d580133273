"""SD3.5 LoRAs through the API of `python app.py --tiny`: /lora_load, /lora_list, /lora_unload, /generate's lora."""

from __future__ import annotations

import numpy as np
import pytest
from gradio_client.exceptions import AppError
from PIL import Image

from pipelines.png_metadata import parse_a1111_parameters, read_png_settings

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


def test_load_mix_fuse_and_unload_change_exactly_what_they_should(clean_loras):
    client = clean_loras
    base, _, _ = _draw(client)

    table, note, active = client.predict(source="tiny_large_style", model="large", api_name="/lora_load")
    assert "tiny_large_style" in _names(table) and "layers changed" in note and "tinystyle" in note
    assert active == "tiny_large_style:1"
    assert _names(client.predict(api_name="/lora_list")) == ["tiny_large_style"]

    # Loading alone draws nothing new; choosing it does, and records it in the PNG.
    assert np.array_equal(_draw(client)[0], base)
    styled, summary, path = _draw(client, lora="tiny_large_style:1")
    assert np.abs(styled - base).max() > 0
    assert "LoRA tiny_large_style:1" in summary and "trigger words added: tinystyle" in summary
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
    fused, fused_summary, _ = _draw(client, lora=mix, lora_fuse=True)
    assert "(fused)" in fused_summary and np.abs(fused - mixed).max() <= 2
    assert np.array_equal(_draw(client)[0], base)

    table, note, active = client.predict(name="", model="large", active=mix, api_name="/lora_unload")
    assert _names(table) == [] and active == ""
    assert np.array_equal(_draw(client)[0], base)
    with pytest.raises(AppError, match="No LoRA is loaded"):
        _draw(client, lora="tiny_large_style")


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
        with pytest.raises(AppError, match="No LoRA"):
            _draw(client, lora="tiny_medium_detail")  # loaded on Medium, not on Large
    finally:
        client.predict(name="", model="medium", active="", api_name="/lora_unload")
