"""PNG Info in process: the settings a Studio, A1111 or Forge image carries, read back (pipelines/sd3/png_info.py)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image, PngImagePlugin

from pipelines import settings
from pipelines.catalog import CATALOG
from pipelines.images import ImageDecodeError
from pipelines.sd3.generation import GenerationService
from pipelines.sd3.jobs import GenerationRequest
from pipelines.sd3.png_info import (
    decode_user_comment,
    fitted_size,
    generate_form_values,
    read_generation_settings,
    studio_model_key,
)

# Written by hand in the layout AUTOMATIC1111 1.10 writes: a two-line prompt with LoRA tags (one
# with A1111's two-weight form), a negative prompt, JSON-quoted values, and a size that is not square.
A1111_TEXT = (
    "masterpiece, a lighthouse on a cliff <lora:ink_style:0.7>,\n"
    "stormy sea, dramatic light <lora:film grain:0.4:0.2>\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    'Model hash: 4ba2e4b2b8, Model: sd3.5_large, Lora hashes: "ink_style: 1a2b3c4d5e6f, film grain: 0f9e8d7c6b5a", '
    "Version: v1.10.1"
)


def png_bytes(text_chunks: dict[str, str] | None = None, size=(32, 48)) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text_chunks or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", size, "teal").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def exif_image_bytes(comment: bytes, image_format: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment  # the Exif sub-IFD's UserComment, where A1111 writes
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "olive").save(buffer, format=image_format, exif=exif.tobytes())
    return buffer.getvalue()


# ----------------------------------------------------------------------------- Studio PNGs


@pytest.fixture(scope="module")
def studio_png(tiny_manager, tmp_path_factory):
    """A PNG the Studio drew and saved (the tiny Medium, so skip-layer guidance is in its settings)."""
    service = GenerationService(tiny_manager)
    request = GenerationRequest(
        prompt="a red fox in the snow",
        model="medium",
        negative_prompt="blurry",
        seed=4242,
        steps=2,
        guidance=5.5,
        width=96,
        height=64,
        max_sequence_length=100,
    )
    outcome = service(request, folder=tmp_path_factory.mktemp("studio-png"))
    return outcome.paths[0], outcome.details


def test_a_studio_png_gives_back_the_settings_it_was_drawn_with(studio_png):
    path, details = studio_png
    info = read_generation_settings(path)
    assert info["found"] and info["source"] == "studio-json"
    assert info["prompt"] == "a red fox in the snow" and info["negative_prompt"] == "blurry"
    assert (info["seed"], info["steps"], info["guidance"]) == (4242, 2, 5.5)
    assert (info["width"], info["height"]) == (96, 64)
    assert info["model"] == "medium" and info["model_key"] == "sd35-medium"
    assert info["max_sequence_length"] == 100 and info["skip_layer_guidance_layers"] == [7, 8, 9]
    assert info["loras"] == [] and info["raw"] == details["parameters"][0]
    assert info["studio"]["model_id"] == CATALOG["sd35-medium"].repo_id
    assert not any("another tool" in note for note in info["notes"])


def test_a_studio_png_fills_the_generate_form_with_its_own_values(studio_png):
    values, notes = generate_form_values(read_generation_settings(studio_png[0]), "large", tiny=True)
    assert values == {
        "model": "medium",
        "prompt": "a red fox in the snow",
        "negative_prompt": "blurry",
        "seed": 4242,
        "steps": "2",
        "guidance": "5.5",
        "width": 96,
        "height": 64,
        "max_sequence_length": 100,
        "skip_layer_guidance": True,
        "lora": "",
    }
    assert notes == []


def test_the_json_chunk_wins_over_the_parameters_text():
    studio_json = '{"prompt": "from json", "seed": 9, "steps": 3, "guidance": 2.0, "width": 64, "height": 80, "model_key": "sd35-large-turbo", "loras": [{"name": "ink", "weight": 0.5}]}'
    text = "from text\nSteps: 30, CFG scale: 7, Seed: 1, Size: 512x512, Model: stable-diffusion-3.5-large"
    info = read_generation_settings(png_bytes({"parameters": text, "studio": studio_json}))
    assert info["source"] == "studio-json" and info["prompt"] == "from json <lora:ink:0.5>"
    assert (info["seed"], info["steps"], info["guidance"], info["width"], info["height"]) == (9, 3, 2.0, 64, 80)
    assert info["model"] == "large-turbo" and info["loras"] == [{"name": "ink", "weight": 0.5}]
    assert info["raw"] == text  # the text is returned as stored, whichever source wins


def test_a_damaged_json_chunk_falls_back_to_the_parameters_text():
    text = "a cat\nSteps: 4, CFG scale: 0, Seed: 7, Size: 512x512, Model: stable-diffusion-3.5-large-turbo"
    info = read_generation_settings(png_bytes({"parameters": text, "studio": "{not json"}))
    assert info["source"] == "png-parameters" and info["prompt"] == "a cat" and info["seed"] == 7
    assert info["model"] == "large-turbo" and any("damaged" in note for note in info["notes"])


def test_a_hostile_json_chunk_is_read_without_a_crash():
    hostile = (
        '{"prompt": 5, "seed": "abc", "steps": [1], "guidance": "nan", "loras": [{"name": "x", "weight": "heavy"}, 3]}'
    )
    text = "a cat\nSteps: 4, CFG scale: 1, Seed: 8, Size: 64x64, Model: stable-diffusion-3.5-large"
    info = read_generation_settings(png_bytes({"parameters": text, "studio": hostile}))
    assert info["prompt"] == "a cat" and (info["seed"], info["steps"], info["guidance"]) == (8, 4, 1.0)
    assert info["loras"] == [{"name": "x", "weight": 1.0}]
    values, _ = generate_form_values(info, "large")
    assert values["seed"] == 8


# ----------------------------------------------------------------------------- A1111 / Forge


def test_an_a1111_parameters_chunk_is_parsed_field_by_field():
    info = read_generation_settings(png_bytes({"parameters": A1111_TEXT}))
    assert info["found"] and info["source"] == "png-parameters" and info["studio"] is None
    assert info["prompt"] == (
        "masterpiece, a lighthouse on a cliff <lora:ink_style:0.7>,\nstormy sea, dramatic light <lora:film grain:0.4:0.2>"
    )
    assert info["negative_prompt"] == "blurry, lowres"
    assert (info["seed"], info["steps"], info["guidance"]) == (1234567890, 20, 7.0)
    assert (info["width"], info["height"]) == (512, 768)
    assert info["sampler"] == "DPM++ 2M Karras"
    assert info["loras"] == [{"name": "ink_style", "weight": 0.7}, {"name": "film grain", "weight": 0.4}]
    assert info["lora_hashes"] == "ink_style: 1a2b3c4d5e6f, film grain: 0f9e8d7c6b5a"
    assert info["model"] == "large" and info["model_key"] == "sd35-large" and info["model_given"] == "sd3.5_large"
    assert info["settings"]["Version"] == "v1.10.1" and info["raw"] == A1111_TEXT
    assert any("another tool" in note for note in info["notes"])


def test_an_empty_negative_prompt_line_and_windows_line_ends_read_as_a1111_reads_them():
    text = "a cat\r\nNegative prompt:\r\nSteps: 20, CFG scale: 7, Seed: 5, Size: 512x512"
    info = read_generation_settings(png_bytes({"parameters": text}))
    assert info["prompt"] == "a cat" and info["negative_prompt"] == "" and info["seed"] == 5


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("sd3.5_large", "sd35-large"),
        ("sd3.5_large_turbo.safetensors", "sd35-large-turbo"),
        ("SD3.5 Medium", "sd35-medium"),
        ("stable-diffusion-3.5-large", "sd35-large"),
        ("stabilityai/stable-diffusion-3.5-medium", "sd35-medium"),
        ("sd35-large-turbo", "sd35-large-turbo"),
        ("sd3_medium_incl_clips", None),  # SD3 Medium, not 3.5
        ("sd_xl_base_1.0", None),
        ("", None),
    ],
)
def test_checkpoint_names_map_to_the_studios_models(name, key):
    assert studio_model_key(name) == key


def test_a_model_the_studio_does_not_serve_is_kept_as_given_with_a_note():
    text = "a castle\nSteps: 25, Sampler: Euler a, CFG scale: 6, Seed: 3, Size: 832x1216, Model: ponyDiffusionV6XL"
    info = read_generation_settings(png_bytes({"parameters": text}))
    assert info["model"] == "ponyDiffusionV6XL" and info["model_key"] is None
    assert any("'ponyDiffusionV6XL' is not one the Studio serves" in note for note in info["notes"])
    values, _ = generate_form_values(info, "medium")
    assert values["model"] == "medium"  # Generate keeps its own model


# ----------------------------------------------------------------------------- clamping into the form


def test_values_outside_the_models_range_are_clamped_with_a_note():
    text = "a cat\nSteps: 150, CFG scale: 30, Seed: 99999999999, Size: 512x768, Model: sd3.5_large"
    values, notes = generate_form_values(read_generation_settings(png_bytes({"parameters": text})), "large", tiny=True)
    assert values["steps"] == str(settings.MAX_STEPS) and values["guidance"] == f"{settings.MAX_GUIDANCE:g}"
    assert values["seed"] == settings.MAX_SEED
    width, height = values["width"], values["height"]
    assert width % 16 == 0 and height % 16 == 0 and width * height <= 512 * 512 and max(width, height) <= 512
    assert abs(height / width - 1.5) < 0.1  # the aspect ratio survives
    assert any("Steps 150" in note for note in notes) and any("Guidance 30" in note for note in notes)
    assert any("Seed 99999999999" in note for note in notes) and any("512x768 is outside" in note for note in notes)


def test_a_size_within_the_real_models_range_is_kept():
    notes: list[str] = []
    assert fitted_size(512, 768, CATALOG["sd35-large"], False, notes) == (512, 768) and notes == []
    assert fitted_size(1000, 1000, CATALOG["sd35-large"], False, notes) == (1008, 1008)
    assert notes and "snapped" in notes[0]


@pytest.mark.parametrize("size", [(64, 4096), (8000, 8000), (20, 20), (4096, 16)])
def test_every_size_is_fitted_into_the_models_limits(size):
    spec = CATALOG["sd35-medium"]
    for tiny in (True, False):
        notes: list[str] = []
        width, height = fitted_size(*size, spec, tiny, notes)
        limits = (
            (64 * 64, 512 * 512, 512) if tiny else (spec.image_preset.min_pixels, spec.image_preset.max_pixels, 2048)
        )
        assert limits[0] <= width * height <= limits[1] and max(width, height) <= limits[2] and notes


# ----------------------------------------------------------------------------- JPEG / WebP EXIF


@pytest.mark.parametrize(
    ("comment", "image_format"),
    [
        (b"UNICODE\x00" + A1111_TEXT.encode("utf-16-be"), "JPEG"),  # A1111's own writer
        (b"UNICODE\x00" + A1111_TEXT.encode("utf-16-le"), "JPEG"),  # little-endian, no byte-order mark
        (b"ASCII\x00\x00\x00" + A1111_TEXT.encode(), "WEBP"),
    ],
)
def test_a_jpeg_or_webp_carries_the_settings_in_its_exif_user_comment(comment, image_format):
    info = read_generation_settings(exif_image_bytes(comment, image_format))
    assert info["found"] and info["source"] == f"{image_format.lower()}-exif"
    assert info["negative_prompt"] == "blurry, lowres" and info["seed"] == 1234567890
    assert (info["width"], info["height"]) == (512, 768) and len(info["loras"]) == 2


def test_user_comment_decoding_keeps_non_ascii_text():
    text = "ein Fuchs im Schnee, 雪の中の狐"
    assert decode_user_comment(b"UNICODE\x00" + text.encode("utf-16-be")) == text
    assert decode_user_comment(b"UNICODE\x00" + text.encode("utf-16")) == text  # with a byte-order mark


def test_a_jpeg_without_settings_gets_one_sentence():
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG")
    info = read_generation_settings(buffer.getvalue(), name="photo.jpg")
    assert not info["found"] and "'photo.jpg' carries no generation settings" in info["message"]
    assert info["message"].count(". ") == 0  # one sentence


# ----------------------------------------------------------------------------- nothing to read


def test_a_png_without_settings_gets_one_sentence():
    info = read_generation_settings(png_bytes({"Title": "holiday"}), name="plain.png")
    assert info == {
        "found": False,
        "message": info["message"],
        "source": "png",
        "tool": None,
        "raw": "",
        "notes": [],
    }
    assert info["message"].startswith("'plain.png' carries no generation settings")


def test_a_comfyui_workflow_png_is_named_as_such():
    info = read_generation_settings(png_bytes({"prompt": "{}", "workflow": "{}"}))
    assert not info["found"] and "ComfyUI workflow" in info["message"]


def test_settings_after_the_image_data_are_found():
    # Some writers put tEXt after IDAT: Pillow needs the pixels read to reach it.
    data = bytearray(png_bytes())
    chunk = b"parameters\x00a cat\nSteps: 4, CFG scale: 1, Seed: 8, Size: 64x64"
    import struct
    import zlib

    tail = data.rindex(b"IEND") - 4
    text_chunk = struct.pack(">I", len(chunk)) + b"tEXt" + chunk + struct.pack(">I", zlib.crc32(b"tEXt" + chunk))
    info = read_generation_settings(bytes(data[:tail]) + text_chunk + bytes(data[tail:]))
    assert info["found"] and info["seed"] == 8


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x00\x01garbage bytes that are no image", "is not a PNG, JPEG or WebP image"),
        (png_bytes()[:60], "damaged"),  # a PNG cut off inside its image data
        (b"", "empty"),
    ],
)
def test_garbage_and_corrupt_files_get_a_sentence(data, words):
    with pytest.raises(ImageDecodeError, match=words):
        read_generation_settings(data, name="upload.png")


def test_a_missing_file_gets_a_sentence(tmp_path):
    with pytest.raises(ImageDecodeError, match="was not found"):
        read_generation_settings(tmp_path / "gone.png")


# ----------------------------------------------------------------------------- the tab's pure parts


def test_the_summary_shows_the_images_text_literally():
    from components.png_info import settings_summary

    summary = settings_summary(read_generation_settings(png_bytes({"parameters": A1111_TEXT})))
    assert "&lt;lora:ink\\_style:0.7&gt;" in summary  # a tag, not an HTML element the page would drop
    assert "| Seed | 1234567890 |" in summary and "| Size | 512x768 |" in summary
    assert "| Model | large |" in summary and "another tool" in summary


def test_send_to_generate_waits_for_the_preset_only_when_the_model_changes():
    import gradio as gr

    from components.png_info import GENERATE_FIELDS, generate_form_update, pending_form_values

    info = read_generation_settings(png_bytes({"parameters": A1111_TEXT}))  # Model: sd3.5_large
    model, pending, notes = generate_form_update(info, "medium", tiny=False)
    assert model == "large" and pending["after_preset"]
    assert notes == [
        "Images is 1: the image was drawn as one.",
        "The control image is cleared: the image was drawn without ControlNet.",
    ]
    skipped = pending_form_values(pending, after_preset=False)  # the preset has not loaded yet
    assert skipped == tuple(gr.skip() for _ in range(len(GENERATE_FIELDS) + 1))
    filled = pending_form_values(pending, after_preset=True)
    assert filled[GENERATE_FIELDS.index("seed")] == 1234567890 and filled[-1] is None  # filled, then cleared
    _, same_model, _ = generate_form_update(info, "large", tiny=False)
    assert not same_model["after_preset"]
    assert pending_form_values(same_model, after_preset=False)[GENERATE_FIELDS.index("steps")] == "20"
    assert pending_form_values(None, after_preset=True) == skipped  # a model switched by hand: no change
    with pytest.raises(ValueError, match="no settings to send"):
        generate_form_update({"found": False}, "large", tiny=False)


def test_png_info_is_queued_on_the_cpu_concurrency_id():
    """Queued like every event that reads an upload, apart from the GPU's queue (it runs no model)."""
    import gradio as gr

    from components.png_info import build_png_info_tab

    with gr.Blocks() as demo:
        build_png_info_tab(None)  # the tab reads no Studio state
    (event,) = [fn for fn in demo.fns.values() if fn.api_name == "png_info"]
    assert event.queue and event.concurrency_id == settings.CPU_CONCURRENCY_ID != settings.GPU_CONCURRENCY_ID
    assert event.concurrency_limit == settings.CPU_CONCURRENCY_LIMIT


def test_send_to_generate_resets_the_image_count_and_an_earlier_control_image_and_says_so():
    from components.png_info import GENERATE_FIELDS, generate_form_update, pending_form_values

    studio = {"prompt": "a house", "seed": 3, "steps": 4, "guidance": 0.0, "width": 64, "height": 64,
              "model_key": "sd35-large", "controlnet": {"type": "canny", "scale": 0.7}}  # fmt: skip
    info = read_generation_settings(
        png_bytes({"parameters": "a house\nSteps: 4, Seed: 3", "studio": json.dumps(studio)})
    )
    _, pending, notes = generate_form_update(info, "large", tiny=False)
    values = pending_form_values(pending, after_preset=False)
    assert values[GENERATE_FIELDS.index("num_images")] == 1 and values[GENERATE_FIELDS.index("control_image")] is None
    assert any("ControlNet (canny, scale 0.7) is recorded, but its map is not in the PNG" in note for note in notes)


def test_a_studio_pngs_comfyui_chunk_alone_gives_its_settings_back(tiny_manager, tmp_path):
    from pipelines.png_chunks import read_png_metadata

    request = GenerationRequest(
        prompt="a red kite over dunes", negative_prompt="fog", seed=31, steps=3, width=64, height=64
    )
    (path,) = GenerationService(tiny_manager)(request, folder=tmp_path).paths
    chunks = read_png_metadata(path.read_bytes()).texts
    assert {"parameters", "studio", "prompt", "workflow"} <= set(chunks)  # A1111, the Studio's JSON, ComfyUI's two
    comfy_only = png_bytes({"prompt": chunks["prompt"], "workflow": chunks["workflow"]})
    info = read_generation_settings(comfy_only, name="dropped.png")
    studio = json.loads(chunks["studio"])
    assert info["found"] and info["tool"] == "ComfyUI"
    assert (info["prompt"], info["negative_prompt"]) == (studio["prompt"], "fog")
    assert (info["seed"], info["steps"], info["guidance"]) == (31, 3, studio["guidance"])
    assert (info["width"], info["height"], info["model_key"]) == (64, 64, "sd35-large")
