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
- in the Batch tab's zip, ``captioning.json``: the model, the adapter, the
  decoding settings and the counts of the run (names only, never a server path).

The Batch tab's zip keeps PNG, JPEG and WebP images as they were uploaded and
stores BMP, TIFF and GIF as PNG, so it takes about what the upload took;
``KeptZips`` caps the bytes of zips each client and everyone keep.
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
import threading
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
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
    converted: dict[str, str] = dataclasses.field(default_factory=dict)  # file_name -> its PNG (was BMP, TIFF, GIF)
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # each captioned file_name -> its name in the zip


class ZipOverLimit(ValueError):
    """A zip would have grown past the bytes it was given; it was deleted unfinished."""


def dataset_zip(
    results: Iterable[CaptionedImage | FailedImage],
    zip_path: Path,
    *,
    images: dict[str, Path] | None = None,
    images_zip: Path | None = None,
    names: dict[str, str] | None = None,
    manifest: dict | None = None,
    max_bytes: int | None = None,
) -> DatasetZip:
    """Write a training-ready zip: sidecars, metadata.jsonl, captions.csv (and the images, if given).

    With ``images`` (file_name -> path of a captioned image, which the safe decoder has accepted)
    the zip is a complete imagefolder dataset: unzip it and ``load_dataset("imagefolder",
    data_dir=...)`` or point kohya-ss at it. PNG, JPEG and WebP files go in byte for byte; BMP, TIFF
    and GIF (uncompressed, or barely) are re-encoded as PNG at full size, so ``x.bmp`` is ``x.png`` in
    the zip, its sidecar ``x.txt`` and its metadata line say so, and ``converted`` lists it.
    ``manifest`` (how the captions were made: model, adapter, settings) is written as
    captioning.json. Two images that would share a sidecar (``photo.jpg``, ``photo.png``) never do:
    the later one is renamed in the zip (``photo_2.png`` + ``photo_2.txt``, see ``dataset_names``),
    everywhere in it, and the renaming is returned so the caller can say so.

    ``images_zip`` and ``names``: an earlier zip of the same results and its ``names``; its images
    are copied as they are (new captions for the same dataset). ``max_bytes``: the zip is checked
    before each member is written and never grows past it; ZipOverLimit instead, with no file left.
    """
    # 1. Names in the zip: one sidecar per image (or the earlier zip's names).
    results = sorted(results, key=lambda item: item.file_name)
    captioned = [item for item in results if isinstance(item, CaptionedImage)]
    if names is None:
        names = dataset_names(item.file_name for item in captioned)
    names = {item.file_name: names.get(item.file_name, item.file_name) for item in captioned}
    images = images or {}
    final: dict[str, str] = {}  # file_name -> its name in the zip, once its image is in
    converted: dict[str, str] = {}  # file_name -> its name in the zip, for images re-encoded as PNG
    # 2. Images and sidecars, then the files that list them; checked against max_bytes as it grows.
    zip_path = Path(zip_path)
    try:
        with open(zip_path, "wb") as sink, contextlib.ExitStack() as stack:
            archive = stack.enter_context(zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED))
            budget = _ZipBudget(sink, max_bytes)
            earlier = stack.enter_context(zipfile.ZipFile(images_zip)) if images_zip is not None else None
            earlier_names = set(earlier.namelist()) if earlier is not None else set()
            for item in captioned:
                name = names[item.file_name]
                if item.file_name in images:
                    name, reencoded = _write_image(archive, budget, Path(images[item.file_name]), name)
                    if reencoded:
                        converted[item.file_name] = name
                elif name in earlier_names:
                    _copy_member(earlier, archive, budget, name)
                final[item.file_name] = name
                budget.write_text(archive, sidecar_name(name), item.text + "\n")
            listed = [
                dataclasses.replace(item, file_name=final[item.file_name]) if isinstance(item, CaptionedImage) else item
                for item in results
            ]
            in_zip = [item for item in listed if isinstance(item, CaptionedImage)]
            budget.write_text(archive, METADATA_FILE, "".join(metadata_line(item) + "\n" for item in in_zip))
            budget.write_text(archive, CSV_FILE, captions_csv(listed))
            if manifest is not None:
                budget.write_text(archive, MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        budget.check_file(zip_path)
    except BaseException:
        zip_path.unlink(missing_ok=True)
        raise
    renamed = {name: final[name] for name, zipped in names.items() if zipped != name} if images_zip is None else {}
    return DatasetZip(zip_path, renamed, converted, final)


class _ZipBudget:
    """Keeps a zip being written under ``max_bytes`` (None: no limit), checked before each member."""

    # Per member: a local header + data descriptor, and its central-directory entry (zip64 extras
    # included), each with the name; and the end records. Generous: the check must never come short.
    MEMBER_BYTES = 2 * 128
    END_BYTES = 256

    def __init__(self, sink, max_bytes: int | None) -> None:
        self.sink = sink
        self.max_bytes = max_bytes
        self.owed = self.END_BYTES  # central-directory entries of the members written so far

    def make_room(self, name: str, data_bytes: int) -> None:
        """ZipOverLimit unless a member ``name`` of at most ``data_bytes`` (stored or deflated) still fits."""
        entry = self.MEMBER_BYTES + 2 * len(name.encode())
        if self.max_bytes is not None and self.sink.tell() + data_bytes + entry + self.owed > self.max_bytes:
            raise ZipOverLimit(f"The zip would take more than {self.max_bytes} bytes.")
        self.owed += entry // 2

    def write_text(self, archive: zipfile.ZipFile, name: str, text: str) -> None:
        data = text.encode("utf-8")
        self.make_room(name, len(data) + len(data) // 100 + 64)  # deflate never grows data past this
        archive.writestr(name, data)

    def check_file(self, path: Path) -> None:
        if self.max_bytes is not None and path.stat().st_size > self.max_bytes:
            raise ZipOverLimit(f"The zip would take more than {self.max_bytes} bytes.")


def _image_format(path: Path) -> str | None:
    """The format named by ``path``'s header among the upload formats (no pixel decoded); None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the safe decoder has checked its size already
            with Image.open(path, formats=settings.UPLOAD_IMAGE_FORMATS) as image:
                return image.format
    except Exception:  # noqa: BLE001 - unreadable here: load_image below says why
        return None


def _write_image(archive: zipfile.ZipFile, budget: _ZipBudget, path: Path, name: str) -> tuple[str, bool]:
    """Put the image at ``path`` in ``archive`` as ``name``; returns (its name there, whether it was re-encoded).

    PNG, JPEG and WebP keep their bytes (deflated only when that saves a tenth: an uncompressed PNG);
    other formats are decoded by ``load_image`` at full size and stored as PNG.
    """
    if _image_format(path) in settings.BATCH_ZIP_KEPT_FORMATS:
        size = path.stat().st_size
        budget.make_room(name, size + size // 100 + 64)
        with open(path, "rb") as handle:
            head = handle.read(64 * 1024)
        deflates = bool(head) and len(zlib.compress(head, 1)) < 0.9 * len(head)
        archive.write(path, name, compress_type=zipfile.ZIP_DEFLATED if deflates else zipfile.ZIP_STORED)
        return name, False
    png_name = Path(name).with_suffix(".png").as_posix()
    buffer = io.BytesIO()
    load_image(path, name=name, max_side=settings.MAX_DECODE_PIXELS).save(buffer, "PNG")  # never downscaled
    budget.make_room(png_name, buffer.tell())
    archive.writestr(png_name, buffer.getvalue(), compress_type=zipfile.ZIP_STORED)
    return png_name, True


def _copy_member(earlier: zipfile.ZipFile, archive: zipfile.ZipFile, budget: _ZipBudget, name: str) -> None:
    """Copy member ``name`` of ``earlier`` into ``archive``, stored or deflated as it was."""
    info = earlier.getinfo(name)
    budget.make_room(name, info.compress_size + info.compress_size // 100 + 64)
    member = zipfile.ZipInfo(name, date_time=info.date_time)
    member.compress_type = info.compress_type
    with earlier.open(info) as source, archive.open(member, "w") as target:
        shutil.copyfileobj(source, target)


def shown_source(source: str | None) -> str | None:
    """A model or adapter source as an exported file may show it: a Hub id or a name, never a server path.

    A folder (absolute, ``~``, or one that exists here) shows only its own name.
    """
    if source is None:
        return None
    text = str(source)
    if os.path.isabs(os.path.expanduser(text)) or "\\" in text or Path(text).exists():
        return Path(text.replace("\\", "/")).name
    return text


def least_zip_bytes(files: Iterable[Path]) -> int:
    """Bytes a zip of ``files`` will take at least: the PNG, JPEG and WebP files, which go in as they are."""
    return sum(Path(path).stat().st_size for path in files if Path(path).suffix.lower() in _KEPT_SUFFIXES)


_KEPT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class _KeptZip:
    client: str
    size: int
    since: float  # when it was written (clock seconds)


class KeptZips:
    """The Batch tab's zips in Gradio's cache: whose they are, and the bytes each client and everyone keep.

    A client (``components.common.client_identity``, a plain string here) may keep ``per_client``
    bytes of zips, and all clients together ``total``. A zip counts from when it is written until it
    is ``max_age`` seconds old, when this book deletes it (Gradio's cache would too), or until it is
    replaced (an export of edited captions replaces its batch's zip). One zip is written at a time
    (``writing``), and it may take exactly the room that is left, so two writers never pass a cap
    together. Refusals are one sentence saying what to do.
    """

    def __init__(self, per_client: int, total: int, max_age: float, *, clock: Callable[[], float] = time.time) -> None:
        self.per_client = per_client
        self.total = total
        self.max_age = max_age
        self._clock = clock
        self._zips: dict[Path, _KeptZip] = {}
        self._book = threading.Lock()  # guards _zips
        self._writer = threading.Lock()  # one zip written at a time

    def kept(self, client: str | None = None) -> int:
        """Bytes kept now by ``client`` (None: everyone)."""
        with self._book:
            self._expire()
            return sum(entry.size for entry in self._zips.values() if client is None or entry.client == client)

    def check_room(self, client: str, needed: int = 0) -> None:
        """ValueError (the sentence) unless ``client`` may keep ``needed`` more bytes now (0: any at all)."""
        with self._book:
            self._expire()
            if self._room(client, None) <= needed:
                raise ValueError(self._refusal(client, None, needed))

    @contextlib.contextmanager
    def writing(self, client: str, replacing: Path | None = None) -> Iterator[int]:
        """Room for one zip of ``client``: yields the bytes it may take. Zips are written one at a time.

        ``replacing``: a zip of this book that the new one replaces (its bytes count as free; ``keep``
        deletes it). A ``ZipOverLimit`` raised in the block becomes the sentence, as a ValueError.
        """
        replacing = Path(replacing) if replacing is not None else None
        with self._writer:
            with self._book:
                self._expire()
                room = self._room(client, replacing)
                if room <= 0:
                    raise ValueError(self._refusal(client, replacing, 0))
            try:
                yield room
            except ZipOverLimit:
                with self._book:
                    raise ValueError(self._refusal(client, replacing, room)) from None

    def keep(self, client: str, path: Path, replacing: Path | None = None) -> None:
        """Count ``path`` for ``client`` from now; ``replacing``, if this book keeps it, is deleted."""
        path = Path(path)
        with self._book:
            self._zips[path] = _KeptZip(client, path.stat().st_size, self._clock())
            if replacing is not None and Path(replacing) != path and Path(replacing) in self._zips:
                self._delete(Path(replacing))

    def holds(self, path: Path) -> bool:
        """Whether ``path`` is a zip this book keeps (written here and neither expired nor replaced)."""
        with self._book:
            self._expire()
            return Path(path) in self._zips

    # -- the book, under self._book

    def _expire(self) -> None:
        cutoff = self._clock() - self.max_age
        for path in [path for path, entry in self._zips.items() if entry.since <= cutoff]:
            self._delete(path)

    def _delete(self, path: Path) -> None:
        self._zips.pop(path, None)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # its own download folder, when nothing else is in it

    def _sizes(self, client: str, replacing: Path | None) -> tuple[int, int]:
        """(bytes ``client`` keeps, bytes everyone keeps), not counting the zip being replaced."""
        mine = everyone = 0
        for path, entry in self._zips.items():
            if path != replacing:
                everyone += entry.size
                mine += entry.size if entry.client == client else 0
        return mine, everyone

    def _room(self, client: str, replacing: Path | None) -> int:
        mine, everyone = self._sizes(client, replacing)
        return min(self.per_client - mine, self.total - everyone)

    def _minutes_left(self, client: str | None) -> int:
        """Minutes until the oldest zip of ``client`` (None: of anyone) expires; at least 1."""
        times = [entry.since for entry in self._zips.values() if client is None or entry.client == client]
        return max(1, -(-int(min(times, default=self._clock()) + self.max_age - self._clock()) // 60))

    def _refusal(self, client: str, replacing: Path | None, needed: int) -> str:
        mine, everyone = self._sizes(client, replacing)
        if self.per_client - mine <= self.total - everyone:  # the client's own share is what ran out
            if mine == 0:
                return (
                    f"This batch's zip would take more than the {_size_words(self.per_client)} one visitor may "
                    'keep; caption fewer images at a time, or untick "Put the images in the zip".'
                )
            where = "already take" if needed <= 0 else "take"
            return (
                f"Your Batch zips {where} {_size_words(mine)} of the {_size_words(self.per_client)} one visitor "
                f"may keep; download what you need from them and try again in {self._minutes_left(client)} "
                'min, when the oldest expires, or untick "Put the images in the zip".'
            )
        return (
            f"The Batch zips of all visitors take {_size_words(everyone)} of the {_size_words(self.total)} this "
            f"server keeps; try again in {self._minutes_left(None)} min, when the oldest expires."
        )


def _size_words(size: int) -> str:
    return f"{size / 1024**3:.1f} GB" if size >= 1024**3 else f"{size / 1024**2:.1f} MB"


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


# What zipfile can unpack here; anything else (AES, PPMd, ...) is refused by name before unpacking.
_READABLE_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


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
            if member.flag_bits & 0x1:  # zipfile would raise RuntimeError while unpacking
                failures.append(
                    FailedImage(label, f"{label} is encrypted; unpack it and zip it again without a password.")
                )
                continue
            if member.compress_type not in _READABLE_COMPRESSION:  # NotImplementedError while unpacking
                failures.append(
                    FailedImage(
                        label, f"{label} uses a compression this app cannot read; re-create the zip with deflate."
                    )
                )
                continue
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
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as error:
                target.unlink(missing_ok=True)
                failures.append(FailedImage(entry.label, _unpack_failure(entry.label, error)))
    finally:
        for archive in archives.values():
            archive.close()
    return failures


def _unpack_failure(label: str, error: Exception) -> str:
    """The sentence for a member that could not be unpacked; never a server path (an OSError names one)."""
    if isinstance(error, EOFError):  # a deflate stream cut short: the zip was truncated or damaged
        return f"{label} ends before its data does (a truncated or damaged zip); re-create the zip."
    reason = (error.strerror or type(error).__name__) if isinstance(error, OSError) else str(error)
    return f"{label} could not be unpacked ({reason}); re-create the zip."


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
