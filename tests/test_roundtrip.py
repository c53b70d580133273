"""Round trip: prompt -> image -> caption -> scores, image -> caption -> image, and the resumable evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from gradio_client import handle_file
from PIL import Image

from pipelines.blip.matching import ImageTextMatcher
from pipelines.roundtrip import loop as roundtrip
from pipelines.roundtrip.loop import (
    evaluation_table,
    image_round_trip,
    load_prompts,
    prompt_round_trip,
    run_evaluation,
    word_diff,
)
from pipelines.sd3.generation import GenerationService
from pipelines.sd3.jobs import GenerationRequest

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def test_word_diff_marks_shared_and_missing_words():
    assert word_diff("A red cube, on a table!", "a cube on the table") == [
        ("a", "both"),
        ("red", "prompt"),
        ("cube", "both"),
        ("on", "both"),
        ("a", "prompt"),
        ("the", "caption"),
        ("table", "both"),
    ]


def test_the_built_in_prompts_cover_five_categories():
    prompts = load_prompts()
    categories = {category for category, _ in prompts}
    assert categories == {"single-objects", "counting", "colours", "spatial", "text-in-image"}
    assert 25 <= len(prompts) <= 40 and len(set(prompts)) == len(prompts)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts([Path("/no/such/prompts.txt")])


def test_prompt_round_trip_returns_an_image_a_caption_and_finite_scores(tiny_manager):
    matcher = ImageTextMatcher(tiny_manager.get("blip-caption"))
    trip = prompt_round_trip(
        GenerationService(tiny_manager),
        GenerationRequest(prompt="a red cube on a table", seed=3, steps=2, width=64, height=64),
        matcher,
        save=False,
    )
    assert trip.image.size == (64, 64) and trip.caption
    for score in (trip.prompt_fit, trip.caption_fit):
        assert math.isfinite(score.mean_logprob) and score.mean_logprob <= 0
    assert trip.prompt_fit.text == "a red cube on a table" and trip.caption_fit.text == trip.caption
    assert trip.caption_fit.num_tokens >= 2 and trip.prompt_fit.num_tokens == 7  # 6 words + [SEP]
    assert {tag for _, tag in trip.diff} <= {"both", "prompt", "caption"}


def test_image_round_trip_draws_the_caption_at_the_image_shape(tiny_manager):
    matcher = ImageTextMatcher(tiny_manager.get("blip-caption"))
    photo = Image.open(EXAMPLES / "rocket.jpg").convert("RGB")  # 640x427
    trip = image_round_trip(
        photo, GenerationService(tiny_manager), matcher, GenerationRequest(prompt="", seed=1), save=False
    )
    assert trip.generated.request.prompt == trip.caption
    width, height = trip.generated.images[0].size
    assert width > height and width % 16 == 0 and height % 16 == 0
    assert math.isfinite(trip.fit.mean_logprob)


def test_evaluation_writes_json_the_scoreboard_reads_and_resumes(tiny_manager, tmp_path, monkeypatch):
    matcher = ImageTextMatcher(tiny_manager.get("blip-caption"))
    prompts = [("colours", "a blue banana"), ("counting", "two cats"), ("counting", "three red balloons")]
    out = tmp_path / "roundtrip-eval.json"
    calls = []
    real_round_trip = roundtrip.prompt_round_trip

    def counting_round_trip(*args, **kwargs):
        calls.append(args[1].prompt)
        return real_round_trip(*args, **kwargs)

    monkeypatch.setattr(roundtrip, "prompt_round_trip", counting_round_trip)
    stop_after_two = iter([False, False, True])
    first = run_evaluation(
        tiny_manager, matcher, prompts, models=["large"], seeds=[0], out_path=out, steps=2, side=64,
        should_stop=lambda: next(stop_after_two),
    )  # fmt: skip
    assert len(first["rows"]) == 2 and calls == ["a blue banana", "two cats"]
    resumed = run_evaluation(
        tiny_manager, matcher, prompts, models=["large"], seeds=[0], out_path=out, steps=2, side=64
    )
    assert calls == ["a blue banana", "two cats", "three red balloons"]  # done prompts were skipped
    saved = json.loads(out.read_text())
    assert saved == resumed and saved["benchmark"] == "roundtrip-eval"
    summary = saved["summary"]["sd35-large"]
    assert summary["counting"]["n"] == 2 and summary["colours"]["n"] == 1 and summary["all"]["n"] == 3
    counting = [row["prompt_mean_logprob"] for row in saved["rows"] if row["category"] == "counting"]
    assert summary["counting"]["mean"] == pytest.approx(sum(counting) / 2)
    assert ["sd35-large", "counting", round(summary["counting"]["mean"], 4)] == evaluation_table(saved)[2][:3]


@pytest.mark.api
def test_roundtrip_answers_with_only_a_prompt(tiny_client):
    image, summary, scores, diff, seed, details = tiny_client.predict("a red apple", api_name="/roundtrip")
    assert image.endswith(".png") and "BLIP wrote" in summary
    assert details["seed"] == seed and details["steps"] == 28 and details["files"] == [Path(image).name]
    rows = scores["data"]
    # Scores first (mean log-prob, ITM), the text last.
    assert scores["headers"] == ["text", "mean log-prob", "ITM P(match)", "words"]
    assert [row[0] for row in rows] == ["prompt", "BLIP's caption"] and rows[0][3] == "a red apple"
    assert all(math.isfinite(row[1]) and row[1] <= 0 for row in rows)
    assert [item["token"] for item in diff if item["class_or_confidence"] in ("both", "prompt")] == [
        "a",
        "red",
        "apple",
    ]


@pytest.mark.api
def test_the_round_trip_takes_generate_settings_and_loras_by_name(tiny_client):
    import numpy as np

    small = {"seed": 5, "steps": 2, "width": 64, "height": 64}
    try:
        plain_image, *_, plain = tiny_client.predict("a red apple", api_name="/roundtrip", **small)
        styled_image, _, _, _, seed, styled = tiny_client.predict(
            "a red apple", api_name="/roundtrip", lora="tiny_large_style:0.8", **small
        )
        assert plain["loras"] == [] and seed == styled["seed"] == 5
        assert [(lora["name"], lora["weight"]) for lora in styled["loras"]] == [("tiny_large_style", 0.8)]
        assert styled["prompt"] == "a red apple, tinystyle" and styled["prompt_fit"]["text"] == styled["prompt"]
        assert styled["caption"] and styled["caption_fit"]["mean_logprob"] <= 0 and styled["size"] == "64x64"
        assert styled["memory_mode"]["mode"] == plain["memory_mode"]["mode"] == "bf16"
        pixels = [np.asarray(Image.open(path).convert("RGB"), dtype=np.int16) for path in (plain_image, styled_image)]
        assert np.abs(pixels[0] - pixels[1]).max() > 0  # the LoRA changes the round trip's image

        caption, redrawn, _, details = tiny_client.predict(
            handle_file(str(EXAMPLES / "rocket.jpg")), api_name="/roundtrip_image", lora="tiny_large_style", **small
        )
        assert details["caption"] == caption and details["loras"][0]["name"] == "tiny_large_style"
        assert details["prompt"].startswith(caption) and redrawn.endswith(".png")
    finally:
        tiny_client.predict(name="", model="large", active="", api_name="/lora_unload")


def test_the_scoreboard_reads_back_what_an_evaluation_wrote(tiny_manager, tmp_path):
    from pipelines.scoreboard.page import build_report

    matcher = ImageTextMatcher(tiny_manager.get("blip-caption"))
    payload = run_evaluation(
        tiny_manager,
        matcher,
        [("colours", "a blue banana"), ("spatial", "a cat under a table")],
        models=["large"],
        seeds=[0],
        out_path=tmp_path / "roundtrip-eval.json",
        steps=2,
        side=64,
        machine="test machine",
        model_size="tiny",
    )
    report = build_report(results_dir=tmp_path, with_claims=False)
    cells = [row for row in report.measured if row["adherence"] is not None]
    expected = payload["summary"]["sd35-large"]["all"]
    assert cells, report.warnings
    assert any(
        f"{expected['mean']:.3f}" in row["adherence"] and "roundtrip-eval.json" in row["source"] for row in cells
    )
    assert all("tiny" in row["source"] for row in cells)
