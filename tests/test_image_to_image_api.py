"""/img2img, /inpaint and /variations through gradio_client against `python app.py --tiny`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.sd3.png_metadata import parse_a1111_parameters, read_png_settings

pytestmark = pytest.mark.api

SIDE = 128
BOX = (40, 40, 88, 88)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from gradio_client import handle_file

    folder = tmp_path_factory.mktemp("img2img")
    grid = np.random.default_rng(4).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    Image.fromarray(grid).resize((SIDE, SIDE), Image.Resampling.BICUBIC).save(folder / "photo.png")
    Image.fromarray(grid).resize((100, 90), Image.Resampling.BICUBIC).save(folder / "odd.png")
    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, BOX)
    mask.save(folder / "mask.png")
    Image.new("L", (SIDE, SIDE), 0).save(folder / "empty.png")
    Image.new("L", (64, 64), 255).save(folder / "small.png")
    return {name: handle_file(str(folder / f"{name}.png")) for name in ("photo", "odd", "mask", "empty", "small")} | {
        "photo_path": folder / "photo.png"
    }


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def first_image(gallery) -> str:
    return gallery[0]["image"] if isinstance(gallery[0], dict) else gallery[0][0]


def test_img2img_reproduces_per_seed_with_named_parameters(tiny_client, files):
    def draw(seed):
        return tiny_client.predict(
            image=files["photo"], prompt="a red fox", strength=0.5, seed=seed, steps=4, api_name="/img2img"
        )

    gallery, _summary, prompt_used, _preview, details = draw(3)
    again, other = draw(3), draw(4)
    assert np.array_equal(pixels(first_image(gallery)), pixels(first_image(again[0])))
    assert not np.array_equal(pixels(first_image(gallery)), pixels(first_image(other[0])))
    assert prompt_used == "a red fox" and details["mode"] == "img2img"
    assert details["denoising_steps"] == 2 and details["steps_done"] == 2 and details["size"] == f"{SIDE}x{SIDE}"


def test_an_empty_prompt_puts_blips_caption_into_the_png(tiny_client, files):
    gallery, summary, prompt_used, _preview, details = tiny_client.predict(
        image=files["photo"], seed=1, steps=2, api_name="/img2img"
    )
    assert details["caption"] and prompt_used == details["caption"] and "BLIP's caption" in summary
    parameters, _ = read_png_settings(Path(first_image(gallery)))
    assert parse_a1111_parameters(parameters)[0] == details["caption"]


def test_an_odd_size_is_snapped_and_said(tiny_client, files):
    *_, details = tiny_client.predict(image=files["odd"], prompt="a fox", seed=1, steps=2, api_name="/img2img")
    assert details["resized"] is True and details["input_size"] == "100x90" and details["size"] == "96x96"
    assert any("96x96" in note for note in details["notes"])


def test_inpaint_keeps_the_outside_and_redraws_the_inside(tiny_client, files):
    gallery, *_, details = tiny_client.predict(
        image=files["photo"], mask=files["mask"], prompt="a fox", strength=1.0, mask_blur=4, seed=2, steps=4,
        api_name="/inpaint",
    )  # fmt: skip
    result, source = pixels(first_image(gallery)), pixels(files["photo_path"])
    reach = np.zeros((SIDE, SIDE), dtype=bool)
    reach[BOX[1] - 4 : BOX[3] + 4, BOX[0] - 4 : BOX[2] + 4] = True
    assert np.array_equal(result[~reach], source[~reach])
    inside = np.zeros_like(reach)
    inside[BOX[1] : BOX[3], BOX[0] : BOX[2]] = True
    assert np.abs(result[inside] - source[inside]).mean() > 5
    assert details["paste_back"] is True and details["mask_pixels"] == 48 * 48


def test_an_empty_or_wrong_size_mask_gets_one_sentence(tiny_client, files):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="The mask is empty"):
        tiny_client.predict(image=files["photo"], mask=files["empty"], prompt="a fox", api_name="/inpaint")
    with pytest.raises(AppError, match="The mask is 64x64 but the image is 128x128"):
        tiny_client.predict(image=files["photo"], mask=files["small"], prompt="a fox", api_name="/inpaint")
    with pytest.raises(AppError, match="strength"):
        tiny_client.predict(image=files["photo"], prompt="a fox", strength=2, api_name="/img2img")


def test_variations_draw_consecutive_seeds_from_the_caption(tiny_client, files):
    gallery, _summary, prompt_used, _preview, details = tiny_client.predict(
        image=files["photo"], count=2, seed=10, steps=2, api_name="/variations"
    )
    assert len(gallery) == 2 and details["seeds"] == [10, 11] and details["strength"] == 0.5
    assert prompt_used == details["caption"]
    assert not np.array_equal(pixels(first_image(gallery)), pixels(gallery[1]["image"]))


def test_the_round_trip_redraws_the_image_itself_at_a_strength(tiny_client, files):
    caption, redrawn, _fits, details = tiny_client.predict(
        image=files["photo"], seed=3, steps=2, strength=0.5, api_name="/roundtrip_image"
    )
    assert details["mode"] == "img2img" and details["strength"] == 0.5 and details["prompt"] == caption
    assert Image.open(redrawn).size == (SIDE, SIDE)  # the image's own size, not the model's default


def test_send_to_img2img_and_inpaint_hand_over_the_selected_image_only(tiny_app_url, tiny_client):
    from tests.test_visitor_files_api import run_private

    gallery, *_ = tiny_client.predict("a lighthouse", seed=5, steps=2, num_images=2, api_name="/generate")
    run_private(tiny_app_url, tiny_client, "generate_select", {"index": 1, "value": str(Path(__file__))})
    image, *_form, _note, _tabs, _modes = run_private(tiny_app_url, tiny_client, "send_to_img2img")["data"]
    assert Path(image["path"]).name == Path(gallery[1]["image"]).name  # by index, from the session's own list
    editor, *_form, _note, _tabs, _modes = run_private(tiny_app_url, tiny_client, "send_to_inpaint")["data"]
    assert Path(editor["background"]["path"]).name == Path(gallery[1]["image"]).name
    assert editor["layers"] == []


def test_a_sent_image_carries_its_settings_into_both_modes(tiny_app_url, tiny_client):
    from tests.test_visitor_files_api import run_private

    tiny_client.predict(
        "a red lighthouse", model="large-turbo", negative_prompt="fog", seed=1234, steps="6", guidance="1.5",
        api_name="/generate",
    )  # fmt: skip
    for mode in ("img2img", "inpaint"):
        sent, model, prompt, negative, seed, steps, guidance, strength, note, _tabs, _modes = run_private(
            tiny_app_url, tiny_client, f"send_to_{mode}"
        )["data"]
        assert sent is not None
        assert (model, prompt, negative, seed, steps, guidance) == (
            "large-turbo", "a red lighthouse", "fog", 1234, "6", "1.5"
        )  # fmt: skip
        assert strength is None or isinstance(strength, dict)  # a text-to-image record gives no strength
        assert "Sent with its model, prompt, negative prompt, seed, steps, guidance" in note.replace("\\", "")
        assert "size follows the image" in note
