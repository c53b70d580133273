"""Hostile PNG metadata: bounded chunk reading (pipelines/png_chunks) and linear A1111 parsing (png_metadata).

Two attacks this guards against: a settings line that made the old backtracking regex take time in the
square of its length (64k characters: 28 s, holding the GIL, so every visitor waited), and a PNG whose
text sits after its pixels, which Pillow reads only by decoding them all (8000x8000: 256 MB).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import random
import re
import struct
import time
import urllib.request
import zlib

import pytest
from PIL import Image, ImageFile

from pipelines import png_chunks, settings
from pipelines.images import ImageDecodeError
from pipelines.png_chunks import PngDamagedError, PngTooLargeError, read_png_metadata
from pipelines.sd3.png_info import read_generation_settings
from pipelines.sd3.png_metadata import parse_a1111_parameters, read_png_settings, settings_pairs

SETTINGS_LINE = "Steps: 4, CFG scale: 1, Seed: 8, Size: 64x64"
# The pattern the parser used before (the reference for what a settings line means), run here only on
# short strings: on long ones its time grows with the square of the length.
OLD_PAIR = re.compile(r'\s*([\w .\-/()]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def text_chunk(keyword: str, text: str | bytes, kind: bytes = b"tEXt") -> bytes:
    body = text.encode("utf-8" if kind == b"iTXt" else "latin-1") if isinstance(text, str) else text
    if kind == b"tEXt":
        return chunk(kind, keyword.encode("latin-1") + b"\x00" + body)
    if kind == b"zTXt":
        return chunk(kind, keyword.encode("latin-1") + b"\x00\x00" + zlib.compress(body, 9))
    return chunk(kind, keyword.encode("latin-1") + b"\x00\x01\x00en\x00\x00" + zlib.compress(body, 9))


def small_png(*, before: bytes = b"", after: bytes = b"", size=(8, 8)) -> bytes:
    """A real PNG (Pillow's) with extra chunks before its IDAT and after it (before IEND)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, "teal").save(buffer, format="PNG")
    data = buffer.getvalue()
    first_idat = data.index(b"IDAT") - 4
    iend = data.rindex(b"IEND") - 4
    return data[:first_idat] + before + data[first_idat:iend] + after + data[iend:]


@pytest.fixture(scope="module")
def huge_png_with_text_after_pixels() -> bytes:
    """8000x8000 RGBA (256 MB decoded) in ~249 kB, its parameters tEXt after the image data."""
    width = height = 8000
    compressor = zlib.compressobj(9)
    row = bytes(1 + width * 4)  # filter byte 0, then transparent black
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        png_chunks.PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", pixels)
        + text_chunk("parameters", "a cat\n" + SETTINGS_LINE)
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Any pixel decode fails the test: every Pillow plugin decodes through ImageFile.load."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"pixels of a {self.format} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# ----------------------------------------------------------------------------- no pixel is decoded


def test_text_after_the_pixels_of_an_8000_square_png_is_read_without_decoding_them(
    huge_png_with_text_after_pixels, no_pixel_decoding, tmp_path
):
    assert len(huge_png_with_text_after_pixels) < 300_000
    info = read_generation_settings(huge_png_with_text_after_pixels, name="huge.png")
    assert info["found"] and info["source"] == "png-parameters"
    assert (info["prompt"], info["seed"], info["steps"], info["width"]) == ("a cat", 8, 4, 64)
    # read_png_settings (the Generate tab's seed lookup) goes through the same reader.
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png_with_text_after_pixels)
    assert read_png_settings(path) == ("a cat\n" + SETTINGS_LINE, None)


@pytest.mark.parametrize("image_format", ["JPEG", "WEBP"])
def test_a_jpeg_or_webp_user_comment_is_read_without_decoding_pixels(image_format, monkeypatch):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"ASCII\x00\x00\x00a cat\n" + SETTINGS_LINE.encode()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "olive").save(buffer, format=image_format, exif=exif.tobytes())
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    info = read_generation_settings(buffer.getvalue())
    assert info["source"] == f"{image_format.lower()}-exif" and info["seed"] == 8


# ----------------------------------------------------------------------------- the chunk reader


@pytest.mark.parametrize("kind", [b"tEXt", b"zTXt", b"iTXt"])
@pytest.mark.parametrize("where", ["before", "after"])
def test_every_text_chunk_kind_before_or_after_the_pixels_reads_as_pillow_reads_it(kind, where):
    text = "a fox, 雪の中 <lora:ink:0.5>\nSteps: 4" if kind == b"iTXt" else "a fox, caf\xe9\nSteps: 4"
    data = small_png(**{where: text_chunk("parameters", text, kind) + text_chunk("Software", "GIMP")})
    metadata = read_png_metadata(data)
    assert metadata.texts == {"parameters": text, "Software": "GIMP"}
    assert (metadata.width, metadata.height, metadata.oversized, metadata.exif) == (8, 8, frozenset(), None)
    with Image.open(io.BytesIO(data)) as image:  # the library's reading (it decodes the pixels to get there)
        assert {key: str(value) for key, value in image.text.items()} == metadata.texts


def test_a_comfyui_workflow_of_a_few_hundred_kb_is_read_whole():
    workflow = json.dumps({str(node): {"class_type": "KSampler", "inputs": {"seed": node}} for node in range(8000)})
    assert 300_000 < len(workflow) < settings.PNG_MAX_TEXT_CHUNK_BYTES
    data = small_png(before=text_chunk("workflow", workflow, b"zTXt"), after=text_chunk("prompt", "{}", b"iTXt"))
    assert read_png_metadata(data).texts == {"workflow": workflow, "prompt": "{}"}


def test_a_small_ztxt_stops_inflating_at_the_chunk_limit(monkeypatch):
    bomb = text_chunk("parameters", b"a" * 16 * 2**20, b"zTXt")  # 16 MB of text in 16 kB
    assert len(bomb) < 20_000
    inflated = []
    real_decompressobj = zlib.decompressobj

    class CountingInflater:
        def __init__(self):
            self.inflater = real_decompressobj()

        def decompress(self, data, max_length=0):
            out = self.inflater.decompress(data, max_length)
            inflated.append(len(out))
            return out

        @property
        def eof(self):
            return self.inflater.eof

    monkeypatch.setattr(png_chunks.zlib, "decompressobj", CountingInflater)
    metadata = read_png_metadata(small_png(after=bomb + text_chunk("Software", "GIMP")))
    assert metadata.oversized == {"parameters"} and metadata.texts == {"Software": "GIMP"}
    assert sum(inflated) == settings.PNG_MAX_TEXT_CHUNK_BYTES + 1  # then it stopped


def test_the_text_of_a_whole_file_is_capped_and_inflating_stops_there():
    one_mb = text_chunk("note", b"b" * 2**20, b"zTXt")
    data = small_png(after=one_mb * 20)
    with pytest.raises(PngTooLargeError, match="more than 8 MB"):
        read_png_metadata(data)
    assert len(read_png_metadata(small_png(after=one_mb * 7)).texts) == 1  # same keyword: 7 MB read, one kept


def test_the_number_of_chunks_is_capped():
    many = chunk(b"tIME", b"\x07\xe8\x01\x01\x00\x00\x00") * 200
    assert read_png_metadata(small_png(after=many), max_chunks=300).texts == {}
    with pytest.raises(PngTooLargeError, match="more than 100 chunks"):
        read_png_metadata(small_png(after=many), max_chunks=100)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (small_png()[:-12], "ends before its IEND"),
        (small_png()[:60], "claims"),  # cut inside its image data
        (small_png(after=struct.pack(">I", 2**31) + b"tEXt" + b"parameters\x00x"), "claims 2,147,483,648 bytes"),
        (small_png(after=text_chunk("parameters", "x")[:-1] + b"\x00"), "bad checksum"),
        (small_png(after=chunk(b"zTXt", b"parameters\x00\x00not zlib")), "does not decompress"),
        (
            small_png(
                after=chunk(b"zTXt", b"parameters\x00\x00" + zlib.compress(random.Random(1).randbytes(1000))[:200])
            ),
            "cut short",
        ),
        (small_png(after=chunk(b"zTXt", b"parameters\x00\x07" + zlib.compress(b"x"))), "unknown compression"),
        (small_png(after=chunk(b"tEXt", b"\x00no keyword")), "no keyword"),
        (png_chunks.PNG_SIGNATURE + chunk(b"tEXt", b"a\x00b") + chunk(b"IEND", b""), "first chunk is not IHDR"),
    ],
    ids=["no-iend", "cut-in-idat", "length-past-end", "crc", "not-zlib", "zlib-cut", "method", "keyword", "no-ihdr"],
)
def test_a_damaged_chunk_list_is_named(data, reason):
    with pytest.raises(PngDamagedError, match=reason):
        read_png_metadata(data)


def test_png_info_answers_each_limit_with_one_sentence():
    with pytest.raises(
        ImageDecodeError, match=r"^'a.png' could not be read \(a tEXt chunk claims .*upload the original"
    ):
        read_generation_settings(small_png(after=struct.pack(">I", 999) + b"tEXt" + b"p\x00x"), name="a.png")
    with pytest.raises(ImageDecodeError, match=r"^'a.png' was not read: its text chunks hold more than 8 MB"):
        read_generation_settings(small_png(after=text_chunk("n", b"b" * 2**20, b"zTXt") * 9), name="a.png")
    too_long = "a" * (settings.MAX_PARAMETERS_CHARS + 1)
    for data in (
        small_png(after=text_chunk("parameters", too_long, b"zTXt")),  # within the chunk limit, over 64 kB
        small_png(after=text_chunk("parameters", b"a" * 3 * 2**20, b"zTXt")),  # over the chunk limit too
    ):
        with pytest.raises(ImageDecodeError, match=r"^'a.png' carries a parameters text over 64 kB"):
            read_generation_settings(data, name="a.png")
    assert read_generation_settings(small_png(after=text_chunk("parameters", too_long[:-1])))["found"]


def test_a_studio_json_nested_thousands_deep_falls_back_to_the_parameters_text():
    data = small_png(before=text_chunk("parameters", "a cat\n" + SETTINGS_LINE) + text_chunk("studio", "[" * 100_000))
    info = read_generation_settings(data)
    assert info["source"] == "png-parameters" and info["seed"] == 8 and info["studio"] is None


# ----------------------------------------------------------------------------- the settings line


def test_the_scanner_finds_the_pairs_the_old_pattern_found():
    # Random short lines over the characters that matter (key characters, colons, commas, quotes,
    # backslashes, whitespace of several kinds, a non-ASCII letter): the same pairs, in the same order.
    rng = random.Random(20240611)
    alphabet = 'ab :,"\\\t  é1_.(\r'
    for _ in range(50_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert settings_pairs(line) == OLD_PAIR.findall(line), line


def test_a1111_quoted_values_keep_their_commas_colons_and_escaped_quotes():
    line = (
        'Steps: 20, Lora hashes: "a: 1, b: 2", Prompt: "say \\"hi\\", then: go", Template: "x\\\\", '
        'Odd: "a" b, Bad escape: "\\q", Seed: 5'
    )
    prompt, negative, pairs = parse_a1111_parameters("a cat\nNegative prompt: dog\n" + line)
    assert (prompt, negative) == ("a cat", "dog")
    assert pairs == {
        "Steps": "20",
        "Lora hashes": "a: 1, b: 2",
        "Prompt": 'say "hi", then: go',
        "Template": "x\\",
        "Odd": '"a" b',  # not JSON: kept as written (the old parser raised here)
        "Bad escape": '"\\q"',
        "Seed": "5",
    }


@pytest.mark.parametrize(
    "line",
    [
        "a" * 65_536,  # a key that never meets its colon: the old pattern's worst case (28 s at 64k)
        " " * 65_536,
        "\t" * 65_535 + ":",
        'a: "' + "\\a" * 32_000,  # a quote that never closes, full of escapes
        'a: "x, ' * 9_000,  # every value opens a quote
        'a: "\\", ' * 8_000,
        "a, " * 21_000,
        ('"' + "b:" * 10) * 3_000,
    ],
    ids=["key-run", "spaces", "tabs-colon", "unclosed-quote", "quote-per-value", "escaped-quotes", "commas", "mixed"],
)
def test_hostile_settings_lines_parse_in_linear_time(line):
    started = time.perf_counter()
    parse_a1111_parameters("a cat\n" + line)
    settings_pairs(line)
    # Wall-clock is the point of a DoS fix: linear takes milliseconds; the old quadratic 28-55 s per
    # line. 10 s is generous enough for a loaded 2-core machine.
    assert time.perf_counter() - started < 10


# ----------------------------------------------------------------------------- through the API


def _post_png_info(client, path):
    """(seconds, the answer or the AppError) of one /png_info call."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    started = time.perf_counter()
    try:
        answer = client.predict(handle_file(str(path)), api_name="/png_info")
    except AppError as error:
        answer = error
    return time.perf_counter() - started, answer


@pytest.mark.api
@pytest.mark.slow
def test_a_1_mb_ztxt_and_a_hostile_line_are_answered_at_once_and_a_bystander_is_not_kept_waiting(
    tiny_app_url, tmp_path
):
    from gradio_client import Client

    megabyte = tmp_path / "megabyte.png"  # 1 MB of text in a 1 kB zTXt: hours with the old parser
    megabyte.write_bytes(small_png(size=(1, 1), after=text_chunk("parameters", "a cat\n" + "a" * 2**20, b"zTXt")))
    assert megabyte.stat().st_size < 2000
    hostile = tmp_path / "hostile.png"  # under the 64 kB limit, so it is parsed: ~50 s with the old parser
    hostile.write_bytes(small_png(size=(1, 1), after=text_chunk("parameters", "a cat\n" + "a" * 60_000, b"zTXt")))

    client = Client(tiny_app_url, verbose=False)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        attacks = [pool.submit(_post_png_info, client, path) for path in (megabyte, hostile) * 2]
        time.sleep(0.2)
        started = time.perf_counter()
        with urllib.request.urlopen(tiny_app_url + "config", timeout=60) as response:
            config = json.load(response)
        bystander_seconds = time.perf_counter() - started
        answers = [attack.result(timeout=120) for attack in attacks]
    # Wall-clock is the point of a DoS fix, so the limits are generous (a loaded 2-core machine): the old
    # parser took hours on the 1 MB line and ~50 s on the 60k one, and every visitor waited as long.
    assert bystander_seconds < 10
    assert all(seconds < 10 for seconds, _ in answers), [seconds for seconds, _ in answers]
    for _, answer in answers[0::2]:
        assert "carries a parameters text over 64 kB" in str(answer)
    for _, answer in answers[1::2]:
        _, raw, info = answer
        assert info["found"] and info["prompt"] == "a cat\n" + "a" * 60_000 and info["settings"] == {}
    assert next(event for event in config["dependencies"] if event.get("api_name") == "png_info")["queue"] is True
