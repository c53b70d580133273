"""BLIP's CPU precision variants against fp32, in process and end to end through ``python app.py``.

    python -m bench.bench_blip_precision [--repeats 5] [--skip-app] [--skip-variants]

(a) In process, real-size BLIP base with random weights: every variant of
``pipelines.blip.precision`` captions the same photo (greedy, exactly 20 new
tokens, the feature cache off), timed in turn with fp32; prints the median
seconds, the ratio to fp32, the relative L2 deviation of the first decode
step's logits from fp32's, and whether the 20 greedy tokens equal fp32's.

(b) End to end: the same random model is saved with ``save_pretrained`` and
served by ``python app.py --model blip-caption=DIR --precision auto``; each
call sends a fresh image (the photo with a few random pixels changed, so the
Studio's feature cache never answers) to ``/caption`` through gradio_client,
interleaved with a bare fp32 ``model.generate`` in this process on the same
image file. Prints medians and the ratio (the goal: at most 0.5).

Rows go to bench/results/blip-precision-cpu.json. Deviations are on random
weights: perceptual caption quality with the real weights is not measured here.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import interleaved_medians, machine_description, real_size_blip_captioner, write_results
from pipelines.blip.captioner import BlipCaptioner, CaptionRequest
from pipelines.blip.feature_cache import ImageFeatureCache
from pipelines.blip.precision import VARIANTS, apply_blip_precision, cpu_has_native_bf16

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "assets" / "examples" / "chelsea.png"
TOKENS = 20
REQUEST = CaptionRequest(strategy="greedy", min_new_tokens=TOKENS, max_new_tokens=TOKENS)


def first_step_logits(captioner: BlipCaptioner, pixel_values: torch.Tensor) -> torch.Tensor:
    """The decoder's logits for the first caption token, in fp32."""
    with torch.inference_mode():
        embeds = captioner.encode_pixels(pixel_values, cache=False)
        prompt = captioner.prompt_ids("")
        logits = captioner.model.text_decoder(input_ids=prompt, encoder_hidden_states=embeds).logits
    return logits[:, -1].float()


def relative_l2(values: torch.Tensor, reference: torch.Tensor) -> float:
    return float((values - reference).norm() / reference.norm())


def variant_rows(repeats: int) -> list[dict]:
    """(a) Every variant against fp32, in this process."""
    reference = real_size_blip_captioner()
    reference.feature_cache = ImageFeatureCache(max_entries=0)  # every call encodes the image
    pixel_values = reference.pixel_values([Image.open(PHOTO).convert("RGB")])
    captioners = {"fp32": reference}
    for name in VARIANTS:
        if name != "fp32":
            model = apply_blip_precision(copy.deepcopy(reference.model), name)
            captioners[name] = BlipCaptioner(
                model, reference.processor, f"random weights, {name}", reference.feature_cache
            )

    reference_logits = first_step_logits(reference, pixel_values)
    reference_tokens = reference.caption_pixels(pixel_values, REQUEST)[0].captions[0].text

    def bare_generate():
        with torch.inference_mode():
            return reference.model.generate(pixel_values=pixel_values, min_new_tokens=TOKENS, max_new_tokens=TOKENS)

    functions = {"bare fp32 generate": bare_generate}
    functions.update({name: (lambda c=c: c.caption_pixels(pixel_values, REQUEST)) for name, c in captioners.items()})
    medians = interleaved_medians(functions, repeats)

    print(f"{'variant':<20} {'median s':>9} {'vs fp32':>8} {'logit dev':>10}  same tokens as fp32")
    rows = []
    for name, seconds in medians.items():
        captioner = captioners.get(name)
        if captioner is None:
            deviation, same = 0.0, True
        else:
            deviation = relative_l2(first_step_logits(captioner, pixel_values), reference_logits)
            same = captioner.caption_pixels(pixel_values, REQUEST)[0].captions[0].text == reference_tokens
        ratio = seconds / medians["fp32"]
        print(f"{name:<20} {seconds:>9.3f} {ratio:>7.2f}x {deviation:>9.2%}  {'yes' if same else 'no'}")
        rows.append(
            {
                "part": "in-process",
                "variant": name,
                "seconds": seconds,
                "ratio_vs_fp32": ratio,
                "first_step_logit_relative_l2": deviation,
                "same_greedy_tokens_as_fp32": same,
                "repeats": repeats,
            }
        )
    return rows


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fresh_images(photo: Image.Image, count: int, folder: Path) -> list[Path]:
    """``count`` PNG files of the photo, each with 16 random pixels changed."""
    generator = np.random.default_rng(0)
    base = np.asarray(photo)
    paths = []
    for index in range(count):
        pixels = base.copy()
        rows = generator.integers(0, pixels.shape[0], 16)
        columns = generator.integers(0, pixels.shape[1], 16)
        pixels[rows, columns] = generator.integers(0, 256, (16, 3), dtype=np.uint8)
        path = folder / f"fresh-{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def app_rows(repeats: int, precision: str) -> list[dict]:
    """(b) /caption through ``python app.py`` against a bare fp32 generate, interleaved."""
    from gradio_client import Client, handle_file

    captioner = real_size_blip_captioner()
    processor, model = captioner.processor, captioner.model
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model_dir = folder / "blip"
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        images = fresh_images(Image.open(PHOTO).convert("RGB"), 2 * repeats + 2, folder)
        port = _free_port()
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        command = [sys.executable, "app.py", "--model", f"blip-caption={model_dir}", "--no-preload"]
        command += ["--precision", precision, "--port", str(port), "--no-train"]
        log_path = folder / "app.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"app.py exited:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url + "config", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"app.py did not start:\n{log_path.read_text()[-3000:]}") from None
                    time.sleep(0.5)
            client = Client(url, verbose=False)
            arguments = {"strategy": "greedy", "min_new_tokens": TOKENS, "max_new_tokens": TOKENS}

            inner: list[float] = []  # the seconds the app itself reports for each timed caption

            def studio(path: Path):
                result = client.predict(handle_file(str(path)), **arguments, api_name="/caption")
                inner.append(result[2]["seconds"])
                return result

            def bare(path: Path):
                with torch.inference_mode():
                    inputs = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")
                    output = model.generate(**inputs, min_new_tokens=TOKENS, max_new_tokens=TOKENS)
                    return processor.batch_decode(output, skip_special_tokens=True)

            studio(images[0])  # warm-up: loads the model in the app
            bare(images[1])
            inner.clear()
            label = client.predict(api_name="/system")[4].get("blip_precision", {}).get("label")
            times: dict[str, list[float]] = {"bare": [], "studio": []}
            for index in range(repeats):
                for name, function in (("bare", bare), ("studio", studio)):
                    started = time.perf_counter()
                    function(images[2 + 2 * index + (name == "studio")])
                    times[name].append(time.perf_counter() - started)
        finally:
            server.terminate()
            server.wait(timeout=30)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["studio"] / medians["bare"]
    print(f"\nend to end: {label}")
    print(f"{'bare fp32 generate':<28} {medians['bare']:>7.3f}s")
    print(f"{'/caption via app.py':<28} {medians['studio']:>7.3f}s   ratio {ratio:.2f} (goal <= 0.50)")
    inside = statistics.median(inner)
    print(f"  (inside the app: {inside:.3f}s median; HTTP, upload, decoding and the queue: the rest)")
    return [
        {
            "part": "end-to-end",
            "precision_flag": precision,
            "precision": label,
            "bare_fp32_generate_seconds": medians["bare"],
            "app_caption_seconds": medians["studio"],
            "app_reported_caption_seconds": inside,
            "ratio": ratio,
            "bare_all": times["bare"],
            "app_all": times["studio"],
            "repeats": repeats,
        }
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="auto", help="the app's --precision for part (b)")
    parser.add_argument("--skip-variants", action="store_true", help="only the end-to-end part")
    parser.add_argument("--skip-app", action="store_true", help="only the in-process part")
    args = parser.parse_args(argv)

    print(
        f"BLIP base, real config, random weights, greedy {TOKENS} tokens; {machine_description()}; "
        f"native bf16: {cpu_has_native_bf16()}; torch {torch.__version__}"
    )
    rows = []
    if not args.skip_variants:
        rows += variant_rows(args.repeats)
    if not args.skip_app:
        rows += app_rows(args.repeats, args.precision)
    path = write_results("blip-precision-cpu", "BLIP base, real-size random weights (224M parameters)", rows)
    print(f"medians of {args.repeats} interleaved runs; saved to {path}")


if __name__ == "__main__":
    main()
