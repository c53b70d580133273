"""SD3.5 generation on the tiny pipelines: seeds, presets, sizes, warnings, stop, previews."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.sd3.png_metadata import parse_a1111_parameters, read_png_settings, save_png
from pipelines.sd3.text_to_image import GenerateRequest, LatentPreviewer, generate, resolve_request
from tests.tolerances import assert_close_pixels

FAST = {"steps": 3, "width": 64, "height": 64}


def draw(manager, **fields):
    resolved = resolve_request(
        GenerateRequest(**{"prompt": "a red cube on a blue sphere", **FAST, **fields}), tiny=True
    )
    return generate(manager.get(resolved.model_key), resolved, repo_id="tiny/" + resolved.model_key)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_pixels_and_another_seed_differs(tiny_manager):
    first = draw(tiny_manager, seed=5).images[0]
    again = draw(tiny_manager, seed=5).images[0]
    other = draw(tiny_manager, seed=6).images[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1.0


def test_the_returned_seed_reproduces_the_image(tiny_manager):
    result = draw(tiny_manager, seed=-1)
    assert 0 <= result.request.seed == result.seeds[0]
    replay = draw(tiny_manager, seed=result.seeds[0])
    assert np.array_equal(pixels(result.images[0]), pixels(replay.images[0]))


def test_each_image_of_a_batch_reproduces_alone_with_its_own_seed(tiny_manager):
    batch = draw(tiny_manager, seed=100, num_images=2)
    assert batch.seeds == [100, 101] and len(batch.images) == 2
    second = draw(tiny_manager, seed=101)
    assert_close_pixels(batch.images[1], second.images[0])  # batched matmuls round differently


def test_presets_turbo_has_four_steps_and_no_cfg_medium_has_slg():
    turbo = resolve_request(GenerateRequest(prompt="x", model="large-turbo", negative_prompt="blurry"))
    assert (turbo.steps, turbo.guidance, turbo.uses_cfg) == (4, 0.0, False)
    assert any("negative prompt is ignored" in note for note in turbo.notes)
    large = resolve_request(GenerateRequest(prompt="x", model="large"))
    assert (large.steps, large.guidance, large.skip_layer_guidance_layers) == (28, 3.5, ())
    medium = resolve_request(GenerateRequest(prompt="x", model="medium"))
    assert (medium.steps, medium.guidance, medium.skip_layer_guidance_layers) == (40, 4.5, (7, 8, 9))
    assert (
        resolve_request(
            GenerateRequest(prompt="x", model="medium", skip_layer_guidance=False)
        ).skip_layer_guidance_layers
        == ()
    )
    custom = resolve_request(GenerateRequest(prompt="x", model="large", steps=0 + 12, guidance=0.0))
    assert (custom.steps, custom.guidance) == (12, 0.0)  # 0 is a value, not "use the preset"


def count_transformer_batches(pipeline, monkeypatch) -> list:
    calls = []
    original = pipeline.transformer.forward

    def spy(*args, **kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs.get("skip_layers")))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline.transformer, "forward", spy)
    return calls


def test_turbo_really_runs_without_cfg_and_medium_really_skips_layers(tiny_manager, monkeypatch):
    turbo_calls = count_transformer_batches(tiny_manager.get("sd35-large-turbo"), monkeypatch)
    draw(tiny_manager, model="large-turbo", steps=None)
    assert len(turbo_calls) == 4 and {batch for batch, _ in turbo_calls} == {1}  # no unconditional half
    medium_calls = count_transformer_batches(tiny_manager.get("sd35-medium"), monkeypatch)
    draw(tiny_manager, model="medium", steps=10)
    assert {batch for batch, _ in medium_calls} >= {2}  # CFG doubles the batch
    assert [7, 8, 9] in [skip for _, skip in medium_calls]  # SLG passes run with layers 7-9 skipped


def test_sizes_are_snapped_and_out_of_range_sizes_name_the_range():
    snapped = resolve_request(GenerateRequest(prompt="x", model="large", width=1000, height=1001))
    assert (snapped.width, snapped.height) == (1008, 1008) and any("snapped" in note for note in snapped.notes)
    with pytest.raises(ValueError, match=r"0\.25 to 1\.10 megapixels"):
        resolve_request(GenerateRequest(prompt="x", model="large", width=1536, height=1536))
    assert resolve_request(GenerateRequest(prompt="x", model="medium", width=1408, height=1408)).width == 1408
    with pytest.raises(ValueError, match=r"0\.25 to 2\.00 megapixels"):
        resolve_request(GenerateRequest(prompt="x", model="medium", width=256, height=256))
    with pytest.raises(ValueError, match="at most 512 px a side"):
        resolve_request(GenerateRequest(prompt="x", width=1024, height=64), tiny=True)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"prompt": "   "}, "Write a prompt"),
        ({"model": "xl"}, "choose one of: large, large-turbo, medium"),
        ({"steps": float("nan")}, "steps must be a whole number"),
        ({"steps": 1000}, "steps must be between 1 and 100"),
        ({"guidance": -1}, "guidance must be between"),
        ({"width": "wide"}, "width must be a number"),
        ({"num_images": 9}, "num_images must be between 1 and 4"),
        ({"max_sequence_length": 1024}, "max_sequence_length must be between 77 and 512"),
        ({"seed": -5}, "seed must be between"),
        ({"model": "large", "skip_layer_guidance": True}, "ruins images"),
        ({"prompt": "x" * 100_000}, "keep it under 4,000"),
    ],
)
def test_bad_requests_are_refused_with_a_sentence(fields, words):
    with pytest.raises(ValueError, match=words):
        resolve_request(GenerateRequest(**{"prompt": "a cat", **fields}))


def test_control_characters_are_removed_from_prompts():
    resolved = resolve_request(GenerateRequest(prompt="a\x00 cat\x07 on\ta\nmat ⟵ مرحبا 🐱"))
    assert resolved.prompt == "a cat on\ta\nmat ⟵ مرحبا 🐱"


def test_a_truncated_prompt_is_reported(tiny_manager):
    long_prompt = " ".join(["a small red cat sitting on a wooden table"] * 12)
    result = draw(tiny_manager, prompt=long_prompt, max_sequence_length=77)
    assert any(warning.startswith("CLIP reads 77 tokens") for warning in result.warnings)
    assert any("T5 reads 77 tokens here" in warning for warning in result.warnings)
    assert draw(tiny_manager).warnings == []


def test_stop_ends_a_run_early_and_the_next_run_works(tiny_manager):
    pipeline = tiny_manager.get("sd35-large")
    resolved = resolve_request(GenerateRequest(prompt="a cat", steps=8, width=64, height=64, seed=1), tiny=True)
    seen = []
    stopped = generate(
        pipeline,
        resolved,
        repo_id="tiny",
        on_step=lambda step, total, _: seen.append(step),
        should_stop=lambda: len(seen) >= 2,
    )
    assert stopped.stopped and stopped.steps_done == 2 and seen == [1, 2]
    assert len(stopped.images) == 1 and "Interrupted at step: 2" in stopped.parameters[0]
    full = generate(pipeline, resolved, repo_id="tiny")
    assert not full.stopped and full.steps_done == 8
    assert np.abs(pixels(full.images[0]) - pixels(stopped.images[0])).mean() > 0


def test_previews_come_every_n_steps_at_latent_size(tiny_manager):
    pipeline = tiny_manager.get("sd35-large")
    resolved = resolve_request(GenerateRequest(prompt="a cat", steps=6, width=128, height=64, seed=3), tiny=True)
    previews = {}
    generate(
        pipeline,
        resolved,
        repo_id="tiny",
        on_step=lambda step, total, images: previews.__setitem__(step, images),
        preview_every=2,
        previewer=LatentPreviewer(pipeline.vae),
    )
    assert [step for step, images in previews.items() if images] == [2, 4]  # not after the last step
    assert previews[2][0].size == (128 // 4, 64 // 4)  # the tiny VAE downsamples 4x


def test_latent_projection_keeps_colours_apart(tiny_manager):
    """An encoded red|blue image projects back redder on the left and bluer on the right.

    The tiny VAE has random weights, so the fit is rough; the real VAE is trained to keep colour.
    """
    import torch

    vae = tiny_manager.get("sd35-large").vae
    image = -torch.ones(1, 3, 64, 64)
    image[:, 0, :, :32] = 1.0  # red left half
    image[:, 2, :, 32:] = 1.0  # blue right half
    with torch.inference_mode():
        latents = (vae.encode(image).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    preview = np.asarray(LatentPreviewer(vae)(latents)[0], dtype=float)
    left, right = preview[:, :8].mean(axis=(0, 1)), preview[:, 8:].mean(axis=(0, 1))
    assert left[0] > right[0] + 20
    assert (right[2] - right[0]) > (left[2] - left[0]) + 30


def test_png_parameters_parse_back_into_the_same_settings(tiny_manager, tmp_path):
    result = draw(tiny_manager, seed=77, negative_prompt="blurry, dark")
    path = save_png(result.images[0], tmp_path / "out.png", result.parameters[0], result.settings[0])
    text, studio = read_png_settings(path)
    prompt, negative, settings = parse_a1111_parameters(text)
    assert prompt == "a red cube on a blue sphere" and negative == "blurry, dark"
    assert settings["Steps"] == "3" and settings["Seed"] == "77" and settings["Size"] == "64x64"
    assert settings["CFG scale"] == "3.5" and settings["Model"] == "sd35-large"
    assert (
        studio["seed"] == 77 and studio["model_id"] == "tiny/sd35-large" and studio["negative_prompt"] == "blurry, dark"
    )
    assert studio["scheduler"].startswith("FlowMatchEulerDiscreteScheduler")
    replay = resolve_request(
        GenerateRequest(
            prompt=prompt,
            negative_prompt=negative,
            seed=int(settings["Seed"]),
            steps=int(settings["Steps"]),
            guidance=float(settings["CFG scale"]),
            width=64,
            height=64,
        ),
        tiny=True,
    )
    again = generate(tiny_manager.get("sd35-large"), replay, repo_id="tiny")
    assert np.array_equal(pixels(again.images[0]), pixels(result.images[0]))


def test_large_images_and_batches_decode_in_tiles_and_slices(tiny_manager, monkeypatch):
    from pipelines import settings

    pipeline = tiny_manager.get("sd35-large")
    small = draw(tiny_manager, width=64, height=64, num_images=2)
    assert not pipeline.vae.use_tiling and pipeline.vae.use_slicing and small.settings[0]["vae_tiling"] is False
    monkeypatch.setattr(settings, "VAE_TILING_ABOVE_PIXELS", 64 * 64)
    large = draw(tiny_manager, width=128, height=64)
    assert pipeline.vae.use_tiling and not pipeline.vae.use_slicing and large.settings[0]["vae_tiling"] is True
    assert large.images[0].size == (128, 64)
    draw(tiny_manager, width=64, height=64)
    assert not pipeline.vae.use_tiling  # set per call: a small image after a large one is untiled
