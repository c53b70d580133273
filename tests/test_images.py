"""Tests for pipelines.images: every fixture is generated in tmp_path, nothing binary is committed."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import GifImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from pipelines import settings
from pipelines.images import ImageDecodeError, decode_bytes_needed, describe_image, load_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def _png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    # Noise does not compress, so the file is long enough to cut in half meaningfully.
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid 1x1 PNG whose IHDR (with a fixed CRC) claims width x height: a cheap bomb."""
    data = bytearray(_png_bytes(Image.new("1", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- modes and colour handling ------------------------------------------------------


def test_rgba_is_composited_onto_white():
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    out = load_image(_png_bytes(image))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == RED
    assert _close(out.getpixel((2, 0)), (127, 127, 127), 1)


def test_la_is_composited_onto_white():
    image = Image.new("LA", (2, 1))
    image.putdata([(50, 0), (50, 255)])
    out = load_image(_png_bytes(image))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == (50, 50, 50)


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([*RED, *BLUE])
    image.putdata([0, 1])
    out = load_image(_save(image, tmp_path / "pal.png"))
    assert [out.getpixel((x, 0)) for x in range(2)] == [RED, BLUE]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparency_becomes_white(tmp_path, suffix):
    image = Image.new("P", (2, 1))
    image.putpalette([*RED, *BLUE])
    image.putdata([0, 1])
    out = load_image(_save(image, tmp_path / f"pal{suffix}", transparency=0))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == BLUE


def test_grayscale_l_and_bilevel():
    gray = Image.new("L", (1, 1), 100)
    assert load_image(_png_bytes(gray)).getpixel((0, 0)) == (100, 100, 100)
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    out = load_image(_png_bytes(bilevel))
    assert [out.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), WHITE]


@pytest.mark.parametrize(
    ("dtype", "suffix"),
    [("<u2", ".png"), ("<u2", ".tif"), (">u2", ".tif"), ("<i4", ".tif"), ("<u2", None)],
    ids=["I;16-png", "I;16-tiff", "I;16B-tiff", "I-tiff", "I;16-in-memory"],
)
def test_16_bit_images_scale_by_range_not_clip(tmp_path, dtype, suffix):
    image = Image.fromarray(np.array([[0, 32768, 65535, 255]], dtype=dtype))
    assert image.mode in ("I;16", "I;16B", "I")
    source = image if suffix is None else _save(image, tmp_path / f"deep{suffix}")
    out = load_image(source)
    values = [out.getpixel((x, 0))[0] for x in range(4)]
    assert values == [0, 128, 255, 1]
    assert out.mode == "RGB"


@pytest.mark.parametrize("scale", [255.0, 1.0], ids=["0-255", "0-1"])
def test_float_f_images(tmp_path, scale):
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32) * np.float32(scale))
    assert image.mode == "F"
    out = load_image(_save(image, tmp_path / "float.tif"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    assert out.mode == "RGB"
    assert _close(out.getpixel((8, 8)), RED)


@pytest.mark.parametrize(("orientation", "marked_corner"), [(6, "top-right"), (8, "bottom-left")])
def test_exif_orientation_is_applied(tmp_path, orientation, marked_corner):
    image = Image.new("RGB", (80, 40), WHITE)
    image.paste(RED, (0, 0, 16, 16))  # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = load_image(_save(image, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95))
    assert out.size == (40, 80)
    corners = {"top-left": (3, 3), "top-right": (36, 3), "bottom-left": (3, 76), "bottom-right": (36, 76)}
    for corner, xy in corners.items():
        assert _close(out.getpixel(xy), RED if corner == marked_corner else WHITE), corner


# --- multi-frame files: frame 0 only, and no other frame is decoded ------------------


@pytest.mark.parametrize("suffix", [".gif", ".png", ".tif"], ids=["gif", "apng", "tiff"])
def test_multi_frame_files_give_first_frame_only(tmp_path, monkeypatch, suffix):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    path = _save(frames[0], tmp_path / f"anim{suffix}", save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 3
    seeks: list[int] = []
    for cls in (GifImagePlugin.GifImageFile, PngImagePlugin.PngImageFile, TiffImagePlugin.TiffImageFile):
        original = cls._seek

        def spy(self, frame, *args, _original=original, **kwargs):
            seeks.append(frame)
            return _original(self, frame, *args, **kwargs)

        monkeypatch.setattr(cls, "_seek", spy)
    out = load_image(path)
    assert out.getpixel((4, 4)) == RED
    assert all(frame == 0 for frame in seeks), seeks


# --- size limits ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "megapixels"),
    [(10_000, 8_000, "80.0"), (12_000, 10_000, "120.0"), (20_000, 20_000, "400.0")],
    ids=["own-header-check", "pillow-bomb-warning", "pillow-bomb-error"],
)
def test_too_many_pixels_refused_before_decoding(tmp_path, width, height, megapixels):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_claiming(width, height))
    filters_before = list(warnings.filters)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(path)
    message = str(caught.value)
    assert f"{megapixels} megapixels" in message
    assert "64 megapixel limit" in message
    assert "downscale it and upload again" in message
    assert "huge.png" in message
    # Global Pillow and warnings state is untouched.
    assert warnings.filters == filters_before
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_lazy_pil_image_is_checked_before_decoding(tmp_path):
    path = tmp_path / "lazy.png"
    path.write_bytes(_png_claiming(10_000, 8_000))
    with Image.open(path) as lazy, pytest.raises(ImageDecodeError, match="megapixels"):
        load_image(lazy)


def test_a_float32_tiff_over_the_decode_byte_cap_is_refused_before_decoding(tmp_path, monkeypatch):
    # 36 MP is under the pixel limit, but float32 decodes through float64 work arrays: ~1.4 GB from a 200 kB file.
    path = tmp_path / "float.tif"
    Image.new("F", (6000, 6000), 0.5).save(path, compression="tiff_adobe_deflate")
    assert path.stat().st_size < 1024 * 1024
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or original(self))
    with pytest.raises(ImageDecodeError) as caught:
        load_image(path)
    assert loads == []  # refused from the header: not one pixel decoded
    message = str(caught.value)
    assert "'float.tif' would take 1,373 MB of memory to decode (6000x6000 F pixels)" in message
    assert "over the 1024 MB limit" in message


def test_the_decode_byte_cap_keeps_64_megapixel_8_bit_images_and_refuses_float_ones():
    size = (8000, 8000)
    for mode in ("RGB", "RGBA", "L", "P", "CMYK"):
        assert decode_bytes_needed(mode, size) <= settings.MAX_DECODE_BYTES, mode
    assert decode_bytes_needed("P", size, transparent=True) <= settings.MAX_DECODE_BYTES
    assert decode_bytes_needed("F", size) > settings.MAX_DECODE_BYTES
    assert decode_bytes_needed("F", size) == 64_000_000 * 40  # decoded 4 + oriented copy 4 + float64 work 32


def test_max_decode_bytes_argument_is_honoured():
    data = _png_bytes(Image.new("RGB", (1024, 1024)))  # 8 bytes a pixel: decoded, and its oriented copy
    assert load_image(data, max_decode_bytes=8 * 1024 * 1024).size == (1024, 1024)
    with pytest.raises(ImageDecodeError, match=r"would take 8 MB of memory .* over the 7\.5 MB limit"):
        load_image(data, max_decode_bytes=int(7.5 * 1024 * 1024))


def test_keep_alpha_keeps_the_transparency():
    image = Image.new("RGBA", (2, 1))
    image.putdata([(255, 0, 0, 0), (0, 0, 255, 200)])
    out = load_image(_png_bytes(image), keep_alpha=True)
    assert out.mode == "RGBA" and list(out.getdata()) == [(255, 0, 0, 0), (0, 0, 255, 200)]
    assert load_image(_png_bytes(Image.new("L", (2, 2), 9)), keep_alpha=True).getpixel((0, 0)) == (9, 9, 9, 255)


def test_max_pixels_argument_is_honoured():
    with pytest.raises(ImageDecodeError, match=r"0\.02 megapixel limit"):
        load_image(_png_bytes(Image.new("RGB", (200, 200))), max_pixels=20_000)


def test_large_image_is_downscaled_with_aspect_kept():
    out = load_image(_png_bytes(Image.new("RGB", (3000, 1000), BLUE)), max_side=600)
    assert out.size == (600, 200)
    assert out.getpixel((300, 100)) == BLUE


def test_large_jpeg_uses_draft(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (4000, 1000), GREEN), tmp_path / "wide.jpg")
    drafts: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        drafts.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = load_image(path, max_side=500)
    assert drafts == [(500, 125)]
    assert out.size == (500, 125)
    assert _close(out.getpixel((250, 60)), GREEN)


def test_bytes_over_limit_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(b"\x89PNG" + b"\0" * (3 * 1024 * 1024))
    with pytest.raises(ImageDecodeError) as caught:
        load_image(path, max_bytes=2 * 1024 * 1024)
    assert "3.0 MB" in str(caught.value)
    assert "2 MB upload limit" in str(caught.value)


# --- malformed input: one line per case ---------------------------------------------


def _truncated(image: Image.Image, fmt: str, name: str):
    def make(tmp: Path) -> Path:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        return _write(tmp / name, buffer.getvalue()[: len(buffer.getvalue()) // 2])

    return make


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


MALFORMED = [
    pytest.param(lambda t: _write(t / "empty.png", b""), {}, ["empty.png", "empty"], id="empty-file"),
    pytest.param(lambda t: b"", {}, ["empty"], id="empty-bytes"),
    pytest.param(_truncated(_noise((64, 64)), "PNG", "cut.png"), {}, ["cut.png", "damaged"], id="truncated-png"),
    pytest.param(_truncated(_noise((64, 64)), "JPEG", "cut.jpg"), {}, ["cut.jpg", "damaged"], id="truncated-jpeg"),
    pytest.param(lambda t: _write(t / "notes.png", b"just some text\n" * 20), {}, ["notes.png", "PNG"], id="text"),
    pytest.param(lambda t: _write(t / "logo.svg", b'<?xml version="1.0"?><svg/>'), {}, ["SVG", "PNG"], id="svg-xml"),
    pytest.param(lambda t: b'\n  <svg xmlns="http://www.w3.org/2000/svg"/>', {}, ["SVG", "export it as PNG"], id="svg"),
    pytest.param(lambda t: t / "missing.png", {}, ["missing.png", "not found"], id="missing-path"),
    pytest.param(lambda t: str(t), {}, ["folder"], id="directory"),
    pytest.param(lambda t: None, {}, ["No image"], id="none"),
    pytest.param(lambda t: 42, {}, ["int", "file path"], id="wrong-type"),
    pytest.param(lambda t: b"x" * 2000, {"max_bytes": 1000, "name": "a.jpg"}, ["a.jpg", "MB"], id="bytes-limit"),
    pytest.param(lambda t: io.BytesIO(b"\x00" * 64), {"name": "blob.bin"}, ["blob.bin"], id="garbage-stream"),
    pytest.param(lambda t: io.StringIO("text"), {}, ["'rb'"], id="text-stream"),
    pytest.param(lambda t: np.zeros((4, 4, 2), np.uint8), {}, ["shape", "(4, 4, 2)"], id="array-2-channels"),
    pytest.param(lambda t: np.zeros((4, 4, 5), np.uint8), {}, ["shape"], id="array-5-channels"),
    pytest.param(lambda t: np.zeros(16, np.uint8), {}, ["shape"], id="array-1d"),
    pytest.param(lambda t: np.zeros((1, 4, 4, 3), np.uint8), {}, ["shape"], id="array-4d"),
    pytest.param(lambda t: np.zeros((0, 4, 3), np.uint8), {}, ["no pixels"], id="array-empty"),
    pytest.param(lambda t: np.array([["a"]]), {}, ["dtype"], id="array-strings"),
    pytest.param(lambda t: Image.new("RGB", (0, 0)), {}, ["no pixels"], id="pil-empty"),
]


@pytest.mark.parametrize(("make", "kwargs", "keywords"), MALFORMED)
def test_malformed_input_raises_clear_error(tmp_path, make, kwargs, keywords):
    with pytest.raises(ImageDecodeError) as caught:
        load_image(make(tmp_path), **kwargs)
    message = str(caught.value)
    for keyword in keywords:
        assert keyword in message, message
    assert message.endswith("."), message


def test_error_is_a_value_error():
    assert issubclass(ImageDecodeError, ValueError)


# --- numpy arrays -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((2, 3, 3), (10, 20, 30), np.uint8), (10, 20, 30)),
        (np.full((2, 3), 77, np.uint8), (77, 77, 77)),
        (np.full((2, 3, 1), 77, np.uint8), (77, 77, 77)),
        (np.full((2, 3, 4), (255, 0, 0, 0), np.uint8), WHITE),
        (np.full((2, 3), 65535, np.uint16), WHITE),
        (np.full((2, 3), 32768, np.uint16), (128, 128, 128)),
        (np.full((2, 3, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((2, 3), np.nan), (0, 0, 0)),
        (np.ones((2, 3), bool), WHITE),
        (np.full((2, 3), 200, np.int64), (200, 200, 200)),
    ],
    ids=["rgb", "gray", "gray-1ch", "rgba-clear", "u16-max", "u16-half", "float", "nan", "bool", "int64"],
)
def test_numpy_arrays(array, expected):
    out = load_image(array)
    assert out.mode == "RGB"
    assert out.size == (3, 2)
    assert out.getpixel((1, 1)) == expected


# --- other sources and invariants ---------------------------------------------------


def test_caller_image_is_not_mutated():
    original = Image.new("RGBA", (4000, 10), (255, 0, 0, 0))
    out = load_image(original, max_side=100)
    assert out is not original
    assert (original.mode, original.size, original.getpixel((0, 0))) == ("RGBA", (4000, 10), (255, 0, 0, 0))
    rgb = Image.new("RGB", (5, 5), RED)
    copy = load_image(rgb)
    copy.putpixel((0, 0), BLUE)
    assert copy is not rgb and rgb.getpixel((0, 0)) == RED


def test_paths_streams_and_names(tmp_path):
    path = _save(Image.new("RGB", (6, 4), GREEN), tmp_path / "leaf.png")
    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        out = load_image(source)
        assert (out.mode, out.size, out.getpixel((0, 0))) == ("RGB", (6, 4), GREEN)
    with open(path, "rb") as handle:
        assert load_image(handle).size == (6, 4)
    with pytest.raises(ImageDecodeError, match="'upload.png'"):
        load_image(b"nonsense", name="upload.png")


def test_result_is_fully_loaded(tmp_path):
    path = _save(Image.new("RGB", (6, 4), GREEN), tmp_path / "leaf.png")
    out = load_image(path)
    path.unlink()  # a lazy image would now fail on first pixel access
    assert out.getpixel((5, 3)) == GREEN


def test_describe_image():
    assert describe_image(load_image(np.zeros((300, 451, 3), np.uint8))) == "451x300 RGB"
