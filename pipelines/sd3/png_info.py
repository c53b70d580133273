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
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from pipelines import settings
from pipelines.catalog import CATALOG, SD3_SHORT_NAMES
from pipelines.images import ImageDecodeError, load_image
from pipelines.png_chunks import PngChunkError, PngTooLargeError, is_png, read_png_metadata
from pipelines.sd3.foreign_metadata import (
    ForeignSettings,
    MetadataTexts,
    describe_origin,
    looks_like_json,
    read_foreign,
    read_json_text,
)
from pipelines.sd3.lora_tags import LORA_TAG
from pipelines.sd3.png_metadata import PARAMETERS_KEY, STUDIO_KEY, parse_a1111_parameters, settings_pairs
from pipelines.sd3.text_to_image import SIZE_MULTIPLE, lora_weight_text, size_limits, snap

_STEALTH_PLAIN, _STEALTH_GZIP = b"stealth_pnginfo", b"stealth_pngcomp"  # alpha-channel signatures
_EXIF_FORMATS = ("JPEG", "WEBP")  # the ones Pillow opens here (a PNG is read by pipelines.png_chunks)
EXIF_IFD_TAG = 0x8769  # the Exif sub-IFD, which holds UserComment
USER_COMMENT_TAG = 0x9286
# IFD0 text tags that name a file's tool or hold settings (ComfyUI's WebP saver: "prompt:" in Model, "workflow:" in Make).
_EXIF_TEXT_TAGS = {0x0131: "Software", 0x010F: "Make", 0x0110: "Model", 0x010E: "ImageDescription", 0x013B: "Artist"}
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

    Read in this order: the Studio's JSON chunk; an A1111-format text (``parameters`` chunk, EXIF
    UserComment, JPEG comment); another tool's own format (``pipelines.sd3.foreign_metadata``); and,
    for a PNG with an alpha channel and nothing else, A1111's or NovelAI's "stealth" text in the
    alpha channel's lowest bits (the one reader that decodes pixels, within the decode caps).
    ``tool`` names the writer. A file with no settings gives ``found: False`` and a one-sentence
    ``message`` naming its tool where the file says. A file that is not a PNG, JPEG or WebP image,
    or is damaged, raises ImageDecodeError with a sentence.
    """
    if name is None and not isinstance(source, bytes | bytearray):
        name = os.path.basename(os.fspath(source))
    label = f"'{name}'" if name else "The file"
    data = _read_bytes(source, label)
    texts, has_alpha = _metadata_texts(data, label)
    kind = texts.kind
    # 1. The Studio's JSON and A1111-format text.
    studio_text = texts.chunks.get(STUDIO_KEY)
    parameters, where = _a1111_text(texts, label)
    studio = None
    notes: list[str] = []
    if studio_text:
        try:
            studio = json.loads(studio_text)
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            notes.append("The Studio's JSON chunk is damaged; the settings come from the parameters text.")
        if not isinstance(studio, dict):
            studio = None
    if parameters or studio is not None:
        info = settings_dict(parameters or "", studio)
        info["source"] = where if studio is None else "studio-json"
        info["notes"] = notes + info["notes"]
        return info
    # 2. Another tool's format.
    foreign = read_foreign(texts)
    if foreign is not None and foreign.fields is not None:
        return foreign_settings_dict(foreign)
    # 3. Text hidden in the alpha channel (A1111's stealth extension, NovelAI), only where nothing else is.
    unsearched = False
    if foreign is None and kind == "png" and has_alpha:
        try:
            hidden = read_stealth_text(data, label)
        except ImageDecodeError:  # over the decode caps or damaged: no pixel is read, and the sentence says so
            hidden, unsearched = None, True
        if hidden is not None:
            if looks_like_json(hidden):
                found = read_json_text(hidden, "png-stealth")
                if found.fields is not None:
                    return foreign_settings_dict(found)
                foreign = found
            else:
                info = settings_dict(_bounded(hidden, label))
                info["source"] = "png-stealth"
                return info
    return _nothing_found(label, kind, texts, foreign, unsearched=unsearched)


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


def _metadata_texts(data: bytes, label: str) -> tuple[MetadataTexts, bool]:
    """(every text the image file ``data`` carries, whether it is a PNG with an alpha channel).

    No pixel is decoded: a PNG's chunks are read by ``pipelines.png_chunks`` (text before and
    after the image data alike), a JPEG's or WebP's EXIF, XMP and comment by Pillow's lazy open.
    """
    if is_png(data):
        chunks, exif, c2pa, oversized = _png_texts(data, label)
        # IHDR is the first chunk (png_chunks checked it): its colour type is byte 25; 4 and 6 carry alpha.
        return _texts_with_exif("png", chunks, exif, c2pa=c2pa, oversized=oversized), data[25] in (4, 6)
    kind, info, exif, c2pa = _exif_of_other_image(data, label)
    comment = info.get("comment")
    xmp = info.get("xmp")
    return (
        _texts_with_exif(
            kind.lower(),
            {key: value for key, value in info.items() if isinstance(value, str)},
            exif,
            comment=_decoded(comment) if isinstance(comment, bytes | str) else None,
            xmp=_decoded(xmp) if isinstance(xmp, bytes | str) else None,
            c2pa=c2pa,
        ),
        False,
    )


def _texts_with_exif(kind: str, chunks: dict, exif: Image.Exif, **extra) -> MetadataTexts:
    text_tags = {}
    for tag, tag_name in _EXIF_TEXT_TAGS.items():
        value = exif.get(tag)
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, str) and value.strip("\x00").strip():
            text_tags[tag_name] = value.strip("\x00")[: settings.MAX_SETTINGS_JSON_CHARS + 1]
    return MetadataTexts(kind=kind, chunks=chunks, user_comment=_user_comment(exif), exif_text=text_tags, **extra)


def _decoded(value: bytes | str) -> str | None:
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
    text = text[: settings.MAX_SETTINGS_JSON_CHARS + 1].strip("\x00").strip()
    return text or None


def _a1111_text(texts: MetadataTexts, label: str) -> tuple[str | None, str]:
    """(an A1111-format settings text, where it was) from the parameters chunk, the EXIF UserComment or a
    JPEG comment; (None, kind) when none holds one (a JSON text there is another tool's format)."""
    kind = texts.kind
    for where, text in (
        ("parameters", texts.chunks.get(PARAMETERS_KEY)),
        ("exif", texts.user_comment),
        ("comment", texts.comment if kind == "jpeg" else None),
    ):
        if text and not looks_like_json(text):
            if where == "comment" and len(settings_pairs(_last_line(text, label))) < 3:
                continue  # a JPEG comment that is no settings text ("Created with GIMP")
            return _bounded(text, label), f"{kind}-{where}"
    return None, kind


def _last_line(text: str, label: str) -> str:
    return _bounded(text, label).strip().rsplit("\n", 1)[-1]


def _png_texts(data: bytes, label: str) -> tuple[dict[str, str], Image.Exif, bytes | None, frozenset[str]]:
    """(text chunks, EXIF, C2PA bytes, keywords of chunks too large to read) of a PNG file's bytes, read
    from its chunks within png_chunks' limits."""
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
    return metadata.texts, exif, metadata.c2pa, metadata.oversized


def _exif_of_other_image(data: bytes, label: str) -> tuple[str, dict, Image.Exif, bytes | None]:
    """(format, Pillow's info entries, EXIF, C2PA bytes) of a JPEG or WebP.

    Pillow's open reads the headers only (a JPEG's segments up to its scan: EXIF, XMP, COM and the
    APP11 segments that hold C2PA, each at most 64 kB); nothing here calls load().
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_EXIF_FORMATS) as image:
                info = dict(image.info)
                try:
                    exif = image.getexif()
                except Exception:  # noqa: BLE001 - a broken EXIF block means "no comment", not a broken image
                    exif = Image.Exif()
                # C2PA in JPEG: JUMBF boxes in APP11 segments ("JP" + box headers); one is enough to name the issuer.
                c2pa = next(
                    (body for marker, body in getattr(image, "applist", []) if marker == "APP11" and b"c2pa" in body),
                    None,
                )
                return image.format, info, exif, c2pa
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
    """The EXIF UserComment text (A1111's place for settings in JPEG and WebP; Fooocus writes it in
    IFD0 rather than the Exif IFD), or None."""
    try:
        raw = exif.get_ifd(EXIF_IFD_TAG).get(USER_COMMENT_TAG)
        if raw is None:
            raw = exif.get(USER_COMMENT_TAG)
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


def _nothing_found(
    label: str, kind: str, texts: MetadataTexts, foreign: ForeignSettings | None, *, unsearched: bool = False
) -> dict:
    """``found: False`` with one true sentence: the tool the file names and what could not be read."""
    tool, source, raw = None, kind, ""
    if foreign is not None:
        tool, source, raw = foreign.tool, foreign.source, foreign.raw
        if foreign.tool in foreign.reason or foreign.tool == "an unknown tool":
            message = f"{label} {foreign.reason}."
        else:
            message = f"{label}, written by {foreign.tool}, {foreign.reason}."
    elif (origin := describe_origin(texts)) is not None:
        tool, reason = origin
        message = f"{label} {reason}."
    elif kind == "png":
        message = (
            f"{label} carries no generation settings: it has none of the texts the Studio reads (A1111, ComfyUI, "
            "InvokeAI, NovelAI, Fooocus, SwarmUI), so its tool wrote none or they were removed"
            + (
                ", and its alpha channel, where some tools hide them, was not searched: the pixels could not be "
                "decoded within the Studio's limits."
                if unsearched
                else "."
            )
        )
    else:
        message = (
            f"{label} carries no generation settings (no EXIF UserComment or other settings text); A1111, Forge "
            f"and SwarmUI write them there, but most tools and sites strip metadata from {kind.upper()} files."
        )
    if len(raw) > settings.MAX_PARAMETERS_CHARS:
        raw = ""  # a graph or JSON too long to show; the sentence says what it was
    return {"found": False, "message": message, "source": source, "tool": tool, "raw": raw, "notes": []}


def read_stealth_text(data: bytes, label: str) -> str | None:
    """The text A1111's stealth-pnginfo extension (alpha mode) or NovelAI hid in a PNG's alpha channel, or None.

    The format (sd_webui_stealth_pnginfo): the lowest bit of each pixel's alpha, pixels taken column
    by column (x outer, y inner), spells ``stealth_pnginfo`` (plain UTF-8 follows) or
    ``stealth_pngcomp`` (gzip follows), then the payload's length in bits (32 bits, big-endian), then
    the payload. The pixels come from the safe decoder (``load_image``: its pixel and memory caps, no
    downscaling here, since that would scramble the bits); the payload is capped at
    ``settings.PNG_MAX_TEXT_CHUNK_BYTES`` and inflates no further than that.
    """
    image = load_image(data, name=label.strip("'"), keep_alpha=True, max_side=settings.MAX_DECODE_PIXELS)
    alpha = np.asarray(image.getchannel("A"))
    image.close()
    header_bits = 8 * len(_STEALTH_PLAIN) + 32
    if alpha.size < header_bits:
        return None
    # The first columns hold the header: transpose only as many as it needs.
    columns = -(-header_bits // alpha.shape[0])
    header = np.packbits(alpha[:, :columns].T.reshape(-1)[:header_bits] & 1).tobytes()
    signature, length_bits = header[: len(_STEALTH_PLAIN)], int.from_bytes(header[len(_STEALTH_PLAIN) :], "big")
    if signature not in (_STEALTH_PLAIN, _STEALTH_GZIP):
        return None
    limit = settings.PNG_MAX_TEXT_CHUNK_BYTES
    if length_bits % 8 or length_bits // 8 > limit or header_bits + length_bits > alpha.size:
        return None  # a length the image cannot hold or over the text limit: no stealth text
    columns = -(-(header_bits + length_bits) // alpha.shape[0])
    bits = alpha[:, :columns].T.reshape(-1)[header_bits : header_bits + length_bits] & 1
    payload = np.packbits(bits).tobytes()
    if signature == _STEALTH_GZIP:
        inflater = zlib.decompressobj(wbits=31)  # gzip framing
        try:
            payload = inflater.decompress(payload, limit + 1)
        except zlib.error:
            return None
        if len(payload) > limit or not inflater.eof:
            return None
    return payload.decode("utf-8", errors="replace") or None


# ----------------------------------------------------------------------------- the settings dict


def settings_dict(parameters: str, studio: Mapping[str, Any] | None = None) -> dict:
    """Settings from a ``parameters`` text and, when given, the Studio's JSON (which wins).

    Keys: ``found``, ``tool`` (who wrote it, from the text's ``Version``/``App`` pairs), ``prompt``
    (as the image's tool wrote it, ``<lora:name:w>`` tags kept), ``negative_prompt``, ``seed``,
    ``steps``, ``guidance``, ``width``, ``height`` (None where absent), ``model`` (the Studio's name
    for it, else the name as given), ``model_key`` (catalog key or None), ``model_given``, ``loras``
    (``name``, ``weight``), ``sampler``, ``max_sequence_length``, ``skip_layer_guidance_layers``,
    ``settings`` (every ``Key: value`` pair as text), ``studio`` (the JSON or None), ``raw`` (the
    text), ``notes``. Keys are matched as A1111 writes them, else in any case (``CFG Scale``).
    """
    parameters = parameters.replace("\r\n", "\n")  # written on Windows, or pasted from there
    prompt, negative, pairs = parse_a1111_parameters(parameters) if parameters else ("", "", {})
    folded = {key.casefold(): value for key, value in pairs.items()}

    def pair(key: str) -> str | None:
        return pairs[key] if key in pairs else folded.get(key.casefold())

    width, height = _size(pair("Size"))
    info = {
        "found": True,
        "tool": "the Studio" if studio is not None else _a1111_tool(pair),
        "prompt": prompt,
        "negative_prompt": negative,
        "seed": _number(pair("Seed"), int),
        "steps": _number(pair("Steps"), int),
        "guidance": _number(pair("CFG scale"), float),
        "width": width,
        "height": height,
        "sampler": " ".join(filter(None, [pair("Sampler"), pair("Schedule type")])) or None,
        "max_sequence_length": _number(pair("T5 tokens"), int),
        "skip_layer_guidance_layers": _layers(pair("SLG layers")),
        "loras": lora_tags(prompt),
        "lora_hashes": pair("Lora hashes"),
        "model_given": pair("Model"),
        "model_hash": pair("Model hash"),
        "settings": pairs,
        "studio": dict(studio) if studio is not None else None,
        "raw": parameters,
        "notes": [],
    }
    if studio is not None:
        _apply_studio_json(info, studio)
    stopped = bool(pair("Interrupted at step")) or bool((studio or {}).get("stopped"))
    return _with_model_and_notes(info, studio, stopped)


def foreign_settings_dict(found: ForeignSettings) -> dict:
    """``settings_dict``'s keys from another tool's format (``pipelines.sd3.foreign_metadata``)."""
    fields = found.fields
    info = {
        "found": True,
        "tool": found.tool,
        **{key: fields[key] for key in ("seed", "steps", "guidance", "width", "height", "sampler")},
        "prompt": fields["prompt"] or "",
        "negative_prompt": fields["negative_prompt"] or "",
        "max_sequence_length": None,
        "skip_layer_guidance_layers": [],
        "loras": fields["loras"] or lora_tags(fields["prompt"] or ""),
        "lora_hashes": None,
        "model_given": fields["model_given"],
        "model_hash": fields["model_hash"],
        "settings": fields["settings"],
        "studio": None,
        "raw": found.raw if len(found.raw) <= settings.MAX_PARAMETERS_CHARS else "",
        "notes": list(found.notes),
        "source": found.source,
    }
    return _with_model_and_notes(info, None, False)


def _with_model_and_notes(info: dict, studio: Mapping[str, Any] | None, stopped: bool) -> dict:
    """``info`` with ``model_key`` and ``model`` (the Studio's name when it serves that checkpoint) and the notes."""
    notes = info["notes"]
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
    if stopped:
        notes.append("This image was stopped early; drawing it again runs every step, so it comes out finished.")
    info["notes"] = [note for note in notes if note]
    return info


def _a1111_tool(pair) -> str:
    """Who wrote an A1111-format text, from the ``Version`` and ``App`` pairs the tools add."""
    version, app = pair("Version") or "", pair("App") or ""
    if app:
        return app  # SD.Next writes "App: SD.Next"
    if pair("Civitai resources") or pair("Civitai metadata"):
        return "Civitai"
    for needle, tool in (
        ("ComfyUI", "ComfyUI (A1111-format saver)"),
        ("RuinedFooocus", "RuinedFooocus"),
        ("Fooocus", "Fooocus"),
    ):
        if needle in version:
            return tool
    if version[:1] == "f" and version[1:2].isdigit():
        return "Forge"
    if version[:1] == "v" and version[1:2].isdigit():
        return "AUTOMATIC1111"
    return "an A1111-format tool"


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
    # Another tool lists its LoRAs apart from the prompt: they travel as the prompt's tags, like A1111's.
    tagged = {lora["name"] for lora in lora_tags(prompt)}
    missing = [lora for lora in info.get("loras") or [] if lora["name"] not in tagged]
    if missing:
        prompt = " ".join([prompt, *(f"<lora:{lora['name']}:{lora_weight_text(lora['weight'])}>" for lora in missing)])
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
