"""pipelines/history: the saved images, indexed per owner, paged newest first, surviving a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines.history import LOCAL_OWNER, VISITORS_FOLDER, History, owner_digest
from pipelines.sd3.png_metadata import save_png


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def studio_settings(seed: int, mode: str = "txt2img", prompt: str = "a fox") -> dict:
    return {
        "prompt": prompt,
        "negative_prompt": "",
        "model_key": "sd35-large-turbo",
        "seed": seed,
        "steps": 4,
        "guidance": 0.0,
        "width": 16,
        "height": 16,
        "job": {"id": f"job{seed}", "mode": mode, "index": 0, "source": None},
    }


def save(history: History, owner: str, seed: int, mode: str = "txt2img", *, size: int = 16) -> tuple[Path, dict]:
    image_settings = studio_settings(seed, mode)
    path = history.folder_for(owner, mode) / f"image-{seed}.png"
    save_png(Image.new("RGB", (size, size), (seed % 256, 0, 0)), path, f"a fox\nSeed: {seed}", image_settings)
    return path, image_settings


@pytest.fixture()
def clock():
    return FakeClock()


@pytest.fixture()
def history(tmp_path, clock):
    return History(tmp_path / "outputs", clock=clock)


def test_the_local_owner_writes_where_a1111_does_and_a_visitor_under_a_digest(history, clock):
    local = history.folder_for(LOCAL_OWNER, "txt2img")
    day = local.name
    assert local == history.root / "txt2img-images" / day
    assert history.folder_for(LOCAL_OWNER, "inpaint") == history.root / "img2img-images" / day
    visitor = history.folder_for("secret-owner-key", "img2img")
    assert visitor == history.root / VISITORS_FOLDER / owner_digest("secret-owner-key") / "img2img-images" / day
    assert "secret-owner-key" not in str(visitor)  # the key never becomes a path
    with pytest.raises(ValueError, match="Unknown image mode"):
        history.folder_for(LOCAL_OWNER, "../../etc")


def test_pages_are_newest_first_and_each_owner_sees_only_their_own(history, clock):
    ids = []
    for seed in range(5):
        clock.now += 1
        path, image_settings = save(history, "alice", seed)
        ids.append(history.add("alice", path, image_settings).id)
    path, image_settings = save(history, "bob", 99)
    bobs = history.add("bob", path, image_settings)

    first = history.page("alice", page=0, per_page=2)
    assert [record.seed for record in first.records] == [4, 3] and first.total == 5 and first.pages == 3
    assert [record.seed for record in history.page("alice", page=2, per_page=2).records] == [0]
    assert history.page("alice", page=7, per_page=2).records == []
    assert [record.seed for record in history.page("bob").records] == [99]
    # Another owner's id is no record of this one's: neither read nor deleted.
    assert history.get("alice", bobs.id) is None and history.delete("alice", bobs.id) is False
    assert history.path(history.get("bob", bobs.id)).is_file()
    summary = history.get("alice", ids[0]).summary()
    assert summary["settings"]["seed"] == 0 and "file" not in summary and str(history.root) not in json.dumps(summary)


def test_an_image_outside_the_owners_folder_is_not_indexed(history, tmp_path):
    path, image_settings = save(history, "bob", 1)
    with pytest.raises(ValueError, match="outside its owner's folder"):
        history.add("alice", path, image_settings)
    stray = tmp_path / "stray.png"
    Image.new("RGB", (4, 4)).save(stray)
    with pytest.raises(ValueError, match="outside its owner's folder"):
        history.add(LOCAL_OWNER, stray, {})


def test_delete_and_forget_remove_the_files(history):
    path, image_settings = save(history, "alice", 1)
    record = history.add("alice", path, image_settings)
    assert history.delete("alice", record.id) is True and not path.exists()
    assert history.get("alice", record.id) is None
    paths = [save(history, "alice", seed)[0] for seed in range(3)]
    for path in paths:
        history.add("alice", path, {"seed": 0})
    kept, kept_settings = save(history, "bob", 7)
    history.add("bob", kept, kept_settings)
    assert history.forget("alice") == 3
    assert not any(path.exists() for path in paths) and history.page("alice").total == 0
    assert kept.exists() and history.page("bob").total == 1


def test_expiry_and_byte_caps_take_the_oldest_first(history, clock):
    for seed in range(4):
        clock.now += 3600
        path, image_settings = save(history, "alice", seed)
        history.add("alice", path, image_settings)
    clock.now += 1
    path, image_settings = save(history, "bob", 50)
    history.add("bob", path, image_settings)
    # 24 h after the last image, alice's are 27, 26, 25 and 24 h old: none past 28 h...
    clock.now += 24 * 3600
    assert history.expire(max_age_seconds=28 * 3600, owner_bytes=10**9, total_bytes=10**9) == 0
    # ...and the first two past 25.5 h.
    assert history.expire(max_age_seconds=25.5 * 3600, owner_bytes=10**9, total_bytes=10**9) == 2
    assert [record.seed for record in history.page("alice").records] == [3, 2]
    # A per-owner cap of one image's bytes keeps alice's newest only (and bob's one).
    newest, bobs = history.page("alice").records[0].bytes, history.page("bob").records[0].bytes
    assert history.expire(max_age_seconds=10**9, owner_bytes=max(newest, bobs), total_bytes=10**9) == 1
    assert [record.seed for record in history.page("alice").records] == [3]
    assert history.owner_bytes("alice") == newest and history.page("bob").total == 1
    # A total cap of bob's bytes keeps the newest image of all (bob's) and takes alice's older one.
    assert history.expire(max_age_seconds=10**9, owner_bytes=10**9, total_bytes=bobs) == 1
    assert history.page("alice").total == 0 and history.page("bob").total == 1


def test_a_restart_keeps_the_history_and_a_lost_index_is_rebuilt_from_the_pngs(tmp_path, clock):
    root = tmp_path / "outputs"
    history = History(root, clock=clock)
    local_path, local_settings = save(history, LOCAL_OWNER, 1, "img2img")
    history.add(LOCAL_OWNER, local_path, local_settings)
    visitor_path, visitor_settings = save(history, "alice", 2)
    history.add("alice", visitor_path, visitor_settings)
    history.close()

    again = History(root, clock=clock)  # a restart: the same index
    assert [record.seed for record in again.page(LOCAL_OWNER).records] == [1]
    again.close()

    (root / "history.sqlite3").unlink()  # the index is lost: the PNGs are the truth
    rebuilt = History(root, clock=clock)
    assert rebuilt.rebuild() == 2
    (local,) = rebuilt.page(LOCAL_OWNER).records
    assert local.mode == "img2img" and local.settings == local_settings
    assert [record.seed for record in rebuilt.page("alice").records] == [2]
    assert rebuilt.rebuild() == 0  # nothing new
    visitor_path.unlink()
    rebuilt.rebuild()
    assert rebuilt.page("alice").total == 0  # a file that is gone leaves the index
