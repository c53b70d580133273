"""Batch captioning: the loader, exports, uploads (zips included) and the /caption_batch API."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from gradio_client import handle_file
from PIL import Image

from pipelines import settings
from pipelines.blip.batch_caption import (
    CaptionedImage,
    FailedImage,
    caption_files,
    collect_uploads,
    dataset_zip,
    decorate_caption,
    find_images,
)
from pipelines.blip.captioner import CaptionRequest
from tests.tolerances import assert_same_captions

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]


def collect(paths, work_dir, **limits):
    limits = {
        "max_files": settings.MAX_BATCH_FILES,
        "max_unpacked_bytes": settings.MAX_ZIP_UNCOMPRESSED_BYTES,
        "max_ratio": settings.MAX_ZIP_RATIO,
        **limits,
    }
    return collect_uploads(paths, work_dir, **limits)


@pytest.fixture
def photo_root(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for name in PHOTOS:
        shutil.copy(EXAMPLES / name, root / name)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_batches_equal_one_image_at_a_time_and_keep_file_order(tiny_captioner, photo_root):
    files = find_images(photo_root)
    request = CaptionRequest(strategy="beam", num_beams=3)
    batched = [
        item for batch in caption_files(tiny_captioner, files, photo_root, request, batch_size=3) for item in batch
    ]
    single = [
        item
        for batch in caption_files(tiny_captioner, files, photo_root, request, batch_size=1, num_workers=0)
        for item in batch
    ]
    assert [item.file_name for item in batched] == sorted(PHOTOS + ["corrupt.jpg"])
    assert_same_captions(batched, single)  # texts exact; scores within SCORE_ATOL (sums in another order)
    failed = [item for item in batched if isinstance(item, FailedImage)]
    assert [item.file_name for item in failed] == ["corrupt.jpg"] and "corrupt.jpg" in failed[0].reason
    direct = tiny_captioner.caption(Image.open(photo_root / "chelsea.png").convert("RGB"), request)
    (chelsea,) = [item for item in batched if item.file_name == "chelsea.png"]
    assert chelsea.text == direct.captions[0].text


def test_should_stop_ends_after_the_batch_in_hand(tiny_captioner, photo_root):
    batches = list(
        caption_files(
            tiny_captioner, find_images(photo_root), photo_root, batch_size=2, num_workers=0, should_stop=lambda: True
        )
    )
    assert len(batches) == 1 and len(batches[0]) == 2


@pytest.mark.parametrize(
    ("trigger", "caption", "suffix", "expected"),
    [
        ("sks", "a cat", "", "sks, a cat"),
        ("sks,", "a cat", " photo ", "sks, a cat, photo"),
        ("", "a cat", "", "a cat"),
    ],
)
def test_trigger_and_suffix(trigger, caption, suffix, expected):
    assert decorate_caption(caption, trigger, suffix) == expected


def test_dataset_zip_files_agree(tmp_path, photo_root):
    results = [
        CaptionedImage("chelsea.png", "sks, a cat", -1.25),
        CaptionedImage("sub/rocket.jpg", "a rocket, launch", -2.5),
        FailedImage("corrupt.jpg", "not an image"),
    ]
    archive = dataset_zip(results, tmp_path / "out.zip", images={"chelsea.png": photo_root / "chelsea.png"})
    assert archive.renamed == {}
    with zipfile.ZipFile(archive.path) as zipped:
        names = set(zipped.namelist())
        assert names == {"chelsea.txt", "chelsea.png", "sub/rocket.txt", "metadata.jsonl", "captions.csv"}
        metadata = [json.loads(line) for line in zipped.read("metadata.jsonl").decode().splitlines()]
        rows = list(csv.DictReader(io.StringIO(zipped.read("captions.csv").decode())))
        assert metadata == [
            {"file_name": "chelsea.png", "text": "sks, a cat"},
            {"file_name": "sub/rocket.jpg", "text": "a rocket, launch"},
        ]
        assert zipped.read("sub/rocket.txt").decode() == "a rocket, launch\n"
        assert [(row["file_name"], row["caption"], row["error"]) for row in rows] == [
            ("chelsea.png", "sks, a cat", ""),
            ("corrupt.jpg", "", "not an image"),
            ("sub/rocket.jpg", "a rocket, launch", ""),
        ]


def test_sampled_captions_do_not_depend_on_the_batch(tiny_captioner, photo_root):
    files = find_images(photo_root)
    request = CaptionRequest(strategy="sampling", seed=7, top_k=0, top_p=1.0)
    by_batch_size = {
        size: [
            item
            for batch in caption_files(tiny_captioner, files, photo_root, request, batch_size=size)
            for item in batch
        ]
        for size in (1, 3)
    }
    assert_same_captions(by_batch_size[1], by_batch_size[3])
    # Each image on its own, and in another order, draws from the same stream: seed + caption index.
    for name in ("rocket.jpg", "astronaut.png"):
        (alone,) = next(caption_files(tiny_captioner, [photo_root / name], photo_root, request, num_workers=0))
        (batched,) = [item for item in by_batch_size[3] if item.file_name == name]
        assert alone.text == batched.text
    other_seed = CaptionRequest(strategy="sampling", seed=8, top_k=0, top_p=1.0)
    reseeded = [item for batch in caption_files(tiny_captioner, files, photo_root, other_seed) for item in batch]
    texts = [getattr(item, "text", None) for item in by_batch_size[1]]
    assert [getattr(item, "text", None) for item in reseeded] != texts


def test_caption_i_of_an_image_uses_seed_plus_i(tiny_captioner, photo_root):
    image = Image.open(photo_root / "coffee.png").convert("RGB")
    three = tiny_captioner.caption(image, CaptionRequest(strategy="sampling", seed=40, num_captions=3, top_k=0))
    singles = {
        tiny_captioner.caption(image, CaptionRequest(strategy="sampling", seed=seed, top_k=0)).captions[0].text
        for seed in (40, 41, 42)
    }
    assert {caption.text for caption in three.captions} == singles


def test_images_that_would_share_a_sidecar_are_renamed_in_the_zip(tmp_path, photo_root):
    results = [
        CaptionedImage("photo.png", "a png", -1.0),
        CaptionedImage("photo.jpg", "a jpeg", -1.0),
        CaptionedImage("photo_2.jpg", "already a _2", -1.0),
        CaptionedImage("PHOTO.webp", "upper case", -1.0),
        CaptionedImage("other.png", "alone", -1.0),
        FailedImage("photo.gif", "not an image"),
    ]
    images = {item.file_name: photo_root / "chelsea.png" for item in results if isinstance(item, CaptionedImage)}
    archive = dataset_zip(results, tmp_path / "out.zip", images=images)
    # Sorted: PHOTO.webp keeps photo.txt (case-insensitively it is first); photo_2.jpg keeps its own.
    assert archive.renamed == {"photo.jpg": "photo_3.jpg", "photo.png": "photo_4.png"}
    with zipfile.ZipFile(archive.path) as zipped:
        names = zipped.namelist()
        metadata = [json.loads(line) for line in zipped.read("metadata.jsonl").decode().splitlines()]
        sidecars = {name.casefold() for name in names if name.endswith(".txt")}
        assert len(sidecars) == len([name for name in names if name.endswith(".txt")]) == 5
        assert {entry["file_name"] for entry in metadata} == {
            "PHOTO.webp",
            "other.png",
            "photo_2.jpg",
            "photo_3.jpg",
            "photo_4.png",
        }
        assert zipped.read("photo_3.txt").decode() == "a jpeg\n" and zipped.read("photo_4.txt").decode() == "a png\n"
        assert {"photo_3.jpg", "photo_4.png"} <= set(names) and "photo.png" not in names


def test_dataset_names_is_linear_in_the_number_of_clashes():
    import time

    from pipelines.blip.batch_caption import dataset_names

    names = [f"a.{suffix}" for suffix in ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")]
    names += [f"dir/a{index}.png" for index in range(20_000)] + [f"dir/a{index}.jpg" for index in range(20_000)]
    started = time.perf_counter()
    renamed = dataset_names(names)
    assert time.perf_counter() - started < 5
    assert len({name.casefold().rsplit(".", 1)[0] for name in renamed.values()}) == len(names)


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_uploads_keep_zip_folders_rename_duplicates_and_skip_other_files(tmp_path):
    photo = (EXAMPLES / "chelsea.png").read_bytes()
    archive = make_zip(tmp_path / "set.zip", {"cats/chelsea.png": photo, "chelsea.png": photo, "readme.txt": b"hi"})
    notes = tmp_path / "notes.pdf"
    notes.write_bytes(b"%PDF")
    uploads = collect([EXAMPLES / "chelsea.png", archive, notes], tmp_path / "work")
    names = sorted(path.relative_to(uploads.root).as_posix() for path in uploads.files)
    assert names == ["cats/chelsea.png", "chelsea (2).png", "chelsea.png"]
    assert [failure.file_name for failure in uploads.failures] == ["notes.pdf"]


@pytest.mark.parametrize(
    ("member", "words"),
    [("../escape.png", "zip-slip"), ("/etc/absolute.png", "zip-slip"), ("C:/windows.png", "zip-slip")],
)
def test_zip_slip_is_refused_by_name(tmp_path, member, words):
    uploads = collect([make_zip(tmp_path / "evil.zip", {member: b"x"})], tmp_path / "work")
    assert uploads.files == [] and words in uploads.failures[0].reason
    assert not (tmp_path / "escape.png").exists()


def test_zip_bombs_and_oversized_archives_are_refused(tmp_path):
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.png": b"\0" * 5_000_000})
    uploads = collect([bomb], tmp_path / "work1")
    assert uploads.files == [] and "zip bomb" in uploads.failures[0].reason
    big = make_zip(tmp_path / "big.zip", {f"{index}.png": (EXAMPLES / "coffee.png").read_bytes() for index in range(3)})
    uploads = collect([big], tmp_path / "work2", max_unpacked_bytes=600_000)
    assert len(uploads.files) == 1 and "split it into smaller zips" in uploads.failures[0].reason
    with pytest.raises(ValueError, match="at most 2"):
        collect([big], tmp_path / "work3", max_files=2)


@pytest.mark.api
def test_caption_batch_api_three_images_and_a_corrupt_file(tiny_client, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    uploads = [handle_file(str(EXAMPLES / name)) for name in ("chelsea.png", "coffee.png", "rocket.jpg")]
    table, archive, summary = tiny_client.predict(
        [*uploads, handle_file(str(corrupt))], trigger="sks", suffix="photo", api_name="/caption_batch"
    )
    rows = {row[1]: row for row in table["data"]}
    assert set(rows) == {"chelsea.png", "coffee.png", "rocket.jpg", "corrupt.png"}
    assert rows["corrupt.png"][2].startswith("⚠") and rows["corrupt.png"][3] is None
    assert "3 of 4 images captioned" in summary and "corrupt.png" in summary
    with zipfile.ZipFile(archive) as zipped:
        metadata = {
            entry["file_name"]: entry["text"]
            for entry in map(json.loads, zipped.read("metadata.jsonl").decode().splitlines())
        }
        csv_rows = {row["file_name"]: row for row in csv.DictReader(io.StringIO(zipped.read("captions.csv").decode()))}
        assert set(metadata) == {"chelsea.png", "coffee.png", "rocket.jpg"}
        for name, text in metadata.items():
            assert text.startswith("sks, ") and text.endswith(", photo")
            assert zipped.read(Path(name).with_suffix(".txt").as_posix()).decode().strip() == text
            assert csv_rows[name]["caption"] == text == rows[name][2]
            assert zipped.read(name) == (EXAMPLES / name).read_bytes()
        assert csv_rows["corrupt.png"]["error"]


@pytest.mark.api
def test_caption_batch_api_renames_the_later_of_two_images_with_one_stem(tiny_client, tmp_path):
    jpeg, png = tmp_path / "photo.jpg", tmp_path / "photo.png"
    shutil.copy(EXAMPLES / "rocket.jpg", jpeg)
    shutil.copy(EXAMPLES / "coffee.png", png)
    _, archive, summary = tiny_client.predict(
        [handle_file(str(jpeg)), handle_file(str(png))], include_images=True, api_name="/caption_batch"
    )
    assert "`photo.png` → `photo_2.png`" in summary
    with zipfile.ZipFile(archive) as zipped:
        assert {"photo.jpg", "photo.txt", "photo_2.png", "photo_2.txt"} <= set(zipped.namelist())
        assert zipped.read("photo_2.png") == png.read_bytes() and zipped.read("photo.jpg") == jpeg.read_bytes()
        metadata = [json.loads(line)["file_name"] for line in zipped.read("metadata.jsonl").decode().splitlines()]
        assert metadata == ["photo.jpg", "photo_2.png"]


@pytest.mark.api
def test_caption_batch_api_without_files_says_what_to_do(tiny_client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Upload some images"):
        tiny_client.predict([], api_name="/caption_batch")


def test_edited_captions_replace_only_the_text_of_the_server_held_rows():
    from pipelines.blip.batch_caption import CaptionedImage, FailedImage, edited_results

    results = [CaptionedImage("a.png", "sks, a cat", -1.0), FailedImage("b.png", "unreadable"),
               CaptionedImage("c.png", "sks, a cup", -2.0)]  # fmt: skip
    # The page's table: row 0 edited, row 1 (a failed file) "edited", row 2 untouched, and rows past the server's.
    table = [["", "a.png", "  sks,\ta\x1b[31m tabby  cat ", -1.0], ["", "b.png", "not an image", None],
             ["", "c.png", "sks, a cup", -2.0], ["", "/etc/passwd", "planted", 0.0]]  # fmt: skip
    edited, names = edited_results(results, table, file_column=1, caption_column=2)
    assert names == ["a.png"]
    assert edited[0] == CaptionedImage("a.png", "sks, a[31m tabby cat", -1.0, edited=True)
    assert edited[1:] == results[1:] and len(edited) == 3
    # A table sorted on the page: captions follow their file, not their position.
    swapped = [["", "c.png", "sks, a mug", -2.0], ["", "b.png", "", None], ["", "a.png", "sks, a cat", -1.0]]
    edited, names = edited_results(results, swapped, file_column=1, caption_column=2)
    assert names == ["c.png"] and edited[2].text == "sks, a mug" and edited[0] == results[0]
    with pytest.raises(ValueError, match="The caption of a.png is empty"):
        edited_results(results, [["", "a.png", "   ", 0]], file_column=1, caption_column=2)
    with pytest.raises(ValueError, match="a.png has 2001 characters; keep it under 2000"):
        edited_results(results, [["", "a.png", "x" * 2001, 0]], file_column=1, caption_column=2)


@pytest.mark.api
def test_an_edited_batch_caption_ends_up_in_the_exported_zip(tiny_client):
    from gradio_client.exceptions import AppError

    uploads = [handle_file(str(EXAMPLES / name)) for name in ("chelsea.png", "coffee.png")]
    table, first_zip, _ = tiny_client.predict(uploads, trigger="sks", api_name="/caption_batch")
    rows = table["data"]
    edited_row = next(index for index, row in enumerate(rows) if row[1] == "coffee.png")
    rows[edited_row][2] = "sks, a cup of black coffee on a saucer"
    # Only caption cells are taken from the page: a row naming another file is ignored, never opened.
    rows[1 - edited_row][1:3] = ["../../app.py", "planted"]
    archive, summary, details = tiny_client.predict(
        {"headers": table["headers"], "data": rows}, api_name="/caption_batch_export"
    )
    assert details["edited"] == ["coffee.png"] and "Saved 1 edited caption" in summary
    with zipfile.ZipFile(archive) as zipped, zipfile.ZipFile(first_zip) as before:
        assert zipped.read("coffee.txt").decode().strip() == "sks, a cup of black coffee on a saucer"
        assert zipped.read("chelsea.txt") == before.read("chelsea.txt")
        metadata = {
            entry["file_name"]: entry["text"]
            for entry in map(json.loads, zipped.read("metadata.jsonl").decode().splitlines())
        }
        assert metadata["coffee.png"] == "sks, a cup of black coffee on a saucer"
        csv_rows = {row["file_name"]: row for row in csv.DictReader(io.StringIO(zipped.read("captions.csv").decode()))}
        assert csv_rows["coffee.png"]["edited"] == "yes" and csv_rows["chelsea.png"]["edited"] == ""
        assert zipped.read("coffee.png") == (EXAMPLES / "coffee.png").read_bytes()  # images copied as they were
        assert json.loads(zipped.read("captioning.json"))["edited_captions"] == ["coffee.png"]
        assert "app.py" not in " ".join(zipped.namelist())
    # A client that never captioned has no batch to export.
    from gradio_client import Client

    stranger = Client(tiny_client.src, verbose=False)
    with pytest.raises(AppError, match="Caption a batch first"):
        stranger.predict({"headers": table["headers"], "data": rows}, api_name="/caption_batch_export")
