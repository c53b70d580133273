"""Turn any upload into a safe, fully decoded RGB image.

Every tab calls :func:`load_image` on whatever it is handed (a temp-file path,
bytes, a file object, a PIL image or a numpy array). Limits come from
``pipelines.settings``: oversized files and decompression bombs are refused
before any pixel is decoded, and the result is downscaled so its longest side
fits. Every failure is an :class:`ImageDecodeError` whose message can be shown
to the user as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pipelines.settings import (
    MAX_DECODE_BYTES,
    MAX_DECODE_PIXELS,
    MAX_IMAGE_SIDE,
    MAX_UPLOAD_BYTES,
    UPLOAD_IMAGE_FORMATS,
)

_MB = 1024 * 1024
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Memory a decode takes per pixel beyond the decoded image and its oriented copy (``_finish``): what
# turning a mode into RGB (or RGBA) holds at its peak. Pillow stores 1, 2 or 4 bytes a pixel
# (``_stored_bytes``); high-bit modes go through numpy (a copy, then float64 work arrays for "I" and "F").
_CONVERSION_BYTES_PER_PIXEL = {"RGB": 0, "I;16": 16, "I": 28, "F": 32}
_OTHER_CONVERSION_BYTES_PER_PIXEL = 4  # L, P, 1, CMYK, YCbCr, ...: one RGB copy
_ALPHA_CONVERSION_BYTES_PER_PIXEL = 8  # a white backdrop, then the composite (+4: an RGBA copy unless RGBA)


class ImageDecodeError(ValueError):
    """An upload could not be turned into an image; the message says what happened and what to do."""


def load_image(
    source: Any,
    *,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_DECODE_PIXELS,
    max_side: int = MAX_IMAGE_SIDE,
    max_decode_bytes: int = MAX_DECODE_BYTES,
    name: str | None = None,
    keep_alpha: bool = False,
) -> Image.Image:
    """Decode ``source`` into a new, fully loaded RGB image (RGBA with ``keep_alpha``).

    ``source`` may be a path (str or os.PathLike), bytes, a binary file object,
    a PIL image (never modified) or a numpy array (HxW, HxWx3, HxWx4; uint8,
    uint16, float in [0, 1] or bool). EXIF orientation is applied, transparency
    is composited onto white (kept as it is with ``keep_alpha``), and the longest side is at most
    ``max_side``. A file whose decode would take more than ``max_decode_bytes`` of memory (width x
    height x the bytes its mode and the conversion hold, from the header) is refused before decoding.
    ``name`` is used in error messages and defaults to the file's name.
    Raises ImageDecodeError for anything that is not a usable image.
    """
    if source is None:
        raise ImageDecodeError("No image was given; upload an image file and try again.")
    if isinstance(source, Image.Image):
        label = _label(name or _basename(getattr(source, "filename", None)))
        with _decoding(label, max_pixels):
            return _finish(source, label, max_pixels, max_side, keep_alpha)
    if isinstance(source, np.ndarray):
        label = _label(name) if name else "The image array"
        with _decoding(label, max_pixels):
            return _finish(_from_array(source, label, max_pixels), label, max_pixels, max_side, keep_alpha)
    if isinstance(source, (str, os.PathLike)):
        label = _label(name or _basename(source))
        data = _read_path(source, label, max_bytes)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        label, data = _label(name), bytes(source)
    elif hasattr(source, "read"):
        label = _label(name or _basename(getattr(source, "name", None)))
        data = _read_stream(source, label, max_bytes)
    else:
        raise ImageDecodeError(
            f"Got a {type(source).__name__}, not an image; pass a file path, bytes, a file object, "
            "a PIL image or a numpy array."
        )
    limits = _Limits(max_bytes, max_pixels, max_side, max_decode_bytes)
    return _decode_bytes(data, label, limits, keep_alpha)


def decode_bytes_needed(mode: str, size: tuple[int, int], *, transparent: bool = False) -> int:
    """The most memory (bytes) decoding an image of ``mode`` and ``size`` and turning it into RGB takes:
    the decoded image, its oriented copy and the conversion's intermediates. ``transparent``: the image
    has a transparency key (``info["transparency"]``), so it is composited like an alpha channel."""
    pixels = size[0] * size[1]
    stored = _stored_bytes(mode)
    if mode in _HIGH_BIT_MODES:
        conversion = _CONVERSION_BYTES_PER_PIXEL["I;16" if mode.startswith("I;16") else mode]
    elif mode == "RGB":
        conversion = 0
    elif transparent or "A" in mode or "a" in mode:
        conversion = _ALPHA_CONVERSION_BYTES_PER_PIXEL + (0 if mode == "RGBA" else 4)
    else:
        conversion = _OTHER_CONVERSION_BYTES_PER_PIXEL
    return pixels * (2 * stored + conversion)


def _stored_bytes(mode: str) -> int:
    """Bytes Pillow keeps a pixel of ``mode`` in (multi-band modes take 4, RGB included)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def describe_image(image: Image.Image) -> str:
    """Return a short summary such as ``"451x300 RGB"`` for UI info lines."""
    return f"{image.width}x{image.height} {image.mode}"


def _label(name: str | None) -> str:
    # Messages start with the label, so the unnamed fallback is capitalised.
    return f"'{name}'" if name else "The uploaded image"


def _basename(path: Any) -> str | None:
    if isinstance(path, (str, bytes, os.PathLike)) and os.fspath(path):
        return os.path.basename(os.fsdecode(path))
    return None


def _check_bytes(size: int, label: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageDecodeError(
            f"{label} is {size / _MB:.1f} MB, over the {max_bytes / _MB:g} MB upload limit; "
            "compress or downscale it and upload again."
        )


def _check_pixels(size: tuple[int, int], label: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{label} has no pixels ({width}x{height}); upload a non-empty image.")
    if width * height > max_pixels:
        raise ImageDecodeError(_too_large(label, width * height, max_pixels, f"{width}x{height}, "))


def _too_large(label: str, pixels: int | None, limit: int, dims: str = "") -> str:
    size = f"{dims}{pixels / 1e6:.1f} megapixels" if pixels else "too many pixels"
    return f"{label} is {size}, over the {limit / 1e6:g} megapixel limit; downscale it and upload again."


def _read_path(source: str | os.PathLike, label: str, max_bytes: int) -> bytes:
    path = os.fspath(source)
    try:
        if os.path.isdir(path):
            raise ImageDecodeError(f"{label} is a folder, not an image file; choose an image file instead.")
        _check_bytes(os.stat(path).st_size, label, max_bytes)
        with open(path, "rb") as handle:
            return handle.read(max_bytes + 1)  # +1: the file may have grown since stat()
    except FileNotFoundError:
        raise ImageDecodeError(f"{label} was not found (temporary uploads expire); upload it again.") from None
    except OSError as error:
        raise ImageDecodeError(f"{label} could not be read ({error.strerror or error}); upload it again.") from error


def _read_stream(stream: Any, label: str, max_bytes: int) -> bytes:
    try:
        data = stream.read(max_bytes + 1)  # never read more than needed to know it is too big
    except Exception as error:
        raise ImageDecodeError(f"{label} could not be read ({error}); upload it again.") from error
    if not isinstance(data, (bytes, bytearray)):
        raise ImageDecodeError(f"{label} was opened as text, not binary; open it with mode 'rb'.")
    return bytes(data)


@contextlib.contextmanager
def _decoding(label: str, max_pixels: int) -> Iterator[None]:
    """Turn every failure inside the block into an ImageDecodeError naming ``label``."""
    with warnings.catch_warnings():
        # Pillow only *warns* between its bomb limit and twice that; refuse those too, for this
        # call only, instead of changing Image.MAX_IMAGE_PIXELS for the whole process.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            found = re.search(r"\((\d+) pixels\)", str(error))
            limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
            raise ImageDecodeError(_too_large(label, found and int(found[1]), limit)) from error
        except Image.UnidentifiedImageError as error:
            supported = "PNG, JPEG, WebP, GIF, BMP or TIFF"
            raise ImageDecodeError(f"{label} is not an image file this app can read; upload {supported}.") from error
        except Exception as error:  # Pillow raises OSError, SyntaxError, struct.error, ... on bad files
            reason = str(error).strip().rstrip(".") or type(error).__name__
            raise ImageDecodeError(
                f"{label} could not be decoded ({reason}); the file looks damaged or incomplete, "
                "so re-export it and upload again."
            ) from error


@dataclasses.dataclass(frozen=True)
class _Limits:
    max_bytes: int
    max_pixels: int
    max_side: int
    max_decode_bytes: int


def _check_decode_bytes(image: Image.Image, label: str, max_decode_bytes: int) -> None:
    needed = decode_bytes_needed(image.mode, image.size, transparent="transparency" in image.info)
    if needed > max_decode_bytes:
        raise ImageDecodeError(
            f"{label} would take {needed / _MB:,.0f} MB of memory to decode ({image.width}x{image.height} "
            f"{image.mode} pixels), over the {max_decode_bytes / _MB:g} MB limit; save it as 8-bit RGB or "
            "downscale it and upload again."
        )


def _decode_bytes(data: bytes, label: str, limits: _Limits, keep_alpha: bool) -> Image.Image:
    max_pixels, max_side = limits.max_pixels, limits.max_side
    if not data:
        raise ImageDecodeError(f"{label} is empty (0 bytes); upload the file again.")
    _check_bytes(len(data), label, limits.max_bytes)
    if data[:256].lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith((b"<?xml", b"<svg")):
        raise ImageDecodeError(f"{label} is an SVG vector drawing, which is not supported; export it as PNG.")
    with _decoding(label, max_pixels), Image.open(io.BytesIO(data), formats=UPLOAD_IMAGE_FORMATS) as image:
        # Image.open only parsed the header, so this check costs nothing even for a bomb.
        _check_pixels(image.size, label, max_pixels)
        if max(image.size) > max_side:
            # JPEG decodes straight at 1/2, 1/4 or 1/8 scale here; other formats ignore draft().
            scale = max_side / max(image.size)
            image.draft(None, (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        _check_decode_bytes(image, label, limits.max_decode_bytes)  # after draft(): the size it will decode at
        image.load()  # inside the try: truncated files must fail here, not come back grey
        return _finish(image, label, max_pixels, max_side, keep_alpha)


def _finish(image: Image.Image, label: str, max_pixels: int, max_side: int, keep_alpha: bool = False) -> Image.Image:
    """Orient, flatten to RGB (or RGBA) and downscale; always returns a new image (the input is left alone)."""
    _check_pixels(image.size, label, max_pixels)
    try:
        oriented = ImageOps.exif_transpose(image)  # a copy even when there is nothing to rotate
    except Exception:  # noqa: BLE001 - any EXIF parsing failure means "leave it as stored"
        oriented = image.copy()  # a broken EXIF block should not make a readable picture unusable
    rgb = _to_rgba(oriented) if keep_alpha else _to_rgb(oriented)
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return rgb


def _to_rgba(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_BIT_MODES:
        return _to_rgb(image).convert("RGBA")  # no alpha channel in these modes
    return image if image.mode == "RGBA" else image.convert("RGBA")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_BIT_MODES:
        values = np.asarray(image)
        if image.mode == "F" and not (np.nanmin(values) >= 0 and np.nanmax(values) <= 1):
            values = values / 255.0  # Pillow's convention for "F" is 0..255 unless the data is 0..1
        return Image.fromarray(_to_uint8(values)).convert("RGB")
    if image.mode == "RGB":
        return image
    if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
        # Transparent pixels usually hide black RGB; on white they look as in a browser.
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")  # ``image`` is already a copy
        # The white backdrop is a temporary, freed before the RGB copy is made (decode_bytes_needed counts on it).
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Map bool, 8/16-bit, wider integer or float [0, 1] values onto uint8 by their type's range."""
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind == "f":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 65535:
        # 16-bit range: 65535 -> 255 and 32768 -> 128 (x / 257, rounded), never clipped at 255.
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    # Wider integers have no fixed range: stretch what is actually there.
    return np.round((values.astype(np.float64) - low) * 255 / max(high - low, 1)).astype(np.uint8)


def _from_array(array: np.ndarray, label: str, max_pixels: int) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageDecodeError(
            f"{label} has shape {array.shape}; expected height x width, or height x width x 3 (RGB) or x 4 (RGBA)."
        )
    if array.dtype.kind not in "biuf":
        raise ImageDecodeError(f"{label} has dtype {array.dtype}; use uint8, uint16, float or bool.")
    _check_pixels((array.shape[1], array.shape[0]), label, max_pixels)
    if array.dtype.kind in "iu" and array.dtype.itemsize != 2 and array.min() >= 0 and array.max() <= 255:
        array = array.astype(np.uint8)  # plain Python ints (int64) holding 0..255 mean 8-bit values
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array)))
