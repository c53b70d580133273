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

import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from pipelines import settings

PARAMETERS_KEY = "parameters"
STUDIO_KEY = "studio"
_NEGATIVE_PREFIX = "Negative prompt: "
# One "Key: value" pair: a JSON-quoted value, or anything up to the next comma.
_PAIR = re.compile(r'\s*([\w .\-/()]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


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
    """(prompt, negative prompt, settings) from a ``parameters`` text; values stay strings."""
    lines = text.strip("\n").split("\n")
    # As A1111: the last line holds the settings when it has at least 3 "Key: value" pairs.
    settings_line = lines.pop() if len(lines) > 1 and len(_PAIR.findall(lines[-1])) >= 3 else ""
    negative_lines: list[str] = []
    prompt_lines: list[str] = []
    for line in lines:
        # A1111 also reads "Negative prompt:" with nothing after it (an empty negative prompt).
        if line.startswith(_NEGATIVE_PREFIX.rstrip()) or negative_lines:
            negative_lines.append(
                line.removeprefix(_NEGATIVE_PREFIX.rstrip()).removeprefix(" ") if not negative_lines else line
            )
        else:
            prompt_lines.append(line)
    settings: dict[str, str] = {}
    for match in _PAIR.finditer(settings_line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if not key:
            continue
        if value.startswith('"'):
            value = json.loads(value)
        settings[key] = value
    return "\n".join(prompt_lines), "\n".join(negative_lines), settings


def save_png(image: Image.Image, path: Path, parameters: str, studio_settings: dict) -> Path:
    """Save ``image`` as PNG with both text chunks; returns ``path``."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    info.add_text(STUDIO_KEY, json.dumps(studio_settings, ensure_ascii=False, sort_keys=True))
    image.save(path, format="PNG", pnginfo=info, compress_level=settings.PNG_COMPRESS_LEVEL)
    return Path(path)


def read_png_settings(path: Path) -> tuple[str | None, dict | None]:
    """(parameters text, studio JSON) from a PNG written by ``save_png``; None where absent."""
    with Image.open(path) as image:
        text_chunks = getattr(image, "text", {}) or {}
        studio = text_chunks.get(STUDIO_KEY)
        return text_chunks.get(PARAMETERS_KEY), json.loads(studio) if studio else None
