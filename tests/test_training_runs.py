"""Training uploads become a checked imagefolder; runs start, report loss and cancel as process groups."""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from pipelines.training.dataset import METADATA_FILE, TrainingDataError, read_dataset
from pipelines.training.runs import LOSS_LINE, TrainingRuns, run_name, unpack_training_upload


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), colour).save(path)
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _png_bytes(colour) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_batch_export_zip_with_folder_becomes_the_dataset_root(tmp_path):
    metadata = "".join(
        json.dumps({"file_name": name, "text": text}) + "\n"
        for name, text in [("red.png", "a red square"), ("sub/blue.png", "a blue square")]
    )
    upload = _zip(
        tmp_path / "export.zip",
        {
            "data/red.png": _png_bytes((255, 0, 0)),
            "data/sub/blue.png": _png_bytes((0, 0, 255)),
            "data/metadata.jsonl": metadata.encode(),
            "data/captions.csv": b"ignored",
        },
    )
    root = unpack_training_upload([upload], tmp_path / "work")
    assert root == tmp_path / "work" / "data"
    examples = read_dataset(root)
    assert [(example.file_name, example.text) for example in examples] == [
        ("red.png", "a red square"),
        ("sub/blue.png", "a blue square"),
    ]
    assert examples[1].load().getpixel((0, 0)) == (0, 0, 255)


def test_kohya_sidecars_are_turned_into_metadata(tmp_path):
    red = _png(tmp_path / "in" / "red.png", (255, 0, 0))
    green = _png(tmp_path / "in" / "green.png", (0, 255, 0))
    (tmp_path / "in" / "red.txt").write_text("sks square, red\n")
    (tmp_path / "in" / "green.txt").write_text("  ")  # empty caption: this image is left out
    root = unpack_training_upload(
        [red, green, tmp_path / "in" / "red.txt", tmp_path / "in" / "green.txt"], tmp_path / "w"
    )
    lines = [json.loads(line) for line in (root / METADATA_FILE).read_text().splitlines()]
    assert lines == [{"file_name": "red.png", "text": "sks square, red"}]


def test_two_images_with_one_sidecar_are_refused_by_name(tmp_path):
    upload = tmp_path / "set.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for name, colour in (("cat.png", (255, 0, 0)), ("cat.jpg", (0, 255, 0))):
            image = _png(tmp_path / "in" / name.replace(".", "_") / "x.png", colour)
            archive.write(image, name)
        archive.writestr("cat.txt", "sks cat")
    with pytest.raises(ValueError, match=r"cat\.jpg and cat\.png would both be captioned by cat\.txt; rename one"):
        unpack_training_upload([upload], tmp_path / "w")
    # With metadata.jsonl naming each image, the same files are a valid dataset.
    with zipfile.ZipFile(upload, "a") as archive:
        archive.writestr(
            METADATA_FILE,
            "".join(json.dumps({"file_name": name, "text": f"sks {name}"}) + "\n" for name in ("cat.jpg", "cat.png")),
        )
    root = unpack_training_upload([upload], tmp_path / "w2")
    assert len((root / METADATA_FILE).read_text().splitlines()) == 2


def test_upload_without_captions_is_refused(tmp_path):
    image = _png(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(ValueError, match="no captions"):
        unpack_training_upload([image], tmp_path / "w")


def test_bad_metadata_in_upload_is_named_before_any_run(tmp_path):
    upload = _zip(
        tmp_path / "bad.zip",
        {"a.png": _png_bytes((9, 9, 9)), METADATA_FILE: b'{"file_name": "a.png", "text": ""}\n{"text": "x"}\n'},
    )
    with pytest.raises(TrainingDataError) as caught:
        unpack_training_upload([upload], tmp_path / "w")
    assert "line 1: 'a.png' has an empty text" in str(caught.value)
    assert "line 2 has no file_name" in str(caught.value)


def test_zip_slip_in_caption_files_is_refused(tmp_path):
    upload = _zip(tmp_path / "evil.zip", {"a.png": _png_bytes((0, 0, 0)), "../metadata.jsonl": b"{}"})
    with pytest.raises(ValueError, match="zip-slip"):
        unpack_training_upload([upload], tmp_path / "w")
    assert not (tmp_path / "metadata.jsonl").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("My Style!", "my-style"), ("pixel_art v2", "pixel_art-v2"), ("ok", "ok")],
)
def test_run_names_are_safe_folder_names(text, expected):
    assert run_name(text) == expected


@pytest.mark.parametrize("text", ["", "../..", "///", "★"])
def test_unusable_run_names_are_refused(text):
    with pytest.raises(ValueError, match="cannot name a training run"):
        run_name(text)


@pytest.mark.parametrize(
    ("line", "step", "total", "loss"),
    [
        ("step 40/200  loss 0.1234  lr 1.0e-04", 40, 200, 0.1234),
        ("step=7 loss=1.5e-02", 7, None, 0.015),
        ("[train] Step 3 / 10 | loss: 2.5", 3, 10, 2.5),
    ],
)
def test_loss_lines_are_parsed(line, step, total, loss):
    match = LOSS_LINE.search(line)
    assert int(match.group(1)) == step
    assert (int(match.group(2)) if match.group(2) else None) == total
    assert float(match.group(3)) == pytest.approx(loss)


def test_a_run_reports_its_loss_curve_and_cancel_stops_its_process_group(tmp_path, monkeypatch):
    """A stand-in trainer module (a real subprocess) prints loss lines, spawns a child, then waits."""
    package = tmp_path / "fake_trainers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "slow.py").write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('child', child.pid, flush=True)\n"
        "for step in range(1, 4):\n"
        "    print(f'step {step}/100 loss {1.0 / step:.4f}', flush=True)\n"
        "time.sleep(120)\n"
    )
    monkeypatch.setitem(sys.modules["pipelines.training.runs"].TRAINER_MODULES, "sd3", "fake_trainers.slow")
    runs = TrainingRuns(tmp_path / "runs", environment={"PYTHONPATH": str(tmp_path)})
    run = runs.start("sd3", ["--x", "1"], tmp_path / "out", name="fake")
    deadline = time.monotonic() + 30
    while run.status().step < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    status = run.status()
    assert status.state == "running"
    assert status.losses == [(1, 1.0), (2, 0.5), (3, pytest.approx(0.3333))]
    assert status.total_steps == 100
    with pytest.raises(ValueError, match="already going"):
        runs.start("sd3", [], tmp_path / "out2")
    child_pid = int(next(line for line in run.log_path.read_text().splitlines() if line.startswith("child")).split()[1])

    run.cancel()
    assert run.status().state == "cancelled"
    deadline = time.monotonic() + 10
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child_pid), "the trainer's child process outlived the cancel"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def _finished_run(studio, kind: str, name: str, owner: str, options: dict | None = None):
    """A run of ``studio`` that has finished (its process exited 0), with an empty output folder of its own."""
    import subprocess

    from pipelines.training.runs import TrainingRun, new_run_id

    runs = studio.training_runs
    run_id = new_run_id(kind, name)
    output = runs.output_folder(run_id)
    output.mkdir(parents=True)
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    run = TrainingRun(
        run_id, kind, [], output, runs.run_folder(run_id) / "trainer.log", process, owner=owner,
        folder=runs.run_folder(run_id), name=name, options=dict(options or {}),
    )  # fmt: skip
    runs._runs[run_id] = run
    return run


def test_a_finished_sd3_run_loads_as_its_owners_own_lora(tiny_manager, tiny_root, tmp_path, monkeypatch):
    """The LoRA stays in the run's folder (``--lora-dir loras``, relative, the default, gets nothing) and loads
    as alice's own entry: bob neither lists, draws with nor unloads it, and cannot name its file."""
    import shutil

    from pipelines.lora.sources import list_lora_files
    from pipelines.studio import Studio
    from pipelines.tiny import tiny_lora_dir

    monkeypatch.chdir(tmp_path)
    studio = Studio(manager=tiny_manager, lora_dir=Path("loras"))
    run = _finished_run(studio, "sd3", "my-run", "alice", {"model": "large", "trigger": "sks"})
    lora_file = run.output_dir / "pytorch_lora_weights.safetensors"
    shutil.copy(tiny_lora_dir(tiny_root) / "tiny-large-style.safetensors", lora_file)

    loaded = studio.load_training_result(run, model="large")
    assert "LoRA **my_run** is loaded on Stable Diffusion 3.5 Large" in loaded.sentence
    assert "trigger word `sks`" in loaded.sentence and "called 'my_run'" in loaded.sentence  # the renaming, aloud
    assert loaded.as_dict() == {
        "kind": "sd3", "name": "my_run", "model": "large", "trigger_words": ["sks"], "weight": 1.0,
    }  # fmt: skip
    library = studio.sd3_loras["sd35-large"]
    entry = library.get("my_run", visitor="alice")
    assert (entry.owner, entry.source, entry.trigger_words) == ("alice", "run:my-run", ("sks",))
    # Loading it again is the same entry, not a second one.
    assert studio.load_training_result(run, model="large").name == "my_run" and library.names("alice") == ["my_run"]
    # Bob: not listed, not usable, not removable; the shared folder holds nothing of it, by any name.
    assert library.names("bob") == [] and library.list("bob") == []
    with pytest.raises(ValueError, match="my_run"):
        library.parse_selection("my_run", visitor="bob")
    pipeline = studio.sd3_pipeline("sd35-large")
    with pytest.raises(ValueError):
        library.unload(pipeline, "my_run", visitor="bob", shared=False)
    assert list_lora_files(studio.lora_dir) == [] and studio.find_lora("my-run") is None
    relative = lora_file.relative_to(studio.lora_dir).as_posix()  # .runs/<run id>/output/...
    with pytest.raises(ValueError, match="hidden folder"):
        studio.lora_source(relative)
    # Alice unloads her own entry; the file stays with the run.
    library.unload(pipeline, "my_run", visitor="alice", shared=False)
    assert library.names() == [] and lora_file.is_file()
    empty = _finished_run(studio, "sd3", "empty", "alice", {"model": "large"})
    with pytest.raises(ValueError, match="left no .safetensors LoRA"):
        studio.load_training_result(empty, model="large")


def test_a_finished_blip_run_loads_as_its_owners_own_adapter(tiny_manager, tiny_root, tmp_path):
    import shutil

    from pipelines.blip.tiny_adapter import ensure_tiny_demo_adapter
    from pipelines.studio import Studio

    studio = Studio(manager=tiny_manager, lora_dir=tmp_path / "loras", blip_adapter_dir=tmp_path / "adapters")
    run = _finished_run(studio, "blip", "alices-words", "alice")
    demo = ensure_tiny_demo_adapter(tmp_path / "made", tiny_root / "blip-caption")
    for file in demo.iterdir():
        shutil.copy(file, run.output_dir / file.name)

    loaded = studio.load_training_result(run)
    adapters = studio.blip_adapters
    assert loaded.as_dict()["name"] == "alices-words" and adapters.names("alice") == ["alices-words"]
    listed = adapters.describe("alice")["loaded"]
    assert [(entry["kind"], entry["shared"], entry["source"]) for entry in listed] == [
        ("run", False, "run:alices-words")
    ]
    assert studio.load_training_result(run).name == "alices-words" and len(adapters.names("alice")) == 1
    # Bob: not listed, not usable, not removable, not loadable by a folder name.
    assert adapters.names("bob") == [] and adapters.describe("bob")["loaded"] == []
    assert adapters.available() == []
    with pytest.raises(ValueError, match="No BLIP adapter named 'alices-words' is loaded"):
        adapters.use("alices-words", "bob")
    with pytest.raises(ValueError, match="No BLIP adapter named 'alices-words' is loaded"):
        adapters.remove(studio.captioner(), "alices-words", visitor="bob", shared=False)
    for name in ("alices-words", run.run_id, f"../loras/.runs/{run.run_id}/output"):
        with pytest.raises(ValueError):
            studio.load_blip_adapter(name, visitor="bob")
    # Alice removes her own; the run keeps its files.
    adapters.remove(studio.captioner(), "alices-words", visitor="alice", shared=False)
    assert adapters.names() == [] and (run.output_dir / "adapter_model.safetensors").is_file()


# -- safety: ownership, paths, survivors, one dataset check at a time (issue 15)


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    """``TrainingRuns`` whose sd3 trainer is a stand-in module: prints its arguments and a loss, then waits."""
    package = tmp_path / "fake_trainers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "waits.py").write_text(
        "import sys, time\n"
        "print('arguments', *sys.argv[1:], flush=True)\n"
        "print(f'File \"{__file__}\", line 1', flush=True)\n"
        "print('step 1/10 loss 0.5', flush=True)\n"
        "time.sleep(120)\n"
    )
    monkeypatch.setitem(sys.modules["pipelines.training.runs"].TRAINER_MODULES, "sd3", "fake_trainers.waits")
    runs = TrainingRuns(tmp_path / "runs", environment={"PYTHONPATH": str(tmp_path)})
    yield runs
    runs.cancel_all(grace=2)


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_run_ids_are_random_and_end_with_the_readable_name():
    from pipelines.training.runs import new_run_id

    ids = {new_run_id("sd3", "My Style") for _ in range(50)}
    assert len(ids) == 50
    for run_id in ids:
        secret, kind, name = run_id.split("-", 2)
        assert (kind, name) == ("sd3", "my-style")
        assert len(secret) >= 16 and int(secret, 16) >= 0  # at least 64 random bits, not a time stamp
    assert not any(time.strftime("%Y%m%d") in run_id for run_id in ids)


def test_another_owner_is_told_there_is_no_such_run(fake_trainer, tmp_path):
    run = fake_trainer.start("sd3", ["--x"], tmp_path / "out", name="mine", owner="alice")
    assert fake_trainer.get(run.run_id, "alice") is run
    with pytest.raises(ValueError, match="No such training run") as other:
        fake_trainer.get(run.run_id, "bob")
    with pytest.raises(ValueError, match="No such training run") as unknown:
        fake_trainer.get(run.run_id.replace(run.run_id[:4], "0000"), "bob")
    # The same sentence as for an id that never existed: nothing about the run, its state or its log.
    assert str(other.value).replace(run.run_id, "ID") == str(unknown.value).replace(
        run.run_id.replace(run.run_id[:4], "0000"), "ID"
    )
    assert fake_trainer.runs("bob") == [] and fake_trainer.runs("alice") == [run]
    # The one-run limit tells bob to wait without naming alice's run.
    with pytest.raises(ValueError, match="already going") as refused:
        fake_trainer.start("sd3", [], tmp_path / "out2", owner="bob")
    assert run.run_id not in str(refused.value)
    with pytest.raises(ValueError, match=f"yours: {run.run_id}"):
        fake_trainer.start("sd3", [], tmp_path / "out2", owner="alice")


def test_the_log_tail_shows_placeholders_not_server_paths(fake_trainer, tmp_path):
    dataset = tmp_path / "secret-datasets" / "faces"
    run = fake_trainer.start(
        "sd3",
        [dataset, tmp_path / "loras" / "mine", "--tiny-dir", "/opt/private/models", "--note=/home/op/x"],
        tmp_path / "loras" / "mine",
        name="mine",
        placeholders={dataset: "<dataset>"},
    )
    _wait_for(lambda: run.status().step == 1)
    tail = run.status().log_tail
    assert "<dataset> <output> --tiny-dir <path> --note=<path>" in tail
    assert 'File "<path>/waits.py", line 1' in tail  # a traceback keeps the file name
    assert str(tmp_path) not in tail and "/opt/private" not in tail and "/home/op" not in tail
    assert str(tmp_path) in run.log_path.read_text()  # the operator's log on disk keeps everything


def test_a_survivor_of_an_earlier_app_is_stopped_and_the_limit_holds(fake_trainer, tmp_path):
    """An app killed without cleanup leaves a trainer and its PID file; the next app's runs stop it."""
    from pipelines.training.runs import PID_FILE, _command_line

    run = fake_trainer.start("sd3", [], tmp_path / "out", name="orphan")
    # A survivor has long been running; right after its start the child may not have exec'd yet
    # (its /proc cmdline is still empty), so wait until it is the trainer it will be found as.
    _wait_for(lambda: "fake_trainers.waits" in _command_line(run.process.pid), timeout=30)
    pid_file = run.folder / PID_FILE
    record = json.loads(pid_file.read_text())
    assert record["pid"] == run.process.pid and record["module"] == "fake_trainers.waits"
    # The app that started it is alive (this process): a second app on the folder leaves it alone.
    assert TrainingRuns(tmp_path / "runs").survivors_stopped == []
    assert run.process.poll() is None
    # Now pretend that app has died: its pid no longer belongs to the process that wrote the file.
    pid_file.write_text(json.dumps({**record, "app_started": record["app_started"] + 1}))
    restarted = TrainingRuns(tmp_path / "runs", environment={"PYTHONPATH": str(tmp_path)})
    assert restarted.survivors_stopped == [run.process.pid]
    _wait_for(lambda: run.process.poll() is not None, timeout=10)
    assert not pid_file.exists()
    started = restarted.start("sd3", [], tmp_path / "out", name="next")  # the limit of 1 holds: room again
    restarted.cancel_all(grace=2)
    assert started.status().state == "cancelled"


def test_a_reused_pid_is_never_killed(tmp_path):
    """A PID file whose pid now belongs to another program (or started at another time) is dropped, not acted on."""
    import subprocess

    from pipelines.training.runs import PID_FILE, _start_time

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        folder = tmp_path / "runs" / "abc-sd3-x"
        folder.mkdir(parents=True)
        record = {"pid": bystander.pid, "module": "pipelines.training.train_sd3_lora", "app_pid": 999_999_999}
        record.update(started=_start_time(bystander.pid), app_started=1)  # same start: the module must match too
        (folder / PID_FILE).write_text(json.dumps(record))
        (tmp_path / "runs" / "broken-sd3-y").mkdir()
        (tmp_path / "runs" / "broken-sd3-y" / PID_FILE).write_text("not json")
        assert TrainingRuns(tmp_path / "runs").survivors_stopped == []
        assert bystander.poll() is None
        assert not (folder / PID_FILE).exists() and not (tmp_path / "runs" / "broken-sd3-y" / PID_FILE).exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_refused_dataset_leaves_nothing_behind_and_names_no_server_path(fake_trainer, tmp_path):
    upload = _zip(
        tmp_path / "bad.zip",
        {"data/a.png": _png_bytes((9, 9, 9)), f"data/{METADATA_FILE}": b'{"file_name": "a.png", "text": ""}\n'},
    )
    with pytest.raises(ValueError, match="has an empty text") as refused:
        fake_trainer.start_with_dataset("sd3", [upload], tmp_path / "out", lambda dataset: [], name="bad")
    assert str(fake_trainer.runs_dir) not in str(refused.value)
    assert f"Fix data/{METADATA_FILE} before training" in str(refused.value)
    assert not fake_trainer.runs_dir.exists() or list(fake_trainer.runs_dir.iterdir()) == []

    def bad_settings(dataset):
        raise ValueError("steps must be a whole number between 1 and 100000, not 'inf'.")

    good = _zip(tmp_path / "good.zip", {"a.png": _png_bytes((1, 1, 1)), "a.txt": b"a grey square"})
    with pytest.raises(ValueError, match="steps must be"):
        fake_trainer.start_with_dataset("sd3", [good], tmp_path / "out", bad_settings, name="bad")
    assert not fake_trainer.runs_dir.exists() or list(fake_trainer.runs_dir.iterdir()) == []


def test_a_started_run_keeps_its_dataset_in_its_own_folder(fake_trainer, tmp_path):
    good = _zip(tmp_path / "good.zip", {"a.png": _png_bytes((1, 1, 1)), "a.txt": b"a grey square"})
    seen = []
    run = fake_trainer.start_with_dataset(
        "sd3", [good], tmp_path / "out", lambda dataset: seen.append(dataset) or [dataset], name="kept", owner="ann"
    )
    assert run.owner == "ann" and run.folder == fake_trainer.runs_dir / run.run_id
    assert seen[-1] == run.folder / "dataset" and (run.folder / "dataset" / METADATA_FILE).is_file()
    assert run.log_path.parent == run.folder
    _wait_for(lambda: run.status().step == 1)
    assert "arguments <dataset>" in run.status().log_tail


def test_dataset_checks_run_one_at_a_time_outside_the_callers_thread(fake_trainer, tmp_path, monkeypatch):
    import threading

    module = sys.modules["pipelines.training.runs"]
    active, most, threads = [0], [0], set()
    entered = threading.Event()

    def slow_unpack(paths, work_dir):
        threads.add(threading.current_thread().name)
        active[0] += 1
        most[0] = max(most[0], active[0])
        entered.set()
        time.sleep(0.3)
        active[0] -= 1
        return Path(work_dir)

    monkeypatch.setattr(module, "unpack_training_upload", slow_unpack)
    workers = [threading.Thread(target=fake_trainer.check_dataset, args=([], tmp_path / f"w{i}")) for i in range(3)]
    for worker in workers:
        worker.start()
    entered.wait(5)
    with pytest.raises(ValueError, match="Another training dataset is being checked"):
        fake_trainer.check_dataset([], tmp_path / "impatient", wait=0)
    for worker in workers:
        worker.join()
    assert most[0] == 1
    assert threads == {"training-dataset-check_0"}


def test_exit_signals_stop_trainers_then_chain_to_the_previous_handler(tmp_path):
    """In a child app: SIGTERM stops the trainer's group, runs the handler that was there before, and exits."""
    import subprocess

    (tmp_path / "fake_trainers").mkdir()
    (tmp_path / "fake_trainers" / "__init__.py").write_text("")
    (tmp_path / "fake_trainers" / "waits.py").write_text("import time\ntime.sleep(120)\n")
    script = tmp_path / "app_like.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from pipelines.training import runs as training_runs\n"
        "training_runs.TRAINER_MODULES['sd3'] = 'fake_trainers.waits'\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('previous handler ran', flush=True))\n"
        f"runs = training_runs.TrainingRuns(Path({str(tmp_path / 'runs')!r}), environment={{'PYTHONPATH': {str(tmp_path)!r}}})\n"
        "runs.stop_on_exit()\n"
        "run = runs.start('sd3', [], Path('out'))\n"
        "print('trainer', run.process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
        "print('not reached', flush=True)\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(script)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    trainer = int(lines[0].split()[1])
    assert lines[1:] == ["previous handler ran"], done.stderr
    assert done.returncode == 128 + 15
    assert not _alive(trainer)
    assert list((tmp_path / "runs").glob("*/trainer.pid")) == []


# -- what the Train tab shows: the loss chart, the command, renamings (issue 19)


def test_the_smoothed_loss_is_tensorboards_debiased_ema():
    from pipelines.training.runs import smoothed_losses

    losses = [1.689, 1.52, 1.61, 1.446, 1.39, 1.47]
    weight = 0.9
    # The closed form: each point is the weighted mean of the losses so far, weights weight**age.
    expected = [
        sum(weight ** (t - i) * losses[i] for i in range(t + 1)) / sum(weight ** (t - i) for i in range(t + 1))
        for t in range(len(losses))
    ]
    assert smoothed_losses(losses, weight) == pytest.approx(expected, rel=1e-12)
    assert smoothed_losses([2.0] * 5, weight) == pytest.approx([2.0] * 5)  # a flat loss stays flat
    assert smoothed_losses(losses, 0.0) == pytest.approx(losses) and smoothed_losses([], weight) == []
    with pytest.raises(ValueError, match="smoothing weight"):
        smoothed_losses(losses, 1.0)


def test_the_loss_chart_has_numeric_axes_from_the_first_poll():
    import gradio as gr

    from components.train import LOSS_SERIES, SMOOTHED_SERIES, loss_frame
    from pipelines.training.runs import smoothed_losses

    plot = gr.LinePlot(x="step", y="loss", color="series")
    for losses in ([], [(1, 1.689)], [(1, 1.689), (2, 1.52), (10, 1.446)]):
        data = plot.postprocess(loss_frame(losses))
        assert data.datatypes == {"step": "quantitative", "loss": "quantitative", "series": "nominal"}, losses
    frame = loss_frame([(1, 1.689), (2, 1.52), (10, 1.446)])
    raw, smooth = frame[frame.series == LOSS_SERIES], frame[frame.series == SMOOTHED_SERIES]
    assert raw.step.tolist() == smooth.step.tolist() == [1.0, 2.0, 10.0]
    assert raw.loss.tolist() == [1.689, 1.52, 1.446]
    assert smooth.loss.tolist() == pytest.approx(smoothed_losses([1.689, 1.52, 1.446]))


def test_renamings_are_said_aloud():
    from pipelines.lora.sources import sanitize_lora_name
    from pipelines.training.runs import renaming_sentence, run_name

    assert renaming_sentence("ux-sks", run_name("ux-sks")) == ""
    said = renaming_sentence("ux-sks", "ux-sks", sanitize_lora_name("ux-sks"))
    assert "'ux_sks'" in said and "Generate" in said
    said = renaming_sentence("My Style!", run_name("My Style!"))
    assert "'My Style!' became the folder 'my-style'" in said


def test_the_logged_command_runs_as_printed(tmp_path, monkeypatch):
    """The log's first line, pasted into a shell anywhere, runs the trainer with the same arguments."""
    import shlex
    import subprocess

    from pipelines.training.runs import COMMAND_PROMPT

    package = tmp_path / "printing_trainers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "prints.py").write_text("import os, sys\nprint(repr(sys.argv[1:]), os.getcwd())\n")
    monkeypatch.setitem(sys.modules["pipelines.training.runs"].TRAINER_MODULES, "sd3", "printing_trainers.prints")
    runs = TrainingRuns(tmp_path / "runs", environment={"PYTHONPATH": str(tmp_path)})
    upload = _zip(tmp_path / "up.zip", {"a.png": _png_bytes((1, 2, 3)), "a.txt": b"a dark square"})
    run = runs.start_with_dataset(
        "sd3", [upload], tmp_path / "loras" / "my run", lambda dataset: [dataset, "--note", "two words"], name="x"
    )
    run.process.wait(timeout=30)
    logged = run.log_path.read_text().splitlines()
    command = logged[0].removeprefix(COMMAND_PROMPT)
    assert logged[0].startswith(COMMAND_PROMPT) and f"&& PYTHONPATH={tmp_path} {sys.executable} -m " in command
    dataset = run.folder / "dataset"
    assert shlex.split(command)[-3:] == [str(dataset), "--note", "two words"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pasted = subprocess.run(["bash", "-c", command], cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert pasted.returncode == 0, pasted.stderr
    assert pasted.stdout == logged[1] + "\n"  # the same arguments, from the same folder, as the run itself
    assert (dataset / "metadata.jsonl").is_file()  # the dataset it names stays in the run's folder
    shown = run.status().command
    assert shown.startswith("cd <app> && PYTHONPATH=<path> python -m printing_trainers.prints <dataset>"), shown


@pytest.mark.slow
def test_the_real_trainers_logged_command_starts_from_any_folder(tiny_manager, tmp_path):
    """The SD3.5 trainer's command as the Train tab logs it: pasted into a shell elsewhere, it starts (--help)."""
    import subprocess

    from components.train import trainer_arguments
    from pipelines.studio import Studio
    from pipelines.training.runs import COMMAND_PROMPT

    studio = Studio(manager=tiny_manager, lora_dir=tmp_path / "loras")
    runs = studio.training_runs
    upload = _zip(tmp_path / "up.zip", {"a.png": _png_bytes((1, 2, 3)), "a.txt": b"a dark square"})
    output = tmp_path / "loras" / "ux-sks"

    def arguments_for(dataset):
        return trainer_arguments(
            studio, "sd3", dataset, output, model="medium", steps=1, rank=2, learning_rate=1e-4, batch_size=1,
            gradient_accumulation=1, resolution=64, validation_every=1, validation_split=0.0,
        )  # fmt: skip

    run = runs.start_with_dataset("sd3", [upload], output, arguments_for, name="ux-sks")
    run.cancel(grace=2)
    command = run.log_path.read_text().splitlines()[0].removeprefix(COMMAND_PROMPT)
    assert "-m pipelines.training.train_sd3_lora" in command and str(run.folder / "dataset") in command
    started = subprocess.run(
        ["bash", "-c", command + " --help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0 and "usage:" in started.stdout, started.stderr
