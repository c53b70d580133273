"""LoRA attacks through the API of `python app.py --tiny --public` (two gradio_client Clients are two visitors).

Security issue item 4 (one visitor loaded the registry LoRA under 8 names: 8 shared entries that
nobody could unload, and the next visitor's upload was refused), and the low ones: another visitor's
LoRA names could be probed, /lora_list showed the previous visitor's weights, and a missing file's
sentence showed a server path and listed the LoRA folder. The Hub attacks (items 7, 8) need a Hub,
which --tiny turns off: tests/test_lora_hub_attacks.py runs them against a fake one.
"""

from __future__ import annotations

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from safetensors.torch import load_file, save_file

from pipelines import settings
from pipelines.tiny import tiny_lora_dir
from tests.app_server import tiny_app

pytestmark = [pytest.mark.api, pytest.mark.slow]

DRAW = {"model": "large", "seed": 5, "steps": 2, "width": 64, "height": 64, "preview_every": 0}
STYLE = "tiny-large-style.safetensors"


@pytest.fixture(scope="module")
def public_url(tiny_root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("lora-public-app") / "app.log"
    environment = {"STUDIO_RESULTS_DIR": str(tmp_path_factory.mktemp("lora-public-results")), "STUDIO_PUBLIC": ""}
    with tiny_app(tiny_root, log_path, "--public", environment=environment) as (_, url):
        yield url


def visitor(url: str) -> Client:
    return Client(url, verbose=False)


def rows(table) -> list[list]:
    return table["data"] if isinstance(table, dict) else table


def names(table) -> list[str]:
    return [row[1] for row in rows(table)]


def upload(tiny_root, folder, name: str, factor: float):
    tensors = {key: value * factor for key, value in load_file(str(tiny_lora_dir(tiny_root) / STYLE)).items()}
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path))
    return handle_file(str(path))


def unload_all(*clients: Client) -> None:
    for client in clients:
        client.predict(name="", model="large", active="", api_name="/lora_unload")


def test_one_visitor_cannot_lock_every_slot_with_one_registry_lora_under_eight_names(public_url, tiny_root, tmp_path):
    mallory, victim = visitor(public_url), visitor(public_url)
    try:
        answers = set()
        for index in range(settings.MAX_LOADED_LORAS):
            table, _, active = mallory.predict(
                source="tiny_large_style", name=f"name {index}", model="large", api_name="/lora_load"
            )
            answers.add(active)
        # One entry, answered with its first name every time, and it is mallory's own.
        assert answers == {"name_0:1"} and names(table) == ["name_0"]
        assert names(victim.predict(api_name="/lora_list")) == []  # not a shared entry
        # The next visitor's upload has room.
        table, note, _ = victim.predict(upload=upload(tiny_root, tmp_path, "victims", 1.3), api_name="/lora_load")
        assert names(table) == ["victims"] and "Loaded **victims**" in note
        # Mallory's own entries can be unloaded by mallory, as any upload.
        _, note, _ = mallory.predict(name="", model="large", active="", api_name="/lora_unload")
        assert note == "Unloaded name_0 from sd35-large."
    finally:
        unload_all(mallory, victim)


def test_a_name_another_visitor_uses_looks_free(public_url, tiny_root, tmp_path):
    alice, bob = visitor(public_url), visitor(public_url)
    try:
        alice.predict(upload=upload(tiny_root, tmp_path, "a", 1.1), name="secret_plan", api_name="/lora_load")
        table, note, active = bob.predict(
            upload=upload(tiny_root, tmp_path, "b", 1.2), name="secret_plan", api_name="/lora_load"
        )
        assert names(table) == ["secret_plan"] and active == "secret_plan:1" and "Loaded **secret_plan**" in note
        # Each draws with their own.
        for client in (alice, bob):
            *_, details = client.predict("a fox", lora="secret_plan", **DRAW, api_name="/generate")
            assert [lora["name"] for lora in details["loras"]] == ["secret_plan"]
        alice_hash = alice.predict("a fox", lora="secret_plan", **DRAW, api_name="/generate")[-1]["loras"][0]["sha256"]
        bob_hash = bob.predict("a fox", lora="secret_plan", **DRAW, api_name="/generate")[-1]["loras"][0]["sha256"]
        assert alice_hash != bob_hash
    finally:
        unload_all(alice, bob)


def test_the_list_shows_only_the_callers_weights(public_url):
    alice, bob = visitor(public_url), visitor(public_url)
    try:
        # A file of the operator's folder: one shared entry for both.
        alice.predict(source=STYLE, model="large", api_name="/lora_load")
        alice.predict("a fox", lora="tiny_large_style:0.7", **DRAW, api_name="/generate")
        assert [row[2] for row in rows(alice.predict(api_name="/lora_list"))] == [0.7]
        assert [row[2] for row in rows(bob.predict(api_name="/lora_list"))] == [""]
    finally:
        unload_all(alice, bob)


def test_a_missing_file_shows_no_server_path_and_no_listing(public_url, tiny_root):
    with pytest.raises(AppError) as missing:
        visitor(public_url).predict(source="nothing-here.safetensors", model="large", api_name="/lora_load")
    sentence = str(missing.value)
    assert "There is no 'nothing-here.safetensors' in the LoRA folder" in sentence
    assert str(tiny_root) not in sentence and "/" not in sentence.split("folder", 1)[1]
    assert STYLE not in sentence and "It has:" not in sentence
