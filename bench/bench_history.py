"""The saved history's first page: the Studio's index against reading the folder's PNGs.

    python -m bench.bench_history                 # 10,000 records (the issue's figure)
    python -m bench.bench_history --records 2000  # a quicker run

Writes ``--records`` small Studio PNGs (16x16, each with its A1111 text and Studio JSON, as the
Studio saves them) into a scratch history root, in the A1111 layout, and indexes each as it is
saved. Rows, interleaved medians:

- ``index``: ``History.page(owner, 0)``, the first page (24 records, newest first) from SQLite;
- ``rescan``: the same page the way a folder of images is read without an index: list every PNG
  under the owner's folders, read each one's Studio JSON (``read_png_settings``), sort by time.
- ``restart``: a new ``History`` on the same root, then its first page (the index survives).

The ratio is index / rescan. The goal is the index's first page under 0.5 s at 10,000 records.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.common import interleaved_medians, machine_description, write_results
from pipelines.history import LOCAL_OWNER, History
from pipelines.sd3.png_metadata import read_png_settings, save_png

GOAL_SECONDS = 0.5


def fill(history: History, records: int) -> None:
    image = Image.new("RGB", (16, 16), (200, 80, 40))
    folder = history.folder_for(LOCAL_OWNER, "txt2img")
    for seed in range(records):
        settings = {
            "prompt": f"a red fox number {seed}",
            "model_key": "sd35-large-turbo",
            "seed": seed,
            "steps": 4,
            "guidance": 0.0,
            "width": 16,
            "height": 16,
            "job": {"id": f"{seed:012x}", "mode": "txt2img", "index": 0, "source": None},
        }
        path = folder / f"{seed:06d}.png"
        save_png(image, path, f"a red fox number {seed}\nSteps: 4, Seed: {seed}", settings)
        history.add(LOCAL_OWNER, path, settings)


def rescan_first_page(root: Path, per_page: int) -> list[dict]:
    found = []
    for path in root.glob("*-images/*/*.png"):
        _, settings = read_png_settings(path)
        found.append((path.stat().st_mtime, settings))
    found.sort(key=lambda item: item[0], reverse=True)
    return [settings for _, settings in found[:per_page]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench-history-"))
    try:
        history = History(scratch)
        started = time.perf_counter()
        fill(history, args.records)
        fill_seconds = time.perf_counter() - started
        per_page = history.page(LOCAL_OWNER).per_page

        def restart():
            again = History(scratch)
            page = again.page(LOCAL_OWNER)
            again.close()
            return page

        medians = interleaved_medians(
            {
                "index": lambda: history.page(LOCAL_OWNER),
                "rescan": lambda: rescan_first_page(scratch, per_page),
                "restart": restart,
            },
            args.repeats,
        )
        assert [record.seed for record in history.page(LOCAL_OWNER).records] == list(
            range(args.records - 1, args.records - 1 - per_page, -1)
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ratio = medians["index"] / medians["rescan"]
    print(f"machine: {machine_description()}; {args.records} records, first page of {per_page}")
    print(f"{'row':<10}{'median s':>12}")
    for name, seconds in medians.items():
        print(f"{name:<10}{seconds:>12.4f}")
    print(
        f"index / rescan = {ratio:.4f}; index first page {'meets' if medians['index'] < GOAL_SECONDS else 'misses'} "
        f"the {GOAL_SECONDS} s goal; saving and indexing took {fill_seconds / args.records * 1000:.2f} ms per image"
    )
    rows = [
        {"row": name, "records": args.records, "median_seconds": round(seconds, 5)} for name, seconds in medians.items()
    ]
    rows.append({"row": "ratio index/rescan", "value": round(ratio, 5)})
    path = write_results("history-cpu", f"{args.records} records of 16x16 PNGs", rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
