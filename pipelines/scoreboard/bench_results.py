"""What the benchmarks measured: ``bench/results/*.json`` read into Measurements, each with its source.

Nothing here is filled in by hand: a figure comes from a results file, with the machine, the date
and the size of the model it ran; a cell without one says "not measured". A row a benchmark could
not measure is stored as ``{"model": ..., "not_measured": "<one sentence>"}`` and shown as
"not measured: <that sentence>"; exception text never reaches the page.

The folder is read on every call, so new files show up without a restart; a file is parsed again
only when its modification time or size changes.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from pipelines import settings
from pipelines.scoreboard.schema import NOT_MEASURED, Measurement, ScoreboardData

RESULTS_DIR = settings.BENCH_RESULTS_DIR
# Benchmarks whose rows name no model: which Studio model they ran.
BENCHMARK_MODELS = {"caption-cpu": "blip-caption", "batch-caption-cpu": "blip-caption", "match-cpu": "blip-caption"}
# Row fields that describe the setting a row was measured in, and how to print each.
SETTING_FIELDS = {
    "pipeline": "{}",
    "mode": "{}",
    "strategy": "{}",
    "setting": "{}",
    "batch": "batch {}",
    "steps": "{} steps",
    "size": "{}",
}
# Shown for a row written before failures were stored as a sentence: its "error" is exception text.
FAILED_ROW_SENTENCE = "the benchmark stopped on this row before timing it; rerun the benchmark to fill the cell"
MAX_REASON_CHARS = 240


def read_results(directory: Path = RESULTS_DIR) -> tuple[list[dict], list[str]]:
    """Every parseable results file in ``directory`` (name order) and a warning per unreadable one."""
    directory = Path(directory)
    payloads, warnings = [], []
    if not directory.is_dir():
        return payloads, [f"No results folder at {directory}: every measured cell says '{NOT_MEASURED}'."]
    for path in sorted(directory.glob("*.json")):
        try:
            stat = path.stat()
            payloads.append(_read_result_file(str(path), stat.st_mtime_ns, stat.st_size))
        except (OSError, ValueError) as error:
            warnings.append(f"Skipped {path.name}: {error}")
    return payloads, warnings


@functools.lru_cache(maxsize=256)
def _read_result_file(path: str, mtime_ns: int, size: int) -> dict:
    # Keyed by modification time and size: a rewritten file is parsed again, an unchanged one is not.
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(payload, dict):
        raise ValueError("not a results object")
    missing = [key for key in ("benchmark", "machine", "date", "model_size") if not isinstance(payload.get(key), str)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if not isinstance(payload.get("rows", []), list) or not isinstance(payload.get("summary", {}), dict):
        raise ValueError("'rows' must be a list and 'summary' an object")
    return {**payload, "file": Path(path).name}


def _source(payload: dict) -> str:
    return f"{payload['file']} · {payload['machine']} · {payload['date'][:10]} · {payload['model_size']}"


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _seconds_per_image(row: dict) -> float | None:
    """Seconds per image from whichever field the benchmark wrote (a batch's time is divided by its size)."""
    if _number(row.get("seconds_per_image")) is not None:
        return _number(row["seconds_per_image"])
    rate = _number(row.get("images_per_second"))
    if rate:
        return 1.0 / rate
    for name in ("seconds", "studio_seconds"):  # timed one image at a time
        if _number(row.get(name)) is not None:
            return _number(row[name]) / (_number(row.get("batch")) or 1.0)
    return None


def not_measured_reason(row: dict) -> str | None:
    """Why a row holds no figure, as one sentence without a trailing full stop; None for a measured row.

    ``not_measured`` is the sentence a benchmark stored; ``skipped`` is the refusal sentence of a mode
    the machine cannot run (bench/gpu.py). A legacy ``error`` holds exception text, which the page
    never shows: it gets FAILED_ROW_SENTENCE instead.
    """
    for name in ("not_measured", "skipped"):
        text = row.get(name)
        if isinstance(text, str) and text.strip():
            first_line = text.strip().splitlines()[0]
            return first_line[:MAX_REASON_CHARS].rstrip(" .")
    if "error" in row:
        return FAILED_ROW_SENTENCE
    return None


def _setting(row: dict, benchmark: str) -> str:
    parts = [template.format(row[name]) for name, template in SETTING_FIELDS.items() if row.get(name) is not None]
    return ", ".join(parts) or benchmark


def measurements(data: ScoreboardData | None, payloads: list[dict]) -> list[Measurement]:
    """One Measurement per timed row, per round-trip category and per row a benchmark could not measure."""
    owners = {key: model.name for model in (data.models if data else ()) for key in model.studio_models}
    found = []
    for payload in payloads:
        source = _source(payload)
        for category_model, categories in payload.get("summary", {}).items():
            if not isinstance(categories, dict):
                continue
            for category, stats in categories.items():
                mean = _number(stats.get("mean")) if isinstance(stats, dict) else None
                if mean is None:
                    continue
                std = _number(stats.get("std")) or 0.0
                text = f"{mean:.3f} ± {std:.3f} (n={stats.get('n', '?')})"
                found.append(
                    Measurement(
                        model=owners.get(category_model, category_model),
                        studio_model=category_model,
                        setting=f"round trip: {category}",
                        machine=payload["machine"],
                        seconds_per_image=None,
                        peak_gib=None,
                        adherence=text,
                        source=source,
                    )
                )
        # A round-trip evaluation's rows time prompt → image → caption together: its summary is what counts.
        rows = [] if payload["benchmark"] == "roundtrip-eval" else payload.get("rows", [])
        for row in rows:
            if not isinstance(row, dict):
                continue
            reason = not_measured_reason(row)
            seconds = None if reason else _seconds_per_image(row)
            peak = None if reason else _number(row.get("peak_gib"))
            if reason is None and seconds is None and peak is None:
                continue  # a speed-up comparison, not a per-image figure
            studio_model = str(row.get("model") or BENCHMARK_MODELS.get(payload["benchmark"], payload["benchmark"]))
            found.append(
                Measurement(
                    model=owners.get(studio_model, studio_model),
                    studio_model=studio_model,
                    setting=_setting(row, payload["benchmark"]),
                    machine=payload["machine"],
                    seconds_per_image=seconds,
                    peak_gib=peak,
                    adherence=None,
                    source=source,
                    not_measured=reason,
                )
            )
    return found
