"""The scoreboard page: the published ranking of BLIP base against SD3.5 Large, checked against the Studio.

Three sources meet here, and each cell says which one it came from:

- ``assets/scoreboard.json``: the comparison page's ranking, feature table, terms and each model's
  capabilities with the claims published for them (data, not code: edit the file and the order
  changes). Read and validated here;
- the Studio's own code and config files, which check those claims at run time
  (pipelines/scoreboard/claims.py);
- ``bench/results/*.json``: what the benchmarks measured, with the machine, the date and the size
  of the model they ran (pipelines/scoreboard/bench_results.py).

The shared types live in pipelines/scoreboard/schema.py, below all three.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines import settings
from pipelines.scoreboard.bench_results import RESULTS_DIR, measurements, read_results
from pipelines.scoreboard.claims import CLAIM_CHECKS, check_claims
from pipelines.scoreboard.schema import (
    CAPABILITY_STATUSES,
    NOT_MEASURED,
    STUDIO_TAB_IDS,
    Capability,
    Claim,
    Measurement,
    RankedModel,
    ScoreboardData,
    ScoreboardDataError,
)

ROOT = Path(__file__).resolve().parents[2]
SCOREBOARD_PATH = ROOT / "assets" / "scoreboard.json"


@dataclass
class ScoreboardReport:
    """Everything the tab and the `/scoreboard` API show."""

    title: str = ""
    verdict: str = ""
    terms: dict[str, str] = field(default_factory=dict)
    shared_scale: str = ""
    ranking: list[dict] = field(default_factory=list)
    capabilities: list[dict] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)
    measured: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# 1. The data file --------------------------------------------------------------------------------


def load_scoreboard(path: Path = SCOREBOARD_PATH) -> ScoreboardData:
    """Read and validate the data file; ScoreboardDataError with a sentence saying what to fix."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise ScoreboardDataError(
            f"The scoreboard data file {path} is missing: restore it (git checkout -- assets/scoreboard.json)."
        ) from None
    return _load_scoreboard_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load_scoreboard_cached(path: str, mtime_ns: int, size: int) -> ScoreboardData:
    # mtime and size are part of the key so that an edited file is read again.
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ScoreboardDataError(
            f"The scoreboard data file {path} is not valid JSON ({error}); fix it or restore it from git."
        ) from None
    try:
        return _parse_scoreboard(raw)
    except (KeyError, TypeError, ValueError) as error:
        detail = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise ScoreboardDataError(f"The scoreboard data file {path} is incomplete: {detail}.") from None


def _parse_scoreboard(raw: dict) -> ScoreboardData:
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list) or len(raw["models"]) < 2:
        raise ValueError("it needs a 'models' list with at least two models")
    models = []
    for entry in raw["models"]:
        score, score_max = entry["score"], entry["score_max"]
        if not all(isinstance(value, int | float) and math.isfinite(value) for value in (score, score_max)):
            raise ValueError(f"{entry['name']}: score and score_max must be numbers")
        if not 0 <= score <= score_max:
            raise ValueError(f"{entry['name']}: score {score} is not between 0 and {score_max}")
        capabilities = []
        for item in entry["capabilities"]:
            tab, status = item["tab"], item["status"]
            if tab is not None and tab not in STUDIO_TAB_IDS:
                raise ValueError(f"capability {item['name']!r}: tab {tab!r} is not one of {', '.join(STUDIO_TAB_IDS)}")
            if status not in CAPABILITY_STATUSES:
                raise ValueError(
                    f"capability {item['name']!r}: status {status!r} is not one of {', '.join(CAPABILITY_STATUSES)}"
                )
            if (tab is None) != (status == "not built yet"):
                raise ValueError(f"capability {item['name']!r}: only a capability without a tab is 'not built yet'")
            claims = tuple(Claim(text=claim["text"], check=claim.get("check")) for claim in item.get("claims", []))
            for claim in claims:
                if claim.check is not None and claim.check not in CLAIM_CHECKS:
                    raise ValueError(f"claim {claim.text!r}: unknown check {claim.check!r}")
            note = item.get("status_note", "")
            if not isinstance(note, str):
                raise ValueError(f"capability {item['name']!r}: status_note must be a sentence")
            capabilities.append(Capability(item["name"], tab, status, claims, note))
        models.append(
            RankedModel(
                key=entry["key"],
                name=entry["name"],
                repo_id=entry["repo_id"],
                studio_models=tuple(entry.get("studio_models", ())),
                score=score,
                score_max=score_max,
                features=dict(entry["features"]),
                capabilities=tuple(capabilities),
            )
        )
    terms = raw.get("terms", {})
    if not isinstance(terms, dict) or not all(isinstance(text, str) for text in terms.values()):
        raise ValueError("'terms' must map each term of the page to one sentence")
    return ScoreboardData(
        title=raw["title"],
        features=tuple(raw["features"]),
        verdict=raw["verdict"],
        models=tuple(models),
        terms=dict(terms),
        shared_scale=str(raw.get("shared_scale", "")),
    )


def ranked(data: ScoreboardData) -> list[RankedModel]:
    """The models, best first: by score as a share of its maximum, then by name for ties."""
    return sorted(data.models, key=lambda model: (-model.score / model.score_max, model.name))


def ranking_rows(data: ScoreboardData) -> list[dict]:
    """One dict per model, best first: rank, name, leader flag and every feature of the file."""
    rows = []
    best = ranked(data)
    for rank, model in enumerate(best, start=1):
        features = dict(model.features)
        features["UnfragileRank"] = f"{model.score:g}/{model.score_max:g}"
        rows.append(
            {
                "rank": rank,
                "model": model.name,
                "repo_id": model.repo_id,
                "score": model.score,
                "score_max": model.score_max,
                "leader": model.score * best[0].score_max == best[0].score * model.score_max,
                "features": {name: features.get(name, "") for name in data.features},
            }
        )
    return rows


def capability_rows(data: ScoreboardData) -> list[dict]:
    """Every capability of every model, with the tab that shows it and whether it runs here."""
    return [
        {
            "model": model.name,
            "capability": capability.name,
            "tab": capability.tab,
            "status": capability.status,
            "status_note": capability.status_note,
            "claims": [claim.text for claim in capability.claims],
        }
        for model in data.models
        for capability in model.capabilities
    ]


# 2. Measured at a glance ---------------------------------------------------------------------


SUMMARY_COLUMNS = ("GPU latency", "CPU latency", "GPU peak memory", "round-trip adherence")


def _on_gpu(machine: str) -> bool:
    return "CUDA" in machine or "NVIDIA" in machine or "GPU" in machine


def summary_rows(data: ScoreboardData, measured: list[Measurement]) -> list[dict]:
    """Per ranked model, the first measurement of its main Studio model in each column, or 'not measured'."""
    rows = []
    for model in ranked(data):
        main = model.studio_models[0] if model.studio_models else None
        mine = [item for item in measured if item.studio_model == main]
        picks = {
            "GPU latency": next((m for m in mine if m.seconds_per_image is not None and _on_gpu(m.machine)), None),
            "CPU latency": next((m for m in mine if m.seconds_per_image is not None and not _on_gpu(m.machine)), None),
            "GPU peak memory": next((m for m in mine if m.peak_gib is not None and _on_gpu(m.machine)), None),
            # The category "all" when the evaluation has one, else its first category.
            "round-trip adherence": next(
                (m for m in mine if m.adherence is not None and m.setting == "round trip: all"),
                next((m for m in mine if m.adherence is not None), None),
            ),
        }
        cells = {}
        for column, pick in picks.items():
            if pick is None:
                cells[column] = NOT_MEASURED
                continue
            if column == "GPU peak memory":
                value = f"{pick.peak_gib:.1f} GiB"
            elif column == "round-trip adherence":
                value = pick.adherence
            else:
                value = f"{pick.seconds_per_image:.3g} s/image"
            cells[column] = f"{value} ({pick.setting}) — {pick.source}"
        rows.append({"model": model.name, "studio_model": main, **cells})
    return rows


# 3. Everything together -------------------------------------------------------------------------


def build_report(
    data_path: Path = SCOREBOARD_PATH, results_dir: Path = RESULTS_DIR, *, with_claims: bool = True
) -> ScoreboardReport:
    """The whole scoreboard; a broken data file or results file becomes a warning, never an exception."""
    report = ScoreboardReport()
    payloads, report.warnings = read_results(results_dir)
    evaluations = settings.EVALUATION_RESULTS_DIR
    if results_dir == RESULTS_DIR and evaluations != RESULTS_DIR and evaluations.is_dir():  # none run yet: no folder
        extra, extra_warnings = read_results(evaluations)  # the Round trip tab's evaluations
        payloads += extra
        report.warnings += extra_warnings
    # A row a benchmark could not measure is no warning: it is a measurement row that says
    # "not measured: <why>" (pipelines/scoreboard/bench_results.py), never a toast with exception text.
    try:
        data = load_scoreboard(data_path)
    except ScoreboardDataError as error:
        data = None
        report.error = str(error)
        report.warnings.insert(0, str(error))
    measured = measurements(data, payloads)
    report.measured = [asdict(item) for item in measured]
    if data is None:
        return report
    report.title, report.verdict = data.title, data.verdict
    report.terms, report.shared_scale = dict(data.terms), data.shared_scale
    report.ranking = ranking_rows(data)
    report.capabilities = capability_rows(data)
    report.summary = summary_rows(data, measured)
    if with_claims:
        report.claims = [asdict(item) for item in check_claims(data, measured)]
    return report
