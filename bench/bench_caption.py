"""The Studio's caption call against a bare ``model.generate``, on real-size BLIP base.

    python -m bench.bench_caption [--repeats 5]

Both sides caption the same decoded photo with the same settings and exactly
20 new tokens (random weights would otherwise stop at random lengths). The
bare side is what a notebook does: ``processor(images=...)``, ``model.generate``,
``processor.batch_decode``. The Studio side adds scoring (raw log-probs of every
token) and validation. The Studio's image-feature cache is cleared before each
timed call, so both sides encode the image; a third column shows the same image
captioned again with its features cached. Prints medians and the ratio; the
goal is <= 1.05.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from PIL import Image

from bench.common import interleaved_medians, machine_description, real_size_blip_captioner, write_results
from pipelines.blip.captioner import CaptionRequest

PHOTO = Path(__file__).resolve().parent.parent / "assets" / "examples" / "chelsea.png"
TOKENS = 20

SETTINGS = {
    "greedy": {"request": CaptionRequest(strategy="greedy"), "generate": {"num_beams": 1, "do_sample": False}},
    "beam 3": {
        "request": CaptionRequest(strategy="beam", num_beams=3),
        "generate": {"num_beams": 3, "do_sample": False, "early_stopping": True},
    },
    # Sampling draws from one seeded stream per caption (pipelines/blip/seeded_sampling.py), so a caption
    # does not depend on its batch; the bare side samples from the global generator.
    "sample": {
        "request": CaptionRequest(strategy="sampling", seed=0),
        "generate": {"num_beams": 1, "do_sample": True, "top_k": 50, "top_p": 0.9},
    },
    "sample 5": {
        "request": CaptionRequest(strategy="sampling", seed=0, num_captions=5),
        "generate": {"num_beams": 1, "do_sample": True, "top_k": 50, "top_p": 0.9, "num_return_sequences": 5},
    },
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    captioner = real_size_blip_captioner()
    processor, model = captioner.processor, captioner.model
    image = Image.open(PHOTO).convert("RGB")
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"BLIP base, real config, random weights: {parameters / 1e6:.1f}M parameters, fp32, {machine_description()}")
    print(f"{'setting':<8} {'bare generate':>14} {'Studio caption':>15} {'ratio':>7}")

    rows = []
    for name, setting in SETTINGS.items():
        request = dataclasses.replace(setting["request"], min_new_tokens=TOKENS, max_new_tokens=TOKENS)

        def bare(setting=setting):
            with torch.inference_mode():
                inputs = processor(images=image, return_tensors="pt")
                output = model.generate(**inputs, min_new_tokens=TOKENS, max_new_tokens=TOKENS, **setting["generate"])
                return processor.batch_decode(output, skip_special_tokens=True)

        def studio(request=request):
            captioner.feature_cache.clear()  # a new image each time, as the bare side sees it
            return captioner.caption(image, request)

        def studio_cached(request=request):
            return captioner.caption(image, request)  # the same image again: the ViT is skipped

        medians = interleaved_medians({"bare": bare, "studio": studio, "cached": studio_cached}, args.repeats)
        ratio = medians["studio"] / medians["bare"]
        print(
            f"{name:<8} {medians['bare']:>13.3f}s {medians['studio']:>14.3f}s {ratio:>7.3f}"
            f"   (same image again, features cached: {medians['cached']:.3f}s)"
        )
        rows.append(
            {
                "setting": name,
                "tokens": TOKENS,
                "bare_seconds": medians["bare"],
                "studio_seconds": medians["studio"],
                "ratio": ratio,
                "studio_cached_image_seconds": medians["cached"],
                "repeats": args.repeats,
            }
        )
    path = write_results(
        "caption-cpu" if not torch.cuda.is_available() else "caption-cuda", "real-size random weights", rows
    )
    print(f"seconds per caption are medians of {args.repeats} interleaved runs; saved to {path}")


if __name__ == "__main__":
    main()
