"""Batch captioning throughput on real-size BLIP base (random weights), CPU.

    python -m bench.bench_batch_caption [--images 16] [--batch-size 8]

1. In-process: ``caption_files`` (loader workers + true batches) against
   captioning one image at a time with ``captioner.caption``.
2. The command line in two processes (``torch.distributed.run``, as
   ``accelerate launch`` starts them) against one process, on the same folder
   and a saved copy of the same model. Both sides load the model, so the
   times include start-up, as a user would see them.

Beam 3, exactly 20 new tokens. Prints images/s and ratios; the goal for (1) is >= 1.3x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.common import machine_description, real_size_blip_captioner, write_results
from pipelines.blip.batch_caption import caption_files, find_images
from pipelines.blip.captioner import CaptionRequest

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
ROOT = Path(__file__).resolve().parent.parent
REQUEST = CaptionRequest(strategy="beam", num_beams=3, min_new_tokens=20, max_new_tokens=20)


def make_folder(folder: Path, count: int) -> None:
    photos = sorted(path for path in EXAMPLES.iterdir() if path.suffix in (".png", ".jpg"))
    for index in range(count):
        source = photos[index % len(photos)]
        shutil.copy(source, folder / f"{index:03d}{source.suffix}")


def run_cli(folder: Path, model_dir: Path, processes: int, batch_size: int) -> float:
    for stale in list(folder.glob("*.txt")) + list(folder.glob("metadata.jsonl")):
        stale.unlink()
    command = [sys.executable, "-m"]
    if processes > 1:
        command += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m"]
    command += ["pipelines.blip.caption_folder", str(folder), "--model", str(model_dir), "--device", "cpu"]
    command += ["--batch-size", str(batch_size), "--strategy", "beam", "--num-beams", "3"]
    command += ["--min-new-tokens", "20", "--max-new-tokens", "20"]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-processes", action="store_true", help="only the in-process comparison")
    args = parser.parse_args(argv)

    captioner = real_size_blip_captioner()
    print(
        f"BLIP base, real config, random weights, fp32, {machine_description()}; {args.images} images, beam 3, 20 tokens"
    )
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "images"
        folder.mkdir()
        make_folder(folder, args.images)
        files = find_images(folder)

        # 1. One at a time vs batched, in one process.
        captioner.caption(Image.open(files[0]).convert("RGB"), REQUEST)  # warm-up
        started = time.perf_counter()
        for path in files:
            captioner.feature_cache.clear()  # the photos repeat; a dataset's images would not
            captioner.caption(Image.open(path).convert("RGB"), REQUEST)
        one_by_one = time.perf_counter() - started
        started = time.perf_counter()
        for _ in caption_files(captioner, files, folder, REQUEST, batch_size=args.batch_size, num_workers=2):
            pass
        batched = time.perf_counter() - started
        ratio = one_by_one / batched
        print(f"one at a time : {one_by_one:7.1f} s  {args.images / one_by_one:6.2f} img/s")
        print(
            f"batched ({args.batch_size:>2})  : {batched:7.1f} s  {args.images / batched:6.2f} img/s   speed-up {ratio:.2f}x"
        )
        rows.append(
            {"comparison": "batched vs one at a time", "baseline_s": one_by_one, "studio_s": batched, "speedup": ratio}
        )

        # 2. Two processes vs one, through the command line.
        if not args.skip_processes:
            model_dir = Path(scratch) / "blip"
            captioner.model.save_pretrained(model_dir)
            captioner.processor.save_pretrained(model_dir)
            del captioner
            one = run_cli(folder, model_dir, 1, args.batch_size)
            two = run_cli(folder, model_dir, 2, args.batch_size)
            print(f"CLI, 1 process : {one:7.1f} s (model load included)")
            print(f"CLI, 2 processes: {two:6.1f} s   speed-up {one / two:.2f}x")
            rows.append(
                {"comparison": "2 processes vs 1 (CLI)", "baseline_s": one, "studio_s": two, "speedup": one / two}
            )
    path = write_results("batch-caption-cpu", "real-size random weights", rows)
    print(f"saved to {path}")


if __name__ == "__main__":
    main()
