"""ComfyUI graphs in Studio PNGs: written from the settings, valid against ComfyUI's node definitions, read back.

The definitions are recorded from ComfyUI 0.3.64's source (assets/comfyui/SOURCES.md), so these
tests run offline. ``OFFICIAL_CANNY_PROMPT`` is ComfyUI's own SD3.5 Large canny template
(Comfy-Org/workflow_templates, templates/sd3.5_large_canny_controlnet_example.json at
6eccdfae196c9da327366e0f60adec494c0b0433) written out in the API format by hand: same nodes, same
links, same widget values.
"""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image, PngImagePlugin

from pipelines.sd3 import comfyui_graph
from pipelines.sd3.comfyui_graph import (
    MAX_GRAPH_NODES,
    comfyui_chunks,
    comfyui_prompt,
    comfyui_workflow,
    node_definitions,
    scheduler_shift,
    settings_from_comfyui,
    settings_from_comfyui_text,
)

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def problems(prompt: dict) -> list[str]:
    """Everything in ``prompt`` that ComfyUI 0.3.64's validation would refuse, per the recorded definitions."""
    definitions = node_definitions()["nodes"]
    found = []
    for node_id, node in prompt.items():
        kind = node.get("class_type")
        if kind not in definitions:
            found.append(f"{node_id}: unknown class {kind!r}")
            continue
        definition = definitions[kind]
        specs = {spec["name"]: (spec, False) for spec in definition["required"]}
        specs.update({spec["name"]: (spec, True) for spec in definition["optional"]})
        for name in node["inputs"]:
            if name not in specs:
                found.append(f"{node_id} {kind}: unknown input {name!r}")
        for name, (spec, optional) in specs.items():
            if name not in node["inputs"]:
                if not optional:
                    found.append(f"{node_id} {kind}: required input {name!r} missing")
                continue
            value = node["inputs"][name]
            if spec["type"] not in WIDGET_TYPES:
                if not (isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt):
                    found.append(f"{node_id} {kind}.{name}: {value!r} is not a link to an existing node")
                    continue
                origin = definitions.get(prompt[str(value[0])]["class_type"])
                outputs = origin["outputs"] if origin else []
                if not (isinstance(value[1], int) and 0 <= value[1] < len(outputs)):
                    found.append(f"{node_id} {kind}.{name}: output {value[1]!r} does not exist")
                elif outputs[value[1]] != spec["type"]:
                    found.append(f"{node_id} {kind}.{name}: wants {spec['type']}, linked to {outputs[value[1]]}")
                continue
            found.extend(f"{node_id} {kind}.{name}: {error}" for error in widget_problems(spec, value))
    return found


def widget_problems(spec: dict, value) -> list[str]:
    kind = spec["type"]
    if kind == "COMBO":
        if "options" in spec and value not in spec["options"]:
            return [f"{value!r} is not one of the allowed values"]
        if "options_from" in spec and not (isinstance(value, str) and value.strip()):
            return [f"{value!r} is not a file name"]
        return []
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{value!r} is not text"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{value!r} is not a boolean"]
    number_type = int if kind == "INT" else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_type):
        return [f"{value!r} is not {kind}"]
    if not spec["min"] <= value <= spec["max"]:
        return [f"{value!r} is outside {spec['min']}..{spec['max']}"]
    return []


def studio_settings(**overrides) -> dict:
    """A Studio PNG's settings dict, as sd3.text_to_image.generate writes it."""
    base = {
        "prompt": "a red fox, tinystyle",
        "negative_prompt": "blurry, low quality",
        "model_key": "sd35-large",
        "model_id": "stabilityai/stable-diffusion-3.5-large",
        "seed": 7,
        "steps": 28,
        "guidance": 3.5,
        "width": 1024,
        "height": 768,
        "max_sequence_length": 256,
        "skip_layer_guidance_layers": [],
        "num_images": 1,
        "scheduler": "FlowMatchEulerDiscreteScheduler (shift 3)",
        "loras": [],
        "steps_done": 28,
        "stopped": False,
        "vae_tiling": False,
        "controlnet": None,
    }
    base.update(overrides)
    return base


LORAS = [
    {"name": "style", "weight": 0.8, "hash": "abc123def456", "sha256": "0" * 64, "source": "folder"},
    {"name": "ink-wash", "weight": 1.25, "hash": "fedcba654321", "sha256": "1" * 64, "source": "registry"},
]
CONTROL = {"scale": 0.7, "preprocess": True, "canny_low": 100, "canny_high": 200}
JOBS = {
    "large": studio_settings(),
    "large-turbo": studio_settings(
        model_key="sd35-large-turbo",
        model_id="stabilityai/stable-diffusion-3.5-large-turbo",
        steps=4,
        guidance=0.0,
        negative_prompt="",
    ),
    "medium-slg": studio_settings(
        model_key="sd35-medium",
        model_id="stabilityai/stable-diffusion-3.5-medium",
        steps=40,
        guidance=4.5,
        skip_layer_guidance_layers=[7, 8, 9],
    ),
    "large-loras": studio_settings(loras=LORAS),
    "img2img": studio_settings(image_to_image={"Denoising strength": "0.6"}, job={"mode": "img2img", "index": 0}),
    "inpaint": studio_settings(
        image_to_image={"Denoising strength": "0.85", "Mask blur": 4}, loras=LORAS[:1], job={"mode": "inpaint"}
    ),
    "controlnet-canny": studio_settings(
        controlnet={**CONTROL, "type": "canny", "model": "stabilityai/stable-diffusion-3.5-large-controlnet-canny"},
        job={"mode": "controlnet"},
    ),
    "controlnet-depth": studio_settings(
        controlnet={
            **CONTROL,
            "type": "depth",
            "canny_low": None,
            "canny_high": None,
            "model": "stabilityai/stable-diffusion-3.5-large-controlnet-depth",
        },
    ),
    "controlnet-blur": studio_settings(
        controlnet={
            **CONTROL,
            "type": "blur",
            "scale": 1.0,
            "canny_low": None,
            "canny_high": None,
            "model": "stabilityai/stable-diffusion-3.5-large-controlnet-blur",
        },
    ),
}


def classes(prompt: dict) -> list[str]:
    return [node["class_type"] for node in prompt.values()]


def only(prompt: dict, kind: str) -> dict:
    found = [node for node in prompt.values() if node["class_type"] == kind]
    assert len(found) == 1, (kind, classes(prompt))
    return found[0]


# ----------------------------------------------------------------------------- the definitions


def test_recorded_definitions_name_their_comfyui_release():
    data = node_definitions()
    assert data["comfyui"]["version"] == "0.3.64"
    assert len(data["comfyui"]["commit"]) == 40
    ksampler = {spec["name"]: spec for spec in data["nodes"]["KSampler"]["required"]}
    assert "euler" in ksampler["sampler_name"]["options"] and "simple" in ksampler["scheduler"]["options"]
    assert len(ksampler["sampler_name"]["options"]) == 42 and len(ksampler["scheduler"]["options"]) == 9
    shift = next(spec for spec in data["nodes"]["ModelSamplingSD3"]["required"] if spec["name"] == "shift")
    assert (shift["min"], shift["max"]) == (0.0, 100.0)


def test_the_validator_refuses_what_comfyui_refuses():
    prompt = comfyui_prompt(JOBS["large"])
    assert problems(prompt) == []
    sampler_id = next(key for key, node in prompt.items() if node["class_type"] == "KSampler")
    broken = json.loads(json.dumps(prompt))
    broken[sampler_id]["inputs"]["sampler_name"] = "euler_flow"
    broken[sampler_id]["inputs"]["steps"] = 0
    broken[sampler_id]["inputs"]["positive"] = ["1", 0]  # a MODEL where CONDITIONING belongs
    del broken[sampler_id]["inputs"]["latent_image"]
    broken["99"] = {"class_type": "NotACoreNode", "inputs": {}}
    found = "\n".join(problems(broken))
    for fragment in ("euler_flow", "steps: 0", "wants CONDITIONING, linked to MODEL", "latent_image", "NotACoreNode"):
        assert fragment in found


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_graph_the_studio_writes_is_valid_for_comfyui(job):
    prompt = comfyui_prompt(JOBS[job])
    assert problems(prompt) == []
    kinds = classes(prompt)
    assert kinds.count("KSampler") == 1 and kinds.count("SaveImage") == 1
    assert {"CheckpointLoaderSimple", "TripleCLIPLoader", "ModelSamplingSD3", "VAEDecode"} <= set(kinds)


@pytest.mark.parametrize(
    ("job", "checkpoint"),
    [
        ("large", "sd3.5_large.safetensors"),
        ("large-turbo", "sd3.5_large_turbo.safetensors"),
        ("medium-slg", "sd3.5_medium.safetensors"),
    ],
)
def test_txt2img_graph_carries_the_job(job, checkpoint):
    settings = JOBS[job]
    prompt = comfyui_prompt(settings)
    assert only(prompt, "CheckpointLoaderSimple")["inputs"]["ckpt_name"] == checkpoint
    clip = only(prompt, "TripleCLIPLoader")["inputs"]
    assert [clip["clip_name1"], clip["clip_name2"], clip["clip_name3"]] == [
        "clip_l.safetensors",
        "clip_g.safetensors",
        "t5xxl_fp16.safetensors",
    ]
    assert only(prompt, "ModelSamplingSD3")["inputs"]["shift"] == 3.0
    assert only(prompt, "EmptySD3LatentImage")["inputs"] == {"width": 1024, "height": 768, "batch_size": 1}
    sampler = only(prompt, "KSampler")["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["denoise"]) == (7, settings["steps"], 1.0)
    assert (sampler["sampler_name"], sampler["scheduler"]) == ("euler", "normal")
    assert sampler["cfg"] == max(settings["guidance"], 1.0)  # Turbo's guidance 0 is ComfyUI's cfg 1: no CFG
    texts = [node["inputs"]["text"] for node in prompt.values() if node["class_type"] == "CLIPTextEncode"]
    assert texts == [settings["prompt"], settings["negative_prompt"]]
    assert ("SkipLayerGuidanceSD3" in classes(prompt)) == (job == "medium-slg")


def comfyui_flow_sigmas(scheduler: str, steps: int, shift: float) -> list[float]:
    """ComfyUI 0.3.64's sigmas for an SD3 (discrete flow, 1000 timesteps) model, from its scheduler maths.

    The model's table holds sigma(t) = shift t / (1 + (shift - 1) t) at t = k / 1000, k = 1..1000.
    "normal": timesteps evenly from 1000 sigma_max to 1000 sigma_min, then sigma of each, then 0.
    "simple": every (1000 / steps)-th entry of the table from the top, then 0.
    """

    def sigma(t):
        return shift * t / (1 + (shift - 1) * t)

    table = [sigma(k / 1000) for k in range(1, 1001)]
    if scheduler == "normal":
        start, end = table[-1] * 1000, table[0] * 1000
        return [sigma((start + (end - start) * i / (steps - 1)) / 1000) for i in range(steps)] + [0.0]
    stride = len(table) / steps
    return [table[-(1 + int(x * stride))] for x in range(steps)] + [0.0]


@pytest.mark.parametrize("steps", [4, 28, 40])
def test_comfyuis_normal_schedule_is_the_studios_sigmas(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = json.loads(
        (
            comfyui_graph.MODEL_CONFIGS_DIR
            / "stabilityai__stable-diffusion-3.5-large"
            / "scheduler"
            / "scheduler_config.json"
        ).read_text()
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    studio = scheduler.sigmas.tolist()
    assert comfyui_flow_sigmas("normal", steps, config["shift"]) == pytest.approx(studio, abs=1e-5)
    # "simple" (ComfyUI's template default) is not the same schedule: it ends far above the Studio's last sigma.
    simple = comfyui_flow_sigmas("simple", steps, config["shift"])
    assert simple[-2] > studio[-2] + 0.05
    assert comfyui_graph.SCHEDULER_NAME == "normal"


def test_the_shift_is_read_from_each_models_real_scheduler_config():
    for key in ("sd35-large", "sd35-large-turbo", "sd35-medium"):
        assert scheduler_shift(key) == 3.0
    assert scheduler_shift("not-a-model") == comfyui_graph.DEFAULT_SHIFT


def test_medium_skip_layer_guidance_is_a_core_node_on_the_model_chain():
    prompt = comfyui_prompt(JOBS["medium-slg"])
    slg = only(prompt, "SkipLayerGuidanceSD3")["inputs"]
    assert slg["layers"] == "7, 8, 9"
    assert (slg["scale"], slg["start_percent"], slg["end_percent"]) == (2.8, 0.01, 0.2)  # diffusers' defaults
    shift = only(prompt, "ModelSamplingSD3")["inputs"]
    assert prompt[shift["model"][0]]["class_type"] == "SkipLayerGuidanceSD3"


def test_loras_chain_on_the_model_with_their_weights_in_order():
    prompt = comfyui_prompt(JOBS["large-loras"])
    loras = [node["inputs"] for node in prompt.values() if node["class_type"] == "LoraLoaderModelOnly"]
    assert [(lora["lora_name"], lora["strength_model"]) for lora in loras] == [
        ("style.safetensors", 0.8),
        ("ink-wash.safetensors", 1.25),
    ]
    assert prompt[loras[0]["model"][0]]["class_type"] == "CheckpointLoaderSimple"


def test_img2img_and_inpaint_encode_the_input_and_denoise_by_strength():
    img2img = comfyui_prompt(JOBS["img2img"])
    assert only(img2img, "KSampler")["inputs"]["denoise"] == 0.6
    assert only(img2img, "ImageScale")["inputs"]["width"] == 1024
    assert "EmptySD3LatentImage" not in classes(img2img)
    assert img2img[only(img2img, "KSampler")["inputs"]["latent_image"][0]]["class_type"] == "VAEEncode"
    inpaint = comfyui_prompt(JOBS["inpaint"])
    sampler = only(inpaint, "KSampler")["inputs"]
    assert sampler["denoise"] == 0.85
    assert inpaint[sampler["latent_image"][0]]["class_type"] == "SetLatentNoiseMask"
    assert only(inpaint, "LoadImageMask")["inputs"]["channel"] == "red"  # white = redraw, as the Studio's mask
    blur = only(inpaint, "ImageBlur")["inputs"]
    assert (blur["blur_radius"], blur["sigma"]) == (4, 1.6)  # the Studio's kernel: radius r, sigma r / 2.5
    save = only(inpaint, "SaveImage")["inputs"]
    assert inpaint[save["images"][0]]["class_type"] == "ImageCompositeMasked"  # the paste-back


@pytest.mark.parametrize(
    ("job", "file", "preprocessor"),
    [
        ("controlnet-canny", "sd3.5_large_controlnet_canny.safetensors", "Canny"),
        ("controlnet-depth", "sd3.5_large_controlnet_depth.safetensors", None),
        ("controlnet-blur", "sd3.5_large_controlnet_blur.safetensors", "ImageBlur"),
    ],
)
def test_controlnet_graphs_match_comfyuis_sd35_template(job, file, preprocessor):
    prompt = comfyui_prompt(JOBS[job])
    assert only(prompt, "ControlNetLoader")["inputs"]["control_net_name"] == file
    applied = only(prompt, "ControlNetApplyAdvanced")["inputs"]
    assert applied["strength"] == JOBS[job]["controlnet"]["scale"]
    assert prompt[applied["vae"][0]]["class_type"] == "CheckpointLoaderSimple"
    sampler = only(prompt, "KSampler")["inputs"]
    assert [sampler["positive"], sampler["negative"]] == [
        [key, slot] for key in prompt for slot in (0, 1) if prompt[key]["class_type"] == "ControlNetApplyAdvanced"
    ]
    image_source = prompt[applied["image"][0]]["class_type"]
    assert image_source == (preprocessor or "ImageScale")
    if preprocessor == "Canny":
        canny = only(prompt, "Canny")["inputs"]
        assert (round(canny["low_threshold"] * 255), round(canny["high_threshold"] * 255)) == (100, 200)
    if job == "controlnet-depth":  # core ComfyUI has no depth estimator: the map is loaded as an image
        assert only(prompt, "LoadImage")["inputs"]["image"] == comfyui_graph.CONTROL_MAP_FILE


def test_missing_numbers_are_refused_with_one_sentence():
    with pytest.raises(ValueError, match="no usable seed"):
        comfyui_prompt({"prompt": "x", "steps": 4, "guidance": 1.0, "width": 64, "height": 64})
    with pytest.raises(ValueError, match="finite number"):
        comfyui_prompt(studio_settings(guidance=float("nan")))


# ----------------------------------------------------------------------------- the workflow


def check_workflow(workflow: dict, prompt: dict) -> None:
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert workflow["version"] == 0.4
    assert workflow["last_node_id"] == max(nodes) and workflow["last_link_id"] == len(workflow["links"])
    assert len(nodes) == len(prompt)
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[target]["inputs"][target_slot]["type"] == kind
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[origin]["outputs"][origin_slot]["type"] == kind
    linked_inputs = sum(1 for node in prompt.values() for value in node["inputs"].values() if isinstance(value, list))
    assert len(workflow["links"]) == linked_inputs
    orders = sorted(node["order"] for node in nodes.values())
    assert orders == list(range(len(nodes)))
    for _link, origin, _slot, target, _tslot, _kind in workflow["links"]:
        assert nodes[origin]["order"] < nodes[target]["order"]  # runs after what it reads


@pytest.mark.parametrize("job", sorted(JOBS))
def test_the_workflow_is_load_shaped_and_consistent(job):
    prompt = comfyui_prompt(JOBS[job])
    workflow = comfyui_workflow(prompt)
    check_workflow(workflow, prompt)
    json.dumps(workflow)  # plain JSON


def test_workflow_widget_values_follow_comfyuis_order():
    prompt = comfyui_prompt(JOBS["controlnet-canny"])
    nodes = {node["type"]: node for node in comfyui_workflow(prompt)["nodes"]}
    # The template saves KSampler as [seed, "randomize", 32, 4.5, "euler", "simple", 1]; "fixed" keeps the seed.
    assert nodes["KSampler"]["widgets_values"] == [7, "fixed", 28, 3.5, "euler", "normal", 1.0]
    assert nodes["LoadImage"]["widgets_values"] == [comfyui_graph.CONTROL_IMAGE_FILE, "image"]
    assert nodes["ImageScale"]["widgets_values"] == ["lanczos", 1024, 768, "disabled"]
    assert nodes["ControlNetApplyAdvanced"]["widgets_values"] == [0.7, 0.0, 1.0]
    vae_socket = nodes["ControlNetApplyAdvanced"]["inputs"][-1]
    assert vae_socket["name"] == "vae" and vae_socket["shape"] == 7 and vae_socket["link"] is not None
    assert nodes["EmptySD3LatentImage"]["widgets_values"] == [1024, 768, 1]
    inpaint = {node["type"]: node for node in comfyui_workflow(comfyui_prompt(JOBS["inpaint"]))["nodes"]}
    # ComfyUI saves the upload button's value last: LoadImageMask is [file, channel, "image"].
    assert inpaint["LoadImageMask"]["widgets_values"] == [comfyui_graph.MASK_FILE, "red", "image"]


# ----------------------------------------------------------------------------- reading back


@pytest.mark.parametrize("job", sorted(JOBS))
def test_round_trip_gives_back_the_settings(job):
    settings = JOBS[job]
    read = settings_from_comfyui(comfyui_prompt(settings))
    assert read["found"] is True
    assert read["prompt"] == settings["prompt"]
    assert read["negative_prompt"] == settings["negative_prompt"]
    assert (read["seed"], read["steps"]) == (settings["seed"], settings["steps"])
    assert read["cfg"] == max(settings["guidance"], 1.0)  # exact above 1; Turbo's 0 reads back as "no CFG" 1.0
    assert (read["width"], read["height"]) == (settings["width"], settings["height"])
    assert read["loras"] == [(lora["name"], lora["weight"]) for lora in settings["loras"]]
    strength = (settings.get("image_to_image") or {}).get("Denoising strength")
    assert read["denoise"] == (1.0 if strength is None else float(strength))
    assert read["model_key"] == settings["model_key"]
    assert (read["sampler"], read["scheduler"], read["shift"]) == ("euler", "normal", 3.0)
    assert read["skip_layer_guidance_layers"] == settings["skip_layer_guidance_layers"]
    expected_mode = (settings.get("job") or {}).get("mode") or ("controlnet" if settings["controlnet"] else "txt2img")
    assert read["mode"] == expected_mode
    assert read["notes"] == []


def test_round_trip_reads_the_controlnet_and_mask_blur():
    canny = settings_from_comfyui(comfyui_prompt(JOBS["controlnet-canny"]))["controlnet"]
    assert canny == {
        "model": "sd3.5_large_controlnet_canny.safetensors",
        "strength": 0.7,
        "preprocessor": "Canny",
        "canny_low": 100,
        "canny_high": 200,
    }
    assert settings_from_comfyui(comfyui_prompt(JOBS["inpaint"]))["mask_blur"] == 4


def test_png_info_reads_the_settings_from_the_comfyui_chunk_alone(tmp_path):
    settings = JOBS["large-loras"]
    info = PngImagePlugin.PngInfo()
    for key, text in comfyui_chunks(settings).items():  # only ComfyUI's two chunks: no studio JSON, no A1111 text
        info.add_text(key, text)
    path = tmp_path / "comfy-only.png"
    Image.new("RGB", (16, 16)).save(path, format="PNG", pnginfo=info)
    with Image.open(path) as image:
        chunks = dict(image.text)
    assert set(chunks) == {"prompt", "workflow"}
    read = settings_from_comfyui_text(chunks["prompt"])
    assert (read["prompt"], read["seed"], read["cfg"], read["width"], read["height"]) == (
        settings["prompt"],
        7,
        3.5,
        1024,
        768,
    )
    assert read["loras"] == [("style", 0.8), ("ink-wash", 1.25)]
    check_workflow(json.loads(chunks["workflow"]), json.loads(chunks["prompt"]))


# ----------------------------------------------------------------------------- other people's graphs

# ComfyUI's SD3.5 Large canny template, in the API format (node ids and values as in the template).
OFFICIAL_CANNY_PROMPT = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_large_fp8_scaled.safetensors"}},
    "46": {
        "class_type": "ControlNetLoader",
        "inputs": {"control_net_name": "sd3.5_large_controlnet_canny.safetensors"},
    },
    "50": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
    "45": {"class_type": "LoadImage", "inputs": {"image": "sd3.5_large_canny_controlnet_example_input_image.png"}},
    "33": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    "51": {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["6", 0],
            "negative": ["50", 0],
            "control_net": ["46", 0],
            "image": ["47", 0],
            "vae": ["4", 2],
            "strength": 0.66,
            "start_percent": 0,
            "end_percent": 1,
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "model": ["4", 0],
            "positive": ["51", 0],
            "negative": ["51", 1],
            "latent_image": ["33", 0],
            "seed": 840657187058661,
            "steps": 32,
            "cfg": 4.5,
            "sampler_name": "euler",
            "scheduler": "simple",
            "denoise": 1,
        },
    },
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "sd3.5_canny_controlnet"}},
    "48": {
        "class_type": "ImageScale",
        "inputs": {"image": ["45", 0], "upscale_method": "bilinear", "width": 1024, "height": 1024, "crop": "center"},
    },
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {"clip": ["4", 1], "text": "crystal pink dragon on a blue mystery sky, hyperdetailed"},
    },
    "47": {"class_type": "Canny", "inputs": {"image": ["48", 0], "low_threshold": 0.3, "high_threshold": 0.6}},
    "49": {"class_type": "PreviewImage", "inputs": {"images": ["47", 0]}},
}


def test_comfyuis_own_sd35_template_is_valid_and_reads_back():
    assert problems(OFFICIAL_CANNY_PROMPT) == []  # the recorded definitions fit ComfyUI's own graph
    read = settings_from_comfyui(OFFICIAL_CANNY_PROMPT)
    assert read["prompt"] == "crystal pink dragon on a blue mystery sky, hyperdetailed"
    assert read["negative_prompt"] == ""
    assert any("ConditioningZeroOut" in note for note in read["notes"])
    assert (read["seed"], read["steps"], read["cfg"], read["denoise"]) == (840657187058661, 32, 4.5, 1.0)
    assert (read["sampler"], read["scheduler"], read["width"], read["height"]) == ("euler", "simple", 1024, 1024)
    assert read["model"] == "sd3.5_large_fp8_scaled.safetensors" and read["model_key"] is None
    assert read["controlnet"] == {
        "model": "sd3.5_large_controlnet_canny.safetensors",
        "strength": 0.66,
        "preprocessor": "Canny",
        "canny_low": 76,
        "canny_high": 153,
    }
    assert read["mode"] == "controlnet" and read["loras"] == [] and read["shift"] is None


def test_a_hires_fix_graph_reads_the_first_pass_and_says_so():
    prompt = comfyui_prompt(JOBS["large"])
    first = next(key for key, node in prompt.items() if node["class_type"] == "KSampler")
    model, positive, negative = (prompt[first]["inputs"][name] for name in ("model", "positive", "negative"))
    # A second pass on an upscaled latent, added with smaller ids so "first in the file" would be wrong.
    second_pass = {
        "0": {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "seed": 99,
                "steps": 12,
                "cfg": 5.0,
                "sampler_name": "dpmpp_2m",
                "scheduler": "karras",
                "positive": positive,
                "negative": negative,
                "latent_image": ["00", 0],
                "denoise": 0.45,
            },
        },
        "00": {
            "class_type": "LatentUpscale",
            "inputs": {
                "samples": [first, 0],
                "upscale_method": "bislerp",
                "width": 2048,
                "height": 1536,
                "crop": "disabled",
            },
        },
    }
    read = settings_from_comfyui({**second_pass, **prompt})
    assert (read["seed"], read["steps"], read["denoise"], read["width"]) == (7, 28, 1.0, 1024)
    assert len(read["notes"]) == 1 and "2 sampler passes" in read["notes"][0]


def test_a_custom_sampler_graph_reads_through_noise_guider_and_sigmas():
    prompt = {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "sd3.5_medium.safetensors", "weight_dtype": "default"},
        },
        "2": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["3", 0],
                "lora_name": "sub/fox.safetensors",
                "strength_model": 0.5,
                "strength_clip": 0.5,
            },
        },
        "3": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "a", "clip_name2": "b", "clip_name3": "c"}},
        "4": {
            "class_type": "CLIPTextEncodeSD3",
            "inputs": {
                "clip": ["2", 1],
                "clip_l": "",
                "clip_g": "g text",
                "t5xxl": "a fox in snow",
                "empty_padding": "none",
            },
        },
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ["9", 0]}},
        "9": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "ugly"}},
        "6": {
            "class_type": "CFGGuider",
            "inputs": {"model": ["2", 0], "positive": ["4", 0], "negative": ["5", 0], "cfg": 5.5},
        },
        "7": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1234}},
        "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "10": {
            "class_type": "BasicScheduler",
            "inputs": {"model": ["2", 0], "scheduler": "sgm_uniform", "steps": 30, "denoise": 1.0},
        },
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 832, "height": 1216, "batch_size": 1}},
        "12": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["7", 0],
                "guider": ["6", 0],
                "sampler": ["8", 0],
                "sigmas": ["10", 0],
                "latent_image": ["11", 0],
            },
        },
    }
    read = settings_from_comfyui(prompt)
    assert (read["prompt"], read["negative_prompt"]) == ("a fox in snow", "ugly")
    assert (read["seed"], read["steps"], read["cfg"], read["sampler"], read["scheduler"]) == (
        1234,
        30,
        5.5,
        "euler",
        "sgm_uniform",
    )
    assert (read["width"], read["height"], read["model_key"]) == (832, 1216, "sd35-medium")
    assert read["loras"] == [("fox", 0.5)]


def test_an_image_loaded_without_a_size_reads_as_unknown():
    prompt = comfyui_prompt(JOBS["img2img"])
    scale_id = next(key for key, node in prompt.items() if node["class_type"] == "ImageScale")
    encode = next(node for node in prompt.values() if node["class_type"] == "VAEEncode")
    encode["inputs"]["pixels"] = prompt[scale_id]["inputs"]["image"]  # straight from LoadImage
    read = settings_from_comfyui(prompt)
    assert (read["width"], read["height"], read["mode"]) == (None, None, "img2img")
    assert any("loaded image" in note for note in read["notes"])


# ----------------------------------------------------------------------------- hostile graphs


def test_cycles_and_junk_do_not_hang_or_crash_the_reader():
    cyclic = {
        "1": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "positive": ["3", 0],
                "negative": ["3", 0],
                "latent_image": ["1", 0],
                "seed": 1,
                "steps": 2,
                "cfg": 2.0,
            },
        },
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["2", 0], "lora_name": "loop.safetensors", "strength_model": 1},
        },
        "3": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["4", 0], "conditioning_2": ["3", 0]}},
        "4": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["3", 0]}},
        "5": "not a node",
        "6": {"class_type": 7, "inputs": []},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": ["404", 0], "clip": [None, "x"]}},
    }
    read = settings_from_comfyui(cyclic)
    assert read["found"] is True and read["prompt"] is None and read["loras"] == [("loop", 1.0)]
    assert settings_from_comfyui({"1": {"class_type": "VAEDecode", "inputs": {}}})["found"] is False
    for not_a_graph in ([], "x", {}, None):
        with pytest.raises(ValueError, match="not a graph"):
            settings_from_comfyui(not_a_graph)
    with pytest.raises(ValueError, match="not valid JSON"):
        settings_from_comfyui_text("{")


def test_graph_size_and_chain_length_are_bounded():
    too_big = {str(index): {"class_type": "CLIPTextEncode", "inputs": {}} for index in range(MAX_GRAPH_NODES + 1)}
    with pytest.raises(ValueError, match=f"more than {MAX_GRAPH_NODES:,}"):
        settings_from_comfyui(too_big)
    # The longest chain a graph under the cap can hold: the model walk stops at MAX_WALK_STEPS hops.
    chain = {"0": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}}}
    for index in range(1, MAX_GRAPH_NODES - 1):
        chain[str(index)] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": [str(index - 1), 0], "lora_name": f"l{index}.safetensors", "strength_model": 1.0},
        }
    chain["s"] = {"class_type": "KSampler", "inputs": {"model": [str(MAX_GRAPH_NODES - 2), 0], "seed": 1, "steps": 1}}
    started = time.perf_counter()
    read = settings_from_comfyui(chain)
    seconds = time.perf_counter() - started
    assert len(read["loras"]) == comfyui_graph.MAX_WALK_STEPS and read["model"] is None
    assert seconds < 10  # generous: a bounded walk takes milliseconds; an unbounded one would not finish here


def test_comfyui_chunks_are_small_json_text():
    chunks = comfyui_chunks(JOBS["inpaint"])
    assert set(chunks) == {"prompt", "workflow"}
    assert all(len(text.encode()) < 64_000 for text in chunks.values())
    buffer = io.StringIO(chunks["prompt"])
    assert json.load(buffer) == comfyui_prompt(JOBS["inpaint"])


def test_the_graph_leaks_no_server_path():
    # A local folder can stand in for a repo id; the graph names files as ComfyUI users have them.
    settings = studio_settings(model_key="sd35-custom", model_id="/srv/studio/models/my-sd35", loras=LORAS)
    settings["loras"] = [{**lora, "source": "/srv/studio/loras/style.safetensors"} for lora in LORAS]
    for job in (settings, *JOBS.values()):
        chunks = comfyui_chunks(job)
        assert "/srv" not in chunks["prompt"] and "/srv" not in chunks["workflow"]
        files = {
            node["inputs"]["image"]
            for node in json.loads(chunks["prompt"]).values()
            if node["class_type"] in ("LoadImage", "LoadImageMask")
        }
        assert files <= {
            comfyui_graph.INIT_IMAGE_FILE,
            comfyui_graph.MASK_FILE,
            comfyui_graph.CONTROL_IMAGE_FILE,
            comfyui_graph.CONTROL_MAP_FILE,
        }
    assert only(comfyui_prompt(settings), "CheckpointLoaderSimple")["inputs"]["ckpt_name"] == "my-sd35.safetensors"
