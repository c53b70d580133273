"""Read a captioned imagefolder for training, and refuse a bad one before training starts.

The format is the one the Batch tab and ``pipelines.blip.caption_folder`` export (and
Hugging Face's ``imagefolder`` reads): images beside a ``metadata.jsonl`` whose
lines are ``{"file_name": "...", "text": "..."}``. Both trainers
(``pipelines.training.train_blip_lora``, ``pipelines.training.train_sd3_lora``) read it here, so a
malformed dataset gets the same sentence whichever model is trained.

Every problem found is collected, not only the first, so a user fixes the file
in one pass: ``TrainingDataError`` lists up to ``MAX_REPORTED_PROBLEMS`` of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipelines.images import ImageDecodeError, load_image

METADATA_FILE = "metadata.jsonl"
MAX_REPORTED_PROBLEMS = 10


class TrainingDataError(ValueError):
    """The dataset cannot be trained on; the message lists what to fix."""


@dataclass(frozen=True)
class TrainingExample:
    path: Path  # the image, inside the dataset folder
    file_name: str  # as written in metadata.jsonl (relative to the folder)
    text: str  # the caption, whitespace normalised

    def load(self) -> Image.Image:
        """The image as RGB (decoded safely; see pipelines.images)."""
        return load_image(self.path)


def read_dataset(folder: str | Path, *, check_images: bool = True) -> list[TrainingExample]:
    """The examples of ``folder/metadata.jsonl``, in file order.

    Raises TrainingDataError naming every bad line: not JSON, no ``file_name``,
    a path that leaves the folder or does not exist, an image that cannot be
    decoded (when ``check_images``), an empty ``text``, or a file listed twice.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise TrainingDataError(f"{root} is not a folder; give the dataset folder that holds {METADATA_FILE}.")
    metadata = root / METADATA_FILE
    if not metadata.is_file():
        raise TrainingDataError(
            f"{root} has no {METADATA_FILE}; caption the folder first (Batch tab or "
            f"`python -m pipelines.blip.caption_folder {root}`), or write one line per image: "
            '{"file_name": "cat.jpg", "text": "a cat on a sofa"}.'
        )
    try:
        # utf-8-sig: editors on Windows start a hand-edited file with a byte-order mark.
        lines = metadata.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise TrainingDataError(
            f"{metadata} is not UTF-8 text (byte {error.start} cannot be read); save it as UTF-8 and try again."
        ) from None
    resolved_root = root.resolve()
    examples: list[TrainingExample] = []
    problems: list[str] = []
    seen: dict[Path, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{METADATA_FILE} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{where} is not valid JSON ({error.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where} is not a JSON object")
            continue
        file_name = record.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            problems.append(f"{where} has no file_name")
            continue
        path = (root / file_name).resolve()
        if not path.is_relative_to(resolved_root):
            problems.append(f"{where}: {file_name!r} points outside the dataset folder")
            continue
        if not path.is_file():
            problems.append(f"{where}: {file_name!r} does not exist in {root}")
            continue
        if path in seen:  # by the file itself, so "a.png" and "./a.png" are the same entry
            problems.append(f"{where}: {file_name!r} is listed again (first on line {seen[path]})")
            continue
        seen[path] = number
        text = record.get("text")
        if not isinstance(text, str):
            problems.append(f"{where}: {file_name!r} has no text (a string with its caption)")
            continue
        text = " ".join(text.split())
        if not text:
            problems.append(f"{where}: {file_name!r} has an empty text")
            continue
        if check_images:
            try:
                load_image(path)
            except ImageDecodeError as error:
                problems.append(f"{where}: {error}")
                continue
        examples.append(TrainingExample(path=path, file_name=file_name, text=text))
    if problems:
        shown = "; ".join(problems[:MAX_REPORTED_PROBLEMS])
        more = f" (and {len(problems) - MAX_REPORTED_PROBLEMS} more)" if len(problems) > MAX_REPORTED_PROBLEMS else ""
        raise TrainingDataError(f"Fix {metadata} before training: {shown}{more}.")
    if not examples:
        raise TrainingDataError(f"{metadata} lists no images; add one line per image.")
    return examples


def split_validation(
    examples: list[TrainingExample], fraction: float, seed: int
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(train, validation): a seeded shuffle holds out ``fraction`` of the examples (at least one if > 0).

    At least one example always stays in training.
    """
    import random

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation split {fraction!r} must be at least 0 and below 1 (e.g. 0.1).")
    count = 0 if fraction == 0 else max(1, round(len(examples) * fraction))
    count = min(count, len(examples) - 1)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
    train = [example for index, example in enumerate(examples) if index not in held_out]
    validation = [example for index, example in enumerate(examples) if index in held_out]
    return train, validation
