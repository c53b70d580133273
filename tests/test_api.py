"""The app launched with `--tiny`, called the way users script it: through gradio_client."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import handle_file

pytestmark = pytest.mark.api

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def test_caption_answers_with_only_an_image(tiny_client):
    table, summary, details = tiny_client.predict(handle_file(str(EXAMPLES / "chelsea.png")), api_name="/caption")
    rows = table["data"]
    assert len(rows) == 1 and rows[0][0] == 1
    assert rows[0][1] == details["captions"][0]["text"] and rows[0][1].strip()
    assert details["captions"][0]["score"] <= 0
    assert details["request"]["strategy"] == "beam" and details["tiny_mode"] is True
    assert details["image"] == "451x300 RGB"
    assert "caption(s)" in summary


def test_caption_parameters_are_named_after_the_request(tiny_client):
    table, _, details = tiny_client.predict(
        handle_file(str(EXAMPLES / "coffee.png")),
        strategy="sampling",
        num_captions=3,
        seed=11,
        prefix="a picture of",
        api_name="/caption",
    )
    assert len(table["data"]) == 3 and details["seed"] == 11
    assert all(row[1].startswith("a picture of") for row in table["data"])
    again = tiny_client.predict(
        handle_file(str(EXAMPLES / "coffee.png")),
        strategy="sampling",
        num_captions=3,
        seed=11,
        prefix="a picture of",
        api_name="/caption",
    )[0]
    assert again["data"] == table["data"]


@pytest.mark.parametrize(
    ("content", "filename", "words"),
    [
        (b"", "empty.png", "empty"),
        (b"this is not a picture", "notes.png", "not an image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "cut.png", "png"),
    ],
)
def test_a_bad_upload_gets_our_sentence_not_a_generic_error(tiny_client, tmp_path, content, filename, words):
    from gradio_client.exceptions import AppError

    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(AppError) as caught:
        tiny_client.predict(handle_file(str(path)), api_name="/caption")
    message = str(caught.value).lower()
    assert words in message, message
    assert "upstream gradio app has raised an exception" not in message
    # and the app keeps serving
    table = tiny_client.predict(handle_file(str(EXAMPLES / "rocket.jpg")), api_name="/caption")[0]
    assert len(table["data"]) == 1


def test_bad_settings_are_refused_server_side(tiny_client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Diverse beam search needs Beams"):
        tiny_client.predict(
            handle_file(str(EXAMPLES / "chelsea.png")),
            strategy="diverse_beam",
            num_beams=5,
            num_beam_groups=2,
            api_name="/caption",
        )


def test_five_beam_captions_at_three_beams_raise_the_beams_and_say_so(tiny_client):
    table, summary, details = tiny_client.predict(
        handle_file(str(EXAMPLES / "chelsea.png")), strategy="beam", num_captions=5, num_beams=3, api_name="/caption"
    )
    assert len(table["data"]) == 5 and len(details["captions"]) == 5
    assert details["request"]["num_beams"] == 5
    assert details["notes"] == ["Beams raised from 3 to 5: Beam search returns at most one caption per beam."]
    assert details["notes"][0] in summary


def test_greedy_with_several_captions_gives_one_and_says_why(tiny_client):
    table, summary, details = tiny_client.predict(
        handle_file(str(EXAMPLES / "chelsea.png")), strategy="greedy", num_captions=4, api_name="/caption"
    )
    assert len(table["data"]) == 1 and details["request"]["num_captions"] == 1
    assert "Greedy always gives one caption, so Captions was set to 1 instead of 4" in summary


def test_sampling_picks_a_random_seed_by_default_and_the_seed_reproduces(tiny_client):
    photo = handle_file(str(EXAMPLES / "coffee.png"))
    runs = [tiny_client.predict(photo, strategy="sampling", num_captions=3, api_name="/caption")[2] for _ in range(2)]
    assert runs[0]["request"]["seed"] == runs[0]["seed"] and isinstance(runs[0]["seed"], int)
    assert runs[0]["seed"] != runs[1]["seed"]  # two draws from 2**32 seeds: equal once in 4 billion
    again = tiny_client.predict(photo, strategy="sampling", num_captions=3, seed=runs[0]["seed"], api_name="/caption")
    assert [caption["text"] for caption in again[2]["captions"]] == [caption["text"] for caption in runs[0]["captions"]]
    parameters = tiny_client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/caption"]
    seed = next(item for item in parameters["parameters"] if item["parameter_name"] == "seed")
    assert seed["parameter_default"] == -1


def test_every_event_has_a_named_endpoint(tiny_client):
    endpoints = tiny_client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/caption" in endpoints
    parameters = [parameter["parameter_name"] for parameter in endpoints["/caption"]["parameters"]]
    assert parameters[:4] == ["image", "strategy", "prefix", "num_captions"]
    assert all(parameter["parameter_has_default"] for parameter in endpoints["/caption"]["parameters"][1:])


def test_reuse_seed_takes_the_last_results_seed_and_nothing_else():
    from components.caption import last_seed

    assert last_seed({"seed": 1234, "captions": []}, -1) == 1234
    assert last_seed({"seed": None}, 7) == 7  # the last caption was not sampled
    assert last_seed({"seed": "1; rm -rf /"}, 7) == 7 and last_seed({"seed": 2**40}, 7) == 7
    assert last_seed({"seed": True}, 7) == 7 and last_seed(None, -1) == -1
