"""`python app.py --tiny --public`: what stays the operator's, and what visitors keep (issue 15, public mode).

A second app of its own, started with --public, on a free loopback port: /unload, /evaluate and a
memory-mode change are refused with a sentence, shared LoRAs are read-only, while /caption and
/generate work as everywhere.
"""

from __future__ import annotations

import urllib.request

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.app_server import tiny_app

pytestmark = [pytest.mark.api, pytest.mark.slow]  # starts an app of its own

DRAW = {"model": "large", "seed": 5, "steps": 2, "width": 64, "height": 64, "preview_every": 0}
OPERATOR_ONLY = "reserved for the operator of this public instance; run the Studio yourself"


@pytest.fixture(scope="module")
def public_app_url(tiny_root, tmp_path_factory):
    """`python app.py --tiny --public` on a loopback port for this module."""
    log_path = tmp_path_factory.mktemp("public-app") / "app.log"
    environment = {
        "STUDIO_RESULTS_DIR": str(tmp_path_factory.mktemp("public-results")),
        "STUDIO_PUBLIC": "",  # --public alone decides
    }
    with tiny_app(tiny_root, log_path, "--public", environment=environment) as (_, url):
        yield url


@pytest.fixture(scope="module")
def public_client(public_app_url):
    return Client(public_app_url, verbose=False)


def test_operator_actions_are_refused_with_a_sentence_and_visitors_keep_captions_and_images(public_client):
    photo = handle_file("assets/examples/chelsea.png")
    table, _, _ = public_client.predict(photo, strategy="greedy", api_name="/caption")
    assert table["data"][0][1]
    with pytest.raises(AppError, match=f"Unloading models is {OPERATOR_ONLY}"):
        public_client.predict("blip-caption", api_name="/unload")
    with pytest.raises(AppError, match=f"Running an evaluation is {OPERATOR_ONLY}"):
        public_client.predict(categories=["counting"], steps=1, side=64, api_name="/evaluate")
    gallery, *_, details = public_client.predict("a red fox", **DRAW, api_name="/generate")
    assert len(gallery) == 1 and details["memory_mode"]["mode"] == "bf16"
    *_, details = public_client.predict(api_name="/system")
    assert "blip-caption" in [item["key"] for item in details["loaded_models"]]  # nothing was unloaded


@pytest.mark.parametrize("endpoint", ["/generate", "/lora_load"])
def test_a_memory_mode_change_is_refused_and_the_operators_mode_is_accepted(public_client, endpoint):
    arguments = {"/generate": {"prompt": "a cat", **DRAW}, "/lora_load": {"source": "tiny_large_style"}}[endpoint]
    # Alternating bf16 and bf16-no-t5 reloaded Large on every request (attack 6): a visitor cannot switch.
    with pytest.raises(
        AppError, match=r"Changing the memory mode \(to .bf16-no-t5.; this instance runs .bf16.\) is reserved"
    ):
        public_client.predict(**arguments, memory_mode="bf16-no-t5", api_name=endpoint)
    for same in ("auto", "bf16"):  # the instance's choice, or the mode it runs
        public_client.predict(**arguments, memory_mode=same, api_name=endpoint)


def test_shared_loras_are_read_only_for_visitors(public_app_url, public_client):
    other = Client(public_app_url, verbose=False)
    # A file of the operator's LoRA folder: shared (a visitor's registry or Hub load is their own).
    public_client.predict(source="tiny-large-style.safetensors", model="large", api_name="/lora_load")
    with pytest.raises(AppError, match="'tiny_large_style' is shared by every visitor of this public instance"):
        other.predict(name="tiny_large_style", model="large", active="", api_name="/lora_unload")
    _, note, _ = other.predict(name="", model="large", active="", api_name="/lora_unload")
    assert "None of your LoRAs" in note
    *_, details = other.predict("a fox", lora="tiny_large_style", **DRAW, api_name="/generate")
    assert [lora["name"] for lora in details["loras"]] == ["tiny_large_style"]


def operator_controls(url: str) -> dict[str, bool]:
    """Whether the page shows the memory-mode dropdown, the Unload row and the evaluation run (from /config)."""
    import json

    with urllib.request.urlopen(url + "config", timeout=10) as response:
        config = json.load(response)
    components = {item["id"]: item for item in config["components"]}
    parents: dict[int, int] = {}

    def walk(node):
        for child in node.get("children", []):
            parents[child["id"]] = node["id"]
            walk(child)

    walk(config["layout"])

    def shown(component_id) -> bool:  # visible itself and inside visible containers
        while component_id is not None:
            if components.get(component_id, {}).get("props", {}).get("visible") is False:
                return False
            component_id = parents.get(component_id)
        return True

    def find(kind: str, text: str) -> int:
        return next(
            item["id"]
            for item in config["components"]
            if item["type"] == kind and text in str(item["props"].get("label") or item["props"].get("value"))
        )

    return {
        "memory mode": shown(find("dropdown", "Memory mode")),
        "unload": shown(find("dropdown", "Loaded model")),  # the System tab's row: this dropdown and Unload
        "evaluation": shown(find("button", "Run (resumes where it stopped)")),
    }


def test_the_page_hides_the_operators_controls_only_in_public_mode(public_app_url, tiny_app_url):
    assert operator_controls(public_app_url) == {"memory mode": False, "unload": False, "evaluation": False}
    assert operator_controls(tiny_app_url) == {"memory mode": True, "unload": True, "evaluation": True}


# 100 steps x 2 images at the tiny default size (128²) cost 200 image-steps: over the public bound (160).
OVER_COST = {"prompt": "a fox", "steps": 100, "num_images": 2, "width": 128, "height": 128, "preview_every": 0}


def test_an_over_cost_generation_is_refused_with_a_sentence_in_public_mode_and_drawn_locally(
    public_client, tiny_app_url
):
    with pytest.raises(AppError) as refused:
        public_client.predict(**OVER_COST, api_name="/generate")
    assert str(refused.value) == (
        "100 steps x 2 images at 128x128 cost 200 image-steps at 128x128, and this public instance runs at most "
        "160 a job; use at most 80 steps, or fewer images or a smaller size."
    )
    gallery, *_ = public_client.predict(**{**OVER_COST, "steps": 80}, api_name="/generate")  # at the bound
    assert len(gallery) == 2
    local = Client(tiny_app_url, verbose=False, download_files=False)
    gallery, *_ = local.predict(**OVER_COST, api_name="/generate")
    assert len(gallery) == 2
