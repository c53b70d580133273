"""The Studio's SD3.5 jobs as ComfyUI graphs, and ComfyUI graphs read back as settings.

ComfyUI keeps a job in two PNG text chunks: ``prompt`` (the API format the server runs:
``{"<id>": {"class_type": ..., "inputs": {...}}}``, a link is ``["<id>", output_index]``) and
``workflow`` (the frontend's canvas: nodes, positions, widget values, links). Dropping such a PNG on
ComfyUI's canvas loads the workflow. Three calls:

- ``comfyui_prompt(studio_settings)``: the API-format graph of one Studio image's settings (the
  dict its ``studio`` PNG chunk holds). Only core ComfyUI nodes, as ComfyUI's own SD3.5 examples
  use them: ``CheckpointLoaderSimple`` (MODEL, VAE) + ``TripleCLIPLoader`` (clip_l, clip_g,
  t5xxl_fp16: the SD3.5 checkpoints hold no text encoders), one ``LoraLoaderModelOnly`` per LoRA
  (the Studio loads the MMDiT part of a LoRA only), ``SkipLayerGuidanceSD3`` when the job used
  skip-layer guidance, ``ModelSamplingSD3`` with the scheduler's real shift, ``CLIPTextEncode``
  positive and negative, ``EmptySD3LatentImage``, ``KSampler`` (``euler`` / ``normal``: diffusers'
  FlowMatchEulerDiscreteScheduler; ``normal`` spaces the timesteps exactly as diffusers does, while
  ``simple``, which ComfyUI's templates use, differs most at few steps), ``VAEDecode``, ``SaveImage``. Image to image adds ``LoadImage``
  + ``ImageScale`` + ``VAEEncode`` and ``denoise`` = strength; inpainting adds ``LoadImageMask`` +
  ``SetLatentNoiseMask`` (diffusers' SD3 inpaint pipeline re-noises outside the mask, as
  ``SetLatentNoiseMask`` does; ``VAEEncodeForInpaint``/``InpaintModelConditioning`` are for
  inpainting models, which SD3.5 has none of) and the Studio's paste-back through the blurred mask
  (``MaskToImage`` -> ``ImageBlur`` -> ``ImageToMask`` -> ``ImageCompositeMasked``); ControlNet adds
  ``ControlNetLoader`` + ``LoadImage`` + ``ImageScale`` (+ ``Canny`` or ``ImageBlur``) +
  ``ControlNetApplyAdvanced`` with the VAE, as ComfyUI's SD3.5 Large canny template does.
- ``comfyui_workflow(prompt)``: the same graph in the frontend's workflow format (version 0.4).
- ``settings_from_comfyui(prompt)``: what PNG Info shows, read from any API-format graph (the
  Studio's or another ComfyUI user's): the first sampler pass, its prompts through conditioning
  nodes, its size, checkpoint and LoRAs along the model chain. Bounded: at most
  ``MAX_GRAPH_NODES`` nodes, ``MAX_WALK_STEPS`` hops per walk, cycles stop a walk.

``comfyui_chunks`` and ``settings_from_comfyui_text`` are the one-call wiring for the PNG writer and
PNG Info.

What does not carry exactly, said plainly:

- **Pixels.** ComfyUI draws its noise differently from the Studio's CPU ``torch.Generator``: the
  same seed gives a different image in ComfyUI. Settings carry; pixels do not.
- **Text encoders.** The Studio truncates CLIP at 77 tokens and pads T5 to ``max_sequence_length``
  (256 by default); ComfyUI encodes long prompts in 77-token CLIP windows and does not cap T5 the
  same way, so long prompts encode differently. ``max_sequence_length`` has no node.
- **Guidance below 1.** diffusers runs no classifier-free guidance at guidance <= 1 (Turbo's 0);
  ComfyUI's cfg 1.0 is that, while cfg 0 would draw the unconditional prediction. Such jobs are
  written with cfg 1.0, and read back as 1.0.
- **Denoise.** ComfyUI's ``denoise`` runs all ``steps`` inside the shortened schedule; diffusers'
  ``strength`` runs ``int(steps * strength)`` of a full schedule. Same setting, a different count.
- **Skip-layer guidance.** Written with diffusers' defaults (scale 2.8, 1% to 20%); ComfyUI reads the
  range as sigma percents, diffusers as step fractions.
- **Control maps.** ComfyUI's ``Canny`` (kornia, thresholds 0.01-0.99) is not OpenCV's; the Studio's
  thresholds are written divided by 255. Depth maps come from Depth Anything V2, which core ComfyUI
  has no node for: the graph loads the depth map as an image (``CONTROL_MAP_FILE``). Mask blur
  above ``ImageBlur``'s 31 px is written as 31.
- **Input files.** The init image, mask and control image are not inside the PNG: ``LoadImage``
  names placeholder files (``INIT_IMAGE_FILE`` and so on) for the user to replace.
- A stopped run (``stopped``/``steps_done``) is written with its full step count.
"""

from __future__ import annotations

import json
import math
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipelines import settings
from pipelines.catalog import CATALOG, CONTROLNET_KEYS, MODEL_CONFIGS_DIR

DEFINITIONS_PATH = Path(__file__).resolve().parents[2] / "assets" / "comfyui" / "node_definitions.json"
PROMPT_KEY = "prompt"  # ComfyUI's PNG text chunk names, as its SaveImage writes them
WORKFLOW_KEY = "workflow"

# Checkpoint files as ComfyUI users have them (Stability's single-file releases; ComfyUI's examples).
CHECKPOINT_FILES = {
    "sd35-large": "sd3.5_large.safetensors",
    "sd35-large-turbo": "sd3.5_large_turbo.safetensors",
    "sd35-medium": "sd3.5_medium.safetensors",
}
# TripleCLIPLoader's files, in the order ComfyUI's SD3.5 example loads them.
TEXT_ENCODER_FILES = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")
# Stability's SD3.5 Large ControlNets under the names ComfyUI's template loads them by.
CONTROLNET_FILES = {kind: f"sd3.5_large_controlnet_{kind}.safetensors" for kind in CONTROLNET_KEYS}
INIT_IMAGE_FILE = "studio_init_image.png"  # placeholders: the inputs are not inside the output PNG
MASK_FILE = "studio_mask.png"
CONTROL_IMAGE_FILE = "studio_control_image.png"
CONTROL_MAP_FILE = "studio_control_map.png"  # a map made elsewhere (depth, or preprocess off)
SAMPLER_NAME = "euler"  # diffusers' FlowMatchEulerDiscreteScheduler is an Euler step on the flow
# ComfyUI's "normal" spaces timesteps linearly from sigma_max to sigma_min, as diffusers' set_timesteps
# does: the same sigmas (tests check it); "simple" steps by 1/steps and differs (Turbo's 4: 0.5 vs 0.009 last).
SCHEDULER_NAME = "normal"
DEFAULT_SHIFT = 3.0  # every SD3.5 scheduler_config.json says 3.0; used when a model has none on disk
# diffusers' StableDiffusion3Pipeline defaults, which the Studio leaves as they are.
SLG_SCALE, SLG_START, SLG_END = 2.8, 0.01, 0.2
IMAGE_BLUR_MAX_RADIUS = 31  # ImageBlur's largest blur_radius
FILENAME_PREFIX = "sd35-studio"
# Bounds for reading graphs from strangers' files (the chunk itself is capped by the PNG reader).
MAX_GRAPH_NODES = 2000  # ComfyUI workflows of a few hundred nodes exist; thousands do not
MAX_WALK_STEPS = 256  # hops along one chain (model, conditioning, latent); far beyond real graphs

SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
CHECKPOINT_LOADERS = {
    "CheckpointLoaderSimple": "ckpt_name",
    "CheckpointLoader": "ckpt_name",
    "unCLIPCheckpointLoader": "ckpt_name",
    "ImageOnlyCheckpointLoader": "ckpt_name",
    "UNETLoader": "unet_name",
}
_LATENT_SOURCES = ("samples", "latent", "latent_image", "pixels", "image", "destination")
_CONDITIONING_INPUTS = ("conditioning", "conditioning_1", "conditioning_to", "positive", "cond")


# ----------------------------------------------------------------------------- definitions


@lru_cache(maxsize=1)
def node_definitions() -> dict:
    """The recorded ComfyUI node definitions (``assets/comfyui/node_definitions.json``)."""
    return json.loads(DEFINITIONS_PATH.read_text(encoding="utf-8"))


@lru_cache(maxsize=8)
def scheduler_shift(model_key: str) -> float:
    """The flow-matching shift in ``model_key``'s real ``scheduler_config.json``."""
    spec = CATALOG.get(model_key)
    path = MODEL_CONFIGS_DIR / spec.config_dir / "scheduler" / "scheduler_config.json" if spec else None
    if path is None or not path.is_file():
        return DEFAULT_SHIFT
    shift = json.loads(path.read_text(encoding="utf-8")).get("shift")
    return DEFAULT_SHIFT if shift is None else float(shift)


# ----------------------------------------------------------------------------- writing: API format


class _Graph:
    """An API-format prompt under construction: ids "1", "2", ... in the order nodes are added."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, title: str | None = None, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        node = {"class_type": class_type, "inputs": inputs}
        if title:
            node["_meta"] = {"title": title}  # ComfyUI's own API exports carry the title here
        self.nodes[node_id] = node
        return node_id


def _link(node_id: str, output: int = 0) -> list:
    return [node_id, output]


def _job_mode(studio_settings: dict) -> str:
    job = studio_settings.get("job")
    mode = job.get("mode") if isinstance(job, dict) else None
    if mode in ("txt2img", "controlnet", "img2img", "inpaint", "variations"):
        return mode
    if studio_settings.get("controlnet"):
        return "controlnet"
    image_to_image = studio_settings.get("image_to_image")
    if isinstance(image_to_image, dict):
        return "inpaint" if "Mask blur" in image_to_image else "img2img"
    return "txt2img"


def _checkpoint_file(studio_settings: dict) -> str:
    key = studio_settings.get("model_key")
    if key in CHECKPOINT_FILES:
        return CHECKPOINT_FILES[key]
    model_id = str(studio_settings.get("model_id") or key or "model")
    return model_id.replace("\\", "/").rsplit("/", 1)[-1] + ".safetensors"


def _number(studio_settings: dict, name: str, kind=float):
    value = studio_settings.get(name)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"The settings have no usable {name} ({value!r}); they are not a Studio image's.") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"The settings' {name} is {value!r}; it must be a finite number.")
    return number


def comfyui_prompt(studio_settings: dict) -> dict:
    """The ComfyUI API-format graph ("prompt" chunk) for one Studio image's settings dict.

    In: the dict the Studio's ``studio`` PNG chunk holds (prompt, negative_prompt, model_key,
    model_id, seed, steps, guidance, width, height, skip_layer_guidance_layers, loras, and for image
    jobs ``image_to_image`` / ``controlnet``). Out: ``{"<id>": {"class_type", "inputs", "_meta"}}``.
    ValueError when a required setting is missing or not a number.
    """
    if not isinstance(studio_settings, dict):
        raise ValueError("The Studio settings must be a dict (the PNG's studio JSON).")
    # 1. The numbers every job has.
    seed = _number(studio_settings, "seed", int)
    steps = _number(studio_settings, "steps", int)
    guidance = _number(studio_settings, "guidance")
    width = _number(studio_settings, "width", int)
    height = _number(studio_settings, "height", int)
    mode = _job_mode(studio_settings)
    graph = _Graph()

    # 2. Loaders and the model chain: checkpoint -> LoRAs -> skip-layer guidance -> shift.
    checkpoint = graph.add("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=_checkpoint_file(studio_settings))
    clip = graph.add(
        "TripleCLIPLoader",
        "Load SD3.5 text encoders",
        clip_name1=TEXT_ENCODER_FILES[0],
        clip_name2=TEXT_ENCODER_FILES[1],
        clip_name3=TEXT_ENCODER_FILES[2],
    )
    vae = _link(checkpoint, 2)
    model = _link(checkpoint, 0)
    for lora in studio_settings.get("loras") or []:
        if not isinstance(lora, dict) or not lora.get("name"):
            continue
        model = _link(
            graph.add(
                "LoraLoaderModelOnly",
                f"LoRA {lora['name']}",
                model=model,
                lora_name=f"{lora['name']}.safetensors",
                strength_model=float(lora.get("weight", 1.0)),
            )
        )
    layers = [int(layer) for layer in studio_settings.get("skip_layer_guidance_layers") or []]
    if layers:
        model = _link(
            graph.add(
                "SkipLayerGuidanceSD3",
                "Skip-layer guidance",
                model=model,
                layers=", ".join(map(str, layers)),
                scale=SLG_SCALE,
                start_percent=SLG_START,
                end_percent=SLG_END,
            )
        )
    model = _link(
        graph.add(
            "ModelSamplingSD3", "Scheduler shift", model=model, shift=scheduler_shift(studio_settings.get("model_key"))
        )
    )

    # 3. Prompts, and the ControlNet on both.
    positive = _link(
        graph.add("CLIPTextEncode", "Positive prompt", text=str(studio_settings.get("prompt", "")), clip=_link(clip))
    )
    negative = _link(
        graph.add(
            "CLIPTextEncode",
            "Negative prompt",
            text=str(studio_settings.get("negative_prompt") or ""),
            clip=_link(clip),
        )
    )
    control = studio_settings.get("controlnet")
    if mode == "controlnet" and isinstance(control, dict):
        positive, negative = _controlnet_nodes(graph, control, positive, negative, vae, width, height)

    # 4. The latent: empty, or the encoded (and masked) input image.
    denoise = 1.0
    init_image = mask = None
    if mode in ("img2img", "inpaint", "variations"):
        image_to_image = studio_settings.get("image_to_image") or {}
        denoise = float(image_to_image.get("Denoising strength", settings.DEFAULT_STRENGTH))
        loaded = graph.add("LoadImage", "Input image", image=INIT_IMAGE_FILE)
        init_image = _link(
            graph.add(
                "ImageScale",
                "Drawing size",
                image=_link(loaded),
                upscale_method="lanczos",  # diffusers' image processor resizes with Lanczos
                width=width,
                height=height,
                crop="disabled",
            )
        )
        latent = _link(graph.add("VAEEncode", "Encode input", pixels=init_image, vae=vae))
        if mode == "inpaint":
            mask = _link(graph.add("LoadImageMask", "Mask (white = redraw)", image=MASK_FILE, channel="red"))
            latent = _link(graph.add("SetLatentNoiseMask", "Redraw inside the mask", samples=latent, mask=mask))
    else:
        latent = _link(graph.add("EmptySD3LatentImage", "Size", width=width, height=height, batch_size=1))

    # 5. Sample, decode, paste back (inpainting), save.
    sampled = graph.add(
        "KSampler",
        "KSampler",
        model=model,
        seed=seed,
        steps=steps,
        cfg=max(guidance, 1.0),  # guidance <= 1 is "no CFG" in diffusers; cfg 1.0 is that in ComfyUI
        sampler_name=SAMPLER_NAME,
        scheduler=SCHEDULER_NAME,
        positive=positive,
        negative=negative,
        latent_image=latent,
        denoise=denoise,
    )
    image = _link(graph.add("VAEDecode", "Decode", samples=_link(sampled), vae=vae))
    if mode == "inpaint" and mask is not None:
        image = _paste_back(graph, studio_settings, image, init_image, mask)
    graph.add("SaveImage", "Save", images=image, filename_prefix=FILENAME_PREFIX)
    return graph.nodes


def _controlnet_nodes(graph: _Graph, control: dict, positive, negative, vae, width: int, height: int):
    kind = str(control.get("type", settings.DEFAULT_CONTROL_TYPE))
    preprocess = bool(control.get("preprocess", True))
    loader = graph.add("ControlNetLoader", f"ControlNet ({kind})", control_net_name=CONTROLNET_FILES.get(kind, kind))
    made_here = preprocess and kind in ("canny", "blur")  # core ComfyUI has no depth estimator
    loaded = graph.add("LoadImage", "Control image", image=CONTROL_IMAGE_FILE if made_here else CONTROL_MAP_FILE)
    image = _link(
        graph.add(
            "ImageScale",
            "Drawing size",
            image=_link(loaded),
            upscale_method="lanczos",
            width=width,
            height=height,
            crop="disabled",
        )
    )
    if made_here and kind == "canny":
        low = control.get("canny_low", settings.DEFAULT_CANNY_LOW)
        high = control.get("canny_high", settings.DEFAULT_CANNY_HIGH)
        image = _link(
            graph.add(
                "Canny",
                "Canny edges",
                image=image,
                low_threshold=_unit_threshold(settings.DEFAULT_CANNY_LOW if low is None else low),
                high_threshold=_unit_threshold(settings.DEFAULT_CANNY_HIGH if high is None else high),
            )
        )
    elif made_here:  # blur: OpenCV's kernel for sigma s reaches 3 s, i.e. a radius of round(3 s)
        sigma = float(settings.CONTROL_BLUR_SIGMA)
        radius = min(IMAGE_BLUR_MAX_RADIUS, max(1, round(3 * sigma)))
        image = _link(graph.add("ImageBlur", "Blur", image=image, blur_radius=radius, sigma=sigma))
    applied = graph.add(
        "ControlNetApplyAdvanced",
        "Apply ControlNet",
        positive=positive,
        negative=negative,
        control_net=_link(loader),
        image=image,
        strength=float(control.get("scale", settings.DEFAULT_CONTROL_SCALE)),
        start_percent=0.0,
        end_percent=1.0,
        vae=vae,
    )
    return _link(applied, 0), _link(applied, 1)


def _unit_threshold(value) -> float:
    """An OpenCV canny threshold (0-255) as ComfyUI's Canny takes it (0.01-0.99)."""
    return min(0.99, max(0.01, float(value) / 255.0))


def _paste_back(graph: _Graph, studio_settings: dict, drawn, init_image, mask) -> list:
    """The Studio's paste-back: the drawing over the input through the mask blurred by Mask blur."""
    blur = int(float((studio_settings.get("image_to_image") or {}).get("Mask blur", settings.DEFAULT_MASK_BLUR)))
    weights = mask
    if blur > 0:
        radius = min(IMAGE_BLUR_MAX_RADIUS, blur)
        as_image = graph.add("MaskToImage", "Mask as image", mask=mask)
        blurred = graph.add("ImageBlur", "Mask blur", image=_link(as_image), blur_radius=radius, sigma=radius / 2.5)
        weights = _link(graph.add("ImageToMask", "Blurred mask", image=_link(blurred), channel="red"))
    pasted = graph.add(
        "ImageCompositeMasked",
        "Paste back",
        destination=init_image,
        source=drawn,
        x=0,
        y=0,
        resize_source=False,
        mask=weights,
    )
    return _link(pasted)


def comfyui_chunks(studio_settings: dict) -> dict[str, str]:
    """The two PNG text chunks ComfyUI reads, ``{"prompt": json, "workflow": json}``, for one image."""
    prompt = comfyui_prompt(studio_settings)
    return {
        PROMPT_KEY: json.dumps(prompt, ensure_ascii=False),
        WORKFLOW_KEY: json.dumps(comfyui_workflow(prompt), ensure_ascii=False),
    }


# ----------------------------------------------------------------------------- writing: workflow


_SOCKET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}  # these are widgets; every other type a socket


def _is_link(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def comfyui_workflow(prompt: dict) -> dict:
    """The frontend's workflow ("workflow" chunk, schema version 0.4) for an API-format ``prompt``.

    Every node's class must be in the recorded definitions (ValueError otherwise): they give the
    order of its widget values and its sockets. Nodes are laid out in columns by their distance
    from the loaders.
    """
    definitions = node_definitions()["nodes"]
    if not isinstance(prompt, dict) or len(prompt) > MAX_GRAPH_NODES:
        raise ValueError(f"A workflow is made from a graph of at most {MAX_GRAPH_NODES:,} nodes.")
    ids = {node_id: index + 1 for index, node_id in enumerate(prompt)}  # UI ids are integers
    for node_id, node in prompt.items():
        if node.get("class_type") not in definitions:
            raise ValueError(f"Node {node_id} is a {node.get('class_type')!r}, which has no recorded definition.")
    columns = _columns(prompt)
    links: list[list] = []
    nodes: list[dict] = []
    outputs_links: dict[tuple[str, int], list[int]] = {}
    inputs_by_node: dict[str, list[dict]] = {}
    for node_id, node in prompt.items():  # 1. sockets and links
        definition = definitions[node["class_type"]]
        sockets = []
        for spec, optional in [(spec, False) for spec in definition["required"]] + [
            (spec, True) for spec in definition["optional"]
        ]:
            if spec["type"] in _SOCKET_TYPES:
                continue
            value = node["inputs"].get(spec["name"])
            if optional and not _is_link(value):
                continue
            link_id = None
            if _is_link(value):
                origin = str(value[0])
                origin_type = definitions[prompt[origin]["class_type"]]["outputs"][value[1]]
                link_id = len(links) + 1
                links.append([link_id, ids[origin], value[1], ids[node_id], len(sockets), origin_type])
                outputs_links.setdefault((origin, value[1]), []).append(link_id)
            socket = {"name": spec["name"], "type": spec["type"], "link": link_id}
            if optional:
                socket["shape"] = 7  # the frontend draws optional inputs hollow
            sockets.append(socket)
        inputs_by_node[node_id] = sockets
    order = sorted(prompt, key=lambda node_id: (columns[node_id], ids[node_id]))
    rows: dict[int, float] = {}
    for position, node_id in enumerate(order):  # 2. nodes
        node = prompt[node_id]
        definition = definitions[node["class_type"]]
        widgets, upload = [], False
        for spec in definition["required"] + definition["optional"]:
            if spec["type"] not in _SOCKET_TYPES or spec["name"] not in node["inputs"]:
                continue
            widgets.append(node["inputs"][spec["name"]])
            if spec.get("control_after_generate"):
                widgets.append("fixed")  # keep the seed when the workflow is queued again
            upload = upload or bool(spec.get("image_upload"))
        if upload:
            widgets.append("image")  # the upload button's own value, saved after every other widget
        outputs = [
            {
                "name": name,
                "type": kind,
                "slot_index": slot,
                "links": outputs_links.get((node_id, slot)) or None,
            }
            for slot, (name, kind) in enumerate(zip(definition["output_names"], definition["outputs"], strict=True))
        ]
        sockets = inputs_by_node[node_id]
        height = 46 + 26 * max(len(sockets), len(outputs)) + 24 * len(widgets)
        column = columns[node_id]
        top = rows.get(column, 0.0)
        rows[column] = top + height + 60
        entry = {
            "id": ids[node_id],
            "type": node["class_type"],
            "pos": [column * 380, top],
            "size": [320, height],
            "flags": {},
            "order": position,
            "mode": 0,
            "inputs": sockets,
            "outputs": outputs,
            "properties": {"cnr_id": "comfy-core", "ver": node_definitions()["comfyui"]["version"]},
            "widgets_values": widgets,
        }
        entry["properties"]["Node name for S&R"] = node["class_type"]
        title = (node.get("_meta") or {}).get("title")
        if title and title != node["class_type"]:
            entry["title"] = title
        nodes.append(entry)
    nodes.sort(key=lambda entry: entry["id"])
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(prompt, sort_keys=True))),
        "revision": 0,
        "last_node_id": len(nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": 0.4,
    }


def _columns(prompt: dict) -> dict[str, int]:
    """Each node's column: 0 for nodes with no links in, else one more than its deepest input."""
    columns: dict[str, int] = {}
    for _ in range(len(prompt)):  # longest-path relaxation; a DAG settles within len(prompt) rounds
        changed = False
        for node_id, node in prompt.items():
            depth = 0
            for value in node["inputs"].values():
                if _is_link(value) and str(value[0]) in prompt:
                    depth = max(depth, columns.get(str(value[0]), 0) + 1)
            if columns.get(node_id) != depth:
                columns[node_id], changed = depth, True
        if not changed:
            break
    return columns


# ----------------------------------------------------------------------------- reading


def settings_from_comfyui_text(text: str) -> dict:
    """``settings_from_comfyui`` of a ``prompt`` chunk's JSON text; ValueError when it is not a graph."""
    try:
        prompt = json.loads(text)
    except (TypeError, ValueError):
        raise ValueError("The ComfyUI prompt chunk is not valid JSON; the file's graph cannot be read.") from None
    return settings_from_comfyui(prompt)


class _Reader:
    """Walks one API-format graph with a bound on every chain and no revisits."""

    def __init__(self, prompt: dict) -> None:
        if not isinstance(prompt, dict) or not prompt:
            raise ValueError("The ComfyUI prompt is not a graph (a JSON object of nodes).")
        if len(prompt) > MAX_GRAPH_NODES:
            raise ValueError(
                f"The ComfyUI graph has {len(prompt):,} nodes; graphs of more than {MAX_GRAPH_NODES:,} are not read."
            )
        self.nodes = {
            str(node_id): node
            for node_id, node in prompt.items()
            if isinstance(node, dict)
            and isinstance(node.get("class_type"), str)
            and isinstance(node.get("inputs", {}), dict)
        }
        self.notes: list[str] = []

    def node(self, link) -> tuple[str, dict, int] | None:
        if not _is_link(link) or str(link[0]) not in self.nodes:
            return None
        return str(link[0]), self.nodes[str(link[0])], link[1]

    def inputs(self, node: dict) -> dict:
        return node.get("inputs") or {}

    def walk(self, link, step):
        """Follow ``step(node_id, node, output) -> next link | None`` from ``link``; bounded, acyclic."""
        seen = set()
        for _ in range(MAX_WALK_STEPS):
            found = self.node(link)
            if found is None or found[0] in seen:
                return
            seen.add(found[0])
            link = step(*found)
            if link is None:
                return

    def text(self, value) -> str | None:
        """A text input: a string, or a link to a node holding one (a primitive, a string node)."""
        for _ in range(8):  # text nodes chain rarely; a few hops cover primitives and concatenations
            if isinstance(value, str):
                return value
            found = self.node(value)
            if found is None:
                return None
            inputs = self.inputs(found[1])
            value = next((inputs[name] for name in ("value", "text", "string", "text_a") if name in inputs), None)
        return None


def _first_sampler(reader: _Reader) -> tuple[str, dict] | tuple[None, None]:
    samplers = [(node_id, node) for node_id, node in reader.nodes.items() if node["class_type"] in SAMPLER_CLASSES]
    if not samplers:
        return None, None
    sampler_ids = {node_id for node_id, _ in samplers}

    def fed_by_sampler(node: dict) -> bool:
        found_sampler = False

        def step(node_id, current, output):
            nonlocal found_sampler
            if node_id in sampler_ids and current is not node:
                found_sampler = True
                return None
            inputs = reader.inputs(current)
            return next((inputs[name] for name in _LATENT_SOURCES if _is_link(inputs.get(name))), None)

        reader.walk(_latent_link(node), step)
        return found_sampler

    first = [(node_id, node) for node_id, node in samplers if not fed_by_sampler(node)] or samplers
    first.sort(key=lambda item: (len(item[0]), item[0]))
    if len(samplers) > 1:
        reader.notes.append(
            f"The graph has {len(samplers)} sampler passes; these settings are the first pass's "
            f"(node {first[0][0]}, {first[0][1]['class_type']})."
        )
    return first[0]


def _latent_link(sampler: dict):
    inputs = sampler.get("inputs") or {}
    return inputs.get("latent_image")


def settings_from_comfyui(prompt: dict) -> dict:
    """The settings PNG Info shows, read from a ComfyUI API-format graph (the "prompt" chunk).

    Returns ``found`` (False when the graph has no sampler), ``prompt``, ``negative_prompt``,
    ``seed``, ``steps``, ``cfg``, ``width``/``height`` (None when the size comes from a loaded image),
    ``sampler``, ``scheduler``, ``denoise``, ``model`` (the checkpoint file), ``model_key`` (the
    Studio's catalog key when the file is an SD3.5 checkpoint it knows), ``loras`` as (name, weight)
    in the order they apply, ``shift``, ``skip_layer_guidance_layers``, ``mode``, ``controlnet``,
    ``mask_blur`` and ``notes``. Values the graph does not hold are None. ValueError (one sentence)
    when ``prompt`` is not a graph or is larger than ``MAX_GRAPH_NODES``.
    """
    reader = _Reader(prompt)
    info: dict[str, Any] = {
        "found": False,
        "prompt": None,
        "negative_prompt": None,
        "seed": None,
        "steps": None,
        "cfg": None,
        "width": None,
        "height": None,
        "sampler": None,
        "scheduler": None,
        "denoise": None,
        "model": None,
        "model_key": None,
        "loras": [],
        "shift": None,
        "skip_layer_guidance_layers": [],
        "mode": None,
        "controlnet": None,
        "mask_blur": None,
        "notes": reader.notes,
    }
    sampler_id, sampler = _first_sampler(reader)
    if sampler is None:
        reader.notes.append("The ComfyUI graph has no sampler node (KSampler, SamplerCustom, ...) to read.")
        return info
    info["found"] = True
    # 1. The sampler's own numbers (and, for the custom samplers, those of its noise, guider, sigmas).
    inputs = reader.inputs(sampler)
    model_link, positive, negative = inputs.get("model"), inputs.get("positive"), inputs.get("negative")
    info["seed"] = _int(inputs.get("seed", inputs.get("noise_seed")))
    info["steps"] = _int(inputs.get("steps"))
    info["cfg"] = _float(inputs.get("cfg"))
    info["sampler"] = _str(inputs.get("sampler_name"))
    info["scheduler"] = _str(inputs.get("scheduler"))
    info["denoise"] = _float(inputs.get("denoise"))
    if sampler["class_type"] == "KSamplerAdvanced" and info["steps"]:
        start = _int(inputs.get("start_at_step")) or 0
        info["denoise"] = max(0.0, (info["steps"] - min(start, info["steps"])) / info["steps"])
    if sampler["class_type"] in ("SamplerCustom", "SamplerCustomAdvanced"):
        model_link, positive, negative = _custom_sampler(reader, inputs, info, model_link, positive, negative)
    elif info["denoise"] is None:
        info["denoise"] = 1.0
    # 2. Prompts, through conditioning nodes (ControlNets recorded on the way).
    info["prompt"] = _prompt_text(reader, positive, info, "positive")
    info["negative_prompt"] = _prompt_text(reader, negative, info, "negative")
    # 3. The model chain: checkpoint, LoRAs, shift, skip-layer guidance.
    _model_chain(reader, model_link, info)
    # 4. The latent: size and mode.
    _latent_chain(reader, _latent_link(sampler), info)
    _mask_blur(reader, info)
    return info


def _custom_sampler(reader: _Reader, inputs: dict, info: dict, model_link, positive, negative):
    noise = reader.node(inputs.get("noise"))
    if noise is not None:
        info["seed"] = _int(reader.inputs(noise[1]).get("noise_seed"))
    chosen = reader.node(inputs.get("sampler"))
    if chosen is not None:
        info["sampler"] = _str(reader.inputs(chosen[1]).get("sampler_name"))
    sigmas = reader.node(inputs.get("sigmas"))
    if sigmas is not None:
        sigma_inputs = reader.inputs(sigmas[1])
        info["scheduler"] = _str(sigma_inputs.get("scheduler"))
        info["steps"] = _int(sigma_inputs.get("steps"))
        info["denoise"] = _float(sigma_inputs.get("denoise"))
        model_link = model_link or sigma_inputs.get("model")
    guider = reader.node(inputs.get("guider"))
    if guider is not None:
        guider_inputs = reader.inputs(guider[1])
        model_link = guider_inputs.get("model", model_link)
        if guider[1]["class_type"] == "BasicGuider":
            positive, info["cfg"] = guider_inputs.get("conditioning"), 1.0
        else:
            positive, negative = guider_inputs.get("positive"), guider_inputs.get("negative")
            info["cfg"] = _float(guider_inputs.get("cfg"))
    if info["denoise"] is None:
        info["denoise"] = 1.0
    return model_link, positive, negative


def _prompt_text(reader: _Reader, link, info: dict, side: str) -> str | None:
    result: dict[str, Any] = {"text": None}

    def step(node_id, node, output):
        kind, inputs = node["class_type"], reader.inputs(node)
        if kind == "ConditioningZeroOut":
            result["text"] = ""
            reader.notes.append(f"The {side} conditioning is zeroed out (ConditioningZeroOut): no {side} prompt.")
            return None
        if kind in ("CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeFlux"):
            result["text"] = reader.text(inputs.get("text", inputs.get("text_g", inputs.get("t5xxl"))))
            return None
        if kind == "CLIPTextEncodeSD3":
            for name in ("t5xxl", "clip_g", "clip_l"):
                text = reader.text(inputs.get(name))
                if text:
                    result["text"] = text
                    return None
            result["text"] = ""
            return None
        if kind.startswith("ControlNetApply") and info["controlnet"] is None:
            info["controlnet"] = _controlnet_info(reader, inputs)
        if "positive" in inputs and "negative" in inputs:  # a node that passes both: follow this side
            return inputs["negative" if output == 1 else "positive"]
        return next((inputs[name] for name in _CONDITIONING_INPUTS if _is_link(inputs.get(name))), None)

    reader.walk(link, step)
    return result["text"]


def _controlnet_info(reader: _Reader, inputs: dict) -> dict:
    control: dict[str, Any] = {"model": None, "strength": _float(inputs.get("strength")), "preprocessor": None}
    loader = reader.node(inputs.get("control_net"))
    if loader is not None:
        control["model"] = _str(reader.inputs(loader[1]).get("control_net_name"))

    def step(node_id, node, output):
        node_inputs = reader.inputs(node)
        if node["class_type"] in ("Canny", "ImageBlur") and control["preprocessor"] is None:
            control["preprocessor"] = node["class_type"]
            if node["class_type"] == "Canny":
                control["canny_low"] = _threshold_255(node_inputs.get("low_threshold"))
                control["canny_high"] = _threshold_255(node_inputs.get("high_threshold"))
        return node_inputs.get("image")

    reader.walk(inputs.get("image"), step)
    return control


def _model_chain(reader: _Reader, link, info: dict) -> None:
    loras: list[tuple[str, float]] = []

    def step(node_id, node, output):
        kind, inputs = node["class_type"], reader.inputs(node)
        if kind in CHECKPOINT_LOADERS:
            info["model"] = _str(inputs.get(CHECKPOINT_LOADERS[kind]))
            return None
        if kind in ("LoraLoader", "LoraLoaderModelOnly"):
            name = _str(inputs.get("lora_name"))
            if name:
                loras.append((_stem(name), _float(inputs.get("strength_model"))))
        elif kind == "ModelSamplingSD3" and info["shift"] is None:
            info["shift"] = _float(inputs.get("shift"))
        elif kind in ("SkipLayerGuidanceSD3", "SkipLayerGuidanceDiT") and not info["skip_layer_guidance_layers"]:
            layers = _str(inputs.get("layers", inputs.get("double_layers"))) or ""
            info["skip_layer_guidance_layers"] = [int(part) for part in layers.split(",") if part.strip().isdigit()]
        return inputs.get("model")

    reader.walk(link, step)
    info["loras"] = loras[::-1]  # the walk meets the last-applied LoRA first
    stem = _stem(info["model"] or "")
    info["model_key"] = next((key for key, name in CHECKPOINT_FILES.items() if _stem(name) == stem), None)


def _latent_chain(reader: _Reader, link, info: dict) -> None:
    def step(node_id, node, output):
        kind, inputs = node["class_type"], reader.inputs(node)
        if kind in ("EmptySD3LatentImage", "EmptyLatentImage", "EmptyHunyuanLatentVideo", "EmptyCosmosLatentVideo"):
            info["width"], info["height"] = _int(inputs.get("width")), _int(inputs.get("height"))
            info["mode"] = info["mode"] or ("controlnet" if info["controlnet"] else "txt2img")
            return None
        if kind in ("SetLatentNoiseMask", "VAEEncodeForInpaint", "InpaintModelConditioning"):
            info["mode"] = "inpaint"
        elif kind in ("VAEEncode", "VAEEncodeTiled"):
            info["mode"] = info["mode"] or "img2img"
        elif kind in ("ImageScale", "LatentUpscale") and info["width"] is None:
            width, height = _int(inputs.get("width")), _int(inputs.get("height"))
            if width and height:
                info["width"], info["height"] = width, height
        elif kind in ("LoadImage", "LoadImageMask"):
            return None
        return next((inputs[name] for name in _LATENT_SOURCES if _is_link(inputs.get(name))), None)

    reader.walk(link, step)
    if info["width"] is None and info["mode"] in ("img2img", "inpaint"):
        reader.notes.append("The size comes from a loaded image, which the graph does not hold.")


def _mask_blur(reader: _Reader, info: dict) -> None:
    """The Studio's paste-back blur: an ImageBlur between MaskToImage and ImageToMask."""
    for node in reader.nodes.values():
        if node["class_type"] != "ImageToMask":
            continue
        blur = reader.node(reader.inputs(node).get("image"))
        if blur is None or blur[1]["class_type"] != "ImageBlur":
            continue
        source = reader.node(reader.inputs(blur[1]).get("image"))
        if source is not None and source[1]["class_type"] == "MaskToImage":
            info["mask_blur"] = _int(reader.inputs(blur[1]).get("blur_radius"))
            return


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _int(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value)


def _float(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _str(value) -> str | None:
    return value if isinstance(value, str) else None


def _threshold_255(value) -> int | None:
    number = _float(value)
    return None if number is None else round(number * 255)
