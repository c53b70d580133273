"""PNG Info on files other tools write: one test per format on the samples in tests/data/png-info/.

The samples are made by tests/data/png-info/make_samples.py in each tool's own layout (see its
LICENSES.md); expected.json says what each must give.
"""

from __future__ import annotations

import functools
import io
import json
import struct
from pathlib import Path

import pytest
from PIL import Image, ImageFile, PngImagePlugin

from pipelines import settings
from pipelines.images import load_image
from pipelines.sd3 import foreign_metadata, png_info
from pipelines.sd3.png_info import generate_form_values, read_generation_settings
from pipelines.sd3.png_metadata import parse_a1111_parameters

SAMPLES = Path(__file__).parent / "data" / "png-info"
EXPECTED = json.loads((SAMPLES / "expected.json").read_text())
FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "width", "height", "model_given")
FORMATS = sorted({entry["format"] for entry in EXPECTED.values()})


def files_of(fmt: str) -> list[str]:
    return [name for name, entry in EXPECTED.items() if entry["format"] == fmt]


def png_bytes(chunks: dict[str, str], image: Image.Image | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    (image or Image.new("RGB", (8, 8))).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_its_samples(fmt):
    """Every field of every sample of a format, and the tool named, as its writer wrote them."""
    assert files_of(fmt)
    for name in files_of(fmt):
        expected = EXPECTED[name]
        info = read_generation_settings(SAMPLES / name)
        assert info["found"] is expected["found"], (name, info.get("message"))
        assert info["tool"] == expected["tool"], name
        if expected["found"]:
            assert {key: info[key] for key in FIELDS} == {key: expected[key] for key in FIELDS}, name
        else:
            # One sentence that names the tool the file came from.
            assert info["message"].startswith(f"'{name}' ") and expected["tool"].split(" (")[0] in info["message"]
            assert info["message"].count(". ") == 0 and info["message"].endswith(".")


def test_a1111_whitespace_is_read_as_a1111_reads_it():
    """A1111's parse_generation_parameters strips the text, then each line, and the negative prompt after its label."""
    text = "  amazing quality, \n1girl  \n\nNegative prompt:\n  lowres, \nbad hands \nSteps: 20, Seed: 1, Size: 8x8"
    prompt, negative, pairs = parse_a1111_parameters(text)
    assert prompt == "amazing quality,\n1girl\n"  # the empty line before the negative prompt stays, stripped
    assert negative == "lowres,\nbad hands"  # "Negative prompt:" alone: no leading line break
    assert pairs == {"Steps": "20", "Seed": "1", "Size": "8x8"}
    assert parse_a1111_parameters("a cat \nNegative prompt:   dog  \nSteps: 1, Seed: 2, Size: 8x8")[:2] == (
        "a cat",
        "dog",
    )


def test_cfg_scale_is_taken_in_any_case():
    for key in ("CFG scale", "CFG Scale", "cfg scale"):
        info = read_generation_settings(
            png_bytes({"parameters": f"a cat\nSteps: 20, {key}: 6.5, Seed: 3, Size: 64x64"})
        )
        assert info["guidance"] == 6.5, key


def test_text_formats_decode_no_pixel(monkeypatch):
    """JPEG comments, XMP, WebP EXIF, JSON formats: read from headers and chunks, never from decoded pixels."""

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    calls = []
    monkeypatch.setattr(png_info, "load_image", lambda *args, **kwargs: calls.append(1))
    for name, expected in EXPECTED.items():
        if expected["format"] != "stealth" and expected["found"]:
            assert read_generation_settings(SAMPLES / name)["found"], name
    assert calls == []  # the stealth reader never ran for a file whose settings are in its text


def test_stealth_text_is_read_only_through_the_safe_decoder_and_within_its_caps(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return load_image(*args, **kwargs)

    monkeypatch.setattr(png_info, "load_image", counted)
    assert read_generation_settings(SAMPLES / "a1111-stealth.png")["seed"] == EXPECTED["a1111-stealth.png"]["seed"]
    assert len(calls) == 1 and calls[0]["keep_alpha"]
    # An opaque PNG without settings has no alpha channel to search: nothing is decoded.
    assert not read_generation_settings(png_bytes({}))["found"] and len(calls) == 1
    # Over the decode caps, the pixels are not read and the sentence says so.
    monkeypatch.setattr(png_info, "load_image", functools.partial(load_image, max_pixels=100))
    info = read_generation_settings(SAMPLES / "a1111-stealth.png")
    assert not info["found"] and "was not searched" in info["message"]


def test_a_stealth_length_past_the_image_or_the_limit_reads_nothing():
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 254))
    header = b"stealth_pngcomp" + struct.pack(">I", 2**31)
    pixels = image.load()
    for position, bit in enumerate(int(b) for byte in header for b in f"{byte:08b}"):
        x, y = divmod(position, 32)
        pixels[x, y] = (0, 0, 0, 254 | bit)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    info = read_generation_settings(buffer.getvalue(), name="claims.png")
    assert not info["found"] and info["message"].startswith("'claims.png' carries no generation settings")


def test_json_settings_texts_are_bounded_and_damaged_ones_get_a_sentence():
    deep = png_bytes({"parameters": "{" + '"a":' * 1 + "[" * 200_000 + "]" * 200_000 + "}"})
    info = read_generation_settings(deep, name="deep.png")
    assert not info["found"] and "damaged" in info["message"]
    huge = png_bytes({"invokeai_metadata": '{"positive_prompt": "' + "x" * settings.MAX_SETTINGS_JSON_CHARS + '"}'})
    info = read_generation_settings(huge, name="huge.png")
    assert not info["found"] and "InvokeAI" in info["message"] and "not read" in info["message"]
    broken = png_bytes({"Software": "NovelAI", "Description": "x", "Source": "NAI", "Comment": "{broken"})
    info = read_generation_settings(broken, name="nai.png")
    assert not info["found"] and info["message"].startswith("'nai.png', written by NovelAI, carries")


def test_an_unknown_json_text_is_named_by_its_keys():
    info = read_generation_settings(png_bytes({"parameters": '{"colour": "red", "mood": "calm"}'}), name="x.png")
    assert not info["found"] and "keys: colour, mood" in info["message"]


def test_the_comfyui_graph_reader_is_wired_in_one_place(monkeypatch):
    """Once _comfyui_settings calls settings_from_comfyui, a ComfyUI PNG gives the graph's settings."""
    graph = EXPECTED["comfyui.png"]  # what the sample graph holds (the real reader gives it too)
    seen = []

    def reader(prompt_text, workflow_text):
        seen.append(json.loads(prompt_text))
        return {
            "prompt": graph["prompt"],
            "negative_prompt": graph["negative_prompt"],
            "seed": graph["seed"],
            "steps": graph["steps"],
            "cfg": graph["guidance"],
            "width": graph["width"],
            "height": graph["height"],
            "sampler": "euler",
            "scheduler": "sgm_uniform",
            "model": graph["model_given"],
            "loras": [{"name": "ink", "weight": 0.5}],
            "denoise": 1.0,
            "notes": ["read from the KSampler"],
        }

    monkeypatch.setattr(foreign_metadata, "_comfyui_settings", reader)
    info = read_generation_settings(SAMPLES / "comfyui.png")
    assert info["found"] and info["tool"] == "ComfyUI" and seen[0]["3"]["class_type"] == "KSampler"
    assert {key: info[key] for key in FIELDS} == {key: graph[key] for key in FIELDS}
    assert info["model_key"] == "sd35-large" and info["loras"] == [{"name": "ink", "weight": 0.5}]
    assert "read from the KSampler" in info["notes"]
    # Civitai's graph fills what its site summary leaves out (seed and size).
    info = read_generation_settings(SAMPLES / "civitai-comfyui.jpg")
    assert info["tool"] == "Civitai" and (info["seed"], info["width"]) == (42, 1024) and info["steps"] == 25


def test_another_tools_loras_travel_to_generate_as_prompt_tags():
    info = read_generation_settings(SAMPLES / "swarmui.png")
    assert info["loras"] == [{"name": "ink_style", "weight": 0.7}]
    values, _ = generate_form_values(info, "large")
    assert values["prompt"] == "a lighthouse at dusk, oil painting <lora:ink_style:0.7>"
    # A1111 text keeps its own tags: none is added twice.
    text = "a cat <lora:ink:0.5>\nSteps: 20, Seed: 1, Size: 64x64"
    values, _ = generate_form_values(read_generation_settings(png_bytes({"parameters": text})), "large")
    assert values["prompt"] == "a cat <lora:ink:0.5>"


@pytest.mark.api
@pytest.mark.slow
def test_every_sample_reads_the_same_through_the_api(tiny_client):
    """/png_info on each sample, as a visitor uploads it: the same tool and fields, or the same one sentence."""
    from gradio_client import handle_file

    for name, expected in EXPECTED.items():
        summary, _, info = tiny_client.predict(handle_file(SAMPLES / name), api_name="/png_info")
        assert info["found"] is expected["found"] and info["tool"] == expected["tool"], name
        if expected["found"]:
            assert {key: info[key] for key in FIELDS} == {key: expected[key] for key in FIELDS}, name
        else:
            assert info["message"].startswith(f"'{name}' ") and summary, name


def test_a_comfyui_graph_past_the_readers_bounds_gets_a_true_sentence():
    from pipelines.sd3.comfyui_graph import MAX_GRAPH_NODES

    nodes = {str(index): {"class_type": "KSampler", "inputs": {}} for index in range(MAX_GRAPH_NODES + 1)}
    info = read_generation_settings(png_bytes({"prompt": json.dumps(nodes)}), name="huge-graph.png")
    assert not info["found"] and info["tool"] == "ComfyUI"
    assert "could not read" in info["message"] and "past the reader's bounds" in info["message"]
