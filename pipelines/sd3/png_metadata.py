"""Generation parameters inside PNG files, the way other tools read them.

Two text chunks:

- ``parameters``: the AUTOMATIC1111 format that A1111, Forge, ComfyUI's
  loaders, Civitai and most image browsers parse::

      a capybara holding a sign that reads Hello World
      Negative prompt: blurry
      Steps: 28, Sampler: Euler, Schedule type: Simple, CFG scale: 3.5, Seed: 42, Size: 1024x1024, Model: stable-diffusion-3.5-large

  Values containing ``,`` ``:`` or quotes are JSON-quoted, as A1111 does.
- ``studio``: JSON with every setting (model id, seed, scheduler, LoRAs, ...),
  lossless, for this app and for scripts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from pipelines import settings
from pipelines.png_chunks import is_png, read_png_metadata
from pipelines.sd3.comfyui_graph import comfyui_chunks

PARAMETERS_KEY = "parameters"
STUDIO_KEY = "studio"
_NEGATIVE_PREFIX = "Negative prompt: "
# Runs of one character class from a given position, for the settings-line scanner: a single class
# with nothing after it cannot backtrack, so each run costs its length.
_WHITESPACE_RUN = re.compile(r"\s*")
_KEY_RUN = re.compile(r"[\w .\-/()]*")  # the characters of a key: "CFG scale", "Lora hashes", "Model (v2)"


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(char in text for char in ',:"\n') else text


def a1111_parameters(prompt: str, negative_prompt: str, settings: dict) -> str:
    """The ``parameters`` text: prompt, optional negative line, then ``Key: value`` pairs in order."""
    lines = [prompt]
    if negative_prompt:
        lines.append(_NEGATIVE_PREFIX + negative_prompt)
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items()))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) from a ``parameters`` text; values stay strings.

    Whitespace as A1111's ``parse_generation_parameters`` (modules/infotext_utils.py) reads it: the
    text is stripped, then every prompt line on its own (``'quality, \\n1girl'`` reads as
    ``'quality,\\n1girl'``), and the negative prompt after its ``Negative prompt:`` label. Time
    linear in the text's length (see ``settings_pairs``); the caller bounds the length.
    """
    lines = text.strip().split("\n")
    # As A1111: the last line holds the settings when it has at least 3 "Key: value" pairs.
    pairs = settings_pairs(lines[-1]) if len(lines) > 1 else []
    if len(pairs) >= 3:
        lines.pop()
    else:
        pairs = []
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    label = _NEGATIVE_PREFIX.rstrip()
    done_with_prompt = False
    for line in lines:
        line = line.strip()
        # A1111 also reads "Negative prompt:" with nothing after it (an empty negative prompt).
        if line.startswith(label):
            done_with_prompt = True
            line = line[len(label) :].strip()
        kept = negative_lines if done_with_prompt else prompt_lines
        if line or kept:  # A1111 joins a line break only after some text, so leading empty lines vanish
            kept.append(line)
    settings: dict[str, str] = {}
    for key, value in pairs:
        key, value = key.strip(), value.strip()
        if not key:
            continue
        if value.startswith('"'):
            # A quote that is not JSON (`"a" b`, an unknown escape) is kept as written.
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        settings[key] = value
    return "\n".join(prompt_lines), "\n".join(negative_lines), settings


def settings_pairs(line: str) -> list[tuple[str, str]]:
    """The ``(key, value)`` pairs of an A1111 settings line, as written (not stripped, quotes kept).

    ``Key: value, Key: "JSON-quoted, value", ...``: a key is a run of letters, digits and
    `` _.-/()`` before a colon; a value is a JSON-quoted string followed by a comma or the end of
    the line, else everything up to the next comma. Text that is no pair is skipped. One pass: a
    failed key is never rescanned from a later character of the same run, and a quoted value
    stops at the next unescaped quote, so the time is linear in ``len(line)``.
    """
    pairs: list[tuple[str, str]] = []
    position, end = 0, len(line)
    while position < end:
        key_start = _WHITESPACE_RUN.match(line, position).end()
        key_end = _KEY_RUN.match(line, key_start).end()
        if key_end == end or line[key_end] != ":":
            # Every start from here to key_end reaches the same key_end and fails the same way.
            position = max(key_end, position + 1)
            continue
        if key_end == key_start:  # ": value" with no key: a space before the colon counts as one
            if key_start == position or line[key_start - 1] != " ":
                position = key_start + 1  # every start up to the colon fails the same way
                continue
            key_start -= 1
        value_start = _WHITESPACE_RUN.match(line, key_end + 1).end()
        value_end = _quoted_end(line, value_start) if line.startswith('"', value_start) else -1
        if value_end < 0 or (value_end < end and line[value_end] != ","):
            comma = line.find(",", value_start)
            value_end = end if comma < 0 else comma
        pairs.append((line[key_start:key_end], line[value_start:value_end]))
        position = value_end + 1  # past the comma
    return pairs


def _quoted_end(line: str, start: int) -> int:
    """The index after the quote that closes the string opening at ``line[start]``, or -1 if none does.

    A backslash escapes the next character. Each character is looked at a bounded number of times.
    """
    position = start + 1
    quote = line.find('"', position)
    while quote >= 0:
        backslash = line.find("\\", position, quote)
        if backslash < 0:
            return quote + 1
        position = backslash + 2  # the escaped character, whatever it is
        if position > quote:
            quote = line.find('"', position)
    return -1


def save_png(image: Image.Image, path: Path, parameters: str, studio_settings: dict) -> Path:
    """Save ``image`` as PNG with its text chunks (A1111's ``parameters``, the Studio's JSON, ComfyUI's
    ``prompt`` and ``workflow``); returns ``path``."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    info.add_text(STUDIO_KEY, json.dumps(studio_settings, ensure_ascii=False, sort_keys=True))
    # ComfyUI's own chunks: dropped on its canvas, the PNG opens as the same SD3.5 job's graph.
    with contextlib.suppress(ValueError):  # settings that are no drawn job (no steps, say) have no graph
        for key, text in comfyui_chunks(studio_settings).items():
            info.add_text(key, text)
    image.save(path, format="PNG", pnginfo=info, compress_level=settings.PNG_COMPRESS_LEVEL)
    return Path(path)


def read_png_settings(path: Path) -> tuple[str | None, dict | None]:
    """(parameters text, studio JSON) from a PNG written by ``save_png``; None where absent (or not a PNG).

    Read from the file's chunks by ``pipelines.png_chunks``: no pixel is decoded and every chunk is
    bounded. Raises OSError when the file cannot be read, ValueError when it is damaged or too large.
    """
    if os.path.getsize(path) > settings.MAX_UPLOAD_BYTES:
        raise ValueError(
            f"{Path(path).name} is over {settings.MAX_UPLOAD_BYTES // 2**20} MB, more than any PNG read here."
        )
    data = Path(path).read_bytes()
    if not is_png(data):
        return None, None
    texts = read_png_metadata(data).texts
    studio = texts.get(STUDIO_KEY)
    try:
        return texts.get(PARAMETERS_KEY), json.loads(studio) if studio else None
    except RecursionError:  # JSON nested thousands deep: no settings JSON the Studio writes
        raise ValueError(f"The settings JSON in {Path(path).name} is nested too deeply to read.") from None
