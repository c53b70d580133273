"""Bounded uploads: zips are counted from their central directory before anything is written, duplicate
names cost O(1) each, a refusal leaves nothing behind, and the Batch tab keeps no work folder.

The attacks these guard against (issue 15): a 671 KB zip of 8000 members all named ``a.png`` held the
GPU queue for 288 s; a zip of 20,000 distinct names was unpacked in full before the "at most 2000"
refusal, and its files were never deleted; batch thumbnails decoded files the safe decoder refused.
"""

from __future__ import annotations

import inspect
import io
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest
from gradio_client import handle_file
from PIL import Image

from pipelines import settings
from pipelines.blip import batch_caption
from pipelines.blip.batch_caption import CaptionedImage, FailedImage
from tests.test_batch_caption import collect

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
PNG = (EXAMPLES / "coffee.png").read_bytes()


def zip_of(path: Path, names, data: bytes = b"x") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about each duplicate name
        with zipfile.ZipFile(path, "w") as archive:
            for name in names:
                archive.writestr(name, data)
    return path


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- zips


def test_duplicate_names_cost_constant_time_each():
    claims = batch_caption._NameClaims()
    started = time.perf_counter()
    names = [claims.claim("a.png") for _ in range(8000)]
    assert time.perf_counter() - started < 1.0  # counting up from 2 each time took minutes
    assert names[:3] == ["a.png", "a (2).png", "a (3).png"] and names[-1] == "a (8000).png"
    assert len({name.lower() for name in names}) == 8000


def test_a_taken_numbered_name_is_skipped_once():
    claims = batch_caption._NameClaims()
    assert [claims.claim(name) for name in ("a (2).png", "A.png", "a.png", "a.png", "sub/a.png")] == [
        "a (2).png",
        "A.png",
        "a (3).png",
        "a (4).png",
        "sub/a.png",
    ]


def test_a_training_sized_zip_of_one_repeated_name_unpacks_in_seconds(tmp_path):
    archive = zip_of(tmp_path / "same.zip", ["a.png"] * settings.MAX_TRAINING_IMAGES)
    started = time.perf_counter()
    uploads = collect([archive], tmp_path / "work", max_files=settings.MAX_TRAINING_IMAGES)
    assert time.perf_counter() - started < 10  # quadratic renaming took ~110 s for 5000 names
    names = {path.relative_to(uploads.root).as_posix() for path in uploads.files}
    assert len(names) == settings.MAX_TRAINING_IMAGES and {"a.png", "a (5000).png"} <= names


def test_8000_members_named_a_png_are_refused_at_once_and_nothing_is_written(tmp_path):
    archive = zip_of(tmp_path / "same.zip", ["a.png"] * 8000)
    started = time.perf_counter()
    with pytest.raises(
        ValueError, match=f"8000 images were uploaded; one run takes at most {settings.MAX_BATCH_FILES}"
    ):
        collect([archive], tmp_path / "work")
    assert time.perf_counter() - started < 2
    assert not (tmp_path / "work").exists()


def test_20000_distinct_names_are_refused_before_any_file_is_written(tmp_path, monkeypatch):
    archive = zip_of(tmp_path / "many.zip", [f"{index}.png" for index in range(20_000)])
    opened = []
    monkeypatch.setattr(batch_caption, "_copy_at_most", lambda *args: opened.append(args))
    with pytest.raises(ValueError, match="20000 images were uploaded; one run takes at most 2000. Split them"):
        collect([archive], tmp_path / "work")
    assert not (tmp_path / "work").exists() and opened == []


def test_loose_and_zipped_images_count_together(tmp_path):
    loose = [tmp_path / "one.png", tmp_path / "two.png"]
    for path in loose:
        path.write_bytes(PNG)
    archive = zip_of(tmp_path / "two.zip", ["three.png", "four.png"], PNG)
    with pytest.raises(ValueError, match="4 images were uploaded; one run takes at most 3"):
        collect([*loose, archive], tmp_path / "work", max_files=3)
    assert not (tmp_path / "work").exists()
    assert len(collect([*loose, archive], tmp_path / "work", max_files=4).files) == 4


def test_declared_sizes_are_summed_before_unpacking(tmp_path, monkeypatch):
    archive = zip_of(tmp_path / "big.zip", ["a.png", "b.png", "c.png"], PNG)
    written = []
    real_copy = batch_caption._copy_at_most
    monkeypatch.setattr(
        batch_caption, "_copy_at_most", lambda *args: written.append(args[1].filename) or real_copy(*args)
    )
    uploads = collect([archive], tmp_path / "work", max_unpacked_bytes=2 * len(PNG))
    assert written == ["a.png", "b.png"] and len(uploads.files) == 2
    assert "unpacks past" in uploads.failures[0].reason and uploads.failures[0].file_name == "big.zip:c.png"


def test_a_failure_while_unpacking_leaves_nothing_behind(tmp_path, monkeypatch):
    archive = zip_of(tmp_path / "set.zip", ["a.png", "b.png", "c.png"], PNG)
    real_copy = batch_caption._copy_at_most
    calls = []

    def copy_then_fail(archive, member, target, *args):
        calls.append(member.filename)
        if len(calls) == 2:
            raise KeyboardInterrupt  # anything at all: a cancelled request, a full disk
        real_copy(archive, member, target, *args)

    monkeypatch.setattr(batch_caption, "_copy_at_most", copy_then_fail)
    with pytest.raises(KeyboardInterrupt):
        collect([archive], tmp_path / "work")
    assert not (tmp_path / "work").exists()
    reused = tmp_path / "reused"
    reused.mkdir()
    (reused / "keep.txt").write_text("the caller's")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        collect([archive], reused)
    assert [path.name for path in reused.iterdir()] == ["keep.txt"]


def test_hidden_members_are_neither_counted_nor_written(tmp_path):
    archive = zip_of(tmp_path / "mac.zip", ["a.png", "__MACOSX/._a.png", ".thumbs/b.png"], PNG)
    uploads = collect([archive], tmp_path / "work", max_files=1)
    assert [path.name for path in uploads.files] == ["a.png"]
    assert not (tmp_path / "work" / "__MACOSX").exists() and not (tmp_path / "work" / ".thumbs").exists()


# ----------------------------------------------------------------------------- thumbnails


@pytest.fixture
def disguised(tmp_path) -> Path:
    """Files Pillow would open but the safe decoder refuses, each named .png."""
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "good.png").write_bytes(PNG)
    (root / "pcx.png").write_bytes(encoded(Image.new("RGB", (16, 16), "red"), "PCX"))
    (root / "tga.png").write_bytes(encoded(Image.new("RGB", (16, 16), "red"), "TGA"))
    (root / "print.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, "PNG", optimize=True)  # 81 MP, over the 64 MP limit
    (root / "huge.png").write_bytes(buffer.getvalue())
    return root


def test_thumbnails_only_come_from_the_safe_decoder(disguised):
    from components import batch

    assert batch.thumbnail_markdown(disguised / "good.png").startswith("![](data:image/jpeg;base64,")
    started = time.perf_counter()
    for name in ("pcx.png", "tga.png", "print.png", "huge.png"):
        assert batch.thumbnail_markdown(disguised / name) == "", name
    assert time.perf_counter() - started < 2  # the 81 MP PNG was never decoded


def test_refused_rows_get_no_thumbnail_and_their_files_are_not_opened(disguised, monkeypatch):
    from components import batch

    opened = []
    real = batch.load_image
    monkeypatch.setattr(
        batch, "load_image", lambda source, **kw: opened.append(Path(source).name) or real(source, **kw)
    )
    results = [
        CaptionedImage("good.png", "a cup", -1.0),
        FailedImage("print.png", "not an image"),
        FailedImage("huge.png", "too large"),
    ]
    rows = batch.result_rows(results, disguised)
    assert opened == ["good.png"]
    assert rows[0][0].startswith("![](data:image/jpeg") and rows[1][0] == "" and rows[2][0] == ""


# ----------------------------------------------------------------------------- the Batch tab's work folder


def test_the_batch_work_folder_is_deleted_and_only_the_zip_survives_in_gradios_cache(
    tiny_manager, tmp_path, monkeypatch
):
    from components.batch import make_caption_batch_function
    from components.common import StopRequests
    from pipelines.studio import Studio

    work_root, cache = tmp_path / "tmp", tmp_path / "gradio-cache"
    work_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work_root))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    endpoint = make_caption_batch_function(Studio(manager=tiny_manager), StopRequests())
    defaults = {name: parameter.default for name, parameter in inspect.signature(endpoint).parameters.items()}
    defaults.update(files=[str(zip_of(tmp_path / "two.zip", ["a.png", "a.png"], PNG))], strategy="greedy")
    defaults.update(progress=lambda *args, **kwargs: None, request=None, batch_size=2)
    rows, archive, summary, _kept_rows = endpoint(*defaults.values())  # the last: the rows the server keeps for edits
    assert "2 of 2 images captioned" in summary and [row[1] for row in rows] == ["a (2).png", "a.png"]
    assert list(work_root.iterdir()) == []  # the unpacked copies are gone
    assert Path(archive).is_relative_to(cache) and Path(archive).is_file()
    with zipfile.ZipFile(archive) as zipped:
        assert zipped.read("a (2).png") == PNG


@pytest.mark.api
def test_caption_batch_api_shows_thumbnails_only_for_captioned_images(tiny_client, tmp_path):
    disguised = tmp_path / "old.png"
    disguised.write_bytes(encoded(Image.new("RGB", (16, 16), "red"), "TGA"))
    table, _, summary = tiny_client.predict(
        [handle_file(str(EXAMPLES / "coffee.png")), handle_file(str(disguised))], api_name="/caption_batch"
    )
    rows = {row[1]: row for row in table["data"]}
    assert "1 of 2 images captioned" in summary
    assert rows["coffee.png"][0].startswith("![](data:image/jpeg") and rows["old.png"][0] == ""
