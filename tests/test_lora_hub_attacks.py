"""Attacks on SD3.5 LoRA loading (security issue items 4, 7, 8 and the low ones), in-process.

The Hub ones run against a fake Hub on 127.0.0.1 (tests/fake_hub.py) through huggingface_hub's real
requests: CI is offline, and a monkeypatched HfApi would not show which requests carry the token.
The API-level ones (two visitors, public mode) are in tests/test_lora_api.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from pipelines import settings
from pipelines.hub_access import VisitorDownloads
from pipelines.lora.library import LoraLibrary
from pipelines.lora.sources import resolve_lora_source
from pipelines.runtime import choose_runtime
from pipelines.sd3.loading import load_sd3_pipeline
from pipelines.tiny import tiny_base_names, tiny_lora_dir, tiny_registry_path
from tests.fake_hub import OPERATOR_TOKEN, FakeHub, HubRepo

STYLE, MEDIUM = "tiny-large-style.safetensors", "tiny-medium-detail.safetensors"
MB = 1024 * 1024


@pytest.fixture(scope="module")
def pipeline(tiny_root):
    return load_sd3_pipeline(str(tiny_root / "sd35-large"), choose_runtime("cpu"), "bf16")


@pytest.fixture
def library(pipeline):
    library = LoraLibrary("sd35-large", known_bases=tiny_base_names(), public=True)
    yield library
    library.unload(pipeline)


def variant(tiny_root, index: int, file: str = STYLE) -> bytes:
    """A tiny LoRA's bytes with its factors scaled: each index is a different file."""
    tensors = {key: value * (1 + index / 10) for key, value in load_file(str(tiny_lora_dir(tiny_root) / file)).items()}
    return save(tensors)


def not_a_lora(size: int) -> bytes:
    """A safetensors file of ``size`` bytes holding one plain weight (a model shard, say): not a LoRA."""
    return save({"model.embed.weight": torch.zeros(size // 4, dtype=torch.float32)})


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def bytes_under(folder: Path) -> int:
    return sum(path.stat().st_size for path in files_under(folder))


@pytest.fixture
def downloads(tmp_path):
    return VisitorDownloads(
        tmp_path / "visitor-hub", per_client=settings.MAX_LORA_BYTES, total=4 * settings.MAX_LORA_BYTES
    )


# ----------------------------------------------------------------------------- 7. a private repo in the operator's cache


def test_a_private_repo_the_operator_downloaded_is_never_loaded_for_a_visitor(
    tiny_root, tmp_path, monkeypatch, downloads, library, pipeline
):
    from huggingface_hub import constants, hf_hub_download

    data = variant(tiny_root, 1)
    repos = {"operator/private-lora": HubRepo({"lora.safetensors": data}, private=True)}
    with FakeHub(repos) as hub:
        hub.point_huggingface_hub_here(monkeypatch)
        operator_cache = tmp_path / "operator-hf-cache"
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(operator_cache))
        # The operator downloads it once with their token: it sits in their Hugging Face cache.
        cached = hf_hub_download("operator/private-lora", "lora.safetensors", token=OPERATOR_TOKEN)
        assert Path(cached).read_bytes() == data and hub.requests[-1].authorized
        seen = len(hub.requests)
        # A visitor names it: the anonymous metadata call says "not found", and nothing is read or written.
        with pytest.raises(ValueError, match="There is no public LoRA repo 'operator/private-lora' on the Hub"):
            resolve_lora_source(
                repo="operator/private-lora", weight_name="lora.safetensors", client="addr:1.2.3.4", downloads=downloads
            )
        asked = hub.requests[seen:]
        assert [(item.method, item.path) for item in asked] == [("GET", "/api/models/operator/private-lora")]
        assert not any(item.authorized for item in asked)  # HF_TOKEN is set, and never sent for a visitor
    assert files_under(tmp_path / "visitor-hub") == [] and downloads.held() == 0
    assert library.names() == []


def test_a_public_repo_goes_to_the_visitor_cache_never_the_operators(tiny_root, tmp_path, monkeypatch, downloads):
    from huggingface_hub import constants

    with FakeHub({"someone/style": HubRepo({"style.safetensors": variant(tiny_root, 2)})}) as hub:
        hub.point_huggingface_hub_here(monkeypatch)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "operator-hf-cache"))
        source = resolve_lora_source(repo="someone/style", client="addr:1.2.3.4", downloads=downloads)
        assert source.path.is_relative_to(tmp_path / "visitor-hub") and source.kind == "hub"
        assert not any(item.authorized for item in hub.requests)
    assert files_under(tmp_path / "operator-hf-cache") == []
    assert downloads.held("addr:1.2.3.4") == len(variant(tiny_root, 2))
    source.download.release()
    assert files_under(tmp_path / "visitor-hub") == [] and downloads.held() == 0


# ----------------------------------------------------------------------------- 8. Hub disk fill


def test_five_repos_that_are_not_loras_for_this_model_write_nothing(
    tiny_root, tmp_path, monkeypatch, downloads, library, pipeline
):
    """Each is refused from its header (two ranged reads), before a byte of weights is written."""
    repos = {f"someone/big-{index}": HubRepo({"model.safetensors": not_a_lora(2 * MB + index)}) for index in range(4)}
    repos["someone/medium-lora"] = HubRepo({"lora.safetensors": variant(tiny_root, 1, MEDIUM)})  # for another model
    check = lambda header, label: library.check_header(pipeline, header, label)  # noqa: E731
    with FakeHub(repos) as hub:
        hub.point_huggingface_hub_here(monkeypatch)
        for repo in repos:
            with pytest.raises(ValueError) as refused:
                resolve_lora_source(repo=repo, client="addr:1.2.3.4", downloads=downloads, check_header=check)
            wanted = "was made for" if "medium" in repo else "holds no LoRA weights"
            assert wanted in str(refused.value), str(refused.value)
        assert hub.full_downloads() == []  # only ranged header reads
        assert hub.downloaded_bytes() <= 5 * 100_001  # the first 100 kB at most, of 2 MB files
    assert bytes_under(tmp_path / "visitor-hub") == 0 and downloads.held() == 0


def test_visitor_downloads_are_capped_per_client_and_in_all_and_leave_no_file(
    tiny_root, tmp_path, monkeypatch, library, pipeline
):
    sizes = [len(variant(tiny_root, index)) for index in range(1, 6)]
    ledger = VisitorDownloads(tmp_path / "visitor-hub", per_client=2 * max(sizes), total=3 * max(sizes))
    repos = {
        f"someone/style-{index}": HubRepo({"style.safetensors": variant(tiny_root, index)}) for index in range(1, 6)
    }
    with FakeHub(repos) as hub:
        hub.point_huggingface_hub_here(monkeypatch)

        def load(repo, client, visitor):
            source = resolve_lora_source(repo=repo, client=client, downloads=ledger)
            return library.load(pipeline, source, visitor=visitor)

        first = load("someone/style-1", "addr:1.1.1.1", "alice")
        load("someone/style-2", "addr:1.1.1.1", "alice-second-tab")  # another session, the same client
        assert bytes_under(tmp_path / "visitor-hub") == 0  # loaded: the weights are in memory, no file stays
        assert ledger.held("addr:1.1.1.1") == sizes[0] + sizes[1]
        downloads_before = len(hub.full_downloads())
        with pytest.raises(
            ValueError, match=r"would take the Hub LoRAs you keep loaded past .*unload one of them first"
        ):
            load("someone/style-3", "addr:1.1.1.1", "alice-third-tab")  # a new session hash does not escape the cap
        assert len(hub.full_downloads()) == downloads_before  # refused before the download
        load("someone/style-3", "addr:2.2.2.2", "bob")
        with pytest.raises(ValueError, match="this instance keeps for them .*try again later"):
            load("someone/style-4", "addr:3.3.3.3", "carol")
        # Unloading gives the bytes back.
        library.unload(pipeline, first.name, visitor="alice")
        assert ledger.held("addr:1.1.1.1") == sizes[1]
        load("someone/style-4", "addr:3.3.3.3", "carol")
        # Eviction does too: with all slots full, the least recently used visitor entry goes, with its charge.
        monkeypatch.setattr(settings, "MAX_LOADED_LORAS", 3)
        ledger.total = 4 * max(sizes)  # the total cap is checked before the download, eviction after it
        load("someone/style-5", "addr:4.4.4.4", "dave")
        assert sorted(entry.owner for entry in library.loaded()) == ["bob", "carol", "dave"]
        assert ledger.held("addr:1.1.1.1") == 0 and ledger.held() == sizes[2] + sizes[3] + sizes[4]
    assert files_under(tmp_path / "visitor-hub") == []


# ----------------------------------------------------------------------------- 4. one visitor locks every shared slot


def test_one_file_under_eight_names_is_one_entry_and_a_visitors_registry_load_is_theirs(
    tiny_root, library, pipeline, monkeypatch
):
    from pipelines.lora.sources import load_registry

    registry = load_registry(tiny_registry_path(tiny_root))
    name = next(iter(registry))
    source = resolve_lora_source(registry_name=name, registry=registry)
    answers = {
        library.load(pipeline, source, name=f"name {index}" if index else None, visitor="mallory").name
        for index in range(8)
    }
    assert answers == {name} and len(library.loaded()) == 1  # the first load's name answers every other
    assert library.loaded()[0].owner == "mallory"  # a visitor's registry load fills their slots, not the shared ones
    # Another visitor gets their own entry under the same name (nothing tells them mallory has one).
    assert library.load(pipeline, source, visitor="victim").name == name
    assert [entry.owner for entry in library.loaded()] == ["mallory", "victim"]


def test_a_shared_lora_nobody_used_for_a_while_makes_room(tiny_root, tmp_path, pipeline, monkeypatch):
    now = [0.0]
    library = LoraLibrary("sd35-large", known_bases=tiny_base_names(), public=True)
    library._slots._clock = lambda: now[0]  # the idle time is read from this clock
    monkeypatch.setattr(settings, "MAX_LOADED_LORAS", 2)
    folder = tmp_path / "loras"
    folder.mkdir()
    for index in range(3):
        (folder / f"shared-{index}.safetensors").write_bytes(variant(tiny_root, index))
    try:
        first = library.load(pipeline, resolve_lora_source(file="shared-0.safetensors", lora_dir=folder), visitor="op")
        second = library.load(pipeline, resolve_lora_source(file="shared-1.safetensors", lora_dir=folder), visitor="op")
        assert (first.owner, second.owner) == (None, None)  # the operator's folder: shared
        upload = tmp_path / "upload.safetensors"
        upload.write_bytes(variant(tiny_root, 7))
        with pytest.raises(ValueError, match="none is a visitor's own or a shared one idle long enough"):
            library.load(pipeline, resolve_lora_source(upload=upload), visitor="alice")
        now[0] += settings.SHARED_LORA_IDLE_SECONDS - 1
        library.apply(pipeline, [(second.name, 1.0)], visitor="bob")  # bob draws with the second one
        now[0] += 2  # the first is idle past the limit now; the second is not
        mine = library.load(pipeline, resolve_lora_source(upload=upload), visitor="alice")
        assert library.names() == [second.name, mine.name]
    finally:
        library.unload(pipeline)


# ----------------------------------------------------------------------------- the low ones


def test_another_visitors_private_name_looks_free(tiny_root, tmp_path, library, pipeline):
    upload = tmp_path / "a.safetensors"
    upload.write_bytes(variant(tiny_root, 1))
    library.load(pipeline, resolve_lora_source(upload=upload), name="secret_style", visitor="alice")
    other = tmp_path / "b.safetensors"
    other.write_bytes(variant(tiny_root, 2))
    bobs = library.load(pipeline, resolve_lora_source(upload=other), name="secret_style", visitor="bob")
    assert bobs.name == "secret_style" and library.names("bob") == ["secret_style"]
    # And bob's own name is taken for bob: that sentence is about his own LoRA.
    with pytest.raises(ValueError, match="'secret_style' is already loaded"):
        third = tmp_path / "c.safetensors"
        third.write_bytes(variant(tiny_root, 3))
        library.load(pipeline, resolve_lora_source(upload=third), name="secret_style", visitor="bob")


def test_the_list_shows_a_visitor_only_their_own_weights(tiny_root, tmp_path, pipeline):
    library = LoraLibrary("sd35-large", known_bases=tiny_base_names())
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(tiny_lora_dir(tiny_root) / STYLE, folder / STYLE)
    try:
        shared = library.load(pipeline, resolve_lora_source(file=STYLE, lora_dir=folder))
        library.apply(pipeline, [(shared.name, 0.7)], visitor="alice")
        assert [row[1] for row in library.list("alice")] == [0.7]
        assert [row[1] for row in library.list("bob")] == [""]  # what alice drew with is not bob's to see
    finally:
        library.unload(pipeline)


def test_a_missing_file_names_no_server_path_and_lists_nothing(tiny_root, tmp_path):
    folder = tmp_path / "operator-secret-folder"
    folder.mkdir()
    shutil.copy(tiny_lora_dir(tiny_root) / STYLE, folder / "private-client-work.safetensors")
    with pytest.raises(ValueError) as missing:
        resolve_lora_source(file="x.safetensors", lora_dir=folder)
    sentence = str(missing.value)
    assert sentence.startswith("There is no 'x.safetensors' in the LoRA folder")
    assert str(tmp_path) not in sentence and "private-client-work" not in sentence
    for name in ("/etc/x.safetensors", "../x.safetensors"):
        with pytest.raises(ValueError) as refused:
            resolve_lora_source(file=name, lora_dir=folder)
        assert str(tmp_path) not in str(refused.value)


# ----------------------------------------------------------------------------- the LoRA panel's Hub path


def test_the_panel_checks_a_visitors_repo_against_the_model_before_downloading(
    tiny_manager, tiny_root, tmp_path, monkeypatch
):
    from components.lora_panel import load_hub_lora, names_a_hub_repo
    from pipelines import hub_access
    from pipelines.studio import Studio

    ledger = VisitorDownloads(tmp_path / "visitor-hub", per_client=10 * MB, total=20 * MB)
    monkeypatch.setattr(hub_access, "_visitor_downloads", ledger)  # the process's ledger, for this test
    studio = Studio(tiny_manager, lora_dir=tmp_path / "loras", runs_dir=tmp_path / "runs", public=True)
    studio.sd3_loras["sd35-large"].public = True  # as build_lora_panel sets it
    assert names_a_hub_repo(studio, "someone/style") and not names_a_hub_repo(studio, "tiny_large_style")
    assert not names_a_hub_repo(studio, "someone/x.bin")  # a pickle by name: the folder's refusal
    repos = {
        "someone/medium-lora": HubRepo({"lora.safetensors": variant(tiny_root, 1, MEDIUM)}),
        "someone/style": HubRepo({"style.safetensors": variant(tiny_root, 4)}),
    }
    with FakeHub(repos) as hub:
        hub.point_huggingface_hub_here(monkeypatch)
        with pytest.raises(ValueError, match="was made for a 48-wide"):
            load_hub_lora(studio, "sd35-large", "someone/medium-lora", client="addr:5.5.5.5", visitor="eve")
        assert hub.full_downloads() == []
        loaded = load_hub_lora(studio, "sd35-large", "someone/style", client="addr:5.5.5.5", visitor="eve")
        library = studio.sd3_loras["sd35-large"]
        try:
            assert (loaded.owner, loaded.kind) == ("eve", "hub") and library.names("mallory") == []
            assert ledger.held("addr:5.5.5.5") == len(variant(tiny_root, 4))
            assert not any(item.authorized for item in hub.requests)
        finally:
            library.unload(studio.generation.pipeline("sd35-large"), visitor="eve")
    assert ledger.held() == 0 and files_under(tmp_path / "visitor-hub") == []
