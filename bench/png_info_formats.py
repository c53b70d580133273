"""PNG Info against sd-parsers on every sample in tests/data/png-info/ (a comparison, not a test).

sd-parsers is a development-only comparison (``pip install sd-parsers``; not in requirements.txt).
For each format: files, files read (any settings found), and fields equal to what the file holds
(prompt, negative, seed, steps, cfg, sampler, size, model; expected.json), Studio vs sd-parsers.

    python -m bench.png_info_formats
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from pipelines.sd3.png_info import read_generation_settings

SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "data" / "png-info"
COMPARED = ("prompt", "negative", "seed", "steps", "cfg", "sampler", "size", "model")


def expected_fields(entry: dict) -> dict:
    size = f"{entry['width']}x{entry['height']}" if entry.get("width") else None
    return {
        "prompt": entry.get("prompt"),
        "negative": entry.get("negative_prompt"),
        "seed": entry.get("seed"),
        "steps": entry.get("steps"),
        "cfg": entry.get("guidance"),
        "sampler": entry.get("sampler"),
        "size": size,
        "model": entry.get("model_given"),
    }


def studio_fields(path: Path) -> dict | None:
    info = read_generation_settings(path)
    if not info["found"]:
        return None
    return expected_fields(info) | {"negative": info["negative_prompt"] or None, "prompt": info["prompt"] or None}


def _number(value, kind):
    try:
        return kind(float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def sd_parsers_fields(path: Path, manager) -> dict | None:
    """sd-parsers' reading, in the same fields: its first sampler's values, else its metadata's."""
    result = manager.parse(str(path))
    if result is None or not result.samplers:
        return None
    sampler = result.samplers[0]
    params = {**result.metadata, **sampler.parameters}
    width = params.get("width") or params.get("Size-1")
    height = params.get("height") or params.get("Size-2")
    if width is None and isinstance(params.get("Size"), str) and "x" in params["Size"]:
        width, height = params["Size"].split("x", 1)
    if width is None and isinstance(params.get("resolution"), str):
        digits = [part for part in params["resolution"].strip("()").replace(" ", "").split(",") if part]
        width, height = digits if len(digits) == 2 else (None, None)
    scheduler = params.get("scheduler")
    name = " ".join(str(part) for part in (sampler.name, scheduler) if part)
    return {
        "prompt": result.full_prompt or None,
        "negative": result.full_negative_prompt or None,
        "seed": _number(params.get("seed"), int),
        "steps": _number(params.get("steps"), int),
        "cfg": _number(params.get("cfg_scale"), float),
        "sampler": name or None,
        "size": f"{_number(width, int)}x{_number(height, int)}" if width and height else None,
        "model": sampler.model.name if sampler.model else None,
    }


def main() -> int:
    try:
        from sd_parsers import ParserManager
        from sd_parsers.extractors import Eagerness
    except ImportError:
        print("sd-parsers is not installed; pip install sd-parsers (a development comparison only)")
        return 1
    manager = ParserManager(eagerness=Eagerness.EAGER)  # EAGER: its alpha-channel (stealth) reader too
    expected = json.loads((SAMPLES / "expected.json").read_text())
    table: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    timings = {"studio": 0.0, "sd-parsers": 0.0}
    for name, entry in expected.items():
        row = table[entry["format"]]
        row["files"] += 1
        if not entry["found"] and "graph" not in entry:
            row["no settings"] += 1
            continue
        # A ComfyUI graph: what its nodes say (the Studio's graph reader is another module's, wired in later).
        truth = expected_fields(entry.get("graph", entry))
        for reader, read in (
            ("studio", lambda path: studio_fields(path)),
            ("sd-parsers", lambda path: sd_parsers_fields(path, manager)),
        ):
            start = time.perf_counter()
            try:
                got = read(SAMPLES / name)
            except Exception as error:  # noqa: BLE001 - a comparison: a reader's crash counts as "not read"
                print(f"{reader} failed on {name}: {type(error).__name__}: {error}", file=sys.stderr)
                got = None
            timings[reader] += time.perf_counter() - start
            if got is None:
                continue
            row[f"{reader} read"] += 1
            row[f"{reader} equal"] += sum(got[field] == truth[field] for field in COMPARED)
            row["fields"] += len(COMPARED) if reader == "studio" else 0
    header = "| format | files | Studio read | Studio fields equal | sd-parsers read | sd-parsers fields equal |"
    print(header)
    print("|---|---|---|---|---|---|")
    totals = defaultdict(int)
    for fmt in sorted(table):
        row = table[fmt]
        settings_files = row["files"] - row["no settings"]
        fields = settings_files * len(COMPARED)
        for key in ("files", "studio read", "studio equal", "sd-parsers read", "sd-parsers equal"):
            totals[key] += row[key]
        totals["fields"] += fields
        totals["settings files"] += settings_files
        if settings_files == 0:
            print(f"| {fmt} | {row['files']} | (no settings: a sentence naming the tool) | | | |")
            continue
        print(
            f"| {fmt} | {row['files']} | {row['studio read']}/{settings_files} | {row['studio equal']}/{fields} "
            f"| {row['sd-parsers read']}/{settings_files} | {row['sd-parsers equal']}/{fields} |"
        )
    print(
        f"| **all** | {totals['files']} | {totals['studio read']}/{totals['settings files']} "
        f"| {totals['studio equal']}/{totals['fields']} | {totals['sd-parsers read']}/{totals['settings files']} "
        f"| {totals['sd-parsers equal']}/{totals['fields']} |"
    )
    print(f"\ntime: Studio {timings['studio'] * 1000:.0f} ms, sd-parsers {timings['sd-parsers'] * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
