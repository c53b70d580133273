"""The work root (pipelines/workspace), unique image names, --outputs, and the Generate tab's selection."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

from pipelines import workspace
from pipelines.sd3.png_metadata import read_png_settings
from pipelines.sd3.text_to_image import GenerateResult, save_images


@pytest.fixture(autouse=True)
def own_work_root(tmp_path, monkeypatch):
    """Each test gets a work root of its own under tmp_path (STUDIO_WORK_DIR)."""
    monkeypatch.setenv(workspace.WORK_DIR_ENV, str(tmp_path / "work"))
    monkeypatch.setattr(workspace, "_root", None)
    yield


def test_work_root_is_one_folder_per_process_under_studio_work_dir(tmp_path):
    root = workspace.work_root()
    assert root.parent == (tmp_path / "work").resolve() and root.name.startswith(f"{os.getpid()}-")
    assert workspace.work_root() == root
    assert workspace.session_folder("visitor").parent == workspace.sessions_root() == root / "sessions"
    assert workspace.datasets_root() == root / "datasets"


def test_a_killed_processs_root_is_removed_by_the_next_process(tmp_path, monkeypatch):
    base = tmp_path / "work"
    dead = base / "999999999-abc"  # beyond any pid this machine hands out
    alive = base / f"{os.getppid()}-abc"
    for folder in (dead, alive):
        (folder / "sessions").mkdir(parents=True)
    workspace.work_root()
    assert not dead.exists() and alive.exists()


def test_a_session_hash_never_becomes_a_path():
    for hostile in ("../../etc", "/tmp/x", "..", "a/b", ""):
        folder = workspace.session_folder(hostile)
        assert folder.parent == workspace.sessions_root()
        assert len(folder.name) == 32 and all(character in "0123456789abcdef" for character in folder.name)
    assert workspace.session_folder("a") != workspace.session_folder("b")


def test_request_folder_is_deleted_when_the_request_ends_even_on_error():
    with workspace.request_folder("visitor") as folder:
        (folder / "scratch.bin").write_bytes(b"x")
        assert folder.parent == workspace.session_folder("visitor")
    assert not folder.exists()
    with pytest.raises(RuntimeError), workspace.request_folder("visitor") as failed:
        raise RuntimeError("boom")
    assert not failed.exists()


def test_forget_session_and_sweep_delete_only_what_they_should():
    mine, other = workspace.session_folder("mine"), workspace.session_folder("other")
    (mine / "a.png").write_bytes(b"x")
    workspace.forget_session("mine")
    assert not mine.exists() and other.exists()
    old = time.time() - 7200
    os.utime(other, (old, old))
    fresh = workspace.session_folder("fresh")
    assert workspace.sweep(3600) == [other]
    assert fresh.exists() and not other.exists()


def test_unique_names_differ_for_the_same_stamp_model_and_seed():
    names = {workspace.unique_name("20250101-120000", "sd35-large", 42, suffix=".png") for _ in range(200)}
    assert len(names) == 200
    assert all(name.startswith("20250101-120000-sd35-large-42-") and name.endswith(".png") for name in names)


def test_exclusive_path_never_returns_an_existing_file(tmp_path):
    first = workspace.exclusive_path(tmp_path / "out", "a.png")
    first.write_bytes(b"first")
    second = workspace.exclusive_path(tmp_path / "out", "a.png")
    third = workspace.exclusive_path(tmp_path / "out", "a.png")
    assert [first.name, second.name, third.name] == ["a.png", "a-2.png", "a-3.png"]
    assert first.read_bytes() == b"first"


def _result(seed: int, prompt: str, colour: str) -> GenerateResult:
    from pipelines.sd3.text_to_image import GenerateRequest, resolve_request

    request = resolve_request(GenerateRequest(prompt=prompt, seed=seed, steps=2), tiny=True)
    return GenerateResult(
        images=[Image.new("RGB", (16, 16), colour)],
        seeds=[seed],
        parameters=[f"{prompt}\nSteps: 2, Seed: {seed}"],
        settings=[{"prompt": prompt, "seed": seed}],
        request=request,
        seconds=0.1,
        steps_done=2,
        stopped=False,
    )


def test_two_images_with_the_same_seed_in_the_same_second_keep_two_files_and_outputs_never_overwrites(tmp_path):
    outputs = tmp_path / "outputs"
    existing = outputs / "keep-me.png"
    outputs.mkdir()
    existing.write_bytes(b"an older file")
    first = save_images(_result(7, "alpha", "red"), workspace.session_folder("a"), outputs_dir=outputs)
    second = save_images(_result(7, "beta", "blue"), workspace.session_folder("b"), outputs_dir=outputs)
    assert first[0].name != second[0].name
    assert read_png_settings(first[0])[1]["prompt"] == "alpha" and read_png_settings(second[0])[1]["prompt"] == "beta"
    saved = sorted(path for path in outputs.iterdir() if path != existing)
    assert len(saved) == 2
    assert {read_png_settings(path)[1]["prompt"] for path in saved} == {"alpha", "beta"}
    assert existing.read_bytes() == b"an older file"


def test_outputs_adds_a_counter_when_a_name_is_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(workspace.secrets, "token_hex", lambda _: "00000000")  # force the same name twice
    outputs = tmp_path / "outputs"
    save_images(_result(7, "alpha", "red"), tmp_path / "s1", outputs_dir=outputs)
    save_images(_result(7, "beta", "blue"), tmp_path / "s2", outputs_dir=outputs)
    names = sorted(path.name for path in outputs.iterdir())
    assert len(names) == 2 and names[1].endswith("-00000000.png") and names[0].endswith("-00000000-2.png")
    prompts = {read_png_settings(path)[1]["prompt"] for path in outputs.iterdir()}
    assert prompts == {"alpha", "beta"}


def test_selection_is_an_index_into_the_servers_own_list(tmp_path):
    from components.generate import selected_image, selection_index

    shown = []
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
        shown.append(str(tmp_path / name))
    assert selection_index(1, shown) == 1
    assert selection_index([0], shown) == 0
    for hostile in ("/etc/passwd", {"image": {"path": "/etc/passwd"}}, 2, -1, True, 1.0, None):
        assert selection_index(hostile, shown) is None
    assert selected_image(shown, 1) == shown[1]
    assert selected_image(shown, None) == shown[0]  # nothing selected: the first image
    assert selected_image(shown, 9) == shown[0]
    assert selected_image([], 0) is None


def test_history_is_capped_and_keeps_only_the_sessions_own_files(tmp_path, monkeypatch):
    from components.generate import session_history
    from pipelines import settings

    monkeypatch.setattr(settings, "MAX_HISTORY_IMAGES", 3)
    folder = workspace.session_folder("visitor")
    outsider = tmp_path / "outsider.png"
    outsider.write_bytes(b"x")
    files = []
    for index in range(4):
        path = folder / f"{index}.png"
        path.write_bytes(b"x")
        files.append(str(path))
    history = session_history(files[:2], [str(outsider)], folder)
    assert history == files[:2] and outsider.exists()  # never listed, never deleted
    history = session_history(files[2:], history, folder)
    assert history == [files[2], files[3], files[0]]
    assert not Path(files[1]).exists()  # dropped off the history: deleted


def test_app_blocks_the_private_folders_and_sets_delete_cache(tiny_root, monkeypatch):
    import gradio as gr

    import app
    from pipelines import settings
    from pipelines.startup import build_studio

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs, blocks=self))
    app.main(["--tiny", "--tiny-dir", str(tiny_root), "--no-preload", "--port", "0"])
    blocked = launched["blocked_paths"]
    studio = build_studio(["--tiny", "--tiny-dir", str(tiny_root), "--no-preload"])
    for folder in (
        studio.lora_dir,
        studio.adapter_dir,
        studio.training_runs.runs_dir,
        workspace.datasets_root(),
        Path(app.__file__).resolve().parent / ".git",
    ):
        assert str(Path(folder).resolve()) in blocked
    assert all(Path(path).is_absolute() for path in blocked)
    # Session folders are not blocked: the app returns its own generated files from there.
    assert not any(workspace.sessions_root().is_relative_to(path) for path in blocked)
    assert launched["blocks"].delete_cache == settings.DELETE_CACHE
