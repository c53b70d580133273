"""`python -m pipelines.blip.caption_folder`: sidecars, metadata.jsonl, resume, overwrite, several processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.blip import caption_folder
from pipelines.blip.captioner import BlipCaptioner

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def photo_folder(tmp_path):
    """Five readable photos (one in a subfolder) and one corrupt file."""
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for name in ("chelsea.png", "coffee.png", "astronaut.png"):
        shutil.copy(EXAMPLES / name, folder / name)
    shutil.copy(EXAMPLES / "rocket.jpg", folder / "trip" / "rocket.jpg")
    shutil.copy(EXAMPLES / "coffee.png", folder / "trip" / "second coffee.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def run_cli(folder: Path, tiny_root: Path, *extra: str) -> int:
    args = caption_folder.parse_args([str(folder), "--tiny", "--tiny-dir", str(tiny_root), "--device", "cpu", *extra])
    return caption_folder.run(args)


def dataset_files(folder: Path) -> dict[str, str]:
    """Every caption file the CLI wrote, by relative path."""
    return {
        path.relative_to(folder).as_posix(): path.read_text()
        for path in sorted(folder.rglob("*"))
        if path.suffix in (".txt", ".jsonl")
    }


def test_captions_a_folder_in_both_conventions(photo_folder, tiny_root, capsys):
    code = run_cli(
        photo_folder, tiny_root, "--recursive", "--batch-size", "2", "--trigger", "sks cat", "--suffix", "photo"
    )
    assert code == 1  # one image could not be read
    lines = [json.loads(line) for line in (photo_folder / "metadata.jsonl").read_text().splitlines()]
    names = [line["file_name"] for line in lines]
    assert (
        names
        == sorted(names)
        == [
            "astronaut.png",
            "chelsea.png",
            "coffee.png",
            "trip/rocket.jpg",
            "trip/second coffee.png",
        ]
    )
    for line in lines:
        assert line["text"].startswith("sks cat, ") and line["text"].endswith(", photo")
        sidecar = (photo_folder / line["file_name"]).with_suffix(".txt")
        assert sidecar.read_text().strip() == line["text"]
    assert not (photo_folder / "broken.txt").exists()
    output = capsys.readouterr()
    assert "5 captioned, 0 already had captions, 1 failed (6 images found)" in output.out
    assert "broken.png" in output.err and not (photo_folder / ".caption-parts").exists()


def test_an_interrupted_run_resumes_to_the_same_files(photo_folder, tiny_root, tmp_path, monkeypatch):
    (photo_folder / "broken.png").unlink()
    reference = tmp_path / "reference"
    shutil.copytree(photo_folder, reference)
    assert run_cli(reference, tiny_root, "--recursive", "--batch-size", "2", "--workers", "0") == 0

    # Interrupt after the first batch, as Ctrl-C or a killed job would.
    real_caption_pixels = BlipCaptioner.caption_pixels
    calls = []

    def caption_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_caption_pixels(self, *args, **kwargs)

    monkeypatch.setattr(BlipCaptioner, "caption_pixels", caption_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_cli(photo_folder, tiny_root, "--recursive", "--batch-size", "2", "--workers", "0")
    partial = dataset_files(photo_folder)
    assert len([name for name in partial if name.endswith(".txt")]) == 2  # the first batch was kept
    monkeypatch.setattr(BlipCaptioner, "caption_pixels", real_caption_pixels)

    assert run_cli(photo_folder, tiny_root, "--recursive", "--batch-size", "2", "--workers", "0") == 0
    assert dataset_files(photo_folder) == dataset_files(reference)


SAMPLING = ("--strategy", "sampling", "--seed", "7", "--top-k", "0", "--top-p", "1.0")


@pytest.mark.parametrize("decoding", [(), SAMPLING], ids=["beam", "sampling"])
def test_limit_then_resume_equals_one_run_and_skips_done_images(photo_folder, tiny_root, tmp_path, capsys, decoding):
    (photo_folder / "broken.png").unlink()
    reference = tmp_path / "reference"
    shutil.copytree(photo_folder, reference)
    run_cli(reference, tiny_root, "--recursive", *decoding)
    run_cli(photo_folder, tiny_root, "--recursive", "--limit", "3", *decoding)
    capsys.readouterr()
    run_cli(photo_folder, tiny_root, "--recursive", *decoding)
    assert "2 captioned, 3 already had captions" in capsys.readouterr().out
    assert dataset_files(photo_folder) == dataset_files(reference)


def test_overwrite_replaces_existing_captions(photo_folder, tiny_root):
    (photo_folder / "chelsea.txt").write_text("my own caption\n")
    (photo_folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "chelsea.png", "text": "my own caption"}) + "\n"
    )
    run_cli(photo_folder, tiny_root)
    assert (photo_folder / "chelsea.txt").read_text() == "my own caption\n"
    run_cli(photo_folder, tiny_root, "--overwrite")
    assert (photo_folder / "chelsea.txt").read_text() != "my own caption\n"
    entries = [json.loads(line) for line in (photo_folder / "metadata.jsonl").read_text().splitlines()]
    assert [entry["text"] for entry in entries if entry["file_name"] == "chelsea.png"] != ["my own caption"]
    assert len(entries) == len({entry["file_name"] for entry in entries})


def test_out_folder_mirrors_the_tree_and_formats_are_selectable(photo_folder, tiny_root, tmp_path):
    out = tmp_path / "captions"
    run_cli(photo_folder, tiny_root, "--recursive", "--out", str(out), "--format", "sidecar")
    assert (out / "trip" / "rocket.txt").is_file() and not (out / "metadata.jsonl").exists()
    assert not (photo_folder / "chelsea.txt").exists()
    with pytest.raises(SystemExit):
        caption_folder.parse_args([str(photo_folder), "--format", "yaml"])


def test_a_missing_folder_is_one_sentence(tmp_path, tiny_root):
    with pytest.raises(ValueError, match="is not a folder"):
        run_cli(tmp_path / "nowhere", tiny_root)


def test_images_sharing_a_stem_get_no_sidecar_but_everything_else_does(photo_folder, tiny_root, capsys):
    (photo_folder / "broken.png").unlink()
    shutil.copy(EXAMPLES / "rocket.jpg", photo_folder / "chelsea.jpg")  # chelsea.png and chelsea.jpg: one stem
    assert run_cli(photo_folder, tiny_root) == 1
    error = capsys.readouterr().err
    assert "chelsea.jpg and chelsea.png would share chelsea.txt" in error and "chelsea_2.png" in error
    assert not (photo_folder / "chelsea.txt").exists()
    assert (photo_folder / "coffee.txt").is_file() and (photo_folder / "astronaut.txt").is_file()
    entries = [json.loads(line)["file_name"] for line in (photo_folder / "metadata.jsonl").read_text().splitlines()]
    assert entries == ["astronaut.png", "chelsea.jpg", "chelsea.png", "coffee.png"]
    # A rerun finds both in metadata.jsonl: nothing is captioned again, and still no shared sidecar.
    assert run_cli(photo_folder, tiny_root) == 1
    assert "0 captioned, 4 already had captions" in capsys.readouterr().out
    assert not (photo_folder / "chelsea.txt").exists()
    # Sidecars alone: the pair is refused by name and not captioned at all.
    sidecars_only = photo_folder.parent / "sidecars"
    assert run_cli(photo_folder, tiny_root, "--out", str(sidecars_only), "--format", "sidecar") == 1
    assert sorted(path.name for path in sidecars_only.glob("*.txt")) == ["astronaut.txt", "coffee.txt"]


@pytest.mark.slow
def test_two_processes_write_the_same_metadata_as_one(photo_folder, tiny_root, tmp_path):
    """Two CPU processes (torch.distributed, as `accelerate launch --multi_gpu` starts them) split the files.

    Sampled captions, batch size 2 against the single process's default: each image's random
    stream is its own, so the files are equal byte for byte.
    """
    (photo_folder / "broken.png").unlink()
    single = tmp_path / "single"
    shutil.copytree(photo_folder, single)
    run_cli(single, tiny_root, "--recursive", "--format", "jsonl", *SAMPLING)

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "pipelines.blip.caption_folder", str(photo_folder), "--recursive", "--format", "jsonl"]
    command += ["--tiny", "--tiny-dir", str(tiny_root), "--device", "cpu", "--batch-size", "2", *SAMPLING]
    completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("5 captioned") == 1  # only the main process reports
    assert (photo_folder / "metadata.jsonl").read_text() == (single / "metadata.jsonl").read_text()
    assert not (photo_folder / ".caption-parts").exists()
