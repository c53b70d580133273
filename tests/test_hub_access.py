"""The Hub probe: one short request, remembered; the manager fails in one sentence or loads from the cache."""

from __future__ import annotations

import re
import threading
import time

import pytest
from huggingface_hub import constants

from pipelines import hub_access, settings
from pipelines.errors import ModelLoadError
from pipelines.hub_access import HubProbe, _probe_endpoint, set_hub_timeouts
from pipelines.manager import ModelManager
from pipelines.runtime import choose_runtime
from tests.app_server import free_port

CPU = choose_runtime("cpu")


class CountingProbe:
    def __init__(self, answer: str | None) -> None:
        self.answer = answer
        self.calls: list[str] = []

    def __call__(self, endpoint: str, timeout: float) -> str | None:
        self.calls.append(endpoint)
        time.sleep(0.05)  # long enough for concurrent callers to overlap
        return self.answer


@pytest.fixture
def online_mode(monkeypatch):
    """The library as on a machine where HF_HUB_OFFLINE is unset (conftest sets it for the tests)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_a_closed_port_is_reported_at_once_as_refused(online_mode):
    started = time.monotonic()
    problem = _probe_endpoint(f"http://127.0.0.1:{free_port()}", 3.0)
    assert problem == "connection refused"
    assert time.monotonic() - started < 2


def test_the_probe_asks_once_per_ttl_and_again_for_another_endpoint(monkeypatch):
    counting = CountingProbe("connection refused")
    probe = HubProbe(ttl=60, probe=counting)
    threads = [threading.Thread(target=probe.problem) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert probe.problem() == "connection refused" and len(counting.calls) == 1
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")
    probe.problem()
    assert counting.calls[-1] == "http://127.0.0.1:1" and len(counting.calls) == 2
    expired = HubProbe(ttl=0, probe=counting)
    expired.problem(), expired.problem()
    assert len(counting.calls) == 4


def test_unreachable_hub_and_empty_cache_fail_in_one_sentence_without_calling_the_loader(online_mode, monkeypatch):
    monkeypatch.setattr(hub_access, "cached_snapshot", lambda repo_id: None)
    monkeypatch.setattr("pipelines.manager.cached_snapshot", lambda repo_id: None)
    calls = []
    manager = ModelManager(
        CPU,
        loaders={"blip-caption": lambda *args: calls.append(args)},
        hub_probe=HubProbe(probe=CountingProbe("connection refused")),
    )
    with pytest.raises(ModelLoadError) as raised:
        manager.get("blip-caption")
    message = str(raised.value)
    assert message.startswith(f"This machine cannot reach the Hugging Face Hub at {constants.ENDPOINT}")
    assert "(connection refused)" in message and "Salesforce/blip-image-captioning-base" in message
    assert "--model blip-caption=DIR" in message and "HF_HUB_OFFLINE=1" in message and "--tiny" in message
    assert message.endswith(".") and re.search(r"[.:;]\s+[A-Z]", message) is None  # one sentence
    assert calls == [] and not manager.is_loaded("blip-caption")


def test_unreachable_hub_with_a_cached_copy_loads_from_the_cache(online_mode, monkeypatch, tmp_path):
    monkeypatch.setattr("pipelines.manager.cached_snapshot", lambda repo_id: str(tmp_path / repo_id))
    sources = []
    manager = ModelManager(
        CPU,
        loaders={"blip-caption": lambda source, runtime, variant: sources.append(source) or "model"},
        hub_probe=HubProbe(probe=CountingProbe("no answer within 3 s")),
    )
    assert manager.get("blip-caption") == "model"
    assert sources == [str(tmp_path / "Salesforce/blip-image-captioning-base")]


def test_a_reachable_hub_offline_mode_or_a_local_folder_loads_as_before(monkeypatch, tmp_path):
    sources = []
    probe = CountingProbe(None)
    loaders = {"blip-caption": lambda source, runtime, variant: sources.append(source) or "model"}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ModelManager(CPU, loaders=loaders, hub_probe=HubProbe(probe=probe)).get("blip-caption")
    assert probe.calls == []  # HF_HUB_OFFLINE=1: huggingface_hub reads its cache and asks nothing
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    ModelManager(CPU, loaders=loaders, hub_probe=HubProbe(probe=probe)).get("blip-caption")
    assert len(probe.calls) == 1 and sources == ["Salesforce/blip-image-captioning-base"] * 2
    folder = tmp_path / "blip"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    overridden = ModelManager(
        CPU, loaders=loaders, hub_probe=HubProbe(probe=probe), source_overrides={"blip-caption": str(folder)}
    )
    overridden.get("blip-caption")
    assert len(probe.calls) == 1 and sources[-1] == str(folder)


def test_hub_timeouts_are_set_unless_the_user_chose_them(monkeypatch):
    environ = {"HF_HUB_DOWNLOAD_TIMEOUT": "120"}
    monkeypatch.setattr(settings, "HUB_METADATA_TIMEOUT_SECONDS", 7)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", constants.DEFAULT_ETAG_TIMEOUT)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 120)
    set_hub_timeouts(environ)
    assert environ == {"HF_HUB_DOWNLOAD_TIMEOUT": "120", "HF_HUB_ETAG_TIMEOUT": "7"}
    assert constants.HF_HUB_ETAG_TIMEOUT == 7 and constants.HF_HUB_DOWNLOAD_TIMEOUT == 120
