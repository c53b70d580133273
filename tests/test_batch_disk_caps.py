"""The Batch tab's zips on disk: images kept as uploaded (BMP, TIFF, GIF as PNG), one copy per batch
however often its captions are saved, per-client and total caps on the bytes kept, damaged zip
members listed instead of failing the batch, and no server path in the zip.

The attack these guard against (security issue, item 2): a 3.9 MB zip of 16 compressible 2048²
BMPs became a 201 MB zip in Gradio's cache (images stored uncompressed), and each
``/caption_batch_export`` (no GPU slot, no limit) wrote another full copy: 809 MB after three.
"""

from __future__ import annotations

import io
import json
import os
import struct
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from pipelines.blip import batch_caption
from pipelines.blip.batch_caption import (
    CaptionedImage,
    FailedImage,
    KeptZips,
    ZipOverLimit,
    dataset_zip,
)
from pipelines.catalog import get_spec
from pipelines.images import load_image
from pipelines.training.dataset import read_dataset
from tests.app_server import APP_ROOT, tiny_app
from tests.test_batch_caption import collect

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
MB = 1024**2


def compressible_pixels(index: int, side: int) -> np.ndarray:
    """Flat 64-px squares with a little noise: deflate packs it 50x, under the 200x zip-bomb limit."""
    rng = np.random.default_rng(index)
    y, x = np.arange(side)[:, None], np.arange(side)[None, :]
    pixels = np.repeat(((x // 64 + y // 64 + index) % 8 * 32).astype(np.uint8)[:, :, None], 3, axis=2)
    noise = rng.random((side, side)) < 0.002
    pixels[noise] = rng.integers(0, 256, (int(noise.sum()), 3), dtype=np.uint8)
    return pixels


def encoded(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def bmp_zip(path: Path, count: int = 16, side: int = 1024) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index in range(count):
            archive.writestr(f"img{index:02d}.bmp", encoded(compressible_pixels(index, side), "BMP"))
    return path


def truncated_zip(path: Path, members: dict[str, bytes], cut: str) -> Path:
    """A zip of ``members`` whose member ``cut`` lost the second half of its deflate stream (its data ends early)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    blob = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(cut)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    lost = info.compress_size - info.compress_size // 2
    cut_blob = bytearray(blob[: start + info.compress_size // 2] + blob[start + info.compress_size :])
    end_record = cut_blob.rfind(b"PK\x05\x06")  # the central directory moved up by the bytes lost
    struct.pack_into("<I", cut_blob, end_record + 16, struct.unpack_from("<I", cut_blob, end_record + 16)[0] - lost)
    path.write_bytes(cut_blob)
    return path


def members_of(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def metadata_of(members: dict[str, bytes]) -> dict[str, str]:
    lines = members["metadata.jsonl"].decode().splitlines()
    return {entry["file_name"]: entry["text"] for entry in map(json.loads, lines)}


def bytes_under(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


# ----------------------------------------------------------------------------- what goes in the zip


@pytest.fixture
def mixed_images(tmp_path) -> dict[str, Path]:
    """One image per upload format; ``x.bmp`` and ``x.png`` share a stem, ``y.png`` is really a BMP."""
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = compressible_pixels(1, 256)
    files = {
        "a.jpg": (EXAMPLES / "rocket.jpg").read_bytes(),
        "b.png": (EXAMPLES / "chelsea.png").read_bytes(),
        "c.webp": encoded(pixels, "WEBP"),
        "d.bmp": encoded(pixels, "BMP"),
        "e.tif": encoded(pixels, "TIFF"),
        "f.gif": encoded(pixels, "GIF"),
        "x.bmp": encoded(compressible_pixels(2, 128), "BMP"),
        "x.png": encoded(compressible_pixels(3, 128), "PNG"),
        "y.png": encoded(compressible_pixels(4, 128), "BMP"),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def test_png_jpeg_webp_keep_their_bytes_and_bmp_tiff_gif_become_png_with_their_captions(tmp_path, mixed_images):
    results = [CaptionedImage(name, f"caption of {name}", -1.0) for name in mixed_images]
    archive = dataset_zip(results + [FailedImage("z.png", "unreadable")], tmp_path / "out.zip", images=mixed_images)
    members = members_of(archive.path)
    for name, in_zip in (("a.jpg", "a.jpg"), ("b.png", "b.png"), ("c.webp", "c.webp"), ("x.png", "x_2.png")):
        assert members[in_zip] == mixed_images[name].read_bytes(), name  # byte for byte
    assert archive.converted == {
        "d.bmp": "d.png",
        "e.tif": "e.png",
        "f.gif": "f.png",
        "x.bmp": "x.png",  # first in sorted order, it keeps x.txt
        "y.png": "y.png",  # a BMP named .png is re-encoded under its own name
    }
    assert archive.renamed == {"x.png": "x_2.png"}  # the later one of the two with stem x
    for old, new in archive.converted.items():
        stored = Image.open(io.BytesIO(members[new]))
        assert stored.format == "PNG" and old not in members or old == new
        assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(load_image(mixed_images[old])))
        assert members[Path(new).with_suffix(".txt").as_posix()].decode() == f"caption of {old}\n"
    # metadata.jsonl names what is in the zip, and the Studio's imagefolder reader takes it as it is.
    metadata = metadata_of(members)
    assert set(metadata) == {"a.jpg", "b.png", "c.webp", "d.png", "e.png", "f.png", "x_2.png", "x.png", "y.png"}
    assert metadata["x.png"] == "caption of x.bmp" and metadata["x_2.png"] == "caption of x.png"
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(archive.path).extractall(unpacked)
    examples = read_dataset(unpacked)
    assert {example.file_name: example.text for example in examples} == metadata
    csv_names = [line.split(",")[0] for line in members["captions.csv"].decode().splitlines()[1:]]
    assert sorted(csv_names) == sorted([*metadata, "z.png"])


def test_an_uncompressed_png_is_deflated_in_the_zip_and_comes_out_unchanged(tmp_path):
    raw_png = tmp_path / "raw.png"
    raw_png.write_bytes(encoded(compressible_pixels(5, 512), "PNG", compress_level=0))
    archive = dataset_zip([CaptionedImage("raw.png", "flat", -1.0)], tmp_path / "out.zip", images={"raw.png": raw_png})
    with zipfile.ZipFile(archive.path) as zipped:
        info = zipped.getinfo("raw.png")
        assert zipped.read("raw.png") == raw_png.read_bytes()
    assert info.compress_type == zipfile.ZIP_DEFLATED and info.compress_size < info.file_size / 10
    assert archive.path.stat().st_size < raw_png.stat().st_size / 10


def test_a_zip_never_grows_past_max_bytes_and_a_refused_one_leaves_no_file(tmp_path):
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
    results = [CaptionedImage(name, "words", -1.0) for name in names]
    images = {name: EXAMPLES / name for name in names}
    full = dataset_zip(results, tmp_path / "full.zip", images=images).path.stat().st_size
    for limit in (1000, full // 2, full - 1):
        with pytest.raises(ZipOverLimit):
            dataset_zip(results, tmp_path / "limited.zip", images=images, max_bytes=limit)
        assert not (tmp_path / "limited.zip").exists()
    fitted = dataset_zip(results, tmp_path / "fitted.zip", images=images, max_bytes=full + 8192)
    assert fitted.path.stat().st_size == full


# ----------------------------------------------------------------------------- the book of bytes kept


def sized_file(folder: Path, size: int) -> Path:
    """``folder/captions.zip`` of ``size`` bytes (sparse: only its size matters here)."""
    folder.mkdir(parents=True)
    path = folder / "captions.zip"
    path.write_bytes(b"")
    os.truncate(path, size)
    return path


def test_each_client_keeps_at_most_its_share_and_everyone_the_total(tmp_path):
    now = [1000.0]
    kept = KeptZips(per_client=4 * MB, total=6 * MB, max_age=3600, clock=lambda: now[0])
    with kept.writing("addr:alice") as room:
        assert room == 4 * MB
        kept.keep("addr:alice", sized_file(tmp_path / "a1", 3 * MB))
    now[0] += 600
    with kept.writing("addr:alice") as room:
        assert room == 1 * MB
        kept.keep("addr:alice", sized_file(tmp_path / "a2", 1 * MB))
    with pytest.raises(
        ValueError,
        match=r"^Your Batch zips already take 4\.0 MB of the 4\.0 MB one visitor may keep; download what you need "
        r"from them and try again in 50 min, when the oldest expires",
    ):
        kept.check_room("addr:alice")
    # Another client has its own share, within what is left of the total.
    with kept.writing("addr:bob") as room:
        assert room == 2 * MB
        kept.keep("addr:bob", sized_file(tmp_path / "b1", 2 * MB))
    with pytest.raises(ValueError, match=r"^The Batch zips of all visitors take 6\.0 MB of the 6\.0 MB this server"):
        kept.check_room("addr:carol")
    assert (kept.kept("addr:alice"), kept.kept("addr:bob"), kept.kept()) == (4 * MB, 2 * MB, 6 * MB)
    # An hour after it was written, the oldest zip is deleted (as Gradio's cache would) and its bytes are free.
    now[0] += 3000
    assert kept.kept("addr:alice") == 1 * MB and not (tmp_path / "a1").exists()
    kept.check_room("addr:alice", needed=2 * MB)


def test_a_replacing_zip_may_reuse_the_bytes_of_the_one_it_replaces_which_is_deleted(tmp_path):
    kept = KeptZips(per_client=4 * MB, total=100 * MB, max_age=3600)
    first = sized_file(tmp_path / "first", 3 * MB)
    kept.keep("addr:alice", first)
    with kept.writing("addr:alice", replacing=first) as room:
        assert room == 4 * MB  # the zip it replaces counts as free
        second = sized_file(tmp_path / "second", 3 * MB)
        kept.keep("addr:alice", second, replacing=first)
    assert not first.exists() and not first.parent.exists() and second.is_file()
    assert kept.kept("addr:alice") == 3 * MB and kept.holds(second) and not kept.holds(first)
    # A path the book never wrote is never deleted.
    stranger = sized_file(tmp_path / "not-ours", 10)
    kept.keep("addr:alice", sized_file(tmp_path / "third", 10), replacing=stranger)
    assert stranger.is_file()


def test_a_zip_past_the_room_left_is_refused_with_the_sentence_and_leaves_no_file(tmp_path):
    kept = KeptZips(per_client=1 * MB, total=100 * MB, max_age=3600)
    kept.keep("addr:alice", sized_file(tmp_path / "earlier", 3 * MB // 4))
    names = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")  # 1.3 MB in a zip, deflated or not
    images = {name: EXAMPLES / name for name in names}
    one = [CaptionedImage("coffee.png", "a cup", -1.0)]  # 0.45 MB, more than the 0.25 MB left
    with (
        pytest.raises(ValueError, match=r"^Your Batch zips take 0\.8 MB of the 1\.0 MB one visitor may keep"),
        kept.writing("addr:alice") as room,
    ):
        dataset_zip(one, tmp_path / "new.zip", images=images, max_bytes=room)
    assert not (tmp_path / "new.zip").exists() and kept.kept("addr:alice") == 3 * MB // 4
    both = [CaptionedImage(name, "words", -1.0) for name in names]
    with (
        pytest.raises(ValueError, match=r"^This batch's zip would take more than the 1\.0 MB one visitor may keep"),
        kept.writing("addr:bob") as room,
    ):
        dataset_zip(both, tmp_path / "new.zip", images=images, max_bytes=room)
    assert not (tmp_path / "new.zip").exists() and kept.kept("addr:bob") == 0


# ----------------------------------------------------------------------------- damaged zips


def test_a_truncated_member_is_listed_with_its_reason_and_the_rest_is_unpacked(tmp_path):
    photo = (EXAMPLES / "coffee.png").read_bytes()
    archive = truncated_zip(tmp_path / "cut.zip", {"good.png": photo, "cut.png": photo}, cut="cut.png")
    with zipfile.ZipFile(archive) as zipped, pytest.raises(EOFError):  # what used to fail the whole batch
        batch_caption._copy_at_most(zipped, zipped.getinfo("cut.png"), tmp_path / "out.png")
    uploads = collect([archive], tmp_path / "work")
    assert [path.name for path in uploads.files] == ["good.png"] and (uploads.root / "good.png").read_bytes() == photo
    assert [(failure.file_name, failure.reason) for failure in uploads.failures] == [
        (
            "cut.zip:cut.png",
            "cut.zip:cut.png ends before its data does (a truncated or damaged zip); re-create the zip.",
        )
    ]
    assert not (uploads.root / "cut.png").exists()


def test_encrypted_members_are_refused_by_name_before_unpacking(tmp_path):
    photo = (EXAMPLES / "chelsea.png").read_bytes()
    path = tmp_path / "locked.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("open.png", photo)
        archive.writestr("locked.png", photo)
    blob = bytearray(path.read_bytes())
    entry = blob.rfind(b"PK\x01\x02")  # locked.png's central-directory entry: set "encrypted" (bit 0)
    struct.pack_into("<H", blob, entry + 8, struct.unpack_from("<H", blob, entry + 8)[0] | 1)
    path.write_bytes(blob)
    uploads = collect([path], tmp_path / "work")
    assert [path.name for path in uploads.files] == ["open.png"]
    assert uploads.failures[0].file_name == "locked.zip:locked.png" and "is encrypted" in uploads.failures[0].reason


# ----------------------------------------------------------------------------- through the API

PER_CLIENT_MB = 3  # the app below: every client of these tests is 127.0.0.1, so they share this


@pytest.fixture(scope="module")
def disk_app(tiny_root, tmp_path_factory):
    """`python app.py --tiny` with its Gradio cache, work root and temp folder where the tests can weigh them."""
    scratch = tmp_path_factory.mktemp("batch-disk")
    folders = {"cache": scratch / "gradio", "work": scratch / "work", "tmp": scratch / "tmp", "scratch": scratch}
    folders["tmp"].mkdir()
    environment = {
        "GRADIO_TEMP_DIR": str(folders["cache"]),
        "STUDIO_WORK_DIR": str(folders["work"]),
        "TMPDIR": str(folders["tmp"]),
        "STUDIO_RESULTS_DIR": str(scratch / "results"),
        "STUDIO_MAX_BATCH_KEPT_MB_PER_CLIENT": str(PER_CLIENT_MB),
    }
    with tiny_app(tiny_root, scratch / "app.log", environment=environment) as (_, url):
        yield url, folders


@pytest.mark.api
@pytest.mark.slow
def test_16_compressible_bmps_keep_about_their_upload_size_and_three_exports_keep_one_copy(disk_app, tmp_path):
    url, folders = disk_app
    client = Client(url, verbose=False)
    upload = bmp_zip(tmp_path / "bmps.zip")  # 16 x 3 MB of BMP in a 0.9 MB zip
    upload_bytes = upload.stat().st_size
    cache_before = bytes_under(folders["cache"])
    table, archive, summary = client.predict([handle_file(str(upload))], strategy="greedy", api_name="/caption_batch")
    assert "16 of 16 images captioned" in summary and "16 image(s) stored as PNG" in summary
    members = members_of(archive)
    assert sorted(metadata_of(members)) == [f"img{index:02d}.png" for index in range(16)]
    assert all(Image.open(io.BytesIO(members[f"img{index:02d}.png"])).format == "PNG" for index in range(16))
    assert Path(archive).stat().st_size < 2 * upload_bytes  # was 55x the upload (every BMP stored raw)
    after_batch = bytes_under(folders["cache"]) - cache_before  # the upload and the zip
    assert after_batch < 3 * upload_bytes
    for number in range(3):
        rows = table["data"]
        rows[0][2] = f"edited {number} times"
        exported, _, details = client.predict(
            {"headers": table["headers"], "data": rows}, api_name="/caption_batch_export"
        )
        assert details["edited"] == ["img00.bmp"] and metadata_of(members_of(exported))["img00.png"] == rows[0][2]
    after_exports = bytes_under(folders["cache"]) - cache_before
    assert after_exports - after_batch < 4096  # one zip, replaced each time (was one more full copy per export)
    assert bytes_under(folders["work"]) + bytes_under(folders["tmp"]) == 0  # no unpacked copy left behind


@pytest.mark.api
@pytest.mark.slow
def test_no_server_path_in_the_zip_and_a_truncated_member_is_listed_while_the_rest_is_captioned(
    disk_app, tmp_path, tiny_root
):
    url, folders = disk_app
    client = Client(url, verbose=False)
    photo = (EXAMPLES / "chelsea.png").read_bytes()
    members = {"good.png": photo, "flat.bmp": encoded(compressible_pixels(7, 64), "BMP"), "cut.png": photo}
    upload = truncated_zip(tmp_path / "set.zip", members, cut="cut.png")
    table, first, summary = client.predict([handle_file(str(upload))], strategy="greedy", api_name="/caption_batch")
    assert "2 of 2 images captioned" in summary and "set.zip:cut.png" in summary
    rows = {row[1]: row for row in table["data"]}
    assert (
        set(rows) == {"good.png", "flat.bmp", "set.zip:cut.png"}
        and "ends before its data" in rows["set.zip:cut.png"][2]
    )
    exported, _, _ = client.predict(table, api_name="/caption_batch_export")
    roots = [folders["scratch"], tiny_root, APP_ROOT, Path.home()]
    for archive in (first, exported):
        zipped = members_of(archive)
        manifest = json.loads(zipped["captioning.json"])
        assert manifest["model"] == get_spec("blip-caption").tiny_dir  # the tiny model's folder, by name only
        assert (manifest["images"], manifest["captioned"], manifest["failed"]) == (2, 2, 1)
        assert manifest["request"]["strategy"] == "greedy" and manifest["images_in_zip"] is True
        for name, data in zipped.items():
            if name.endswith((".png", ".jpg")):
                continue
            text = data.decode()
            for root in roots:
                assert str(root) not in text and os.path.realpath(root) not in text, (name, root)
            assert "/tmp" not in text and "\\" not in text, name
        assert set(metadata_of(zipped)) == {"good.png", "flat.png"}


@pytest.mark.api
@pytest.mark.slow
def test_the_cap_refuses_with_a_sentence_and_earlier_zips_stay_downloadable(disk_app):
    from gradio_client.exceptions import AppError

    url, _ = disk_app
    client = Client(url, verbose=False, download_files=False)  # results as server URLs, fetched below
    photos = [handle_file(str(EXAMPLES / name)) for name in ("astronaut.png", "coffee.png")]  # 1.2 MB as they are
    zips = []
    with pytest.raises(AppError) as refused:
        for _ in range(1 + PER_CLIENT_MB):  # the share holds fewer zips than this
            table, archive, _ = client.predict(photos, strategy="greedy", api_name="/caption_batch")
            zips.append(archive["url"])
    sentence = str(refused.value)
    assert (
        sentence.startswith("Your Batch zips take") and f"of the {PER_CLIENT_MB}.0 MB one visitor may keep" in sentence
    )
    assert "try again in" in sentence and 1 <= len(zips) < 1 + PER_CLIENT_MB
    for link in zips:  # every earlier zip is still served, whole
        with urllib.request.urlopen(link, timeout=30) as response:
            members = members_of(io.BytesIO(response.read()))
        assert members["coffee.png"] == (EXAMPLES / "coffee.png").read_bytes()
    # Saving edited captions replaces its batch's zip, so it still fits when no new batch would.
    exported, _, _ = client.predict(table, api_name="/caption_batch_export")
    with urllib.request.urlopen(exported["url"], timeout=30) as response:
        assert "coffee.png" in members_of(io.BytesIO(response.read()))
    with pytest.raises(urllib.error.HTTPError):  # the zip it replaced is gone from the server
        urllib.request.urlopen(zips[-1], timeout=30)
    for link in zips[:-1]:
        with urllib.request.urlopen(link, timeout=30) as response:
            assert response.status == 200
