"""Generation settings other tools write, in their own formats, read as one set of fields.

A1111's ``parameters`` text (A1111, Forge, reForge, SD.Next, Stability Matrix, Civitai, ComfyUI's
A1111-format savers) is parsed by ``pipelines.sd3.png_metadata``. This module reads the rest, each
after its writer's source or documentation:

- **SwarmUI**: JSON ``{"sui_image_params": {prompt, negativeprompt, seed, steps, cfgscale, width,
  height, sampler, scheduler, model, loras, loraweights, ...}}`` in the PNG ``parameters`` chunk, or
  in the EXIF UserComment of a JPEG/WebP (src/Utils/Image.cs; ImageSharp writes it UTF-16LE).
- **Fooocus**: its JSON scheme (``prompt``, ``negative_prompt``, ``seed``, ``steps``,
  ``guidance_scale``, ``resolution`` "(w, h)", ``sampler``, ``scheduler``, ``base_model``, ``loras``
  [[name, weight, hash]], ``version`` "Fooocus v...") in ``parameters`` or the EXIF UserComment
  (modules/meta_parser.py); its A1111 scheme is A1111 text.
- **RuinedFooocus**: flat JSON with ``"software": "RuinedFooocus"`` (``Prompt``, ``Negative``,
  ``cfg``, ``sampler_name``, ``base_model_name``, ...) in ``parameters`` (modules/async_worker.py).
- **InvokeAI**, three generations: ``invokeai_metadata`` (3.x and later: CoreMetadata JSON,
  ``positive_prompt``, ``cfg_scale``, ``scheduler``, ``model.name`` or ``model.model_name``),
  ``sd-metadata`` (2.x JSON: ``image.prompt`` [{prompt}] with the negative prompt in ``[...]``)
  and ``Dream`` (1.x: ``"prompt [negative]" -s steps -S seed -W w -H h -C cfg -A sampler``).
- **NovelAI**: PNG text chunks ``Description`` (prompt), ``Source`` (model and hash), ``Comment``
  (JSON: ``steps``, ``scale``, ``seed``, ``sampler``, ``uc`` or ``v4_negative_prompt``, ``width``,
  ``height``); WebP files carry the same chunks as one JSON object in the EXIF UserComment, and
  PNGs the same again in the alpha channel (read by ``pipelines.sd3.png_info``).
- **Civitai**'s ComfyUI-based generator: the ComfyUI graph as JSON in a JPEG's UserComment, with
  an ``extraMetadata`` JSON text holding the prompt and settings the site shows.
- **ComfyUI**: the ``prompt`` (API graph) and ``workflow`` (editor graph) chunks of a PNG, or
  ``prompt:``/``workflow:`` texts in a WebP's EXIF Model/Make tags. Reading a graph is
  ``_comfyui_settings``'s one job.
- Any other JSON with the usual keys (``prompt``, ``negative_prompt``, ``seed``,
  ``num_inference_steps``, ``guidance_scale``, ``width``/``height`` or ``resolution``, ...), as
  Hugging Face Spaces write.

A file with none of these may still say where it came from: an editor's ``Software`` tag (GIMP,
Photoshop), XMP ``CreatorTool``, or Content Credentials (C2PA) and IPTC's "trained algorithmic
media" marking naming an AI service (ChatGPT, Gemini). ``describe_origin`` turns that into one
true sentence.

Why not a library: ``sd-parsers`` (MIT, the closest) reads PNG text through Pillow's ``.text``,
which decodes every pixel, decodes a UTF-16LE UserComment as big-endian (mojibake for SwarmUI),
bounds nothing it inflates or parses, and reads neither SwarmUI, RuinedFooocus, NovelAI WebP nor
Civitai's JSON. Here every text comes from the bounded readers in ``pipelines.png_chunks`` and
``pipelines.sd3.png_info``, each JSON text is capped (``settings.MAX_SETTINGS_JSON_CHARS``) before
``json.loads``, and every walk over a parsed value is bounded by its size.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipelines import settings
from pipelines.sd3.comfyui_graph import settings_from_comfyui

# Fields every reader here fills (None where the file does not say), as png_info's settings dict names them.
FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "sampler", "model_given")
_MAX_LORAS = 64  # more than any real image names; a hostile list stops here
_MAX_SHOWN_KEYS = 8  # keys named in the sentence for a JSON text nobody recognises
_MAX_SETTINGS_SHOWN = 200  # settings kept per file: more than any tool writes, so a hostile object stops here
_INTS = re.compile(r"\d+")


@dataclass(frozen=True)
class MetadataTexts:
    """Every text an image file carries that may hold settings, each already bounded by its reader.

    ``kind``: "png", "jpeg" or "webp"; ``chunks``: PNG text chunks (keyword -> text);
    ``user_comment``: the EXIF UserComment (Exif IFD, or IFD0 where Fooocus puts it), decoded;
    ``exif_text``: IFD0's text tags by name (``Software``, ``Make``, ``Model``, ``ImageDescription``,
    ``Artist``); ``comment``: a JPEG's COM segment; ``xmp``: the XMP packet; ``c2pa``: the bytes of a
    C2PA manifest store (PNG ``caBX``, JPEG APP11) or None; ``oversized``: keywords of PNG text
    chunks skipped unread for being over the per-chunk limit.
    """

    kind: str
    chunks: Mapping[str, str] = field(default_factory=dict)
    user_comment: str | None = None
    exif_text: Mapping[str, str] = field(default_factory=dict)
    comment: str | None = None
    xmp: str | None = None
    c2pa: bytes | None = None
    oversized: frozenset[str] = frozenset()


@dataclass
class ForeignSettings:
    """What ``read_foreign`` found: ``tool`` (who wrote it), ``source`` (where, for the summary),
    ``raw`` (the text as stored), and either ``fields`` (the settings: FIELDS plus ``loras``,
    ``model_hash`` and ``settings``, every other value as text) or ``reason`` (why none could be
    read, the end of a sentence that starts with the file's name)."""

    tool: str
    source: str
    raw: str
    fields: dict | None = None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- entry point


def read_foreign(texts: MetadataTexts) -> ForeignSettings | None:
    """The settings in ``texts`` written in a format other than A1111's text, or None when none is there.

    Tried in order: InvokeAI's chunks, NovelAI's chunks, ComfyUI's graph chunks, then a JSON text in
    the ``parameters`` chunk, the EXIF UserComment or a JPEG comment, then ComfyUI's WebP EXIF tags.
    """
    chunks = texts.chunks
    kind = texts.kind
    for key, tool in _CHUNK_TOOLS.items():
        if key in texts.oversized:
            return ForeignSettings(tool, f"{kind}-{key}", "", reason=_json_too_long())
    for key, reader in (("invokeai_metadata", _invokeai_core), ("sd-metadata", _invokeai_sd_metadata)):
        if chunks.get(key):
            return _from_json(chunks[key], "InvokeAI", f"{kind}-{key}", reader)
    if chunks.get("Dream"):
        return _finish("InvokeAI", f"{kind}-dream", chunks["Dream"], _invokeai_dream(chunks["Dream"]))
    if _is_novelai_chunks(chunks):
        return _novelai_chunks(chunks, f"{kind}-novelai")
    if chunks.get("prompt") or chunks.get("workflow"):
        return comfyui(chunks.get("prompt"), chunks.get("workflow"), f"{kind}-comfyui")
    for where, text in (
        ("parameters", chunks.get("parameters")),
        ("exif", texts.user_comment),
        ("comment", texts.comment),
    ):
        if text and looks_like_json(text):
            return read_json_text(text, f"{kind}-{where}-json")
    make, model = texts.exif_text.get("Make", ""), texts.exif_text.get("Model", "")
    if model.startswith("prompt:") or make.startswith("workflow:"):
        return comfyui(
            model.removeprefix("prompt:") or None, make.removeprefix("workflow:") or None, f"{kind}-exif-comfyui"
        )
    return None


# PNG text chunks that only one tool writes, for naming it when the chunk is too large to read.
_CHUNK_TOOLS = {
    "invokeai_metadata": "InvokeAI",
    "sd-metadata": "InvokeAI",
    "Dream": "InvokeAI",
    "prompt": "ComfyUI",
    "workflow": "ComfyUI",
    "Comment": "NovelAI",
    "parameters": "an A1111-format or JSON-writing tool",
}


def looks_like_json(text: str) -> bool:
    return text.lstrip()[:1] == "{"


def read_json_text(text: str, source: str) -> ForeignSettings:
    """The settings in a JSON object ``text`` (SwarmUI, Fooocus, RuinedFooocus, NovelAI, Civitai,
    ComfyUI or a Space's own keys), named by the keys that tell the writers apart."""
    value, reason = _load_json(text)
    if value is None:
        return ForeignSettings("an unknown tool", source, text, reason=reason)
    if "sui_image_params" in value:
        return _finish("SwarmUI", source, text, _swarmui(value))
    if value.get("software") == "RuinedFooocus" or ("Prompt" in value and "base_model_name" in value):
        return _finish("RuinedFooocus", source, text, _ruined_fooocus(value))
    if _is_fooocus(value):
        return _finish("Fooocus", source, text, _fooocus(value))
    if _is_novelai_chunks(value):
        return _novelai_chunks(value, source, raw=text)
    if _is_novelai_comment(value):
        return _finish("NovelAI", source, text, _novelai_comment(value, {}))
    if isinstance(value.get("extraMetadata"), str) or _is_comfyui_graph(value):
        return _civitai_or_comfyui(value, text, source)
    if isinstance(value.get("prompt"), Mapping) and _is_comfyui_graph(value["prompt"]):
        workflow = value.get("workflow")
        return comfyui(json.dumps(value["prompt"]), json.dumps(workflow) if workflow else None, source, raw=text)
    fields = _generic(value)
    if fields is not None:
        return _finish("a tool that writes its settings as JSON", source, text, fields)
    keys = ", ".join(str(key) for key in list(value)[:_MAX_SHOWN_KEYS])
    return ForeignSettings(
        "an unknown tool",
        source,
        text,
        reason=f"holds a JSON text from a tool the Studio does not know (keys: {keys}), so no settings could be read",
    )


# ----------------------------------------------------------------------------- ComfyUI


def comfyui(prompt_text: str | None, workflow_text: str | None, source: str, *, raw: str | None = None):
    """ComfyUI's graphs (``prompt``: the API graph, ``workflow``: the editor's), read by ``_comfyui_settings``."""
    raw = raw if raw is not None else (prompt_text or workflow_text or "")
    for text in (prompt_text, workflow_text):
        if text and len(text) > settings.MAX_SETTINGS_JSON_CHARS:
            return ForeignSettings("ComfyUI", source, "", reason=_json_too_long())
    graph = _comfyui_settings(prompt_text, workflow_text)
    if graph is None:
        return ForeignSettings(
            "ComfyUI",
            source,
            raw,
            reason=(
                "holds a ComfyUI workflow whose settings the Studio could not read (no API graph with a sampler "
                "to follow, only the editor's workflow, or a graph past the reader's bounds); open it in ComfyUI "
                "and save it again, or use an A1111-format saver node"
            ),
        )
    return _finish("ComfyUI", source, raw, _from_comfyui_graph(graph))


def _comfyui_settings(prompt_text: str | None, workflow_text: str | None) -> dict | None:
    """Settings from a ComfyUI file's ``prompt`` (API-format graph) and ``workflow`` texts, or None.

    The one place a graph is read: it becomes one call to ``settings_from_comfyui(prompt: dict)``
    (pipelines/sd3/comfyui_graph.py), whose dict has prompt, negative_prompt, seed, steps, cfg,
    width, height, sampler, scheduler, model, loras, denoise and notes. Both texts arrive bounded
    (settings.MAX_SETTINGS_JSON_CHARS). A file with only the editor's ``workflow`` (no API graph) gives
    None: the file is named as ComfyUI's, with a sentence saying its settings were not read.
    """
    if not prompt_text:
        return None
    try:
        graph = settings_from_comfyui(json.loads(prompt_text))
    except (ValueError, RecursionError):  # not JSON, not a graph, or past the reader's bounds
        return None
    return graph if graph.get("found") else None


def _from_comfyui_graph(graph: Mapping[str, Any]) -> dict:
    """FIELDS from ``settings_from_comfyui``'s dict (cfg -> guidance, sampler + scheduler, model)."""
    fields = _fields(
        prompt=graph.get("prompt"),
        negative_prompt=graph.get("negative_prompt"),
        seed=graph.get("seed"),
        steps=graph.get("steps"),
        guidance=graph.get("cfg"),
        width=graph.get("width"),
        height=graph.get("height"),
        sampler=_joined(graph.get("sampler"), graph.get("scheduler")),
        model_given=graph.get("model"),
        loras=graph.get("loras"),
    )
    if graph.get("denoise") is not None:
        fields["settings"]["Denoising strength"] = str(graph["denoise"])
    fields["notes"] = [str(note) for note in (graph.get("notes") or [])[:_MAX_LORAS] if note]
    return fields


def _is_comfyui_graph(value: Mapping) -> bool:
    """An API-format graph: node ids mapping to {"class_type": ..., "inputs": {...}} (a bounded look)."""
    nodes = [node for _, node in zip(range(_MAX_LORAS), value.values(), strict=False) if isinstance(node, Mapping)]
    return any("class_type" in node for node in nodes)


def _civitai_or_comfyui(value: Mapping, text: str, source: str) -> ForeignSettings:
    """Civitai's generator: a ComfyUI graph whose ``extraMetadata`` text holds what the site shows."""
    extra = value.get("extraMetadata")
    graph_nodes = {key: node for key, node in value.items() if isinstance(node, Mapping) and "class_type" in node}
    graph = _comfyui_settings(json.dumps(graph_nodes), None) if graph_nodes else None
    fields = _from_comfyui_graph(graph) if graph else None
    if isinstance(extra, str) and len(extra) <= settings.MAX_SETTINGS_JSON_CHARS:
        meta, _ = _load_json(extra)
        if meta is not None:
            site = _fields(
                prompt=meta.get("prompt"),
                negative_prompt=meta.get("negativePrompt"),
                seed=meta.get("seed"),
                steps=meta.get("steps"),
                guidance=meta.get("cfgScale"),
                width=meta.get("width"),
                height=meta.get("height"),
                sampler=meta.get("sampler"),
                model_given=_first_resource_name(meta.get("resources")),
                settings={k: v for k, v in meta.items() if k not in ("resources",)},
            )
            if fields:  # the graph's values fill what the site's summary leaves out
                for key in FIELDS:
                    if site[key] is None:
                        site[key] = fields[key]
            return _finish("Civitai", source, text, site)
    if fields:
        return _finish("ComfyUI", source, text, fields)
    return comfyui(json.dumps(graph_nodes) if graph_nodes else None, None, source, raw=text)


def _first_resource_name(resources) -> str | None:
    for resource in resources[:_MAX_LORAS] if isinstance(resources, list) else []:
        if isinstance(resource, Mapping) and resource.get("modelType", resource.get("type")) in (
            "Checkpoint",
            "checkpoint",
        ):
            return _text(resource.get("modelName") or resource.get("name"))
    return None


# ----------------------------------------------------------------------------- the formats


def _swarmui(value: Mapping) -> dict:
    params = value["sui_image_params"] if isinstance(value["sui_image_params"], Mapping) else {}
    names = params.get("loras") if isinstance(params.get("loras"), list) else []
    weights = params.get("loraweights") if isinstance(params.get("loraweights"), list) else []
    loras = [
        {"name": name, "weight": weights[index] if index < len(weights) else 1.0}
        for index, name in enumerate(names[:_MAX_LORAS])
    ]
    return _fields(
        prompt=params.get("prompt"),
        negative_prompt=params.get("negativeprompt"),
        seed=params.get("seed"),
        steps=params.get("steps"),
        guidance=params.get("cfgscale"),
        width=params.get("width"),
        height=params.get("height"),
        sampler=_joined(params.get("sampler"), params.get("scheduler")),
        model_given=params.get("model"),
        loras=loras,
        settings=params,
    )


def _is_fooocus(value: Mapping) -> bool:
    version = str(value.get("version", ""))
    return (
        value.get("metadata_scheme") == "fooocus"
        or version.startswith("Fooocus")
        or ("guidance_scale" in value and "base_model" in value and "resolution" in value)
    )


def _fooocus(value: Mapping) -> dict:
    loras = []
    for lora in (value.get("loras") if isinstance(value.get("loras"), list) else [])[:_MAX_LORAS]:
        if isinstance(lora, list | tuple) and len(lora) >= 2:
            loras.append({"name": lora[0], "weight": lora[1]})
    size = _INTS.findall(str(value.get("resolution", "")))[:2]
    return _fields(
        prompt=value.get("prompt"),
        negative_prompt=value.get("negative_prompt"),
        seed=value.get("seed"),
        steps=value.get("steps"),
        guidance=value.get("guidance_scale"),
        width=size[0] if len(size) == 2 else None,
        height=size[1] if len(size) == 2 else None,
        sampler=_joined(value.get("sampler"), value.get("scheduler")),
        model_given=value.get("base_model"),
        model_hash=value.get("base_model_hash"),
        loras=loras,
        settings=value,
    )


def _ruined_fooocus(value: Mapping) -> dict:
    loras = []
    raw_loras = value.get("loras")
    for lora in (raw_loras if isinstance(raw_loras, list) else [])[:_MAX_LORAS]:
        # [hash, "weight - name"] (0.x wrote a "Loras:<name:weight>" text instead: kept in settings)
        if isinstance(lora, list | tuple) and len(lora) == 2 and " - " in str(lora[1]):
            weight, name = str(lora[1]).split(" - ", 1)
            loras.append({"name": name, "weight": weight})
    return _fields(
        prompt=value.get("Prompt"),
        negative_prompt=value.get("Negative"),
        seed=value.get("seed"),
        steps=value.get("steps"),
        guidance=value.get("cfg"),
        width=value.get("width"),
        height=value.get("height"),
        sampler=_joined(value.get("sampler_name"), value.get("scheduler")),
        model_given=value.get("base_model_name"),
        model_hash=value.get("base_model_hash"),
        loras=loras,
        settings=value,
    )


def _invokeai_core(value: Mapping) -> dict:
    model = value.get("model") if isinstance(value.get("model"), Mapping) else {}
    loras = []
    for lora in (value.get("loras") if isinstance(value.get("loras"), list) else [])[:_MAX_LORAS]:
        if isinstance(lora, Mapping):
            ident = lora.get("model") or lora.get("lora") or {}  # 4.x and later: "model"; 3.x: "lora"
            if isinstance(ident, Mapping):
                loras.append({"name": ident.get("name") or ident.get("model_name"), "weight": lora.get("weight")})
    return _fields(
        prompt=value.get("positive_prompt"),
        negative_prompt=value.get("negative_prompt"),
        seed=value.get("seed"),
        steps=value.get("steps"),
        guidance=value.get("cfg_scale"),
        width=value.get("width"),
        height=value.get("height"),
        sampler=value.get("scheduler"),
        model_given=model.get("name") or model.get("model_name"),
        model_hash=model.get("hash"),
        loras=loras,
        settings=value,
    )


def _invokeai_sd_metadata(value: Mapping) -> dict:
    image = value.get("image") if isinstance(value.get("image"), Mapping) else {}
    prompts = image.get("prompt")
    if isinstance(prompts, list):  # [{"prompt": "text [negative]", "weight": 1.0}, ...]
        text = " ".join(str(item.get("prompt", "")) for item in prompts[:_MAX_LORAS] if isinstance(item, Mapping))
    else:
        text = str(prompts or "")
    prompt, negative = _split_invokeai_prompt(text)
    return _fields(
        prompt=prompt,
        negative_prompt=negative,
        seed=image.get("seed"),
        steps=image.get("steps"),
        guidance=image.get("cfg_scale"),
        width=image.get("width"),
        height=image.get("height"),
        sampler=image.get("sampler"),
        model_given=value.get("model_weights") or value.get("model_id"),
        model_hash=value.get("model_hash"),
        settings=image,
    )


_DREAM_SWITCHES = {"-s": "steps", "-S": "seed", "-W": "width", "-H": "height", "-C": "cfg_scale", "-A": "sampler"}


def _invokeai_dream(text: str) -> dict:
    """InvokeAI 1.x: ``"prompt [negative]" -s 50 -S 42 -W 512 -H 512 -C 7.5 -A k_lms`` (one split, no regex)."""
    quoted, _, rest = text.strip().removeprefix('"').partition('"')
    words = rest.split()
    values = {
        _DREAM_SWITCHES[word]: words[index + 1] for index, word in enumerate(words[:-1]) if word in _DREAM_SWITCHES
    }
    prompt, negative = _split_invokeai_prompt(quoted)
    return _fields(
        prompt=prompt,
        negative_prompt=negative,
        seed=values.get("seed"),
        steps=values.get("steps"),
        guidance=values.get("cfg_scale"),
        width=values.get("width"),
        height=values.get("height"),
        sampler=values.get("sampler"),
        settings=values,
    )


def _split_invokeai_prompt(text: str) -> tuple[str, str]:
    """InvokeAI 1.x-2.x put negative words in ``[brackets]`` inside the prompt: (prompt, negatives)."""
    prompt, negatives, depth, start = [], [], 0, 0
    for index, char in enumerate(text):  # one pass; brackets do not nest in this syntax, so depth is 0 or 1
        if char == "[" and depth == 0:
            prompt.append(text[start:index])
            depth, start = 1, index + 1
        elif char == "]" and depth == 1:
            negatives.append(text[start:index].strip(" ,"))
            depth, start = 0, index + 1
    (negatives if depth else prompt).append(text[start:])
    kept = " ".join(part.strip() for part in prompt if part.strip())
    return kept.strip(" ,"), ", ".join(part for part in negatives if part)


def _is_novelai_chunks(chunks: Mapping) -> bool:
    return str(chunks.get("Software", "")).startswith("NovelAI") or (
        "Comment" in chunks and "Description" in chunks and "Source" in chunks
    )


def _is_novelai_comment(value: Mapping) -> bool:
    return "uc" in value or "v4_prompt" in value or ("n_samples" in value and "scale" in value)


def _novelai_chunks(chunks: Mapping, source: str, raw: str | None = None) -> ForeignSettings:
    comment = chunks.get("Comment")
    if isinstance(comment, str):
        if len(comment) > settings.MAX_SETTINGS_JSON_CHARS:
            return ForeignSettings("NovelAI", source, "", reason=_json_too_long())
        comment, reason = _load_json(comment)
        if comment is None:
            return ForeignSettings("NovelAI", source, chunks.get("Comment", ""), reason=reason)
    if not isinstance(comment, Mapping):
        comment = {}
    raw = raw if raw is not None else json.dumps(dict(chunks), ensure_ascii=False)
    return _finish("NovelAI", source, raw, _novelai_comment(comment, chunks))


def _novelai_comment(comment: Mapping, chunks: Mapping) -> dict:
    negative = comment.get("uc")
    v4_negative = comment.get("v4_negative_prompt")
    if negative is None and isinstance(v4_negative, Mapping) and isinstance(v4_negative.get("caption"), Mapping):
        negative = v4_negative["caption"].get("base_caption")
    prompt = comment.get("prompt")
    if not isinstance(prompt, str):
        prompt = chunks.get("Description")
    model, model_hash = None, None
    source = str(chunks.get("Source", ""))
    if source:  # "Stable Diffusion XL C1E1DE52", "NovelAI Diffusion V4 4BDE2A90": a name, then a hash
        name, _, last = source.rpartition(" ")
        model, model_hash = (name, last) if name and last.isalnum() and last.upper() == last else (source, None)
    return _fields(
        prompt=prompt.strip() if isinstance(prompt, str) else None,
        negative_prompt=negative,
        seed=comment.get("seed"),
        steps=comment.get("steps"),
        guidance=comment.get("scale"),
        width=comment.get("width"),
        height=comment.get("height"),
        sampler=_joined(comment.get("sampler"), comment.get("noise_schedule")),
        model_given=model,
        model_hash=model_hash,
        settings=comment,
    )


# Keys tools without a format of their own use (Hugging Face Spaces, scripts), most common first.
_GENERIC_KEYS = {
    "prompt": ("prompt", "positive_prompt", "Prompt", "positive"),
    "negative_prompt": ("negative_prompt", "negativePrompt", "negative", "Negative prompt", "Negative"),
    "seed": ("seed", "Seed"),
    "steps": ("steps", "num_inference_steps", "Steps", "sampling_steps"),
    "guidance": ("guidance_scale", "cfg_scale", "cfg", "cfgScale", "CFG scale", "guidance", "scale"),
    "width": ("width", "Width"),
    "height": ("height", "Height"),
    "sampler": ("sampler", "sampler_name", "scheduler", "Sampler"),
    "model_given": ("model", "model_id", "Model", "base_model", "checkpoint"),
}


def _generic(value: Mapping) -> dict | None:
    """FIELDS from the usual key names, or None when fewer than two are there (then it is no settings text)."""
    found = {name: next((value[key] for key in keys if key in value), None) for name, keys in _GENERIC_KEYS.items()}
    if isinstance(found["model_given"], Mapping):  # {"Model": "Animagine XL", "Model hash": "..."}
        found["model_given"] = next(iter(found["model_given"].values()), None)
    if found["width"] is None and value.get("resolution") is not None:
        size = _INTS.findall(str(value["resolution"]))[:2]  # "1024 x 1024", "(1024, 1024)"
        if len(size) == 2:
            found["width"], found["height"] = size
    if sum(found[name] is not None for name in found) < 2:
        return None
    return _fields(**found, settings=value)


# ----------------------------------------------------------------------------- origin of files without settings

# Who a Content Credentials manifest or an XMP packet names, as bytes to look for (case kept as written).
_AI_SERVICES = (
    (b"ChatGPT", "ChatGPT (OpenAI)"),
    (b"OpenAI", "ChatGPT (OpenAI)"),
    (b"Gemini", "Gemini (Google)"),
    (b"Google", "Gemini (Google)"),
    (b"Adobe Firefly", "Adobe Firefly"),
    (b"Microsoft", "Microsoft Designer"),
)
_TRAINED_MEDIA = "trainedAlgorithmicMedia"  # IPTC digital source type of a generated image
_CREATOR_TOOL = re.compile(r"CreatorTool(?:>|=\")([^<\"]{1,100})")


def describe_origin(texts: MetadataTexts) -> tuple[str, str] | None:
    """(tool, the end of a sentence after the file's name) for a file with no settings whose metadata
    names where it came from: an AI service (C2PA or IPTC marking) or an editor; else None."""
    xmp = texts.xmp or texts.chunks.get("XML:com.adobe.xmp") or ""
    service = None
    if texts.c2pa:
        service = next((name for needle, name in _AI_SERVICES if needle in texts.c2pa), "an AI service")
    elif _TRAINED_MEDIA in xmp or "Made with Google AI" in xmp:
        encoded = xmp.encode("utf-8", errors="replace")
        service = next((name for needle, name in _AI_SERVICES if needle in encoded), "an AI service")
    if service:
        where = "Content Credentials (C2PA)" if texts.c2pa else "IPTC metadata"
        return service, (
            f"was made by {service}; its {where} mark it as AI-generated but hold no prompt or settings to read"
        )
    software = texts.chunks.get("Software") or texts.exif_text.get("Software")
    creator = _CREATOR_TOOL.search(xmp[: settings.MAX_PARAMETERS_CHARS])
    comment = texts.chunks.get("Comment") or texts.comment or ""
    editor = software or (creator[1] if creator else None) or ("GIMP" if "Created with GIMP" in comment else None)
    if editor:
        editor = " ".join(str(editor).split())[:100]
        return editor, (
            f"was last saved by {editor}, which writes no generation settings (any the generator wrote are gone); "
            "upload the image as the generator saved it"
        )
    return None


# ----------------------------------------------------------------------------- helpers


def _from_json(text: str, tool: str, source: str, reader) -> ForeignSettings:
    value, reason = _load_json(text)
    if value is None:
        return ForeignSettings(
            tool, source, text if len(text) <= settings.MAX_SETTINGS_JSON_CHARS else "", reason=reason
        )
    return _finish(tool, source, text, reader(value))


def _load_json(text: str) -> tuple[dict | None, str | None]:
    """(the JSON object in ``text``, None) or (None, why not): bounded before parsing."""
    if len(text) > settings.MAX_SETTINGS_JSON_CHARS:
        return None, _json_too_long()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        return None, "carries its settings as JSON, but the JSON is damaged, so none could be read"
    if not isinstance(value, dict):
        return None, "carries a JSON text that is not an object of settings, so none could be read"
    return value, None


def _json_too_long() -> str:
    return (
        f"carries a settings text over {settings.MAX_SETTINGS_JSON_CHARS // 2**20} MB, far more than settings "
        "take, so it was not read"
    )


def _finish(tool: str, source: str, raw: str, fields: dict) -> ForeignSettings:
    if all(fields[key] is None for key in FIELDS):
        return ForeignSettings(
            tool, source, raw, reason=f"carries {tool} metadata, but it holds no prompt or settings to read"
        )
    return ForeignSettings(tool, source, raw, fields=fields, notes=fields.pop("notes", []))


def _fields(
    *,
    prompt=None,
    negative_prompt=None,
    seed=None,
    steps=None,
    guidance=None,
    width=None,
    height=None,
    sampler=None,
    model_given=None,
    model_hash=None,
    loras=None,
    settings: Mapping | None = None,
) -> dict:
    """FIELDS with their types: text as str, whole numbers as int, guidance as float; None where missing
    or not a finite number. ``settings``: every other value, shown as text (a bounded number of them)."""
    loras_read = []
    for lora in (loras if isinstance(loras, list) else [])[:_MAX_LORAS]:
        if isinstance(lora, Mapping) and _text(lora.get("name")):
            weight = _number(lora.get("weight"), float)
            loras_read.append({"name": _text(lora["name"]), "weight": 1.0 if weight is None else weight})
    shown = {}
    for key, value in list((settings or {}).items())[:_MAX_SETTINGS_SHOWN]:
        if value is None or isinstance(value, Mapping | list):
            continue
        shown[str(key)] = str(value)[:1000]
    return {
        "prompt": _text(prompt),
        "negative_prompt": _text(negative_prompt),
        "seed": _number(seed, int),
        "steps": _number(steps, int),
        "guidance": _number(guidance, float),
        "width": _number(width, int),
        "height": _number(height, int),
        "sampler": _text(sampler),
        "model_given": _text(model_given),
        "model_hash": _text(model_hash),
        "loras": loras_read,
        "settings": shown,
    }


def _text(value) -> str | None:
    if value is None or isinstance(value, Mapping | list | bool):
        return None
    text = str(value)
    return text if text.strip() else None


def _joined(*parts) -> str | None:
    return " ".join(text for text in (_text(part) for part in parts) if text) or None


def _number(value, kind):
    """``value`` as an int or float, or None when missing or not a finite number ("20.0" steps is 20)."""
    if value is None or isinstance(value, bool | Mapping | list):
        return None
    try:
        if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value.strip())  # a 64-bit seed as text keeps every digit (a float would not)
        number = float(str(value).strip()) if not isinstance(value, int | float) else value
        if isinstance(number, int) and kind is int:
            return number
        if not math.isfinite(number):
            return None
        return int(number) if kind is int else float(number)
    except (TypeError, ValueError, OverflowError):
        return None
