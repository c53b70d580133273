"""Two visitors (two gradio_client clients = two sessions) against `python app.py --tiny`.

Attack 1 of issue 15: a gallery ``select`` carrying a path, then "Caption the selected image",
returned that path as a file. Attack 8: two visitors with the same seed in the same second saw
each other's images, because both were written to one shared name.
"""

from __future__ import annotations

import io
import json
import secrets
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from pipelines.sd3.png_metadata import read_png_settings

pytestmark = pytest.mark.api


@pytest.fixture
def two_visitors(tiny_app_url):
    from gradio_client import Client

    return Client(tiny_app_url, verbose=False), Client(tiny_app_url, verbose=False)


def private_event(url: str, api_name: str) -> dict:
    with urllib.request.urlopen(url + "config", timeout=30) as response:
        config = json.loads(response.read())
    (dependency,) = [item for item in config["dependencies"] if item.get("api_name") == api_name]
    assert dependency["api_visibility"] == "private"
    return dependency


def run_private(url: str, client, api_name: str, event_data=None) -> dict:
    """Call a private event in ``client``'s session, as a page (or an attacker) would."""
    dependency = private_event(url, api_name)
    body = {
        "data": [None] * len(dependency["inputs"]),  # its inputs are session state: what is sent is ignored
        "event_data": event_data,
        "fn_index": dependency["id"],
        "session_hash": client.session_hash,
    }
    request = urllib.request.Request(
        url + "gradio_api/run/predict",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # a refusal (Gradio's or the app's) is an answer too
        return {"error": json.loads(error.read() or b"null"), "status": error.code}


def prompt_of_served_file(url: str, payload: dict) -> str:
    """The prompt in the PNG that the app serves for a returned file."""
    file_url = payload["url"] if payload["url"].startswith("http") else url + payload["url"].lstrip("/")
    with urllib.request.urlopen(file_url, timeout=30) as response:
        data = response.read()
    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text["studio"])["prompt"]


def test_a_selection_carrying_a_path_never_comes_back_as_a_file(tiny_app_url, two_visitors):
    visitor_a, visitor_b = two_visitors
    token = secrets.token_hex(8)
    secret = Path(tempfile.gettempdir()) / f"studio-attack1-{token}.png"
    secret.write_bytes(f"SECRET {token}".encode())
    try:
        gallery_a, *_ = visitor_a.predict(f"alpha {token}", seed=3, steps=2, api_name="/generate")
        gallery_b, *_ = visitor_b.predict(f"beta {token}", seed=3, steps=2, num_images=2, api_name="/generate")
        assert len(gallery_a) == 1 and len(gallery_b) == 2

        # B plants a server path, then A's file, as the selected value; only B's own images may come back.
        for planted in (str(secret), gallery_a[0]["image"], {"image": {"path": str(secret)}, "caption": None}):
            run_private(tiny_app_url, visitor_b, "generate_select", {"index": 0, "value": planted})
            (image, _tabs) = run_private(tiny_app_url, visitor_b, "send_to_caption")["data"]
            assert Path(image["path"]).name not in (secret.name, Path(gallery_a[0]["image"]).name)
            assert prompt_of_served_file(tiny_app_url, image) == f"beta {token}"

        # An honest selection still works: the second image of B's gallery is the one handed over.
        run_private(tiny_app_url, visitor_b, "generate_select", {"index": 1, "value": None})
        (image, _tabs) = run_private(tiny_app_url, visitor_b, "send_to_caption")["data"]
        assert Path(image["path"]).name == Path(gallery_b[1]["image"]).name
        # An index past B's gallery selects nothing: the first image is handed over, never something else.
        run_private(tiny_app_url, visitor_b, "generate_select", {"index": 7, "value": str(secret)})
        (image, _tabs) = run_private(tiny_app_url, visitor_b, "send_to_caption")["data"]
        assert Path(image["path"]).name == Path(gallery_b[0]["image"]).name
        # A's selection is A's: B's calls changed nothing there.
        (image, _tabs) = run_private(tiny_app_url, visitor_a, "send_to_caption")["data"]
        assert prompt_of_served_file(tiny_app_url, image) == f"alpha {token}"
    finally:
        secret.unlink(missing_ok=True)


def test_two_visitors_same_seed_same_second_each_see_only_their_own_images(two_visitors):
    visitor_a, visitor_b = two_visitors
    token = secrets.token_hex(8)

    def draw(client, prompt):
        job = client.submit(prompt, seed=11, steps=2, preview_every=0, api_name="/generate")
        return job.result(timeout=120)

    for round_number in (1, 2):
        with ThreadPoolExecutor(2) as pool:
            runs = {
                "alpha": pool.submit(draw, visitor_a, f"alpha {token}"),
                "beta": pool.submit(draw, visitor_b, f"beta {token}"),
            }
            results = {name: run.result() for name, run in runs.items()}
        names = {}
        for name, (gallery, seed, _summary, history, _preview, _control_map, details) in results.items():
            assert seed == 11 and len(gallery) == 1 and details["files"] == [Path(gallery[0]["image"]).name]
            assert read_png_settings(gallery[0]["image"])[1]["prompt"] == f"{name} {token}"  # its own image
            # Locally the history is the machine's (the person at it): every image once, the other page's too
            # once it is drawn (the two jobs take turns on the GPU).
            prompts = [read_png_settings(item["image"])[1]["prompt"] for item in history]
            other = "beta" if name == "alpha" else "alpha"
            assert prompts.count(f"{name} {token}") == round_number
            assert prompts.count(f"{other} {token}") in (round_number - 1, round_number)
            names[name] = Path(gallery[0]["image"]).name
        assert names["alpha"] != names["beta"]  # same stamp, model and seed: still two files
