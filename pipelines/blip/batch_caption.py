"""Caption many images: a background loader, true batches, and the two export conventions.

Used by the Batch tab and by ``python -m pipelines.blip.caption_folder``. Images are
decoded and preprocessed in DataLoader worker processes while the model
captions the previous batch. A file that cannot be read becomes a
``FailedImage`` with the reason; it never stops the batch.

Exports, both keyed by ``file_name`` (the image's path relative to the dataset
root, with forward slashes):

- a sidecar ``<stem>.txt`` next to each image (kohya-ss, taggui, OneTrainer);
- ``metadata.jsonl`` with ``file_name`` and ``text`` per line (Hugging Face
  ``datasets.load_dataset("imagefolder")``);
- ``captions.csv`` with the score, the LoRA adapter that wrote each caption
  (empty: the base model) and any failure, for people who read them;
- in the Batch tab's zip, ``captioning.json``: the model, the adapter and the
  decoding settings of the run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import posixpath
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from pipelines import settings
from pipelines.blip.captioner import BlipCaptioner, CaptionRequest
from pipelines.images import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"
CSV_FILE = "captions.csv"
MANIFEST_FILE = "captioning.json"  # how the captions were made: model, adapter, decoding settings


@dataclass(frozen=True)
class CaptionedImage:
    file_name: str  # relative to the dataset root, forward slashes
    text: str  # the caption with trigger/suffix applied
    score: float  # mean token log-prob of the caption BLIP wrote
    adapter: str | None = None  # the LoRA adapter that wrote it; None: the base model
    edited: bool = False  # the text was typed over BLIP's caption (the score stays BLIP's)


@dataclass(frozen=True)
class FailedImage:
    file_name: str
    reason: str  # one sentence for the user


def find_images(root: Path, *, recursive: bool = False) -> list[Path]:
    """Image files under ``root`` (by suffix), sorted by relative path; hidden files skipped."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; give the folder that holds the images.")
    pattern = "**/*" if recursive else "*"
    found = [
        path
        for path in root.glob(pattern)
        if path.is_file()
        and path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(found, key=lambda path: relative_name(path, root))


def relative_name(path: Path, root: Path) -> str:
    """The ``file_name`` of ``path`` in a dataset rooted at ``root``."""
    return Path(path).relative_to(root).as_posix()


def caption_decoration(label: str, text: str) -> str:
    """A trigger word or suffix, checked: control characters removed, at most a caption prefix's length."""
    from pipelines.validation import strip_control_characters

    cleaned = " ".join(strip_control_characters(str(text or "")).split())
    if len(cleaned) > settings.MAX_CAPTION_PREFIX_CHARS:
        raise ValueError(
            f"The {label} has {len(cleaned)} characters; keep it under {settings.MAX_CAPTION_PREFIX_CHARS} "
            "(a trigger word or a few tags)."
        )
    return cleaned


def decorate_caption(caption: str, trigger: str = "", suffix: str = "") -> str:
    """``trigger, caption, suffix``: how LoRA trainers expect trigger words (kohya's caption prefix)."""
    parts = [part.strip().strip(",").strip() for part in (trigger, caption, suffix)]
    return ", ".join(part for part in parts if part)


class _ImageFiles(Dataset):
    """Decodes and preprocesses one image per item, inside a loader worker."""

    def __init__(self, files: list[Path], root: Path, image_processor) -> None:
        self.files = files
        self.root = root
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        name = relative_name(path, self.root)
        try:
            image = load_image(path, name=name)
            pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        except ValueError as error:
            return name, None, str(error)
        return name, pixels, None


def _as_list(batch: list) -> list:
    return batch


def caption_files(
    captioner: BlipCaptioner,
    files: list[Path],
    root: Path,
    request: CaptionRequest | None = None,
    *,
    batch_size: int = 8,
    num_workers: int = 2,
    trigger: str = "",
    suffix: str = "",
    should_stop: Callable[[], bool] | None = None,
    adapter: str | None = None,
) -> Iterator[list[CaptionedImage | FailedImage]]:
    """Caption ``files`` (paths under ``root``); yield one list of results per batch, in file order.

    ``request`` decides the decoding (its best caption is kept); ``adapter``
    names a LoRA adapter loaded on the captioner (None: the base model). ``num_workers``
    loader processes decode images ahead of the model (0 decodes inline).
    ``should_stop`` is polled between batches; when it returns True the
    iteration ends after the batch in hand, so nothing captioned is lost.
    """
    request = (request or CaptionRequest()).validated()
    trigger, suffix = caption_decoration("trigger", trigger), caption_decoration("suffix", suffix)
    adapter = captioner.check_adapter(adapter)  # before any worker starts
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}.")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked; see tokenizers' warning
    loader = DataLoader(
        _ImageFiles(list(files), Path(root), captioner.processor.image_processor),
        batch_size=batch_size,
        num_workers=num_workers if len(files) > batch_size else 0,  # a single batch gains nothing from workers
        collate_fn=_as_list,
        prefetch_factor=2 if num_workers and len(files) > batch_size else None,
    )
    for batch in loader:
        results: list[CaptionedImage | FailedImage] = []
        readable = [(name, pixels) for name, pixels, error in batch if error is None]
        captions = {}
        if readable:
            pixel_values = torch.stack([pixels for _, pixels in readable])
            results_in_batch = captioner.caption_pixels(pixel_values, request, adapter)
            for (name, _), result in zip(readable, results_in_batch, strict=True):
                best = result.captions[0]
                text = decorate_caption(best.text, trigger, suffix)
                captions[name] = CaptionedImage(name, text, best.score, result.adapter)
        for name, _, error in batch:
            results.append(captions[name] if error is None else FailedImage(name, error))
        yield results
        if should_stop is not None and should_stop():
            return


# ----------------------------------------------------------------------------- exports


def sidecar_name(file_name: str) -> str:
    """The sidecar of ``file_name``: ``<stem>.txt`` beside it, relative, forward slashes."""
    return Path(file_name).with_suffix(".txt").as_posix()


def sidecar_path(file_name: str, out_dir: Path) -> Path:
    """Where ``<stem>.txt`` for ``file_name`` goes under ``out_dir``."""
    return Path(out_dir) / sidecar_name(file_name)


def sidecar_clashes(file_names: Iterable[str]) -> dict[str, list[str]]:
    """Each sidecar that two or more images would share (``photo.jpg`` and ``photo.png`` -> ``photo.txt``).

    Returns sidecar name -> the images, sorted. Names are compared without case, as Windows and
    macOS file systems (and a zip unpacked there) do. A kohya-style trainer reads ``<stem>.txt``
    for every image, so such images would be trained on one caption.
    """
    groups: dict[str, list[str]] = {}
    for name in sorted(set(file_names)):
        groups.setdefault(sidecar_name(name).casefold(), []).append(name)
    return {sidecar_name(names[0]): names for names in groups.values() if len(names) > 1}


def dataset_names(file_names: Iterable[str]) -> dict[str, str]:
    """``file_name`` -> its name in an exported dataset, so that every image has a sidecar of its own.

    The first image (in sorted order) of a shared sidecar keeps its name; each later one becomes
    ``<stem>_2<suffix>``, ``_3``, ... (the first that neither names another image nor shares a
    sidecar). Images without a clash keep their names. Runs in time linear in the number of names.
    """
    ordered = sorted(set(file_names))
    taken_files = {name.casefold() for name in ordered}
    taken_sidecars: set[str] = set()
    keep, later = [], []
    for name in ordered:
        sidecar = sidecar_name(name).casefold()
        (later if sidecar in taken_sidecars else keep).append(name)
        taken_sidecars.add(sidecar)
    names = {name: name for name in keep}
    next_number: dict[str, int] = {}  # per stem, where the search for a free number resumes
    for name in later:
        path = Path(name)
        stem_key = path.with_suffix("").as_posix().casefold()
        number = next_number.get(stem_key, 2)
        while True:
            candidate = (path.parent / f"{path.stem}_{number}{path.suffix}").as_posix()
            number += 1
            if candidate.casefold() not in taken_files and sidecar_name(candidate).casefold() not in taken_sidecars:
                break
        next_number[stem_key] = number
        taken_files.add(candidate.casefold())
        taken_sidecars.add(sidecar_name(candidate).casefold())
        names[name] = candidate
    return names


def write_sidecar(item: CaptionedImage, out_dir: Path) -> Path:
    path = sidecar_path(item.file_name, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(item.text + "\n", encoding="utf-8")
    return path


def metadata_line(item: CaptionedImage) -> str:
    return json.dumps({"file_name": item.file_name, "text": item.text}, ensure_ascii=False)


def read_metadata(path: Path) -> dict[str, str]:
    """``file_name -> text`` from a metadata.jsonl; a malformed line raises ValueError naming it."""
    entries: dict[str, str] = {}
    if not Path(path).is_file():
        return entries
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            entries[str(record["file_name"])] = str(record["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"{path}, line {number}, is not a JSON object with file_name and text; fix or delete that line."
            ) from None
    return entries


def write_metadata(entries: dict[str, str], path: Path) -> None:
    """Write ``file_name -> text`` as metadata.jsonl, sorted by file_name, atomically."""
    lines = [
        json.dumps({"file_name": name, "text": text}, ensure_ascii=False) for name, text in sorted(entries.items())
    ]
    temporary = Path(path).with_suffix(".jsonl.tmp")
    temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    temporary.replace(path)


def captions_csv(results: Iterable[CaptionedImage | FailedImage]) -> str:
    """captions.csv text: file_name, caption, score, adapter (empty: the base model), error, edited
    ("yes" where the caption was typed over BLIP's; the score is then BLIP's, of its own caption)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file_name", "caption", "score", "adapter", "error", "edited"])
    for item in sorted(results, key=lambda item: item.file_name):
        if isinstance(item, CaptionedImage):
            edited = "yes" if item.edited else ""
            writer.writerow([item.file_name, item.text, f"{item.score:.4f}", item.adapter or "", "", edited])
        else:
            writer.writerow([item.file_name, "", "", "", item.reason, ""])
    return buffer.getvalue()


@dataclass(frozen=True)
class DatasetZip:
    path: Path
    renamed: dict[str, str]  # file_name -> its name in the zip, for images that would have shared a sidecar


def dataset_zip(
    results: Iterable[CaptionedImage | FailedImage],
    zip_path: Path,
    *,
    images: dict[str, Path] | None = None,
    images_zip: Path | None = None,
    manifest: dict | None = None,
) -> DatasetZip:
    """Write a training-ready zip: sidecars, metadata.jsonl, captions.csv (and the images, if given).

    With ``images`` (file_name -> path) the zip is a complete imagefolder
    dataset: unzip it and ``load_dataset("imagefolder", data_dir=...)`` or point
    kohya-ss at it. ``manifest`` (how the captions were made: model, adapter,
    settings) is written as captioning.json. Two images that would share a sidecar
    (``photo.jpg``, ``photo.png``) never do: the later one is renamed in the zip
    (``photo_2.png`` + ``photo_2.txt``, see ``dataset_names``), everywhere in it, and
    the renaming is returned so the caller can say so. ``images_zip``: an earlier zip of the same
    results, whose images are copied as they are (new captions for the same dataset).
    """
    import zipfile

    results = sorted(results, key=lambda item: item.file_name)
    names = dataset_names(item.file_name for item in results if isinstance(item, CaptionedImage))
    renamed = {name: new for name, new in names.items() if name != new}
    results = [
        dataclasses.replace(item, file_name=names[item.file_name]) if isinstance(item, CaptionedImage) else item
        for item in results
    ]
    images = {names.get(name, name): path for name, path in (images or {}).items()}
    captioned = sorted((item for item in results if isinstance(item, CaptionedImage)), key=lambda item: item.file_name)
    with contextlib.ExitStack() as stack:
        archive = stack.enter_context(zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED))
        earlier = stack.enter_context(zipfile.ZipFile(images_zip)) if images_zip is not None else None
        earlier_names = set(earlier.namelist()) if earlier is not None else set()
        for item in captioned:
            archive.writestr(sidecar_name(item.file_name), item.text + "\n")
            if item.file_name in images:
                archive.write(images[item.file_name], item.file_name, compress_type=zipfile.ZIP_STORED)
            elif item.file_name in earlier_names:
                member = zipfile.ZipInfo(item.file_name, date_time=earlier.getinfo(item.file_name).date_time)
                member.compress_type = zipfile.ZIP_STORED
                with earlier.open(item.file_name) as source, archive.open(member, "w") as target:
                    shutil.copyfileobj(source, target)
        archive.writestr(METADATA_FILE, "".join(metadata_line(item) + "\n" for item in captioned))
        archive.writestr(CSV_FILE, captions_csv(results))
        if manifest is not None:
            archive.writestr(MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return DatasetZip(Path(zip_path), renamed)


def edited_results(
    results: list[CaptionedImage | FailedImage],
    table_rows: Iterable,
    *,
    file_column: int,
    caption_column: int,
    max_chars: int = settings.MAX_EDITED_CAPTION_CHARS,
) -> tuple[list[CaptionedImage | FailedImage], list[str]]:
    """``results`` (held by the server) with the captions a user typed into their table; (results, edited names).

    Only caption text is taken from ``table_rows`` (the table as the page sent it back): row ``i``'s
    caption cell goes to ``results[i]`` when its file cell names that result, else to the result of
    that name (a table sorted on the page); rows naming no result, rows past ``len(results)``, cells
    that are not text and rows of failed images are ignored. Text is cleaned (control characters out,
    whitespace collapsed); an empty or over-long caption is refused with a sentence naming the file.
    """
    from pipelines.validation import strip_control_characters

    position = {item.file_name: index for index, item in enumerate(results)}
    typed: dict[int, str] = {}
    for index, row in enumerate(list(table_rows)[: len(results)]):  # bounded by the server's rows
        if not isinstance(row, (list, tuple)) or len(row) <= max(file_column, caption_column):
            continue
        name, text = row[file_column], row[caption_column]
        target = index if name == results[index].file_name else position.get(name) if isinstance(name, str) else None
        if target is not None and isinstance(text, str):
            typed[target] = text
    edited_items: list[CaptionedImage | FailedImage] = []
    edited: list[str] = []
    for index, item in enumerate(results):
        text = typed.get(index)
        if isinstance(item, CaptionedImage) and text is not None:
            text = " ".join(strip_control_characters(text).split())
            if text != item.text:
                if not text:
                    raise ValueError(f"The caption of {item.file_name} is empty; write one, or undo the edit.")
                if len(text) > max_chars:
                    raise ValueError(
                        f"The caption of {item.file_name} has {len(text)} characters; keep it under {max_chars}."
                    )
                item = dataclasses.replace(item, text=text, edited=True)
                edited.append(item.file_name)
        edited_items.append(item)
    return edited_items, edited


# ----------------------------------------------------------------------------- uploads


@dataclass(frozen=True)
class UploadedDataset:
    root: Path  # a work folder holding every image under its file_name
    files: list[Path]  # the images to caption, sorted by file_name
    failures: list[FailedImage]  # zip members and files refused before captioning


def collect_uploads(
    paths: Iterable[str | Path],
    work_dir: Path,
    *,
    max_files: int,
    max_unpacked_bytes: int,
    max_ratio: int,
) -> UploadedDataset:
    """Lay uploaded images and the images inside uploaded zips out under ``work_dir``.

    Names are the uploads' own (``a (2).png`` for a repeated name); zip members
    keep their folders. A zip member with an absolute or ``..`` path (zip-slip),
    an archive that would unpack past ``max_unpacked_bytes``, or a member that
    compresses more than ``max_ratio`` times (a zip bomb) is refused by name.
    Files that are neither images nor zips are listed as failures.

    Every zip is read from its central directory first, so more than
    ``max_files`` images (loose and zipped together) are refused with a
    ValueError before anything is written. Whatever goes wrong while writing,
    nothing written is left behind: the ValueError is raised after
    ``work_dir`` (if this call made it) or the files this call wrote are removed.
    """
    # 1. Plan from the uploads' names and the zips' central directories: nothing is written yet.
    plan = _plan_uploads([Path(path) for path in paths], max_unpacked_bytes, max_ratio)
    if len(plan.entries) > max_files:
        raise ValueError(
            f"{len(plan.entries)} images were uploaded; one run takes at most {max_files}. Split them into several runs."
        )
    # 2. Write, undoing everything on the way out of an error.
    work_dir = Path(work_dir)
    made_work_dir = not work_dir.exists()
    written: list[Path] = []
    failures = list(plan.failures)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        failures += _write_planned(plan.entries, work_dir, written)
        files = find_images(work_dir, recursive=True)
        if len(files) > max_files:  # images already in a work_dir the caller reused
            raise ValueError(
                f"{len(files)} images were uploaded; one run takes at most {max_files}. Split them into several runs."
            )
    except BaseException:
        if made_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            for path in written:
                path.unlink(missing_ok=True)
        raise
    return UploadedDataset(root=work_dir, files=files, failures=failures)


@dataclass(frozen=True)
class _PlannedImage:
    name: str  # the claimed file_name under the work folder
    source: Path  # a loose upload, or the zip that holds ``member``
    member: object = None  # a zipfile.ZipInfo, or None for a loose upload
    label: str = ""  # how failures name it: "upload.zip:member.png"


@dataclass(frozen=True)
class _UploadPlan:
    entries: list[_PlannedImage]
    failures: list[FailedImage]


class _NameClaims:
    """Unique, case-insensitive file names; a repeated name becomes ``stem (2).ext``, ``stem (3).ext``...

    Each name remembers the next number to try, so n copies of one name cost
    O(n) in all, not O(n²) (8000 members named a.png once took minutes).
    """

    def __init__(self) -> None:
        self._taken: set[str] = set()
        self._next_number: dict[str, int] = {}

    def claim(self, name: str) -> str:
        key = name.lower()
        if key not in self._taken:
            self._taken.add(key)
            return name
        stem, suffix = posixpath.splitext(name)  # "cats/a", ".png": the folder stays in front
        number = self._next_number.get(key, 2)
        candidate = f"{stem} ({number}){suffix}"
        while candidate.lower() in self._taken:  # each number is skipped at most once per name
            number += 1
            candidate = f"{stem} ({number}){suffix}"
        self._next_number[key] = number + 1
        self._taken.add(candidate.lower())
        return candidate


def _plan_uploads(paths: list[Path], max_unpacked_bytes: int, max_ratio: int) -> _UploadPlan:
    """Which images go where, and which uploads and members are refused; reads only names and zip directories."""
    import zipfile

    claims = _NameClaims()
    entries: list[_PlannedImage] = []
    failures: list[FailedImage] = []
    unpacked_bytes = 0
    for upload in paths:
        suffix = upload.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            entries.append(_PlannedImage(claims.claim(upload.name), upload, None, upload.name))
            continue
        if suffix != ".zip":
            failures.append(FailedImage(upload.name, f"{upload.name} is neither an image nor a .zip; it was skipped."))
            continue
        try:
            with zipfile.ZipFile(upload) as archive:
                members = archive.infolist()  # the central directory: names and sizes, nothing decompressed
        except (zipfile.BadZipFile, OSError, ValueError):
            failures.append(FailedImage(upload.name, f"{upload.name} is not a readable zip file; re-create it."))
            continue
        for member in members:
            if member.is_dir() or posixpath.splitext(member.filename)[1].lower() not in IMAGE_SUFFIXES:
                continue
            label = f"{upload.name}:{member.filename}"
            relative = member_path(member)
            if relative is None:
                failures.append(FailedImage(label, f"{label} points outside the archive (zip-slip); refused."))
                continue
            if relative.startswith(".") or "/." in relative:
                continue  # hidden files (macOS's ._a.png) are not images of the dataset
            if member.compress_size and member.file_size / member.compress_size > max_ratio:
                failures.append(
                    FailedImage(
                        label,
                        f"{label} expands {member.file_size // max(member.compress_size, 1)}x; refused as a zip bomb.",
                    )
                )
                continue
            if unpacked_bytes + member.file_size > max_unpacked_bytes:
                failures.append(
                    FailedImage(
                        label,
                        f"{upload.name} unpacks past {max_unpacked_bytes // 1024**2} MB; split it into smaller zips.",
                    )
                )
                break
            unpacked_bytes += member.file_size
            entries.append(_PlannedImage(claims.claim(relative), upload, member, label))
    return _UploadPlan(entries, failures)


def _write_planned(entries: list[_PlannedImage], work_dir: Path, written: list[Path]) -> list[FailedImage]:
    """Copy loose uploads and unpack zip members to their planned names; appends each file to ``written``."""
    import zipfile

    failures: list[FailedImage] = []
    archives: dict[Path, zipfile.ZipFile] = {}
    try:
        for entry in entries:
            target = work_dir / entry.name
            if entry.member is None:
                written.append(target)
                shutil.copyfile(entry.source, target)
                continue
            archive = archives.get(entry.source)
            if archive is None:
                archive = archives[entry.source] = zipfile.ZipFile(entry.source)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                written.append(target)
                _copy_at_most(archive, entry.member, target)
            except (zipfile.BadZipFile, OSError, ValueError) as error:
                target.unlink(missing_ok=True)
                failures.append(
                    FailedImage(entry.label, f"{entry.label} could not be unpacked ({error}); re-create the zip.")
                )
    finally:
        for archive in archives.values():
            archive.close()
    return failures


def member_path(member) -> str | None:
    """A zip member's path as a relative POSIX name, or None when it leads out (``..``, ``/x``, ``C:``: zip-slip)."""
    name = member.filename.replace("\\", "/")
    parts = [part for part in name.split("/") if part not in ("", ".")]  # as pathlib reads it, without its cost
    if not parts or name.startswith("/") or ".." in parts or ":" in parts[0]:
        return None
    return "/".join(parts)


def _copy_at_most(archive, member, target: Path, chunk_bytes: int = 1024 * 1024) -> None:
    """Unpack ``member`` in chunks, never past its declared size (a lying header cannot write more)."""
    remaining = member.file_size
    with archive.open(member) as source, open(target, "wb") as sink:
        while remaining > 0:
            chunk = source.read(min(chunk_bytes, remaining))
            if not chunk:
                break
            sink.write(chunk)
            remaining -= len(chunk)
