"""Scoring 10 texts against one image: the Studio's matcher against 10 full forward passes.

    python -m bench.bench_match [--repeats 3]

Real-size BLIP base with random weights, on this machine's CPU. The bare side
is what a notebook does for each text: ``processor(images=...)``, one
``model(pixel_values=..., input_ids=[DEC] + text + [SEP])`` (the ViT and the
decoder), then the mean log-probability of the text. The Studio encodes the
image once and scores all 10 texts in one padded decoder pass; it is timed with
an empty feature cache (cold) and once more with the image's features already
cached, as after the Caption tab saw it (warm). Both sides must give the same
scores; the goal is a cold ratio of at least 3x.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from bench.common import interleaved_medians, machine_description, real_size_blip_captioner, write_results
from pipelines.blip.matching import ImageTextMatcher, MatchRequest

PHOTO = Path(__file__).resolve().parent.parent / "assets" / "examples" / "chelsea.png"
TEXTS = [
    "a cat",
    "a close up of a cat looking at the camera",
    "a tabby cat with green eyes",
    "a dog lying on a couch",
    "a cup of coffee on a wooden table",
    "an astronaut in a white space suit standing next to a flag",
    "a rocket launching into a cloudy sky with smoke and fire below it",
    "two people sitting on a bench in a park",
    "a photograph of a small kitten sleeping on a bed",
    "a red car parked on the side of a street in front of a building",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    captioner = real_size_blip_captioner()
    processor, model, tokenizer = captioner.processor, captioner.model, captioner.processor.tokenizer
    matcher = ImageTextMatcher(captioner)
    image = Image.open(PHOTO).convert("RGB")
    request = MatchRequest(texts=TEXTS)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"BLIP base, real config, random weights: {parameters / 1e6:.1f}M parameters, fp32, {machine_description()}")

    def bare() -> list[float]:
        scores = []
        with torch.inference_mode():
            for text in TEXTS:
                pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                input_ids = torch.tensor([[captioner.bos_token_id, *ids, captioner.eos_token_id]])
                logits = model(pixel_values=pixel_values, input_ids=input_ids).logits
                logprobs = logits[0, :-1].log_softmax(-1).gather(-1, input_ids[0, 1:, None]).squeeze(-1)
                scores.append(float(logprobs.mean()))
        return scores

    def studio_cold() -> list[float]:
        captioner.feature_cache.clear()
        return [score.mean_logprob for score in matcher.match([image], request).scores[0]]

    def studio_warm() -> list[float]:
        return [score.mean_logprob for score in matcher.match([image], request).scores[0]]

    difference = max(abs(a - b) for a, b in zip(bare(), studio_cold(), strict=True))
    print(f"same scores: largest difference between the two sides {difference:.2e} (mean log-prob per token)")
    if difference > 1e-3:
        raise SystemExit("the two sides disagree; the timing would compare different work")

    medians = interleaved_medians({"bare": bare, "cold": studio_cold, "warm": studio_warm}, args.repeats)
    cold_ratio, warm_ratio = medians["bare"] / medians["cold"], medians["bare"] / medians["warm"]
    print(f"{'10 texts, 1 image':<34} {'seconds':>8} {'speed-up':>9}")
    print(f"{'10 full forward passes (bare)':<34} {medians['bare']:>8.3f} {1.0:>8.2f}x")
    print(f"{'Studio matcher, cold cache':<34} {medians['cold']:>8.3f} {cold_ratio:>8.2f}x")
    print(f"{'Studio matcher, image cached':<34} {medians['warm']:>8.3f} {warm_ratio:>8.2f}x")
    rows = [
        {
            "setting": "10 texts x 1 image",
            "bare_seconds": medians["bare"],
            "studio_cold_seconds": medians["cold"],
            "studio_warm_seconds": medians["warm"],
            "ratio_cold": cold_ratio,
            "ratio_warm": warm_ratio,
            "max_score_difference": difference,
            "repeats": args.repeats,
        }
    ]
    name = "match-cpu" if not torch.cuda.is_available() else "match-cuda"
    path = write_results(name, "real-size random weights", rows)
    print(f"medians of {args.repeats} interleaved runs (goal: cold >= 3x); saved to {path}")


if __name__ == "__main__":
    main()
