"""PNG Info: the generation settings an image carries, read back as plain data.

Three places hold them, tried in this order:

1. the Studio's own ``studio`` JSON chunk (lossless: every setting, LoRAs with weights);
2. the ``parameters`` text chunk that the Studio, AUTOMATIC1111, Forge and ComfyUI's
   A1111-format savers write (prompt, ``Negative prompt:`` line, ``Steps: ..., Seed: ...``);
3. for JPEG and WebP, which have no text chunks, the EXIF UserComment where A1111 puts
   the same text (``UNICODE\\0`` + UTF-16, or ``ASCII\\0\\0\\0`` + ASCII).

``read_generation_settings`` returns one dict whatever the source (``found`` says whether
anything was there; ``message`` is the sentence when not). ``generate_form_values`` turns
it into values the Generate tab accepts for a model, clamping what is out of range with a
note. No pixel is decoded, and the text that is parsed is bounded (settings.MAX_PARAMETERS_CHARS).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

from PIL import Image

from pipelines import settings
from pipelines.catalog import CATALOG, SD3_SHORT_NAMES
from pipelines.images import ImageDecodeError
from pipelines.png_chunks import PngChunkError, PngTooLargeError, is_png, read_png_metadata
from pipelines.sd3.lora_tags import LORA_TAG
from pipelines.sd3.png_metadata import PARAMETERS_KEY, STUDIO_KEY, parse_a1111_parameters
from pipelines.sd3.text_to_image import SIZE_MULTIPLE, lora_weight_text, size_limits, snap

_EXIF_FORMATS = ("JPEG", "WEBP")  # the ones Pillow opens here (a PNG is read by pipelines.png_chunks)
EXIF_IFD_TAG = 0x8769  # the Exif sub-IFD, which holds UserComment
USER_COMMENT_TAG = 0x9286
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
# SD3.5 checkpoints as A1111/Forge/ComfyUI name them ("sd3.5_large_turbo.safetensors") and as the
# Studio does ("stable-diffusion-3.5-large"), once lowercased with everything but letters and digits out.
_SD35_NAME = re.compile(r"(?:sd|stablediffusion)35")
_SHORT_NAME_BY_KEY = {key: name for name, key in SD3_SHORT_NAMES.items()}
# What the Studio writes as "Model:" (the repo's last part): such a parameters text is the Studio's own.
_STUDIO_MODEL_NAMES = {CATALOG[key].repo_id.rsplit("/", 1)[-1] for key in SD3_SHORT_NAMES.values()}


# ----------------------------------------------------------------------------- reading the file


def read_generation_settings(source: str | os.PathLike | bytes, *, name: str | None = None) -> dict:
    """The settings ``source`` (a path or the file's bytes) carries, as a dict (see ``settings_dict``).

    A file with no settings gives ``found: False`` and a one-sentence ``message``. A file that is
    not a PNG, JPEG or WebP image, or is damaged, raises ImageDecodeError with a sentence.
    """
    if name is None and not isinstance(source, bytes | bytearray):
        name = os.path.basename(os.fspath(source))
    label = f"'{name}'" if name else "The file"
    data = _read_bytes(source, label)
    parameters, studio_text, where = _settings_texts(data, label)
    studio = None
    notes: list[str] = []
    if studio_text:
        try:
            studio = json.loads(studio_text)
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            notes.append("The Studio's JSON chunk is damaged; the settings come from the parameters text.")
        if not isinstance(studio, dict):
            studio = None
    if not parameters and studio is None:
        return _nothing_found(label, where)
    info = settings_dict(parameters or "", studio)
    info["source"] = where if studio is None else "studio-json"
    info["notes"] = notes + info["notes"]
    return info


def _read_bytes(source, label: str) -> bytes:
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        try:
            if os.path.getsize(source) > settings.MAX_UPLOAD_BYTES:
                raise ImageDecodeError(
                    f"{label} is over the {settings.MAX_UPLOAD_BYTES // 2**20} MB upload limit; "
                    "settings live in small files, so upload the image as it was saved."
                )
            with open(source, "rb") as handle:
                data = handle.read(settings.MAX_UPLOAD_BYTES + 1)
        except (FileNotFoundError, IsADirectoryError):
            raise ImageDecodeError(f"{label} was not found (temporary uploads expire); upload it again.") from None
        except OSError as error:
            raise ImageDecodeError(
                f"{label} could not be read ({error.strerror or error}); upload it again."
            ) from error
    if not data:
        raise ImageDecodeError(f"{label} is empty (0 bytes); upload the file again.")
    if len(data) > settings.MAX_UPLOAD_BYTES:
        raise ImageDecodeError(f"{label} is over the {settings.MAX_UPLOAD_BYTES // 2**20} MB upload limit.")
    return data


def _settings_texts(data: bytes, label: str) -> tuple[str | None, str | None, str]:
    """(parameters text, studio JSON text, where they came from) of an image file's bytes.

    No pixel is decoded: a PNG's chunks are read by ``pipelines.png_chunks`` (text before and
    after the image data alike), a JPEG's or WebP's EXIF by Pillow's lazy open.
    """
    if is_png(data):
        kind, chunks, exif = "PNG", *_png_texts(data, label)
    else:
        kind, chunks, exif = _exif_of_other_image(data, label)
    comment = _user_comment(exif)
    parameters = chunks.get(PARAMETERS_KEY)
    if parameters:
        return _bounded(parameters, label), chunks.get(STUDIO_KEY), f"{kind.lower()}-parameters"
    if comment:
        return _bounded(comment, label), None, f"{kind.lower()}-exif"
    return (
        None,
        chunks.get(STUDIO_KEY),
        kind.lower() + ("-comfyui" if "workflow" in chunks or "prompt" in chunks else ""),
    )


def _png_texts(data: bytes, label: str) -> tuple[dict[str, str], Image.Exif]:
    """(text chunks, EXIF) of a PNG file's bytes, read from its chunks within the limits of png_chunks."""
    try:
        metadata = read_png_metadata(data)
    except PngTooLargeError as error:
        raise ImageDecodeError(
            f"{label} was not read: {error}, more than an image with settings ever has; upload the image as its tool saved it."
        ) from None
    except PngChunkError as error:
        raise ImageDecodeError(
            f"{label} could not be read ({error}); the file looks damaged or incomplete, so upload the original again."
        ) from None
    if PARAMETERS_KEY in metadata.oversized:  # over the per-chunk limit, so far over the parameters limit
        raise _parameters_too_long(label)
    exif = Image.Exif()
    if metadata.exif:
        try:
            exif.load(metadata.exif)
        except Exception:  # noqa: BLE001 - a broken EXIF block means "no comment", not a broken image
            exif = Image.Exif()
    return metadata.texts, exif


def _exif_of_other_image(data: bytes, label: str) -> tuple[str, dict[str, str], Image.Exif]:
    """(format, text entries, EXIF) of a JPEG or WebP. Pillow's open reads headers only; nothing here calls load()."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_EXIF_FORMATS) as image:
                chunks = {key: value for key, value in image.info.items() if isinstance(value, str)}
                try:
                    exif = image.getexif()
                except Exception:  # noqa: BLE001 - a broken EXIF block means "no comment", not a broken image
                    exif = Image.Exif()
                return image.format, chunks, exif
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            f"{label} is not a PNG, JPEG or WebP image, the formats that carry generation settings; "
            "upload the image as its tool saved it."
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(f"{label} has too many pixels to open safely; upload a smaller image.") from None
    except Exception as error:  # Pillow raises OSError, SyntaxError, struct.error, ... on damaged files
        reason = str(error).strip().rstrip(".") or type(error).__name__
        raise ImageDecodeError(
            f"{label} could not be read ({reason}); the file looks damaged or incomplete, so upload the original again."
        ) from error


def _bounded(text: str, label: str) -> str:
    """``text`` when it is short enough to parse (settings.MAX_PARAMETERS_CHARS), else the sentence why not."""
    if len(text) > settings.MAX_PARAMETERS_CHARS:
        raise _parameters_too_long(label)
    return text


def _parameters_too_long(label: str) -> ImageDecodeError:
    return ImageDecodeError(
        f"{label} carries a parameters text over {settings.MAX_PARAMETERS_CHARS // 1024} kB, far more than "
        "settings take (A1111's run to a few kB), so it was not read; upload the image as its tool saved it."
    )


def _user_comment(exif: Image.Exif) -> str | None:
    """The EXIF UserComment text (A1111's place for settings in JPEG and WebP), or None."""
    try:
        raw = exif.get_ifd(EXIF_IFD_TAG).get(USER_COMMENT_TAG)
    except Exception:  # noqa: BLE001 - a broken EXIF block means "no comment", not a broken image
        return None
    text = decode_user_comment(raw) if raw is not None else ""
    return text.strip("\x00").strip() or None


def decode_user_comment(raw: bytes | str) -> str:
    """An EXIF UserComment as text: its 8-byte character-code prefix says how the rest is encoded.

    ``UNICODE\\0`` is UTF-16: big-endian per the EXIF standard and A1111's writer, but some tools
    write little-endian without a byte-order mark, so the side holding the zero bytes of ASCII
    characters decides. ``ASCII`` and an undefined (all-zero) prefix are read as UTF-8.
    """
    if isinstance(raw, str):
        return raw
    prefix, body = bytes(raw[:8]), bytes(raw[8:])
    if prefix == b"UNICODE\x00":
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace")
        big_endian = body[0::2].count(0) >= body[1::2].count(0)
        return body[: len(body) // 2 * 2].decode("utf-16-be" if big_endian else "utf-16-le", errors="replace")
    if prefix == b"JIS\x00\x00\x00\x00\x00":
        return body.decode("shift_jis", errors="replace")
    if prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        return body.decode("utf-8", errors="replace")
    return bytes(raw).decode("utf-8", errors="replace")  # no prefix at all: some tools skip it


def _nothing_found(label: str, where: str) -> dict:
    kind = where.split("-")[0].upper()
    if where.endswith("-comfyui"):
        message = (
            f"{label} holds a ComfyUI workflow but no A1111-format parameters; save it with an A1111-format "
            "saver node, or open the workflow in ComfyUI."
        )
    elif kind == "PNG":
        message = (
            f"{label} carries no generation settings (no parameters text chunk); it was not saved by the Studio, "
            "A1111 or Forge, or a tool removed its metadata."
        )
    else:
        message = (
            f"{label} carries no generation settings (no EXIF UserComment with parameters); A1111 and Forge "
            f"write them there, but most tools strip EXIF from {kind} files."
        )
    return {"found": False, "message": message, "source": where, "raw": "", "notes": []}


# ----------------------------------------------------------------------------- the settings dict


def settings_dict(parameters: str, studio: Mapping[str, Any] | None = None) -> dict:
    """Settings from a ``parameters`` text and, when given, the Studio's JSON (which wins).

    Keys: ``found``, ``prompt`` (as the image's tool wrote it, ``<lora:name:w>`` tags kept),
    ``negative_prompt``, ``seed``, ``steps``, ``guidance``, ``width``, ``height`` (None where
    absent), ``model`` (the Studio's name for it, else the name as given), ``model_key``
    (catalog key or None), ``model_given``, ``loras`` (``name``, ``weight``), ``sampler``,
    ``max_sequence_length``, ``skip_layer_guidance_layers``, ``settings`` (every ``Key: value``
    pair as text), ``studio`` (the JSON or None), ``raw`` (the text), ``notes``.
    """
    parameters = parameters.replace("\r\n", "\n")  # written on Windows, or pasted from there
    prompt, negative, pairs = parse_a1111_parameters(parameters) if parameters else ("", "", {})
    notes: list[str] = []
    width, height = _size(pairs.get("Size"))
    info = {
        "found": True,
        "prompt": prompt,
        "negative_prompt": negative,
        "seed": _number(pairs.get("Seed"), int),
        "steps": _number(pairs.get("Steps"), int),
        "guidance": _number(pairs.get("CFG scale"), float),
        "width": width,
        "height": height,
        "sampler": " ".join(filter(None, [pairs.get("Sampler"), pairs.get("Schedule type")])) or None,
        "max_sequence_length": _number(pairs.get("T5 tokens"), int),
        "skip_layer_guidance_layers": _layers(pairs.get("SLG layers")),
        "loras": lora_tags(prompt),
        "lora_hashes": pairs.get("Lora hashes"),
        "model_given": pairs.get("Model"),
        "model_hash": pairs.get("Model hash"),
        "settings": pairs,
        "studio": dict(studio) if studio is not None else None,
        "raw": parameters,
        "notes": notes,
    }
    if studio is not None:
        _apply_studio_json(info, studio)
    key = studio_model_key(info["model_given"])
    if studio is not None and studio.get("model_key") in _SHORT_NAME_BY_KEY:
        key = studio["model_key"]
    info["model_key"] = key
    info["model"] = _SHORT_NAME_BY_KEY[key] if key else info["model_given"]
    if key is None:
        given = info["model_given"] or info["model_hash"]
        notes.append(
            f"The model {given!r} is not one the Studio serves (SD3.5 Large, Large Turbo, Medium); it is shown "
            "as given, and Generate keeps its own model."
            if given
            else "The settings name no model; Generate keeps its own model."
        )
    if studio is None and info["model_given"] not in _STUDIO_MODEL_NAMES:
        notes.append(
            "Settings from another tool: prompt and settings carry over, but its sampler and noise differ, "
            "so the same seed draws a different image here."
        )
    if pairs.get("Interrupted at step") or (studio or {}).get("stopped"):
        notes.append("This image was stopped early; drawing it again runs every step, so it comes out finished.")
    info["notes"] = [note for note in notes if note]
    return info


def _apply_studio_json(info: dict, studio: Mapping[str, Any]) -> None:
    """Overwrite ``info`` with the Studio JSON's lossless values (the prompt gets its LoRA tags back)."""
    loras = [
        {"name": str(lora["name"]), "weight": _weight_or_one(lora.get("weight"))}
        for lora in (studio.get("loras") if isinstance(studio.get("loras"), list) else [])
        if isinstance(lora, Mapping) and lora.get("name")
    ]
    prompt = studio.get("prompt")
    if isinstance(prompt, str):
        # As sd3.generate wrote the parameters' prompt: the encoders' prompt, then one tag per LoRA.
        info["prompt"] = " ".join(
            [prompt, *(f"<lora:{lora['name']}:{lora_weight_text(lora['weight'])}>" for lora in loras)]
        )
    info["loras"] = loras
    if isinstance(studio.get("negative_prompt"), str):
        info["negative_prompt"] = studio["negative_prompt"]
    for key, kind in (("seed", int), ("steps", int), ("guidance", float), ("width", int), ("height", int)):
        value = _number(studio.get(key), kind)
        if value is not None:
            info[key] = value
    info["max_sequence_length"] = _number(studio.get("max_sequence_length"), int) or info["max_sequence_length"]
    layers = studio.get("skip_layer_guidance_layers")
    if isinstance(layers, list | tuple):
        info["skip_layer_guidance_layers"] = [int(layer) for layer in layers if isinstance(layer, int)]
    if isinstance(studio.get("model_id"), str):
        info["model_given"] = studio["model_id"]
    if isinstance(studio.get("scheduler"), str):
        info["sampler"] = studio["scheduler"]


def _number(text, kind):
    """``text`` as an int or float, or None when it is missing or not a finite number."""
    if text is None or isinstance(text, bool):
        return None
    try:
        value = kind(text) if kind is float or isinstance(text, int) else int(str(text).strip())
    except (TypeError, ValueError, OverflowError):
        try:
            value = kind(float(text))  # "20.0" steps
        except (TypeError, ValueError, OverflowError):
            return None
    return value if math.isfinite(value) else None


def _weight_or_one(value) -> float:
    weight = _number(value, float)
    return 1.0 if weight is None else weight  # A1111's default weight


def _size(text: str | None) -> tuple[int | None, int | None]:
    found = _SIZE.match(text or "")
    return (int(found[1]), int(found[2])) if found else (None, None)


def _layers(text: str | None) -> list[int]:
    return [int(number) for number in re.findall(r"\d+", text or "")][:64]


def lora_tags(prompt: str) -> list[dict]:
    """``[{"name", "weight"}]`` of the ``<lora:name>`` / ``<lora:name:w>`` tags in ``prompt``.

    A1111 also accepts ``<lora:name:te_w:unet_w>``; the first weight is kept (the Studio has one).
    A missing or unreadable weight reads as 1, A1111's default.
    """
    found = []
    for match in LORA_TAG.finditer(prompt or ""):
        name, _, weights = match.group(1).partition(":")
        weight = _number(weights.split(":")[0].strip(), float) if weights.strip() else None
        if name.strip():
            found.append({"name": name.strip(), "weight": 1.0 if weight is None else weight})
    return found


def studio_model_key(name: str | None) -> str | None:
    """The catalog key of an SD3.5 checkpoint named as A1111/Forge/ComfyUI or the Studio name it, else None.

    "stable-diffusion-3.5-large", "sd3.5_large_turbo.safetensors", "SD3.5 Medium" and catalog keys
    match; SD3 Medium (not 3.5), SDXL and everything else do not. (Model *hashes* are not mapped:
    they are hashes of one file, and the Studio has no checkpoint file to hash.)
    """
    if not name:
        return None
    if name in CATALOG and CATALOG[name].kind == "sd3":
        return name
    if name in SD3_SHORT_NAMES:
        return SD3_SHORT_NAMES[name]
    flat = re.sub(r"[^a-z0-9]", "", name.lower().rsplit("/", 1)[-1].removesuffix(".safetensors"))
    if not _SD35_NAME.search(flat):
        return None
    if "turbo" in flat:
        return "sd35-large-turbo"
    if "medium" in flat:
        return "sd35-medium"
    if "large" in flat:
        return "sd35-large"
    return None


# ----------------------------------------------------------------------------- into the Generate tab


def generate_form_values(info: Mapping[str, Any], current_model: str, *, tiny: bool = False) -> tuple[dict, list[str]]:
    """(values for the Generate tab's controls, notes) from a ``read_generation_settings`` dict.

    The model is the image's when the Studio serves it, else ``current_model``. Values outside what
    that model accepts are clamped to the nearest allowed one, each with a note; a size is scaled at
    its aspect ratio into the model's range and snapped to 16. Missing steps and guidance stay
    empty (the preset), a missing seed is -1 (random). LoRAs travel as the prompt's tags.
    """
    notes: list[str] = []
    name = info.get("model") if info.get("model_key") else current_model
    key = SD3_SHORT_NAMES.get(name, "sd35-large")
    spec = CATALOG[key]
    preset = spec.image_preset

    prompt = str(info.get("prompt") or "")
    if len(prompt) > settings.MAX_PROMPT_CHARS:
        prompt = prompt[: settings.MAX_PROMPT_CHARS]
        notes.append(f"The prompt was cut to {settings.MAX_PROMPT_CHARS} characters, the Generate tab's limit.")
    negative = str(info.get("negative_prompt") or "")
    if len(negative) > settings.MAX_PROMPT_CHARS:
        negative = negative[: settings.MAX_PROMPT_CHARS]
        notes.append(f"The negative prompt was cut to {settings.MAX_PROMPT_CHARS} characters.")

    seed = info.get("seed")
    if seed is None:
        seed = -1
        notes.append("The settings hold no seed, so Generate draws with a random one.")
    elif not 0 <= seed <= settings.MAX_SEED:
        seed = min(max(seed, 0), settings.MAX_SEED)
        notes.append(f"Seed {info['seed']} is outside 0-{settings.MAX_SEED}; set to {seed}.")

    steps = _clamped(info.get("steps"), 1, settings.MAX_STEPS, "Steps", notes)
    guidance = _clamped(info.get("guidance"), 0.0, settings.MAX_GUIDANCE, "Guidance", notes)
    if guidance is not None and guidance > 1.0 and preset.guidance <= 1.0:
        notes.append(f"{spec.title} is distilled to run without guidance; guidance {guidance:g} is kept as given.")
    width, height = fitted_size(info.get("width"), info.get("height"), spec, tiny, notes)

    tokens = info.get("max_sequence_length") or settings.DEFAULT_T5_TOKENS
    tokens = int(_clamped(tokens, settings.MIN_T5_TOKENS, settings.MAX_T5_TOKENS, "T5 tokens", notes))
    uses_cfg = (preset.guidance if guidance is None else guidance) > 1.0
    if info.get("studio") is not None:
        wanted_slg = bool(info.get("skip_layer_guidance_layers"))
    else:
        wanted_slg = bool(info.get("skip_layer_guidance_layers")) or bool(preset.skip_layer_guidance_layers)
    skip_layer_guidance = wanted_slg and bool(preset.skip_layer_guidance_layers) and uses_cfg
    if wanted_slg and not skip_layer_guidance:
        notes.append(f"Skip-layer guidance is off: {spec.title} at this guidance does not take it.")
    values = {
        "model": _SHORT_NAME_BY_KEY[key],
        "prompt": prompt,
        "negative_prompt": negative,
        "seed": int(seed),
        "steps": "" if steps is None else str(int(steps)),
        "guidance": "" if guidance is None else f"{guidance:g}",
        "width": width,
        "height": height,
        "max_sequence_length": tokens,
        "skip_layer_guidance": skip_layer_guidance,
        "lora": "",  # the prompt's <lora:name:w> tags carry the LoRAs at their exact weights
    }
    return values, notes


def _clamped(value, low, high, label: str, notes: list[str]):
    if value is None:
        return None
    if low <= value <= high:
        return value
    clamped = min(max(value, low), high)
    notes.append(f"{label} {value:g} is outside {low:g}-{high:g}; set to {clamped:g}.")
    return clamped


def fitted_size(width: int | None, height: int | None, spec, tiny: bool, notes: list[str]) -> tuple[int, int]:
    """(width, height) the model draws: the given size when allowed, else scaled at its aspect ratio into
    the model's pixel range and side limit, snapped to 16. A missing size is the model's default square."""
    limits = size_limits(spec, tiny)
    if not width or not height or width <= 0 or height <= 0:
        side = limits["default_size"]
        notes.append(f"The settings hold no size; Generate uses {side}x{side}.")
        return side, side

    def allowed(w: int, h: int) -> bool:
        return limits["min_pixels"] <= w * h <= limits["max_pixels"] and max(w, h) <= limits["max_side"]

    fitted = (snap(width), snap(height))
    if allowed(*fitted):
        if fitted != (width, height):
            notes.append(f"Size {width}x{height} snapped to {fitted[0]}x{fitted[1]} (multiples of 16).")
        return fitted
    area = min(max(width * height, limits["min_pixels"]), limits["max_pixels"])
    scale = min(math.sqrt(area / (width * height)), limits["max_side"] / max(width, height))
    candidate = (snap(width * scale), snap(height * scale))
    # Snapping can land one step outside the range: walk the scale by one 16 px step, a bounded number of times.
    for _ in range(limits["max_side"] // SIZE_MULTIPLE):
        if allowed(*candidate):
            break
        step = SIZE_MULTIPLE / max(candidate)
        scale *= 1 - step if candidate[0] * candidate[1] > limits["min_pixels"] else 1 + step
        candidate = (snap(width * scale), snap(height * scale))
    else:
        candidate = (limits["default_size"], limits["default_size"])
    notes.append(
        f"Size {width}x{height} is outside what {spec.title}{' (tiny)' if tiny else ''} draws; "
        f"scaled to {candidate[0]}x{candidate[1]} at about the same aspect ratio."
    )
    return candidate
