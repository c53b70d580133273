"""The System tab through gradio_client: machine info, loaded models, unloading, the memory planner."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import handle_file

pytestmark = pytest.mark.api

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def _loaded(details: dict) -> dict[str, dict]:
    return {item["key"]: item for item in details["loaded_models"]}


def test_system_answers_with_only_defaults(tiny_client):
    device, loaded, table, auto, details = tiny_client.predict(api_name="/system")
    machine, planner = details["machine"], details["planner"]
    assert machine["torch"] and machine["device"] in device
    if machine["gpu"] is None:  # CI and developer machines
        assert "no GPU" in device and planner["gpu_gb"] == 24.0
    else:
        assert planner["gpu_gb"] == round(machine["gpu"]["total_bytes"] / 1024**3, 1)
    assert planner["height"] == planner["width"] == 1024
    modes = {(plan["model"], plan["mode"]) for plan in planner["plans"]}
    assert {("sd35-large", "bf16"), ("sd35-large", "nf4-t5nf4"), ("sd35-medium", "bf16-sequential")} <= modes
    assert ("blip-caption", "int8") in modes
    large = next(plan for plan in planner["plans"] if (plan["model"], plan["mode"]) == ("sd35-large", "bf16"))
    assert large["peak_bytes"] > large["weight_bytes"] > 25 * 1024**3
    assert large["fits"] == (large["peak_bytes"] + planner["margin_bytes"] <= planner["gpu_gb"] * 1024**3)
    # Key numbers first: whether it fits and the estimated peak come right after model and mode.
    assert table["headers"][:4] == ["model", "mode", "fits", "est. peak (GiB)"]
    assert len(table["data"]) == len(planner["plans"]) and {row[2] for row in table["data"]} <= {"yes", "no"}
    assert machine["cpu_threads"] == 1  # --tiny runs one intra-op thread
    assert "1 CPU thread" in device and "1 CPU threads" not in device
    assert planner["auto"]["sd35-large"]["mode"] in {mode for _, mode in modes} and "sd35-large" in auto
    assert "estimates" in planner["note"].lower()


def test_system_plans_for_a_typed_gpu_and_size(tiny_client):
    *_, details = tiny_client.predict(gpu_gb=80, height=512, width=768, api_name="/system")
    planner = details["planner"]
    assert planner["gpu_gb"] == 80 and (planner["height"], planner["width"]) == (512, 768)
    assert planner["auto"]["sd35-large"]["mode"] == "bf16"


def test_system_refuses_a_size_sd3_cannot_draw(tiny_client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="multiple of 16"):
        tiny_client.predict(height=1000, api_name="/system")


def test_unload_removes_a_loaded_model(tiny_client):
    tiny_client.predict(handle_file(str(EXAMPLES / "chelsea.png")), api_name="/caption")
    *_, details = tiny_client.predict(api_name="/system")
    blip = _loaded(details)["blip-caption"]
    assert blip["footprint_bytes"] > 0 and blip["load_seconds"] >= 0
    message, loaded = tiny_client.predict("blip-caption", api_name="/unload")
    assert "Unloaded" in message
    assert "blip-caption" not in [row[0] for row in loaded["data"]]
    *_, details = tiny_client.predict(api_name="/system")
    assert "blip-caption" not in _loaded(details)
    message, _ = tiny_client.predict("blip-caption", api_name="/unload")
    assert "was not loaded" in message


def test_unload_refuses_an_unknown_model(tiny_client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="choose one of"):
        tiny_client.predict("sd35-huge", api_name="/unload")


def _strings(value):
    """Every string in a JSON answer, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def test_no_server_path_in_system_caption_or_adapter_list(tiny_client, tiny_root, tmp_path):
    """Visitors read placeholders (``<models>/blip-caption``, ``blip-adapters/``); the log keeps the real folders."""
    import os
    import tempfile
    import zipfile

    from gradio_client.exceptions import AppError

    from pipelines.blip.tiny_adapter import ensure_tiny_demo_adapter
    from pipelines.workspace import ABSOLUTE_PATH

    folder = ensure_tiny_demo_adapter(tmp_path / "made", tiny_root / "blip-caption")
    archive = tmp_path / "paths-adapter.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in sorted(folder.iterdir()):
            zipped.write(file, f"paths-adapter/{file.name}")
    photo = handle_file(str(EXAMPLES / "chelsea.png"))
    name, _, loaded_listing = tiny_client.predict("", [handle_file(str(archive))], api_name="/blip_adapter_load")
    answers = {
        "/blip_adapter_load": loaded_listing,
        "/blip_adapter_list": tiny_client.predict(api_name="/blip_adapter_list"),
        "/caption": tiny_client.predict(photo, strategy="greedy", adapter=name, api_name="/caption"),
    }
    tiny_client.predict("a fox", model="large", steps=2, width=64, height=64, preview_every=0, api_name="/generate")
    answers["/system"] = tiny_client.predict(api_name="/system")
    with pytest.raises(AppError) as refused:
        tiny_client.predict("no-such-folder", api_name="/blip_adapter_load")
    answers["/blip_adapter_load refused"] = str(refused.value)
    try:
        *_, details = answers["/caption"]
        assert details["model"] == "<models>/blip-caption" and details["adapter"] == name
        assert answers["/blip_adapter_list"]["adapter_dir"] == "blip-adapters/"
        assert "<models>/blip-caption" in [item["source"] for item in answers["/system"][-1]["loaded_models"]]
        roots = {tempfile.gettempdir(), str(Path(__file__).resolve().parent.parent), str(tiny_root)}
        roots |= {os.path.realpath(root) for root in roots} | ({str(Path.home())} - {"/"})
        for endpoint, answer in answers.items():
            for text in _strings(answer):
                assert not [root for root in roots if root in text], (endpoint, text)
                assert not ABSOLUTE_PATH.search(text), (endpoint, text)
    finally:
        tiny_client.predict(name, api_name="/blip_adapter_unload")
