"""Write the PNG Info samples in this folder: one small image per format, in each tool's own layout.

Each file is what the named tool's writer puts in an image (read from its source; see LICENSES.md),
on an 8x8 picture (48x48 where the alpha channel must hold a hidden text). ``expected.json`` holds
what reading each file must give. Run from the repository root:

    python tests/data/png-info/make_samples.py

The output is deterministic, so running it again rewrites the same bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import zlib
from pathlib import Path

from PIL import Image, PngImagePlugin

HERE = Path(__file__).resolve().parent
SD35 = "sd3.5_large.safetensors"


def picture(size=(8, 8), mode="RGB") -> Image.Image:
    image = Image.new(mode, size, (90, 120, 200, 255)[: len(mode)])
    image.putpixel((1, 1), (200, 40, 40, 255)[: len(mode)])
    return image


def png(chunks: dict[str, str], image: Image.Image | None = None, itxt: set[str] = frozenset()) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        if key in itxt or any(ord(char) > 255 for char in value):
            info.add_itxt(key, value)
        else:
            info.add_text(key, value)
    buffer = io.BytesIO()
    (image or picture()).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def with_chunk(data: bytes, kind: bytes, body: bytes) -> bytes:
    """``data`` (a PNG) with one more chunk just before IEND."""
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]


def exif_image(fmt: str, user_comment: bytes | str | None = None, ifd0: dict | None = None, **save) -> bytes:
    exif = Image.Exif()
    for tag, value in (ifd0 or {}).items():
        exif[tag] = value
    if user_comment is not None:
        exif.get_ifd(0x8769)[0x9286] = user_comment
    buffer = io.BytesIO()
    picture().save(buffer, format=fmt, exif=exif.tobytes(), **save)
    return buffer.getvalue()


def stealth_png(text: str, *, compressed: bool) -> bytes:
    """A1111's stealth-pnginfo layout (alpha mode): signature, 32-bit payload length in bits, payload,
    one bit per pixel in the alpha's lowest bit, pixels column by column."""
    signature = b"stealth_pngcomp" if compressed else b"stealth_pnginfo"
    payload = gzip.compress(text.encode(), mtime=0) if compressed else text.encode()
    data = signature + struct.pack(">I", len(payload) * 8) + payload
    bits = [(byte >> (7 - index)) & 1 for byte in data for index in range(8)]
    side = 8
    while side * side < len(bits):
        side += 8
    image = picture((side, side), "RGBA")
    pixels = image.load()
    for position, bit in enumerate(bits):
        x, y = divmod(position, side)
        r, g, b, a = pixels[x, y]
        pixels[x, y] = (r, g, b, (a & ~1) | bit)
    return png({}, image)


def xmp_packet(body: str) -> str:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" {body}/></rdf:RDF></x:xmpmeta>'
    )


# ----------------------------------------------------------------------------- the samples

A1111_TEXT = (
    "masterpiece, amazing quality, \n1girl, lighthouse  \n"
    "Negative prompt: lowres, \nbad hands\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, Seed: 1234567890, Size: 832x1216, "
    "Model hash: ffd1a7b3f6, Model: sd3.5_large, Version: v1.10.1"
)
A1111_FIELDS = {
    "prompt": "masterpiece, amazing quality,\n1girl, lighthouse",
    "negative_prompt": "lowres,\nbad hands",
    "seed": 1234567890,
    "steps": 28,
    "guidance": 4.5,
    "sampler": "DPM++ 2M Karras",
    "width": 832,
    "height": 1216,
    "model_given": "sd3.5_large",
}

COMFYUI_PROMPT = {
    "4": {"inputs": {"ckpt_name": SD35}, "class_type": "CheckpointLoaderSimple"},
    "6": {"inputs": {"text": "a red fox in the snow", "clip": ["4", 1]}, "class_type": "CLIPTextEncode"},
    "7": {"inputs": {"text": "blurry", "clip": ["4", 1]}, "class_type": "CLIPTextEncode"},
    "53": {"inputs": {"width": 1024, "height": 1024, "batch_size": 1}, "class_type": "EmptySD3LatentImage"},
    "3": {
        "inputs": {
            "seed": 42,
            "steps": 28,
            "cfg": 4.5,
            "sampler_name": "euler",
            "scheduler": "sgm_uniform",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["53", 0],
        },
        "class_type": "KSampler",
    },
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode"},
    "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage"},
}
COMFYUI_WORKFLOW = {
    "last_node_id": 53,
    "last_link_id": 9,
    "nodes": [
        {"id": 3, "type": "KSampler", "widgets_values": [42, "fixed", 28, 4.5, "euler", "sgm_uniform", 1]},
        {"id": 6, "type": "CLIPTextEncode", "widgets_values": ["a red fox in the snow"]},
    ],
    "links": [],
    "version": 0.4,
}

SWARM = {
    "sui_image_params": {
        "prompt": "a lighthouse at dusk, oil painting",
        "negativeprompt": "blurry",
        "images": 1,
        "seed": 987654321,
        "steps": 28,
        "cfgscale": 4.5,
        "aspectratio": "Custom",
        "width": 1024,
        "height": 1216,
        "sampler": "euler",
        "scheduler": "sgm_uniform",
        "model": "OfficialStableDiffusion/sd3.5_large",
        "loras": ["ink_style"],
        "loraweights": ["0.7"],
        "swarm_version": "0.9.6.2",
        "date": "2025-05-01",
        "generation_time": "0.01 (prep) and 9.80 (gen) seconds",
    },
    "sui_extra_data": {"date": "2025-05-01", "prep_time": "0.01 sec", "generation_time": "9.80 sec"},
    "sui_models": [{"name": "sd3.5_large.safetensors", "param": "model", "hash": "0xffd1a7b3"}],
}
SWARM_FIELDS = {
    "prompt": "a lighthouse at dusk, oil painting",
    "negative_prompt": "blurry",
    "seed": 987654321,
    "steps": 28,
    "guidance": 4.5,
    "sampler": "euler sgm_uniform",
    "width": 1024,
    "height": 1216,
    "model_given": "OfficialStableDiffusion/sd3.5_large",
}

FOOOCUS = {
    "adm_guidance": "(1.5, 0.8, 0.3)",
    "base_model": "juggernautXL_v8Rundiffusion",
    "base_model_hash": "aeb7e9e689",
    "clip_skip": 2,
    "full_negative_prompt": ["(worst quality, low quality:1.4)", "blurry"],
    "full_prompt": ["a cabin in the woods", "cinematic, highly detailed"],
    "guidance_scale": 4,
    "loras": [["sd_xl_offset_example-lora_1.0", 0.1, "4852686128"]],
    "metadata_scheme": "fooocus",
    "negative_prompt": "blurry",
    "performance": "Speed",
    "prompt": "a cabin in the woods",
    "prompt_expansion": "a cabin in the woods, cinematic, highly detailed",
    "refiner_model": "None",
    "refiner_switch": 0.5,
    "resolution": "(1152, 896)",
    "sampler": "dpmpp_2m_sde_gpu",
    "scheduler": "karras",
    "seed": "2101823485",
    "sharpness": 2,
    "steps": 30,
    "styles": "['Fooocus V2', 'Fooocus Enhance', 'Fooocus Sharp']",
    "vae": "Default (model)",
    "version": "Fooocus v2.5.5",
}
FOOOCUS_FIELDS = {
    "prompt": "a cabin in the woods",
    "negative_prompt": "blurry",
    "seed": 2101823485,
    "steps": 30,
    "guidance": 4.0,
    "sampler": "dpmpp_2m_sde_gpu karras",
    "width": 1152,
    "height": 896,
    "model_given": "juggernautXL_v8Rundiffusion",
}

RUINED = {
    "Prompt": "cinematic film still, a sunflower field",
    "Negative": "anime, cartoon",
    "steps": 30,
    "cfg": 8.5,
    "width": 1152,
    "height": 896,
    "seed": 3864674281,
    "sampler_name": "dpmpp_2m_sde_gpu",
    "scheduler": "karras",
    "base_model_name": "sd_xl_base_1.0_0.9vae.safetensors",
    "base_model_hash": "be9edd61",
    "loras": [["4852686128", "0.1 - sd_xl_offset_example-lora_1.0.safetensors"]],
    "start_step": 0,
    "denoise": None,
    "clip_skip": 1,
    "software": "RuinedFooocus",
}

INVOKE_CORE = {
    "generation_mode": "sd3_txt2img",
    "positive_prompt": "a castle on a hill, golden hour",
    "negative_prompt": "lowres",
    "width": 1024,
    "height": 1024,
    "seed": 3141592653,
    "rand_device": "cpu",
    "cfg_scale": 3.5,
    "steps": 30,
    "scheduler": "euler",
    "model": {"key": "9c1e", "hash": "blake3:1a2b3c", "name": "SD3.5 Large", "base": "sd-3", "type": "main"},
    "loras": [{"model": {"key": "77aa", "hash": "blake3:ffee", "name": "ink_style", "base": "sd-3"}, "weight": 0.75}],
    "app_version": "5.6.0",
}
INVOKE_SD_METADATA = {
    "model": "stable diffusion",
    "model_weights": "stable-diffusion-1.5",
    "model_hash": "cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516",
    "app_id": "invoke-ai/InvokeAI",
    "app_version": "2.2.5",
    "image": {
        "prompt": [{"prompt": "a cozy library, warm light [blurry, lowres]", "weight": 1.0}],
        "steps": 50,
        "cfg_scale": 7.5,
        "threshold": 0,
        "perlin": 0,
        "height": 512,
        "width": 768,
        "seed": 1234,
        "seamless": False,
        "hires_fix": False,
        "type": "txt2img",
        "postprocessing": None,
        "sampler": "k_lms",
        "variations": [],
    },
}
INVOKE_DREAM = '"a cozy library, warm light [blurry, lowres]" -s 50 -S 1234 -W 768 -H 512 -C 7.5 -A k_lms'

NOVELAI_COMMENT = {
    "prompt": "1girl, silver hair, night sky, masterpiece",
    "steps": 28,
    "height": 1216,
    "width": 832,
    "scale": 5.0,
    "uncond_scale": 1.0,
    "cfg_rescale": 0.0,
    "seed": 2468013579,
    "n_samples": 1,
    "hide_debug_overlay": False,
    "noise_schedule": "native",
    "legacy_v3_extend": False,
    "sampler": "k_euler_ancestral",
    "sm": False,
    "sm_dyn": False,
    "uc": "lowres, bad anatomy",
    "request_type": "PromptGenerateRequest",
    "version": 1,
}
NOVELAI_CHUNKS = {
    "Title": "NovelAI generated image",
    "Description": "1girl, silver hair, night sky, masterpiece",
    "Software": "NovelAI",
    "Source": "Stable Diffusion XL C1E1DE52",
    "Generation time": "5.7",
    "Comment": json.dumps(NOVELAI_COMMENT),
}
NOVELAI_FIELDS = {
    "prompt": "1girl, silver hair, night sky, masterpiece",
    "negative_prompt": "lowres, bad anatomy",
    "seed": 2468013579,
    "steps": 28,
    "guidance": 5.0,
    "sampler": "k_euler_ancestral native",
    "width": 832,
    "height": 1216,
    "model_given": "Stable Diffusion XL",
}

CIVITAI_EXTRA = {
    "prompt": "a koi pond in autumn, ukiyo-e",
    "negativePrompt": "photo, blurry",
    "steps": 25,
    "cfgScale": 5,
    "sampler": "DPM++ 2M Karras",
    "workflowId": "txt2img",
    "resources": [{"modelVersionId": 983309, "modelName": "SD 3.5 Large", "modelType": "Checkpoint"}],
}
CIVITAI_GRAPH = {
    **{key: node for key, node in COMFYUI_PROMPT.items() if key != "9"},
    "extra": {"airs": ["urn:air:sd3:checkpoint:civitai:878387@983309"]},
    "extraMetadata": json.dumps(CIVITAI_EXTRA),
}

SPACE_JSON = {
    "prompt": "a watercolor map of an island",
    "negative_prompt": "text, watermark",
    "resolution": "896 x 1152",
    "guidance_scale": 7,
    "num_inference_steps": 28,
    "seed": 77,
    "sampler": "Euler a",
    "Model": {"Model": "Animagine XL 3.1", "Model hash": "e3c47aedb0"},
}

GEMINI_XMP = xmp_packet(
    'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/" '
    'Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia" '
    'photoshop:Credit="Made with Google AI"'
)
GIMP_XMP = xmp_packet('xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:CreatorTool="GIMP 2.10"')


def c2pa_box() -> bytes:
    """A minimal JUMBF superbox labelled ``c2pa`` naming OpenAI's ChatGPT as claim generator, as a
    C2PA manifest store does (unsigned: it only carries the labels a reader looks for)."""

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    description = box(b"jumd", bytes.fromhex("6332706100110010800000aa00389b71") + b"\x03c2pa\x00")
    claim = box(b"json", json.dumps({"claim_generator": "ChatGPT", "issuer": "OpenAI"}).encode())
    return box(b"jumb", description + claim)


def samples() -> dict[str, tuple[bytes, dict]]:
    """file name -> (bytes, what reading it must give: format, tool, found and the fields)."""
    novelai_webp_comment = b"UNICODE\x00" + json.dumps(NOVELAI_CHUNKS).encode("utf-16-be")
    return {
        "a1111.png": (png({"parameters": A1111_TEXT}), {"format": "a1111", "tool": "AUTOMATIC1111", **A1111_FIELDS}),
        "a1111.jpg": (
            exif_image("JPEG", b"UNICODE\x00" + A1111_TEXT.encode("utf-16-be")),
            {"format": "a1111", "tool": "AUTOMATIC1111", **A1111_FIELDS},
        ),
        "forge.png": (
            png({"parameters": A1111_TEXT.replace("v1.10.1", "f2.0.1v1.10.1-previous-665-gae278f79")}),
            {"format": "a1111", "tool": "Forge", **A1111_FIELDS},
        ),
        "sdnext.png": (
            png({"parameters": A1111_TEXT.replace("Version: v1.10.1", "App: SD.Next, Version: 3e6e4c2")}),
            {"format": "a1111", "tool": "SD.Next", **A1111_FIELDS},
        ),
        "comfy-image-saver.png": (
            png({"parameters": A1111_TEXT.replace("CFG scale", "CFG Scale").replace("v1.10.1", "ComfyUI")}),
            {"format": "a1111", "tool": "ComfyUI (A1111-format saver)", **A1111_FIELDS},
        ),
        "a1111-stealth.png": (
            stealth_png(A1111_TEXT, compressed=True),
            {"format": "stealth", "tool": "AUTOMATIC1111", **A1111_FIELDS},
        ),
        "swarmui.png": (
            png({"parameters": json.dumps(SWARM)}),
            {"format": "swarmui", "tool": "SwarmUI", **SWARM_FIELDS},
        ),
        "swarmui.jpg": (
            exif_image("JPEG", b"UNICODE\x00" + json.dumps(SWARM).encode("utf-16-le")),
            {"format": "swarmui", "tool": "SwarmUI", **SWARM_FIELDS},
        ),
        "fooocus.png": (
            png({"parameters": json.dumps(FOOOCUS, sort_keys=True), "fooocus_scheme": "fooocus"}),
            {"format": "fooocus", "tool": "Fooocus", **FOOOCUS_FIELDS},
        ),
        "fooocus.jpg": (
            exif_image(
                "JPEG",
                ifd0={0x9286: json.dumps(FOOOCUS, sort_keys=True), 0x0131: "Fooocus v2.5.5", 0x927C: "fooocus"},
            ),
            {"format": "fooocus", "tool": "Fooocus", **FOOOCUS_FIELDS},
        ),
        "ruinedfooocus.png": (
            png({"parameters": json.dumps(RUINED)}),
            {
                "format": "ruinedfooocus",
                "tool": "RuinedFooocus",
                "prompt": RUINED["Prompt"],
                "negative_prompt": RUINED["Negative"],
                "seed": 3864674281,
                "steps": 30,
                "guidance": 8.5,
                "sampler": "dpmpp_2m_sde_gpu karras",
                "width": 1152,
                "height": 896,
                "model_given": RUINED["base_model_name"],
            },
        ),
        "invokeai-5.png": (
            png({"invokeai_metadata": json.dumps(INVOKE_CORE), "invokeai_graph": json.dumps({"id": "g", "nodes": {}})}),
            {
                "format": "invokeai",
                "tool": "InvokeAI",
                "prompt": INVOKE_CORE["positive_prompt"],
                "negative_prompt": "lowres",
                "seed": 3141592653,
                "steps": 30,
                "guidance": 3.5,
                "sampler": "euler",
                "width": 1024,
                "height": 1024,
                "model_given": "SD3.5 Large",
            },
        ),
        "invokeai-2.png": (
            png({"sd-metadata": json.dumps(INVOKE_SD_METADATA), "Dream": INVOKE_DREAM}),
            {
                "format": "invokeai",
                "tool": "InvokeAI",
                "prompt": "a cozy library, warm light",
                "negative_prompt": "blurry, lowres",
                "seed": 1234,
                "steps": 50,
                "guidance": 7.5,
                "sampler": "k_lms",
                "width": 768,
                "height": 512,
                "model_given": "stable-diffusion-1.5",
            },
        ),
        "invokeai-1.png": (
            png({"Dream": INVOKE_DREAM}),
            {
                "format": "invokeai",
                "tool": "InvokeAI",
                "prompt": "a cozy library, warm light",
                "negative_prompt": "blurry, lowres",
                "seed": 1234,
                "steps": 50,
                "guidance": 7.5,
                "sampler": "k_lms",
                "width": 768,
                "height": 512,
                "model_given": None,
            },
        ),
        "novelai.png": (png(NOVELAI_CHUNKS), {"format": "novelai", "tool": "NovelAI", **NOVELAI_FIELDS}),
        "novelai.webp": (
            exif_image("WEBP", novelai_webp_comment, lossless=True),
            {"format": "novelai", "tool": "NovelAI", **NOVELAI_FIELDS},
        ),
        "novelai-stealth.png": (
            stealth_png(json.dumps(NOVELAI_CHUNKS), compressed=True),
            {"format": "stealth", "tool": "NovelAI", **NOVELAI_FIELDS},
        ),
        "civitai-comfyui.jpg": (
            exif_image("JPEG", b"UNICODE\x00" + json.dumps(CIVITAI_GRAPH).encode("utf-16-be")),
            {
                "format": "civitai-json",
                "tool": "Civitai",
                "prompt": CIVITAI_EXTRA["prompt"],
                "negative_prompt": "photo, blurry",
                "seed": None,
                "steps": 25,
                "guidance": 5.0,
                "sampler": "DPM++ 2M Karras",
                "width": None,
                "height": None,
                "model_given": "SD 3.5 Large",
            },
        ),
        "hf-space.png": (
            png({"parameters": json.dumps(SPACE_JSON)}),
            {
                "format": "space-json",
                "tool": "a tool that writes its settings as JSON",
                "prompt": SPACE_JSON["prompt"],
                "negative_prompt": "text, watermark",
                "seed": 77,
                "steps": 28,
                "guidance": 7.0,
                "sampler": "Euler a",
                "width": 896,
                "height": 1152,
                "model_given": "Animagine XL 3.1",
            },
        ),
        "comfyui.png": (
            png({"prompt": json.dumps(COMFYUI_PROMPT), "workflow": json.dumps(COMFYUI_WORKFLOW)}),
            {
                "format": "comfyui",
                "tool": "ComfyUI",
                "found": False,
                # What ComfyUI's graph says, for the graph reader (settings_from_comfyui) once it is wired in.
                "graph": {
                    "prompt": "a red fox in the snow",
                    "negative_prompt": "blurry",
                    "seed": 42,
                    "steps": 28,
                    "guidance": 4.5,
                    "sampler": "euler sgm_uniform",
                    "width": 1024,
                    "height": 1024,
                    "model_given": SD35,
                },
            },
        ),
        "gimp.png": (
            png({"Comment": "Created with GIMP", "XML:com.adobe.xmp": GIMP_XMP}, itxt={"XML:com.adobe.xmp"}),
            {"format": "no-settings", "tool": "GIMP 2.10", "found": False},
        ),
        "chatgpt.png": (
            with_chunk(png({}), b"caBX", c2pa_box()),
            {"format": "no-settings", "tool": "ChatGPT (OpenAI)", "found": False},
        ),
        "gemini.png": (
            png({"XML:com.adobe.xmp": GEMINI_XMP}, itxt={"XML:com.adobe.xmp"}),
            {"format": "no-settings", "tool": "Gemini (Google)", "found": False},
        ),
    }


def main() -> None:
    expected = {}
    for name, (data, fields) in samples().items():
        (HERE / name).write_bytes(data)
        expected[name] = {"found": True, **fields}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(expected)} samples to {HERE}")


if __name__ == "__main__":
    main()
