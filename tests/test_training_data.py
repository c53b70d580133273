"""Reading a captioned imagefolder for training: every problem named at once, a seeded validation split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.training.dataset import (
    METADATA_FILE,
    TrainingDataError,
    TrainingExample,
    read_dataset,
    split_validation,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def write_metadata(folder: Path, lines: list, *, encoding: str = "utf-8") -> None:
    text = "".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n" for line in lines)
    (folder / METADATA_FILE).write_text(text, encoding=encoding)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    shutil.copy(EXAMPLES / "chelsea.png", root / "cat.png")
    shutil.copy(EXAMPLES / "coffee.png", root / "cup.png")
    shutil.copy(EXAMPLES / "rocket.jpg", root / "sub" / "rocket.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def test_a_good_dataset_reads_in_file_order_with_whitespace_tidied(folder):
    write_metadata(
        folder,
        [
            {"file_name": "sub/rocket.jpg", "text": "  a rocket\n launch "},
            "",
            {"file_name": "cat.png", "text": "un chat"},
        ],
    )
    examples = read_dataset(folder)
    assert [(example.file_name, example.text) for example in examples] == [
        ("sub/rocket.jpg", "a rocket launch"),
        ("cat.png", "un chat"),
    ]
    assert examples[1].path == (folder / "cat.png").resolve() and examples[1].load().mode == "RGB"


def test_every_problem_is_named_in_one_error(folder):
    write_metadata(
        folder,
        [
            {"text": "no file"},
            "{not json",
            {"file_name": "broken.png", "text": "a broken file"},
            {"file_name": "cat.png", "text": "   "},
            {"file_name": "../outside.png", "text": "escape"},
            {"file_name": "missing.png", "text": "gone"},
            {"file_name": "sub/rocket.jpg", "text": "a rocket"},
            {"file_name": "./sub/rocket.jpg", "text": "the same file again"},
            {"file_name": "cup.png", "text": 5},
            ["a", "list"],
        ],
    )
    with pytest.raises(TrainingDataError) as caught:
        read_dataset(folder)
    message = str(caught.value)
    assert message.startswith(f"Fix {folder / METADATA_FILE} before training: ")
    for expected in (
        "line 1 has no file_name",
        "line 2 is not valid JSON",
        "line 3: ",  # the image decoder's own sentence about broken.png
        "line 4: 'cat.png' has an empty text",
        "line 5: '../outside.png' points outside the dataset folder",
        "line 6: 'missing.png' does not exist",
        "line 8: './sub/rocket.jpg' is listed again (first on line 7)",
        "line 9: 'cup.png' has no text",
        "line 10 is not a JSON object",
    ):
        assert expected in message, (expected, message)
    assert "broken.png" in message.split("line 3: ")[1].split(";")[0]


def test_a_byte_order_mark_from_a_windows_editor_is_fine(folder):
    write_metadata(folder, [{"file_name": "cat.png", "text": "a cat"}], encoding="utf-8-sig")
    assert [example.text for example in read_dataset(folder)] == ["a cat"]


def test_a_file_that_is_not_utf8_is_one_sentence(folder):
    (folder / METADATA_FILE).write_bytes(b'{"file_name": "cat.png", "text": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(TrainingDataError, match="is not UTF-8 text .* save it as UTF-8"):
        read_dataset(folder)


def test_a_missing_folder_or_metadata_file_says_what_to_do(tmp_path):
    with pytest.raises(TrainingDataError, match="is not a folder"):
        read_dataset(tmp_path / "nowhere")
    with pytest.raises(TrainingDataError, match="has no metadata.jsonl; caption the folder first"):
        read_dataset(tmp_path)
    (tmp_path / METADATA_FILE).write_text("\n\n")
    with pytest.raises(TrainingDataError, match="lists no images"):
        read_dataset(tmp_path)


def test_images_are_only_decoded_when_asked(folder):
    write_metadata(folder, [{"file_name": "broken.png", "text": "a broken file"}])
    assert [example.file_name for example in read_dataset(folder, check_images=False)] == ["broken.png"]


def test_the_validation_split_is_seeded_disjoint_and_keeps_one_for_training(folder):
    examples = [TrainingExample(path=folder / "cat.png", file_name=f"{n}.png", text=str(n)) for n in range(10)]
    train, held_out = split_validation(examples, 0.2, seed=3)
    assert len(held_out) == 2 and len(train) == 8
    assert {item.file_name for item in train} | {item.file_name for item in held_out} == {f"{n}.png" for n in range(10)}
    assert not {item.file_name for item in train} & {item.file_name for item in held_out}
    assert split_validation(examples, 0.2, seed=3) == (train, held_out)
    assert split_validation(examples, 0.2, seed=4)[1] != held_out
    assert [item.file_name for item in train] == sorted((item.file_name for item in train), key=lambda n: int(n[:-4]))
    assert split_validation(examples, 0.01, seed=0)[1] and len(split_validation(examples[:1], 0.5, seed=0)[0]) == 1
    assert split_validation(examples, 0.0, seed=0) == (examples, [])
    with pytest.raises(ValueError, match="must be at least 0 and below 1"):
        split_validation(examples, 1.0, seed=0)
