"""Training uploads become a checked imagefolder; runs start, report loss and cancel as process groups."""

from __future__ import annotations

import json
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from pipelines.training_data import METADATA_FILE, TrainingDataError, read_dataset
from pipelines.training_runs import LOSS_LINE, TrainingRuns, run_name, unpack_training_upload


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
    monkeypatch.setitem(sys.modules["pipelines.training_runs"].TRAINER_MODULES, "sd3", "fake_trainers.slow")
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


def test_a_finished_sd3_run_loads_from_a_relative_lora_folder(tiny_manager, tiny_root, tmp_path, monkeypatch):
    """``--lora-dir loras`` (relative, the default) holds run folders; their LoRA loads by its name in there."""
    import shutil

    from pipelines.studio import Studio
    from pipelines.tiny import tiny_lora_dir

    monkeypatch.chdir(tmp_path)
    run_folder = Path("loras") / "my-run"
    run_folder.mkdir(parents=True)
    shutil.copy(
        tiny_lora_dir(tiny_root) / "tiny-large-style.safetensors", run_folder / "pytorch_lora_weights.safetensors"
    )
    studio = Studio(manager=tiny_manager, lora_dir=Path("loras"))
    sentence = studio.load_training_result("sd3", run_folder, model="large")
    assert "LoRA **my_run** is loaded on Stable Diffusion 3.5 Large" in sentence
    library = studio.sd3_loras["sd35-large"]
    assert library.get("my_run").source == "loras/my-run/pytorch_lora_weights.safetensors"
    library.unload(studio.sd3_pipeline("sd35-large"))
    with pytest.raises(ValueError, match="holds no .safetensors LoRA"):
        studio.load_training_result("sd3", Path("loras") / "empty", model="large")
