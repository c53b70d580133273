"""The Studio's generate call against a bare diffusers pipeline call, same settings, CPU.

    python -m bench.bench_generate [--repeats 3]

Two pipelines: the tiny Large stand-in, and a mid-size random-weight SD3
(an 8-layer, 512-wide MMDiT with the real SD3 VAE config and small text
encoders) at 256x256, 4 steps, guidance 3.5. The Studio side is what every tab
runs: the generation service (``pipelines/sd3/generation.py``: checks, presets,
memory mode, LoRA selection, the step callback, stop check, truncation check,
PNG parameters, saving the PNG with its metadata, the details dict). It is
timed with live previews off and with a preview after every step, so the
previews' cost is printed. Goal: ratio <= 1.05 without previews.

A ControlNet row follows (``controlnet_rows``): the Studio's ControlNet draw
(``pipelines/sd3/controlnet.run``: the service's checks, cv2.Canny, the ControlNet
pipeline built from the loaded one, PNGs, details) against a bare
``StableDiffusion3ControlNetPipeline`` call on a cv2.Canny map, same settings.

The img2img row times the Studio's image to image (``pipelines/sd3/image_to_image.py``: the same
service's prepare and finish around a ``from_pipe`` twin, PNG included) against the bare
``StableDiffusion3Img2ImgPipeline`` call on the same weights, strength 0.6 (3 of the 4 steps).
Goal: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import interleaved_medians, machine_description, write_results
from pipelines.catalog import MODEL_CONFIGS_DIR
from pipelines.runtime import choose_runtime
from pipelines.sd3.generation import GenerationService
from pipelines.sd3.jobs import GenerationRequest, ImageToImageRequest
from pipelines.sd3.text_to_image import LatentPreviewer
from pipelines.tiny import TINY_SD3_DIRS, ensure_tiny_models


class OnePipeline:
    """The slice of ModelManager the generation service uses, serving one in-memory pipeline."""

    tiny = True  # the tiny size limits (64-512 px) admit both bench sizes; the real ones start at 0.25 MP

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.runtime = choose_runtime("cpu")

    def get(self, key, variant=None, notify=None):
        return self.pipeline

    def loaded_models(self):
        return []

    def source_for(self, key):
        return "bench"


def mid_size_pipeline(tiny_dir: Path):
    """A random-weight SD3 pipeline between the tiny one and the real ones, built in memory."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer_2")
    tokenizer_3 = T5Tokenizer.from_pretrained(tiny_dir / "tokenizer_3")
    clip = {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_hidden_layers": 4}
    clip |= {"projection_dim": 256, "vocab_size": len(tokenizer), "max_position_embeddings": 77}
    clip |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    vae_config = json.loads(
        (MODEL_CONFIGS_DIR / "stabilityai__stable-diffusion-3.5-large" / "vae" / "config.json").read_text()
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=8,
            attention_head_dim=64,
            num_attention_heads=8,
            joint_attention_dim=512,
            caption_projection_dim=512,
            pooled_projection_dim=512,
            pos_embed_max_size=96,
            qk_norm="rms_norm",
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL.from_config(vae_config),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=T5EncoderModel(
            T5Config(vocab_size=len(tokenizer_3), d_model=512, d_ff=1024, d_kv=64, num_layers=4, num_heads=8)
        ),
        tokenizer_3=tokenizer_3,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


IMG2IMG_STRENGTH = 0.6


def time_img2img(pipeline, service, request, side: int, folder: Path, repeats: int) -> dict:
    """Medians of the Studio's img2img and the bare diffusers img2img call, same weights and settings."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    grid = np.random.default_rng(0).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((side, side), Image.Resampling.BICUBIC)
    twin = StableDiffusion3Img2ImgPipeline.from_pipe(pipeline, dtype=pipeline.vae.dtype)  # once, as a user would
    twin.set_progress_bar_config(disable=True)
    job = ImageToImageRequest(image, request, strength=IMG2IMG_STRENGTH)

    def bare():
        return twin(
            "a red cube on a blue sphere",
            image=image,
            strength=IMG2IMG_STRENGTH,
            num_inference_steps=4,
            guidance_scale=3.5,
            height=side,
            width=side,
            generator=[torch.Generator().manual_seed(1)],
            max_sequence_length=256,
        ).images

    def studio():
        return service(job, folder=folder)

    medians = interleaved_medians({"bare": bare, "studio": studio}, repeats)
    return {
        "bare_seconds": medians["bare"],
        "studio_seconds": medians["studio"],
        "ratio": medians["studio"] / medians["bare"],
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only",
        choices=["generate", "img2img", "controlnet"],
        help="time one of the three (img2img writes img2img-cpu.json, controlnet generate-controlnet-cpu.json)",
    )
    args = parser.parse_args(argv)

    tiny_root = ensure_tiny_models()
    from diffusers import StableDiffusion3Pipeline

    tiny = StableDiffusion3Pipeline.from_pretrained(tiny_root / TINY_SD3_DIRS["large"])
    tiny.set_progress_bar_config(disable=True)
    cases = {
        "tiny Large, 128x128": (tiny, 128),
        "mid-size SD3, 256x256": (mid_size_pipeline(tiny_root / TINY_SD3_DIRS["large"]), 256),
    }
    print(f"SD3 pipelines with random weights, fp32, {machine_description()}; 4 steps, guidance 3.5")
    generate_rows, img2img_rows = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (pipeline, side) in cases.items():
            parameters = sum(parameter.numel() for parameter in pipeline.transformer.parameters())
            service = GenerationService(OnePipeline(pipeline))
            request = GenerationRequest(
                prompt="a red cube on a blue sphere", steps=4, guidance=3.5, width=side, height=side, seed=1
            )
            if args.only in (None, "generate"):
                row = time_generate(pipeline, service, request, side, Path(scratch), args.repeats)
                generate_rows.append({"pipeline": name, "transformer_parameters": parameters, **row})
            if args.only in (None, "img2img"):
                row = time_img2img(pipeline, service, request, side, Path(scratch), args.repeats)
                img2img_rows.append(
                    {"pipeline": f"{name}, img2img strength {IMG2IMG_STRENGTH}", "transformer_parameters": parameters}
                    | row
                )
    if generate_rows:
        print(f"{'text to image':<24} {'bare call':>10} {'Studio':>9} {'ratio':>6} {'+previews':>10} {'ratio':>6}")
        for row in generate_rows:
            print(
                f"{row['pipeline']:<24} {row['bare_seconds']:>9.3f}s {row['studio_seconds']:>8.3f}s {row['ratio']:>6.3f}"
                f" {row['studio_with_previews_seconds']:>9.3f}s {row['previews_ratio']:>6.3f}"
            )
    if img2img_rows:
        print(f"img2img at strength {IMG2IMG_STRENGTH} (3 of the 4 steps run)")
        print(f"{'pipeline':<42} {'bare call':>10} {'Studio':>9} {'ratio':>6}")
        for row in img2img_rows:
            print(
                f"{row['pipeline']:<42} {row['bare_seconds']:>9.3f}s {row['studio_seconds']:>8.3f}s {row['ratio']:>6.3f}"
            )
    if generate_rows or img2img_rows:
        name = {"img2img": "img2img-cpu"}.get(args.only, "generate-cpu")
        path = write_results(name, "tiny and mid-size random weights", generate_rows + img2img_rows)
        print(f"medians of {args.repeats} interleaved runs; saved to {path}")
    if args.only in (None, "controlnet"):
        controlnet_rows(tiny_root, cases, args.repeats)


class PipelineAndControlNet(OnePipeline):
    """OnePipeline that also serves a ControlNet (for any ControlNet key)."""

    def __init__(self, pipeline, controlnet) -> None:
        super().__init__(pipeline)
        self.controlnet = controlnet

    def get(self, key, variant=None, notify=None, keep=()):
        return self.controlnet if key.startswith("sd35-large-controlnet") else self.pipeline


def controlnet_rows(tiny_root: Path, cases: dict, repeats: int) -> list[dict]:
    """Studio ControlNet (canny) vs a bare StableDiffusion3ControlNetPipeline call, per case; saved and printed."""
    import cv2
    import numpy as np
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from pipelines.sd3.control_maps import ControlSettings
    from pipelines.tiny import TINY_CONTROLNET_DIRS

    photo = Image.open(Path(__file__).resolve().parent.parent / "assets" / "examples" / "astronaut.png").convert("RGB")
    tiny_controlnet = SD3ControlNetModel.from_pretrained(tiny_root / TINY_CONTROLNET_DIRS["canny"])
    print(f"\nControlNet (canny, scale 1), fp32, {machine_description()}; 4 steps, guidance 3.5")
    print(f"{'pipeline':<24} {'bare call':>10} {'Studio':>9} {'ratio':>6}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (pipeline, side) in cases.items():
            width = pipeline.transformer.config.num_attention_heads * pipeline.transformer.config.attention_head_dim
            if width == tiny_controlnet.inner_dim:
                controlnet = tiny_controlnet
            else:  # the mid-size MMDiT's width, half its blocks, as the released ControlNets are to Large
                torch.manual_seed(0)
                controlnet = SD3ControlNetModel(
                    sample_size=32,
                    patch_size=2,
                    in_channels=16,
                    num_layers=pipeline.transformer.config.num_layers // 2,
                    attention_head_dim=pipeline.transformer.config.attention_head_dim,
                    num_attention_heads=pipeline.transformer.config.num_attention_heads,
                    joint_attention_dim=None,
                    caption_projection_dim=width,
                    pooled_projection_dim=pipeline.transformer.config.pooled_projection_dim,
                    out_channels=16,
                    pos_embed_max_size=None,
                    pos_embed_type=None,
                    use_pos_embed=False,
                    force_zeros_for_pooled_projection=False,
                    qk_norm=None,
                ).eval()
            service = GenerationService(PipelineAndControlNet(pipeline, controlnet))
            request = GenerationRequest(
                prompt="a red cube on a blue sphere",
                steps=4,
                guidance=3.5,
                width=side,
                height=side,
                seed=1,
                control=ControlSettings(photo, "canny", 1.0),
            )
            bare_pipeline = StableDiffusion3ControlNetPipeline.from_pipe(pipeline, controlnet=controlnet)
            bare_pipeline.set_progress_bar_config(disable=True)
            canny_processor = VaeImageProcessor(vae_scale_factor=bare_pipeline.vae_scale_factor, do_normalize=False)

            def bare(bare_pipeline=bare_pipeline, canny_processor=canny_processor, side=side):
                edges = Image.fromarray(cv2.Canny(np.asarray(photo.convert("L")), 100, 200)).convert("RGB")
                # The model card's SD3CannyImageProcessor: unnormalised pixels x 127.5 + 0.5.
                control = canny_processor.preprocess(edges, height=side, width=side) * 255 * 0.5 + 0.5
                return bare_pipeline(
                    "a red cube on a blue sphere",
                    control_image=control,
                    controlnet_conditioning_scale=1.0,
                    num_inference_steps=4,
                    guidance_scale=3.5,
                    height=side,
                    width=side,
                    generator=[torch.Generator().manual_seed(1)],
                    max_sequence_length=256,
                ).images

            def studio(service=service, request=request):
                return service(request, folder=Path(scratch))

            medians = interleaved_medians({"bare": bare, "studio": studio}, repeats)
            ratio = medians["studio"] / medians["bare"]
            print(f"{name:<24} {medians['bare']:>9.3f}s {medians['studio']:>8.3f}s {ratio:>6.3f}")
            rows.append(
                {
                    "pipeline": name,
                    "controlnet_parameters": sum(parameter.numel() for parameter in controlnet.parameters()),
                    "bare_seconds": medians["bare"],
                    "studio_seconds": medians["studio"],
                    "ratio": ratio,
                    "repeats": repeats,
                }
            )
    path = write_results("generate-controlnet-cpu", "tiny and mid-size random weights, canny ControlNet", rows)
    print(f"medians of {repeats} interleaved runs; saved to {path}")
    return rows


def time_generate(pipeline, service, request, side: int, folder: Path, repeats: int) -> dict:
    """Medians of the Studio's generation (without and with a preview every step) and the bare call."""
    LatentPreviewer.for_pipeline(pipeline)(torch.zeros(1, 16, 2, 2))  # fit the projection outside the timing

    def bare():
        return pipeline(
            "a red cube on a blue sphere",
            num_inference_steps=4,
            guidance_scale=3.5,
            height=side,
            width=side,
            generator=[torch.Generator().manual_seed(1)],
            max_sequence_length=256,
        ).images

    def studio(preview_every=0):
        return service(dataclasses.replace(request, preview_every=preview_every), folder=folder)

    medians = interleaved_medians(
        {"bare": bare, "studio": studio, "previews": lambda: studio(preview_every=1)}, repeats
    )
    return {
        "bare_seconds": medians["bare"],
        "studio_seconds": medians["studio"],
        "ratio": medians["studio"] / medians["bare"],
        "studio_with_previews_seconds": medians["previews"],
        "previews_ratio": medians["previews"] / medians["bare"],
        "repeats": repeats,
    }


if __name__ == "__main__":
    main()
