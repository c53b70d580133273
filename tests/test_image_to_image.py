"""Image to image and inpainting (pipelines/sd3/image_to_image.py) in process, on the tiny models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from pipelines.catalog import CATALOG
from pipelines.manager import ModelManager
from pipelines.roundtrip.loop import image_round_trip
from pipelines.runtime import choose_runtime
from pipelines.sd3.image_to_image import (
    blurred_mask,
    check_mask,
    denoising_steps,
    derived_pipeline,
    drawing_size,
    mask_from_layers,
)
from pipelines.sd3.jobs import GenerationRequest, ImageToImageRequest, image_fingerprint
from pipelines.sd3.png_metadata import parse_a1111_parameters, read_png_settings
from pipelines.sd3.text_to_image import size_limits
from pipelines.studio import Studio
from tests.tolerances import assert_close_pixels

SIDE = 128
DRAW = {"model": "large", "steps": 4}


@pytest.fixture(scope="module")
def manager(tiny_root):
    return ModelManager(choose_runtime("cpu"), tiny_root=tiny_root)


@pytest.fixture()
def studio(manager, tmp_path):
    return Studio(manager=manager, outputs_dir=tmp_path / "outputs")


def photo(seed: int = 0, size: tuple[int, int] = (SIDE, SIDE)) -> Image.Image:
    """A smooth colour image (a random 4x4 grid, upscaled): something with structure to redraw."""
    grid = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)


def square_mask(size: tuple[int, int] = (SIDE, SIDE), box=(40, 40, 88, 88)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def run(studio, image=None, prompt="a red fox", seed=7, strength=0.6, save=False, **fields):
    request = ImageToImageRequest(
        image=image or photo(),
        generation=GenerationRequest(prompt=prompt, seed=seed, **DRAW),
        strength=strength,
        **fields,
    )
    return studio.generation(request, save=save)


def test_from_pipe_shares_the_loaded_weights(studio):
    prepared = studio.generation.prepare(GenerationRequest(prompt="a fox", **DRAW))
    base = prepared.pipeline
    for inpaint in (False, True):
        twin = derived_pipeline(base, inpaint=inpaint)
        assert twin is not base
        assert twin.transformer is base.transformer and twin.vae is base.vae
        assert twin.text_encoder_3 is base.text_encoder_3 and twin.scheduler is base.scheduler
        assert derived_pipeline(base, inpaint=inpaint) is twin  # made once per pipeline
        assert next(twin.transformer.parameters()).dtype == next(base.transformer.parameters()).dtype


def test_same_seed_same_pixels_other_seed_other_pixels(studio):
    first, again, other = run(studio, seed=3), run(studio, seed=3), run(studio, seed=4)
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert not np.array_equal(pixels(first.images[0]), pixels(other.images[0]))

    # Strength matters: at low strength the input, not the seed's noise, decides the picture.
    def seed_effect(strength):
        one, two = run(studio, seed=3, strength=strength), run(studio, seed=4, strength=strength)
        return np.abs(pixels(one.images[0]) - pixels(two.images[0])).mean()

    assert seed_effect(0.1) < seed_effect(1.0)


def test_details_give_the_denoising_steps_diffusers_runs(studio):
    outcome = run(studio, strength=0.55, seed=1)
    details = outcome.details
    assert details["mode"] == "img2img" and details["strength"] == 0.55 and details["steps"] == 4
    assert details["denoising_steps"] == denoising_steps(4, 0.55) == 3
    assert details["steps_done"] == details["denoising_steps"]  # the callbacks the loop really made
    assert details["resized"] is False and details["output_size"] == f"{SIDE}x{SIDE}"


def test_denoising_steps_is_diffusers_get_timesteps(studio):
    twin = derived_pipeline(studio.generation.prepare(GenerationRequest(prompt="a fox", **DRAW)).pipeline, False)
    for steps in (1, 2, 4, 10, 28, 40):
        for tenths in range(1, 21):
            strength = tenths * 0.05
            twin.scheduler.set_timesteps(steps)
            _, expected = twin.get_timesteps(steps, strength, "cpu")
            assert denoising_steps(steps, strength) == expected, (steps, strength)
    assert denoising_steps(4, 0.6) == 3 and int(0.6 * 4) == 2  # the skipped steps round down, the run up


def test_empty_prompt_is_blips_caption_and_goes_into_the_png(studio):
    image = photo(5)
    outcome = run(studio, image=image, prompt="", save=True)
    caption = studio.captioner().caption(image).captions[0].text  # the base captioner's default: beam 3
    assert outcome.details["caption"] == caption and caption
    assert outcome.details["prompt"] == caption
    parameters, _ = read_png_settings(outcome.paths[0])
    prompt, _, pairs = parse_a1111_parameters(parameters)
    assert prompt == caption
    assert pairs["Denoising strength"] == "0.6"
    assert any(caption in note for note in outcome.details["notes"])


def test_a_size_off_the_grid_is_snapped_and_said(studio):
    outcome = run(studio, image=photo(size=(100, 90)))
    details = outcome.details
    assert details["resized"] is True and details["size"] == "96x96" and details["output_size"] == "96x96"
    assert details["input_size"] == "100x90"
    assert any("100x90" in note and "96x96" in note for note in details["notes"])
    limits = size_limits(CATALOG["sd35-large"], tiny=False)
    width, height = drawing_size((4000, 3000), "large", tiny=False)  # scaled into Large's range, snapped down
    assert width % 16 == 0 and height % 16 == 0 and abs(width / height - 4 / 3) < 0.02
    assert limits["max_pixels"] - 2 * 16 * width < width * height <= limits["max_pixels"]
    assert drawing_size((1024, 1024), "large", tiny=False) == (1024, 1024)


def test_strength_outside_its_range_gets_a_sentence(studio):
    with pytest.raises(ValueError, match="strength"):
        run(studio, strength=0.0)
    with pytest.raises(ValueError, match="strength"):
        run(studio, strength=1.5)


def test_inpaint_keeps_every_pixel_outside_the_blurred_mask(studio):
    image, mask, blur = photo(2), square_mask(), 4
    outcome = run(studio, image=image, inpaint=True, mask=mask, mask_blur=blur, strength=1.0)
    result, source = pixels(outcome.images[0]), pixels(image)
    inside = np.asarray(mask) > 0
    reach = np.zeros_like(inside)  # the mask grown by the blur radius (a square kernel)
    reach[40 - blur : 88 + blur, 40 - blur : 88 + blur] = True
    assert np.array_equal(result[~reach], source[~reach])  # exactly the input's pixels
    assert np.abs(result[inside] - source[inside]).mean() > 5  # and a redrawing inside
    assert outcome.details["mode"] == "inpaint" and outcome.details["paste_back"] is True
    assert outcome.details["mask_blur"] == blur and outcome.details["mask_pixels"] == int(inside.sum())


def test_inpaint_without_paste_back_redraws_outside_too(studio):
    image = photo(2)
    outcome = run(studio, image=image, inpaint=True, mask=square_mask(), paste_back=False, strength=1.0)
    outside = ~(np.asarray(square_mask()) > 0)
    assert not np.array_equal(pixels(outcome.images[0])[outside], pixels(image)[outside])  # the VAE's round trip


def test_a_wrong_size_or_empty_mask_gets_one_sentence(studio):
    with pytest.raises(ValueError, match=r"The mask is 64x64 but the image is 128x128"):
        run(studio, inpaint=True, mask=square_mask((64, 64), (0, 0, 8, 8)))
    with pytest.raises(ValueError, match="The mask is empty"):
        run(studio, inpaint=True, mask=Image.new("L", (SIDE, SIDE), 0))
    with pytest.raises(ValueError, match="No mask was given"):
        run(studio, inpaint=True, mask=None)


def test_brush_layers_become_the_mask():
    layer = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (10, 10, 20, 30))
    mask = mask_from_layers([layer], (SIDE, SIDE))
    assert np.count_nonzero(np.asarray(mask)) == 10 * 20
    assert np.array_equal(np.asarray(check_mask(mask, (SIDE, SIDE))), np.asarray(mask))
    assert mask_from_layers([], (SIDE, SIDE)) is None


def test_the_blur_reaches_exactly_its_radius():
    weights = blurred_mask(square_mask(), 6)
    assert weights[40 - 6, 60] > 0 and weights[40 - 7, 60] == 0.0 and weights[60, 88 + 6] == 0.0
    assert weights[64, 64] == pytest.approx(1.0)


def test_turbo_and_medium_run_with_their_presets(studio):
    for model, steps in (("large-turbo", 4), ("medium", 40)):
        request = ImageToImageRequest(
            image=photo(), generation=GenerationRequest(prompt="a fox", model=model, seed=1), strength=0.5
        )
        details = studio.generation(request, save=False).details
        assert details["steps"] == steps and details["denoising_steps"] == denoising_steps(steps, 0.5)
        assert details["skip_layer_guidance_layers"] == []
        if model == "medium":
            assert any("Skip-layer guidance" in note for note in details["notes"])


def test_text_to_image_after_img2img_still_reproduces(studio):
    request = GenerationRequest(prompt="a fox", seed=11, width=64, height=64, **DRAW)
    before = studio.generation(request, save=False)
    run(studio, strength=0.3)  # the twin shares the scheduler and moves its begin index
    after = studio.generation(request, save=False)
    assert np.array_equal(pixels(before.images[0]), pixels(after.images[0]))


def test_the_image_round_trip_redraws_the_image_itself_at_a_strength(studio):
    image = photo(9)
    request = GenerationRequest(prompt="", seed=2, **DRAW)
    trip = image_round_trip(image, studio.generation, studio.matcher(), request, strength=0.5, save=False)
    details = trip.details()
    assert details["mode"] == "img2img" and details["strength"] == 0.5 and details["size"] == f"{SIDE}x{SIDE}"
    assert details["prompt"] == trip.caption
    plain = image_round_trip(image, studio.generation, studio.matcher(), request, save=False)
    assert "strength" not in plain.details()


def test_variations_are_consecutive_seeds_each_reproducible_alone(studio):
    request = ImageToImageRequest(photo(), GenerationRequest(prompt="", seed=20, num_images=2, **DRAW), strength=0.5)
    both = studio.generation(request, save=False)
    assert both.details["seeds"] == [20, 21] and both.details["caption"]
    assert both.details["mode"] == "img2img" and both.details["source"] == image_fingerprint(photo())
    varied = studio.generation(dataclasses.replace(request, variations=True), save=False)
    assert varied.details["mode"] == "variations" and varied.result.settings[1]["job"]["mode"] == "variations"
    second = run(studio, prompt="", seed=21, strength=0.5)
    assert_close_pixels(pixels(both.images[1]), pixels(second.images[0]))


def test_steps_report_the_denoising_total_and_stop_ends_the_run(studio):
    seen = []
    request = ImageToImageRequest(photo(), GenerationRequest(prompt="a fox", seed=1, model="large", steps=10), 0.55)
    studio.generation(request, on_step=lambda step, total, _: seen.append((step, total)), save=False)
    assert seen == [(step, 6) for step in range(1, 7)]  # 10 steps at 0.55: diffusers runs 6
    stopped = studio.generation(request, should_stop=lambda: True, save=False).details
    assert stopped["stopped"] is True and stopped["steps_done"] == 1


def test_the_editors_pending_edits_are_bounded_per_client_in_bytes_and_by_layer():
    from components.image_to_image import PendingEdits

    edits = PendingEdits(per_client=2, max_edits=8, max_bytes=100, max_layers=2)
    for number in range(3):  # a client's third edit drops its first
        edits.put(f"a{number}", "client-a", "background", None, b"x" * 10)
    assert edits.take("a0") is None and edits.take("a1").background == b"x" * 10 and len(edits) == 1
    with pytest.raises(ValueError, match="unknown part"):
        edits.put("b", "client-b", "layer", 2, b"x")  # index past max_layers: refused before anything is kept
    with pytest.raises(ValueError, match="not yours"):
        edits.put("a2", "client-b", "layer", 0, b"x")  # another client's edit is never written into
    edits.put("b", "client-b", "layer", 1, b"y" * 95)  # 10 + 95 bytes: the oldest edit (a2) goes
    assert edits.take("a2") is None and edits.take("b").layers == {1: b"y" * 95} and len(edits) == 0
