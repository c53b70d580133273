"""/history through gradio_client: the saved images outlive the page and the app (issue "Work that lasts").

Locally every page (every Client, a new session as after a reload) sees the same history, and a
restarted app on the same folder still has it, settings and pixels. A public instance keeps none:
a second visitor sees nothing of the first.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from gradio_client import Client

from pipelines.sd3.png_metadata import read_png_settings
from tests.app_server import tiny_app

pytestmark = [pytest.mark.api, pytest.mark.slow]  # starts apps of its own

DRAW = {"model": "large-turbo", "seed": 4242, "steps": "2", "width": 64, "height": 64, "preview_every": 0}


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_path(item) -> str:
    return item["image"] if isinstance(item, dict) else item[0]


def test_a_new_session_and_a_restarted_app_get_the_image_and_its_settings(tiny_root, tmp_path):
    outputs = tmp_path / "outputs"
    with tiny_app(tiny_root, tmp_path / "first.log", "--outputs", str(outputs)) as (_, url):
        drawing = Client(url, verbose=False)
        gallery, *_, details = drawing.predict("a blue heron", **DRAW, api_name="/generate")
        drawn = digest(image_path(gallery[0]))
        assert len(details["records"]) == 1
        # The saved PNG lies where A1111 puts it: a folder per mode and per day.
        (saved,) = outputs.glob("txt2img-images/*/*.png")
        assert digest(saved) == drawn and read_png_settings(saved)[1]["seed"] == 4242

        reloaded = Client(url, verbose=False)  # a new session, as after a page reload
        shown, records = reloaded.predict(0, api_name="/history")
        assert records["total"] == 1 and records["records"][0]["id"] == details["records"][0]
        settings = records["records"][0]["settings"]
        assert (settings["seed"], settings["prompt"], settings["model_key"]) == (
            4242,
            "a blue heron",
            "sd35-large-turbo",
        )
        assert digest(image_path(shown[0])) == drawn  # the very file, settings chunks and all
        assert str(outputs) not in str(records)  # records name no server path

    with tiny_app(tiny_root, tmp_path / "second.log", "--outputs", str(outputs)) as (_, url):
        shown, records = Client(url, verbose=False).predict(0, api_name="/history")
        assert records["total"] == 1 and records["records"][0]["settings"]["seed"] == 4242
        assert digest(image_path(shown[0])) == drawn


def test_a_public_instance_shows_a_visitor_nothing_of_another(tiny_root, tmp_path):
    with tiny_app(tiny_root, tmp_path / "public.log", "--public", environment={"STUDIO_PUBLIC": ""}) as (_, url):
        Client(url, verbose=False).predict("a secret garden", **DRAW, api_name="/generate")
        stranger = Client(url, verbose=False)
        shown, records = stranger.predict(0, api_name="/history")
        assert shown == [] and records["total"] == 0 and records["records"] == []
        # The stranger's own session history holds its own image only.
        _gallery, _seed, _summary, history, *_ = stranger.predict("a public bench", **DRAW, api_name="/generate")
        assert [read_png_settings(image_path(item))[1]["prompt"] for item in history] == ["a public bench"]
