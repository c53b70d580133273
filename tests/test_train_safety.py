"""Training on an app that strangers share (issue 15): two visitors, bad numbers, public mode, exit and restart.

Two ``gradio_client.Client`` objects against one app are two sessions, so two visitors.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from pipelines.tiny import tiny_lora_dir
from pipelines.training.runs import PID_FILE, _group_alive
from tests.app_server import free_port, tiny_app
from tests.test_train_blip_lora import make_dataset

pytestmark = [pytest.mark.api, pytest.mark.slow]  # background trainers and apps of their own

APP_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety-upload")
    folder = make_dataset(root / "dataset")
    archive = root / "dataset.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.iterdir()):
            zipped.write(path, f"dataset/{path.name}")
    return archive


def _start_long_run(client: Client, dataset_zip: Path, name: str) -> str:
    """A tiny SD3.5 run long enough to still be going when the test acts on it."""
    run_id, status, _ = client.predict(
        kind="sd3", files=[handle_file(str(dataset_zip))], name=name, model="large", steps=5000, rank=4,
        resolution=64, gradient_checkpointing=False, api_name="/train_start",
    )  # fmt: skip
    assert "running" in status
    return run_id


@contextlib.contextmanager
def _tiny_app(tiny_root: Path, lora_dir: Path, log_path: Path, *flags: str, environment: dict | None = None):
    """``python app.py --tiny`` on its own port and LoRA folder (so its runs folder is its own); yields (process, url)."""
    with tiny_app(
        tiny_root, log_path, "--lora-dir", str(lora_dir), "--no-preload", *flags, environment=environment
    ) as (
        process,
        url,
    ):
        yield process, url


def _trainer_pid(lora_dir: Path, run_id: str, timeout: float = 30) -> int:
    pid_file = lora_dir / ".runs" / run_id / PID_FILE
    deadline = time.monotonic() + timeout
    while not pid_file.exists():
        assert time.monotonic() < deadline, f"no PID file for {run_id}"
        time.sleep(0.1)
    return json.loads(pid_file.read_text())["pid"]


def _wait_gone(group: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_alive(group):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# -- two visitors on the shared app


def test_another_visitor_cannot_see_or_cancel_a_run(tiny_client, tiny_app_url, tiny_root, dataset_zip):
    alice, bob = tiny_client, Client(tiny_app_url, verbose=False)
    run_id = _start_long_run(alice, dataset_zip, "alices-run")
    try:
        secret = run_id.split("-sd3-")[0]
        assert len(secret) >= 16 and int(secret, 16) >= 0  # random, not a time stamp
        for call in (
            lambda: bob.predict(run_id, api_name="/train_status"),
            lambda: bob.predict(run_id, api_name="/train_cancel"),
            lambda: bob.predict(run_id, model="large", api_name="/train_load_result"),
        ):
            with pytest.raises(AppError, match="No such training run") as refused:
                call()
            assert "running" not in str(refused.value) and "step" not in str(refused.value)
        # Bob's own start is refused by the one-run limit, without alice's run id.
        with pytest.raises(AppError, match="already going") as busy:
            _start_long_run(bob, dataset_zip, "bobs-run")
        assert run_id not in str(busy.value)

        status, _, log, _ = alice.predict(run_id, api_name="/train_status")
        assert "running" in status  # bob's cancel did nothing
        first = log.splitlines()[0]
        assert "train_sd3_lora <dataset> <output>" in first and "--tiny-dir <models>" in first
        assert str(tiny_root) not in log and "/tmp/" not in log and APP_ROOT.as_posix() not in log
        # The dataset stays in the run's own folder while the run goes on.
        run_folder = tiny_lora_dir(tiny_root) / ".runs" / run_id
        assert (run_folder / "dataset" / "dataset" / "metadata.jsonl").is_file()
        assert (run_folder / PID_FILE).is_file()
    finally:
        assert "cancelled" in alice.predict(run_id, api_name="/train_cancel")
    assert not (run_folder / PID_FILE).exists()


@pytest.mark.parametrize(
    "field", ["steps", "rank", "learning_rate", "batch_size", "gradient_accumulation", "resolution", "validation_every"]
)
@pytest.mark.parametrize("value", ["inf", "1e400", "nan", -1, "abc", 10**400, "-inf"])
def test_every_bad_number_gets_one_sentence(tiny_client, field, value):
    with pytest.raises(AppError) as refused:
        tiny_client.predict(kind="sd3", name="numbers", **{field: value}, api_name="/train_start")
    message = str(refused.value)
    assert message.startswith(f"{field} must be"), message
    assert "Something went wrong" not in message and "convert" not in message


@pytest.mark.parametrize("value", ["inf", "nan", "1e400", -1, "abc"])
def test_bad_numbers_for_the_blip_trainer_too(tiny_client, value):
    for field in ("steps", "validation_split"):
        with pytest.raises(AppError, match=f"^{field} must be"):
            tiny_client.predict(kind="blip", name="numbers", **{field: value}, api_name="/train_start")


def test_a_refused_upload_leaves_nothing_in_the_runs_folder(tiny_client, tiny_root, tmp_path):
    runs_dir = tiny_lora_dir(tiny_root) / ".runs"
    before = set(runs_dir.iterdir()) if runs_dir.exists() else set()
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("a.png", b"not a png")
        archive.writestr("metadata.jsonl", '{"file_name": "a.png", "text": "a square"}\n')
    with pytest.raises(AppError, match="Fix metadata.jsonl before training") as refused:
        tiny_client.predict(kind="sd3", files=[handle_file(str(bad))], name="bad-upload", api_name="/train_start")
    assert str(runs_dir) not in str(refused.value)
    after = set(runs_dir.iterdir()) if runs_dir.exists() else set()
    assert after == before


# -- public mode


def _train_tab_app(studio):
    import gradio as gr

    from components.train import build_train_tab

    with gr.Blocks() as demo:
        build_train_tab(studio)
    return demo


def test_train_start_checks_one_dataset_at_a_time(tiny_manager, tmp_path):
    """Starts wait in Gradio's queue (holding no thread) while one dataset is checked; nothing else shares the slot."""
    from pipelines import settings
    from pipelines.studio import Studio

    demo = _train_tab_app(Studio(manager=tiny_manager, lora_dir=tmp_path / "loras"))
    events = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    start = events["train_start"]
    assert start.queue and start.concurrency_limit == 1 and start.concurrency_id == "train_start"
    assert [name for name, fn in events.items() if fn.concurrency_id == "train_start"] == ["train_start"]
    assert events["train_load_result"].concurrency_id == settings.GPU_CONCURRENCY_ID


@pytest.mark.parametrize("allowed", [False, True])
def test_public_mode_trains_only_when_the_operator_allows_it(tiny_manager, tmp_path, allowed):
    import gradio as gr

    from pipelines.studio import Studio

    studio = Studio(manager=tiny_manager, lora_dir=tmp_path / "loras", public=True, public_training=allowed)
    demo = _train_tab_app(studio)
    start_button = next(
        block for block in demo.blocks.values() if isinstance(block, gr.Button) and block.value == "Start training"
    )
    assert start_button.visible is allowed
    demo.queue().launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        expected = "Upload a dataset first" if allowed else "reserved for the operator"
        with pytest.raises(AppError, match=expected):
            client.predict(kind="sd3", name="public", resolution=64, api_name="/train_start")
    finally:
        demo.close()


# -- no trainer outlives the app


def test_sigterm_to_the_app_stops_its_trainer(tiny_root, tmp_path, dataset_zip):
    lora_dir = tmp_path / "loras"
    with _tiny_app(tiny_root, lora_dir, tmp_path / "app.log") as (app, url):
        run_id = _start_long_run(Client(url, verbose=False), dataset_zip, "until-sigterm")
        trainer = _trainer_pid(lora_dir, run_id)
        assert _group_alive(trainer)
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=20)
        try:
            assert _wait_gone(trainer, timeout=5), "the trainer's process group outlived the app"
        finally:
            if _group_alive(trainer):
                os.killpg(trainer, signal.SIGKILL)
    assert not (lora_dir / ".runs" / run_id / PID_FILE).exists()


def test_a_restarted_app_stops_the_trainer_a_killed_app_left(tiny_root, tmp_path, dataset_zip):
    """SIGKILL leaves no chance to clean up: the PID file lets the next app find and stop the survivor."""
    lora_dir = tmp_path / "loras"
    with _tiny_app(tiny_root, lora_dir, tmp_path / "app.log") as (app, url):
        run_id = _start_long_run(Client(url, verbose=False), dataset_zip, "survivor")
        trainer = _trainer_pid(lora_dir, run_id)
        app.kill()
        app.wait(timeout=20)
    try:
        time.sleep(1)
        assert _group_alive(trainer), "SIGKILL should have left the trainer running (the attack's setup)"
        with _tiny_app(tiny_root, lora_dir, tmp_path / "app.log", environment={"STUDIO_MAX_TRAININGS": "1"}) as (
            _,
            url,
        ):
            assert _wait_gone(trainer, timeout=10), "the restarted app left the survivor running"
            second = _start_long_run(Client(url, verbose=False), dataset_zip, "after-restart")  # the limit holds
            assert second != run_id
    finally:
        if _group_alive(trainer):
            os.killpg(trainer, signal.SIGKILL)
