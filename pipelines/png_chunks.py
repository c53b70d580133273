"""A PNG's text chunks and EXIF, read from its bytes without decoding a pixel, within known bounds.

Pillow parses the text chunks that come before the image data when it opens a PNG, but the
ones after it (some writers put them there) only when it decodes every pixel: ``image.text``
and ``getexif()`` call ``load()``, so an 8000x8000 PNG of 249 kB costs 256 MB to read 60 bytes
of text. This module walks the chunk list instead (PNG spec, section 5) and reads only the
chunks it needs: ``tEXt``, ``zTXt`` and ``iTXt`` before and after ``IDAT``, ``eXIf``, and ``caBX``
(C2PA Content Credentials, whose issuer names the tool that made an AI image).

Everything is bounded before the work starts: the number of chunks walked, each chunk's
declared length against the bytes present, each text chunk's size once inflated (a zTXt is
inflated with a ``max_length``, so 1 kB cannot become 1 GB), and the text of the whole file.
The CRC of every chunk that is read is checked; the walk stops at ``IEND``.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pipelines import settings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_HEADER = struct.Struct(">I4s")  # a chunk's data length and type; 4 bytes of CRC follow its data
_MAX_KEYWORD_BYTES = 79  # PNG spec 11.3.4.2: a keyword is 1-79 Latin-1 bytes
# Bytes a text chunk holds besides its text (keyword, flags, iTXt's tags, zlib's framing of
# incompressible text): a chunk longer than the text limit plus this is skipped without reading it.
_CHUNK_OVERHEAD = 4096


class PngChunkError(ValueError):
    """The file cannot be read as a PNG; the message is a short reason (no sentence)."""


class PngDamagedError(PngChunkError):
    """The chunk list is broken: truncated, a bad CRC, a chunk that does not decompress."""


class PngTooLargeError(PngChunkError):
    """The file is well formed but holds more chunks or text than the reader takes."""


@dataclass(frozen=True)
class PngMetadata:
    """What ``read_png_metadata`` found. ``texts``: keyword -> text of every text chunk, a later
    chunk replacing an earlier one of the same keyword (as Pillow does); ``oversized``: keywords
    of text chunks skipped because they were over the per-chunk limit; ``exif``: the ``eXIf``
    chunk's bytes or None; ``width`` and ``height`` from ``IHDR``; ``c2pa``: the first ``caBX``
    chunk's bytes (a C2PA manifest store) or None."""

    texts: dict[str, str]
    oversized: frozenset[str]
    exif: bytes | None
    width: int
    height: int
    c2pa: bytes | None = None


def is_png(data: bytes) -> bool:
    return data[:8] == PNG_SIGNATURE


def read_png_metadata(
    data: bytes,
    *,
    max_chunks: int | None = None,
    max_chunk_bytes: int | None = None,
    max_text_bytes: int | None = None,
) -> PngMetadata:
    """The text chunks, EXIF and size of the PNG file ``data``, with no pixel decoded.

    Limits default to ``settings.PNG_MAX_CHUNKS``, ``PNG_MAX_TEXT_CHUNK_BYTES`` (one text
    chunk, inflated; a larger one is skipped and named in ``oversized``) and
    ``PNG_MAX_TEXT_BYTES`` (all text, inflated). Raises PngDamagedError for a broken file
    and PngTooLargeError past the chunk or total-text limit.
    """
    max_chunks = settings.PNG_MAX_CHUNKS if max_chunks is None else max_chunks
    max_chunk_bytes = settings.PNG_MAX_TEXT_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    max_text_bytes = settings.PNG_MAX_TEXT_BYTES if max_text_bytes is None else max_text_bytes
    if not is_png(data):
        raise PngDamagedError("no PNG signature")
    view = memoryview(data)
    texts: dict[str, str] = {}
    oversized: set[str] = set()
    exif = None
    c2pa = None
    size = None
    text_left = max_text_bytes
    position = len(PNG_SIGNATURE)
    # 1. Walk the chunks: each costs O(1) but for the few that are read, so the walk is bounded by max_chunks.
    for count in range(max_chunks):
        if position + _HEADER.size > len(data):
            raise PngDamagedError("it ends before its IEND chunk")
        length, kind = _HEADER.unpack_from(data, position)
        start, end = position + _HEADER.size, position + _HEADER.size + length
        if end + 4 > len(data):
            raise PngDamagedError(f"a {_name(kind)} chunk claims {length:,} bytes but the file ends first")
        position = end + 4
        if count == 0 and kind != b"IHDR":
            raise PngDamagedError("its first chunk is not IHDR")
        if kind == b"IEND":
            break
        wanted = kind in (b"IHDR", b"eXIf", b"caBX") or kind in TEXT_CHUNKS
        if not wanted:
            continue
        # 2. A chunk to read: check its CRC (over type and data) first.
        chunk = view[start:end]
        if zlib.crc32(chunk, zlib.crc32(kind)) != int.from_bytes(data[end : end + 4], "big"):
            raise PngDamagedError(f"its {_name(kind)} chunk has a bad checksum")
        if kind == b"IHDR":
            if count != 0 or length != 13:
                raise PngDamagedError("its IHDR chunk is malformed")
            size = struct.unpack_from(">II", data, start)
        elif kind == b"eXIf":
            if length <= max_chunk_bytes:
                exif = bytes(chunk)
        elif kind == b"caBX":
            if c2pa is None and length <= max_chunk_bytes:
                c2pa = bytes(chunk)
        else:
            # 3. A text chunk, read up to what is left of the file's text budget. Inflating counts against
            # the budget even when the chunk turns out too big and is skipped, so the work stays bounded.
            limit = min(max_chunk_bytes, text_left)
            keyword, text, inflated = _text_chunk(kind, chunk, limit)
            text_left -= len(text) if text is not None else inflated
            if text is None and limit < max_chunk_bytes:
                raise PngTooLargeError(f"its text chunks hold more than {max_text_bytes / 2**20:g} MB")
            if text is None:
                oversized.add(keyword)
            else:
                texts[keyword] = text.decode("utf-8" if kind == b"iTXt" else "latin-1", errors="replace")
    else:
        raise PngTooLargeError(f"it has more than {max_chunks:,} chunks")
    return PngMetadata(texts=texts, oversized=frozenset(oversized), exif=exif, width=size[0], height=size[1], c2pa=c2pa)


def _name(kind: bytes) -> str:
    return kind.decode("latin-1") if kind.isalpha() else repr(kind)


def _text_chunk(kind: bytes, chunk: memoryview, limit: int) -> tuple[str, bytes | None, int]:
    """(keyword, text bytes, bytes inflated) of a tEXt, zTXt or iTXt chunk; the text is None when it is
    over ``limit`` bytes (a compressed one stops inflating there)."""
    keyword_end = bytes(chunk[: _MAX_KEYWORD_BYTES + 1]).find(b"\x00")
    if keyword_end < 1:
        raise PngDamagedError(f"a {_name(kind)} chunk has no keyword")
    keyword = bytes(chunk[:keyword_end]).decode("latin-1")
    if len(chunk) > limit + _CHUNK_OVERHEAD:
        return keyword, None, 0  # more than ``limit`` of text, compressed or not: skipped unread
    body = bytes(chunk[keyword_end + 1 :])
    if kind == b"tEXt":
        return (keyword, body, 0) if len(body) <= limit else (keyword, None, 0)
    if kind == b"zTXt":
        if body[:1] != b"\x00":
            raise PngDamagedError(f"the zTXt chunk {keyword!r} uses an unknown compression method")
        return (keyword, *_inflate(body[1:], limit, keyword))
    # iTXt: compression flag and method, language tag, zero byte, translated keyword, zero byte, UTF-8 text.
    flag, method = body[:1], body[1:2]
    parts = body[2:].split(b"\x00", 2)
    if flag not in (b"\x00", b"\x01") or (flag == b"\x01" and method != b"\x00") or len(parts) < 3:
        raise PngDamagedError(f"the iTXt chunk {keyword!r} is malformed")
    if flag == b"\x01":
        return (keyword, *_inflate(parts[2], limit, keyword))
    return (keyword, parts[2], 0) if len(parts[2]) <= limit else (keyword, None, 0)


def _inflate(data: bytes, limit: int, keyword: str) -> tuple[bytes | None, int]:
    """(the zlib stream ``data`` inflated or None once past ``limit`` bytes, bytes inflated): it stops there."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, limit + 1)
    except zlib.error:
        raise PngDamagedError(f"the text chunk {keyword!r} does not decompress") from None
    if len(text) > limit:
        return None, len(text)
    if not inflater.eof:
        raise PngDamagedError(f"the text chunk {keyword!r} is cut short")
    return text, len(text)
