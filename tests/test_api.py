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

    with pytest.raises(AppError, match="raise num_beams to 5"):
        tiny_client.predict(
            handle_file(str(EXAMPLES / "chelsea.png")), num_captions=5, num_beams=3, api_name="/caption"
        )


def test_every_event_has_a_named_endpoint(tiny_client):
    endpoints = tiny_client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/caption" in endpoints
    parameters = [parameter["parameter_name"] for parameter in endpoints["/caption"]["parameters"]]
    assert parameters[:4] == ["image", "strategy", "prefix", "num_captions"]
    assert all(parameter["parameter_has_default"] for parameter in endpoints["/caption"]["parameters"][1:])
