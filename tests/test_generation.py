"""The generation service (pipelines/sd3/generation.py) in process, on the tiny models: LoRAs by name,
A1111 tags, the PNG prompt redraw, the memory mode, the details dict, and every caller on one path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipelines import settings
from pipelines.blip.matching import ImageTextMatcher
from pipelines.manager import ModelManager
from pipelines.roundtrip.loop import image_round_trip, prompt_round_trip
from pipelines.runtime import choose_runtime
from pipelines.sd3.generation import GenerationService
from pipelines.sd3.jobs import GenerationRequest, image_fingerprint
from pipelines.sd3.lora_tags import LoraChoice, merge_lora_choices, parse_lora_text, split_lora_tags
from pipelines.sd3.png_metadata import parse_a1111_parameters, read_png_settings
from pipelines.studio import Studio

DRAW = {"model": "large", "seed": 7, "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def manager(tiny_root):
    """A manager of this module's own: the LoRAs attached here never reach another module's pipelines."""
    return ModelManager(choose_runtime("cpu"), tiny_root=tiny_root)


@pytest.fixture()
def studio(manager, tmp_path):
    studio = Studio(manager=manager, outputs_dir=tmp_path / "outputs")
    yield studio
    for key, library in studio.sd3_loras.items():
        if library.names() and manager.is_loaded(key):
            library.unload(studio.sd3_pipeline(key))


def pixels(outcome, index: int = 0) -> np.ndarray:
    return np.asarray(outcome.images[index].convert("RGB"), dtype=np.int16)


# ----------------------------------------------------------------------------- parsing


def test_lora_tags_leave_the_prompt_and_name_their_weights():
    assert split_lora_tags("a red fox, tinystyle <lora:tiny_large_style:1>") == (
        "a red fox, tinystyle",
        [LoraChoice("tiny_large_style", 1.0, "prompt")],
    )
    assert split_lora_tags("<LORA:My-Style> a fox <lora:other:0.25> at dusk") == (
        "a fox at dusk",
        [LoraChoice("my_style", None, "prompt"), LoraChoice("other", 0.25, "prompt")],
    )
    assert split_lora_tags("no tags here") == ("no tags here", [])
    assert parse_lora_text("style:0.5, <lora:detail:1>", 2.0) == [
        LoraChoice("style", 1.0, "lora"),
        LoraChoice("detail", 2.0, "lora"),
    ]
    (default,) = parse_lora_text("style", 0.5)  # no weight: the LoRA's default weight times lora_scale
    assert default.weight is None and default.weight_for(SimpleNamespace(default_scale=0.8)) == 0.4
    refusals = {
        "<lora:x:1:0.5>": "gives several weights",
        "<lora::1>": "names no LoRA",
        "<lora:x:lots>": "the weight of x must be a number",
        "<lora:x:9>": "the weight of x must be between -3 and 3",
    }
    for prompt, message in refusals.items():
        with pytest.raises(ValueError, match=message):
            split_lora_tags(prompt)


def test_a_lora_tag_in_the_prompt_sets_the_weight_over_the_lora_panel():
    tag = [LoraChoice("style", 0.5, "prompt")]
    assert merge_lora_choices(tag, [LoraChoice("style", 0.5, "lora")]) == (tag, [])  # a redraw with the box filled too
    choices, notes = merge_lora_choices(tag, [LoraChoice("style", 1.0, "lora"), LoraChoice("other", None, "lora")])
    assert [(choice.name, choice.weight) for choice in choices] == [("style", 0.5), ("other", None)]
    assert notes == ["The prompt's <lora:style:0.5> sets its weight for this image; the LoRA panel's 1 does not apply."]
    with pytest.raises(ValueError, match="named twice"):
        merge_lora_choices([], [LoraChoice("style", 1.0, "lora"), LoraChoice("style", 0.5, "lora")])


# ----------------------------------------------------------------------------- LoRAs by name


def test_a_lora_by_name_loads_on_demand_and_a_tag_draws_the_same_pixels(studio):
    service = studio.generation
    assert studio.sd3_loras["sd35-large"].names() == []
    base = service(GenerationRequest(prompt="a red fox", **DRAW), save=False)

    named = service(GenerationRequest(prompt="a red fox", lora="tiny_large_style:0.7", **DRAW))
    details = named.details
    (lora,) = details["loras"]
    assert lora["name"] == "tiny_large_style" and lora["weight"] == 0.7 and lora["loaded_now"] is True
    assert len(lora["hash"]) == 12 and len(lora["sha256"]) == 64 and lora["source"] == "registry:tiny_large_style"
    assert details["trigger_words_added"] == ["tinystyle"] and details["prompt"] == "a red fox, tinystyle"
    assert np.abs(pixels(named) - pixels(base)).max() > 0

    tagged = service(GenerationRequest(prompt="a red fox <lora:tiny_large_style:0.7>", **DRAW), save=False)
    assert np.array_equal(pixels(tagged), pixels(named))
    assert tagged.details["loras"][0]["loaded_now"] is False and tagged.details["prompt"] == "a red fox, tinystyle"

    # Without the LoRA the base model draws again, pixel for pixel.
    assert np.array_equal(pixels(service(GenerationRequest(prompt="a red fox", **DRAW), save=False)), pixels(base))


def test_the_prompts_lora_tag_wins_over_the_panels_weight(studio):
    service = studio.generation
    panel = service(GenerationRequest(prompt="a red fox", lora="tiny_large_style:0.8", **DRAW), save=False)
    both = service(
        GenerationRequest(prompt="a red fox <lora:tiny_large_style:0.8>", lora="tiny_large_style:1", **DRAW),
        save=False,
    )
    assert [(lora["name"], lora["weight"]) for lora in both.details["loras"]] == [("tiny_large_style", 0.8)]
    assert np.array_equal(pixels(both), pixels(panel))  # drawn at 0.8, exactly as the panel's 0.8 draws
    at_one = service(GenerationRequest(prompt="a red fox", lora="tiny_large_style:1", **DRAW), save=False)
    assert np.abs(pixels(at_one) - pixels(both)).max() > 0  # and not at the panel's 1
    assert any("sets its weight for this image" in note for note in both.details["notes"])


def test_a_studio_png_prompt_redraws_the_same_pixels_without_doubling_tags(studio):
    service = studio.generation
    first = service(GenerationRequest(prompt="a red fox", lora="tiny_large_style:0.7", seed=11, steps=2))
    text, _ = read_png_settings(first.paths[0])
    prompt, negative, pairs = parse_a1111_parameters(text)
    assert prompt == "a red fox, tinystyle <lora:tiny_large_style:0.7>"
    width, height = (int(side) for side in pairs["Size"].split("x"))
    again = service(
        GenerationRequest(
            prompt=prompt,
            negative_prompt=negative,
            seed=int(pairs["Seed"]),
            steps=int(pairs["Steps"]),
            guidance=float(pairs["CFG scale"]),
            width=width,
            height=height,
        )
    )
    assert np.array_equal(pixels(again), pixels(first))
    assert again.details["trigger_words_added"] == [] and again.details["parameters"] == first.details["parameters"]
    assert parse_a1111_parameters(read_png_settings(again.paths[0])[0])[0] == prompt  # the tag once, the word once


def test_a_file_in_the_lora_folder_loads_by_its_stem(manager, tiny_root, tmp_path):
    import shutil

    from pipelines.tiny import tiny_lora_dir

    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    shutil.copyfile(
        tiny_lora_dir(tiny_root) / "tiny-large-kohya.safetensors", folder / "styles" / "Ink-Wash.safetensors"
    )
    studio = Studio(manager=manager, lora_dir=folder)
    try:
        # As the Studio names the adapter (what its PNGs write), and as the file is named in the folder.
        for name in ("ink_wash", "styles/Ink-Wash.safetensors"):
            outcome = studio.generation(GenerationRequest(prompt="a fox", lora=f"{name}:0.5", **DRAW), save=False)
            (lora,) = outcome.details["loras"]
            assert lora["name"] == "ink_wash" and lora["source"] == "loras/styles/Ink-Wash.safetensors"
    finally:
        studio.sd3_loras["sd35-large"].unload(studio.sd3_pipeline("sd35-large"))


def test_a_name_found_nowhere_gets_a_sentence_before_any_model_loads(tiny_root):
    manager = ModelManager(choose_runtime("cpu"), tiny_root=tiny_root)
    studio = Studio(manager=manager)
    with pytest.raises(ValueError, match="no LoRA of that name in the LoRA folder or the registry"):
        studio.generation(GenerationRequest(prompt="a fox", lora="no_such_style", **DRAW))
    with pytest.raises(ValueError, match="steps must be"):
        studio.generation.check(GenerationRequest(prompt="a fox", steps=0))
    assert manager.loaded_models() == []  # refused before anything loaded


def test_too_many_lora_tags_in_a_prompt_are_refused_before_any_model_loads(tiny_root):
    manager = ModelManager(choose_runtime("cpu"), tiny_root=tiny_root)
    studio = Studio(manager=manager)
    tags = " ".join(f"<lora:style{index}:0.5>" for index in range(settings.MAX_ACTIVE_LORAS + 1))
    with pytest.raises(ValueError, match=f"use at most {settings.MAX_ACTIVE_LORAS} at once"):
        studio.generation(GenerationRequest(prompt=f"a fox {tags}", **DRAW))
    assert manager.loaded_models() == []


def test_another_visitors_upload_is_not_found_by_name(studio, tiny_root, tmp_path):
    import shutil

    from pipelines.lora.sources import resolve_lora_source
    from pipelines.tiny import tiny_lora_dir

    upload = tmp_path / "alice_style.safetensors"
    shutil.copyfile(tiny_lora_dir(tiny_root) / "tiny-large-style.safetensors", upload)
    studio.generation.load_lora("sd35-large", resolve_lora_source(upload=upload), visitor="alice")
    with pytest.raises(ValueError, match="'alice_style' cannot be used"):
        studio.generation(GenerationRequest(prompt="a fox", lora="alice_style", **DRAW), owner="bob")
    drawn = studio.generation(GenerationRequest(prompt="a fox", lora="alice_style", **DRAW), owner="alice")
    assert drawn.details["loras"][0]["name"] == "alice_style"


# ----------------------------------------------------------------------------- mode, details, callers


def test_the_details_dict_and_the_files(studio):
    steps = []
    outcome = studio.generation(
        GenerationRequest(prompt="two cats", num_images=2, negative_prompt="dogs", **DRAW),
        owner="someone",
        on_step=lambda step, total, previews: steps.append((step, total)),
    )
    details = outcome.details
    assert details["seeds"] == [7, 8] and details["seed"] == 7 and details["num_images"] == 2
    assert details["steps"] == 2 and details["steps_done"] == 2 and details["stopped"] is False
    assert details["guidance"] == 3.5 and details["size"] == "64x64" and details["negative_prompt"] == "dogs"
    assert details["model"] == {
        "key": "sd35-large",
        "repo_id": "stabilityai/stable-diffusion-3.5-large",
        "title": "Stable Diffusion 3.5 Large",
    }
    assert details["memory_mode"]["mode"] == "bf16" and details["memory_mode"]["reason"].startswith("auto: no CUDA")
    assert details["loras"] == [] and details["tiny"] is True
    assert details["files"] == [path.name for path in outcome.paths] and len(outcome.paths) == 2
    # --outputs: locally the saved history keeps a copy of each, filed by mode and day, indexed.
    kept = [studio.history.get("local", record_id) for record_id in details["records"]]
    assert [studio.history.path(record).name for record in kept] == details["files"]
    assert all(studio.history.path(record).parent.parent.name == "txt2img-images" for record in kept)
    assert set(details["timings"]) >= {"load_seconds", "lora_seconds", "generate_seconds", "total_seconds"}
    assert steps == [(1, 2), (2, 2)]
    for path, seed in zip(outcome.paths, details["seeds"], strict=True):
        assert read_png_settings(path)[1]["seed"] == seed


def test_stop_is_reported_in_the_details(studio):
    outcome = studio.generation(
        GenerationRequest(prompt="a slow one", **{**DRAW, "steps": 6}), should_stop=lambda: True, save=False
    )
    assert outcome.details["stopped"] is True and outcome.details["steps_done"] == 1


def test_a_public_instance_refuses_a_visitors_memory_mode(manager):
    studio = Studio(manager=manager, public=True)
    with pytest.raises(ValueError, match="reserved for the operator"):
        studio.generation.check(GenerationRequest(prompt="a cat", memory_mode="bf16-no-t5", **DRAW))
    assert studio.generation.check(GenerationRequest(prompt="a cat", memory_mode="auto", **DRAW)).steps == 2


def test_the_round_trip_uses_the_loaded_mode_and_the_loras(studio, manager):
    """The bug of issue 16: the Round trip fetched the model with no mode (a reload) and ignored LoRAs."""
    service = studio.generation
    service(GenerationRequest(prompt="warm up", **DRAW), save=False)
    pipeline = manager.get("sd35-large", variant="bf16")
    matcher = ImageTextMatcher(manager.get("blip-caption"))
    plain = prompt_round_trip(service, GenerationRequest(prompt="a red cube", **DRAW), matcher, save=False)
    styled = prompt_round_trip(
        service, GenerationRequest(prompt="a red cube", lora="tiny_large_style", **DRAW), matcher, save=False
    )
    assert [(item.key, item.variant) for item in manager.loaded_models() if item.key == "sd35-large"] == [
        ("sd35-large", "bf16")
    ]
    assert manager.get("sd35-large", variant="bf16") is pipeline  # not reloaded
    assert np.abs(np.asarray(styled.image, dtype=np.int16) - np.asarray(plain.image, dtype=np.int16)).max() > 0
    details = styled.details()
    assert details["loras"][0]["name"] == "tiny_large_style" and details["caption"] == styled.caption
    assert details["prompt_fit"]["text"] == "a red cube, tinystyle" and details["prompt_fit"]["mean_logprob"] <= 0

    reverse = image_round_trip(
        plain.image, service, matcher, GenerationRequest(prompt="", lora="tiny_large_style", seed=3, steps=2)
    )
    assert reverse.details()["loras"][0]["name"] == "tiny_large_style"
    assert reverse.generated.request.prompt.startswith(reverse.caption)


def test_a_bare_manager_gets_a_service_of_its_own(manager):
    service = GenerationService(manager)
    outcome = service(GenerationRequest(prompt="a cat", **DRAW), save=False)
    assert outcome.details["memory_mode"]["mode"] == "bf16" and outcome.paths == []
    with pytest.raises(ValueError, match="No LoRA is loaded, so 'style' cannot be used"):
        service.check(GenerationRequest(prompt="a cat", lora="style"))


def test_every_png_records_its_job_mode_place_and_pixels(studio):
    outcome = studio.generation(GenerationRequest(prompt="two owls", num_images=2, **DRAW))
    details = outcome.details
    assert details["mode"] == "txt2img" and len(details["job_id"]) == 12 and details["source"] is None
    jobs = [read_png_settings(path)[1]["job"] for path in outcome.paths]
    assert [job["index"] for job in jobs] == [0, 1] and {job["id"] for job in jobs} == {details["job_id"]}
    assert {job["mode"] for job in jobs} == {"txt2img"}
    for job, image in zip(jobs, outcome.images, strict=True):
        assert job["image"] == image_fingerprint(image)  # the record names its own pixels
    assert jobs[0]["image"] != jobs[1]["image"]
    again = studio.generation(GenerationRequest(prompt="two owls", **DRAW), save=False)
    assert again.details["job_id"] != details["job_id"]  # a new job, a new id


def test_lora_tags_come_out_in_linear_time_and_as_before():
    assert split_lora_tags("a fox <lora:x:1>")[0] == "a fox"
    assert split_lora_tags("a \t<lora:x:1>, red  <lora:y>  fox")[0] == "a, red  fox"
    assert split_lora_tags("<lora:x:1> a fox")[0] == "a fox"
    # 200,000 spaces before a tag: one pass over the text, not one per space (the old pattern took about a minute).
    prompt, choices = split_lora_tags("a fox" + " " * 200_000 + "<lora:x:0.5>" + " " * 200_000 + "end")
    assert prompt == "a fox" + " " * 200_000 + "end" and [choice.weight for choice in choices] == [0.5]


def test_a_tag_for_a_lora_loaded_on_another_model_names_that_model(studio, tiny_root, tmp_path):
    import shutil

    from pipelines.lora.sources import resolve_lora_source
    from pipelines.tiny import tiny_lora_dir

    upload = tmp_path / "my_detail.safetensors"  # as a LoRA trained on Medium and loaded there
    shutil.copyfile(tiny_lora_dir(tiny_root) / "tiny-medium-detail.safetensors", upload)
    studio.generation.load_lora("sd35-medium", resolve_lora_source(upload=upload), visitor="carol")
    with pytest.raises(ValueError, match=r"'my_detail' is loaded on Stable Diffusion 3\.5 Medium.*not on"):
        studio.generation(GenerationRequest(prompt="a fox <lora:my_detail:0.8>", **DRAW), owner="carol")
    with pytest.raises(ValueError, match="No LoRA"):  # another visitor's upload is no cause to name
        studio.generation(GenerationRequest(prompt="a fox <lora:my_detail:0.8>", **DRAW), owner="dave")
