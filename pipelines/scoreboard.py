"""The scoreboard: the published ranking of BLIP base against SD3.5 Large, checked against the Studio.

Three sources meet here, and each cell says which one it came from:

- ``assets/scoreboard.json``: the comparison page's ranking, feature table and
  each model's capabilities with the claims published for them (data, not code:
  edit the file and the order changes);
- the Studio's own code and config files, which check those claims at run time
  (meta-device parameter counts, config values, the installed transformers);
- ``bench/results/*.json``: what the benchmarks measured, with the machine, the
  date and the size of the model they ran. Nothing is filled in by hand: a cell
  without a results file says "not measured".

The results folder is read on every call, so new files show up without a
restart; a file is parsed again only when its modification time or size changes.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines import settings
from pipelines.catalog import CATALOG, MODEL_CONFIGS_DIR

ROOT = Path(__file__).resolve().parent.parent
SCOREBOARD_PATH = ROOT / "assets" / "scoreboard.json"
RESULTS_DIR = settings.BENCH_RESULTS_DIR

# Every tab a capability may link to: the ids app.py gives its gr.Tab()s.
STUDIO_TAB_IDS = ("caption", "batch", "match", "attention", "generate", "system", "roundtrip", "train", "scoreboard")
# "works here": runs in `python app.py --tiny` on a CPU; the other two need more than this machine has.
CAPABILITY_STATUSES = ("works here", "needs a GPU", "needs the real weights", "not built yet")
NOT_MEASURED = "not measured"
NOT_CHECKED = "not checked"
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


class ScoreboardDataError(ValueError):
    """The scoreboard data file is missing or does not hold what the tab needs."""


@dataclass(frozen=True)
class Claim:
    text: str
    check: str | None  # the name of a check in CLAIM_CHECKS, or None when the Studio cannot check it


@dataclass(frozen=True)
class Capability:
    name: str
    tab: str | None  # a STUDIO_TAB_IDS entry, or None while no tab shows it
    status: str  # one of CAPABILITY_STATUSES
    claims: tuple[Claim, ...]


@dataclass(frozen=True)
class RankedModel:
    key: str
    name: str
    repo_id: str
    studio_models: tuple[str, ...]  # catalog keys whose measurements count for this model
    score: float
    score_max: float
    features: dict[str, Any]
    capabilities: tuple[Capability, ...]


@dataclass(frozen=True)
class ScoreboardData:
    title: str
    features: tuple[str, ...]
    verdict: str
    models: tuple[RankedModel, ...]  # as listed in the file; see ranked()


@dataclass(frozen=True)
class ClaimCheck:
    model: str
    capability: str
    published: str
    studio: str  # what the Studio found, with the numbers
    verdict: str  # "agrees", "disagrees", "not measured" or "not checked"
    how: str  # where the Studio's figure comes from


@dataclass(frozen=True)
class Measurement:
    model: str  # the scoreboard model's name, or the Studio key when no scoreboard model claims it
    studio_model: str
    setting: str
    machine: str
    seconds_per_image: float | None
    peak_gib: float | None
    adherence: str | None  # round-trip score "mean ± std (n)" for one category
    source: str  # file · machine · date · model size

    def cells(self) -> list[str]:
        return [
            self.model,
            self.studio_model,
            self.setting,
            self.machine,
            NOT_MEASURED if self.seconds_per_image is None else f"{self.seconds_per_image:.3g} s",
            NOT_MEASURED if self.peak_gib is None else f"{self.peak_gib:.1f} GiB",
            NOT_MEASURED if self.adherence is None else self.adherence,
            self.source,
        ]


@dataclass
class ScoreboardReport:
    """Everything the tab and the `/scoreboard` API show."""

    title: str = ""
    verdict: str = ""
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
            capabilities.append(Capability(name=item["name"], tab=tab, status=status, claims=claims))
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
    return ScoreboardData(
        title=raw["title"], features=tuple(raw["features"]), verdict=raw["verdict"], models=tuple(models)
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
            "claims": [claim.text for claim in capability.claims],
        }
        for model in data.models
        for capability in model.capabilities
    ]


# 2. Claims against the Studio's own figures -------------------------------------------------------


@functools.cache
def _blip_architecture() -> dict:
    """BLIP base built from its real config on the meta device: counts and the decoder's shape."""
    from pipelines.architectures import component_config

    model = _blip_meta_model()
    config = component_config("blip-caption", "model")
    return {
        "parameters": sum(tensor.numel() for tensor in model.parameters()),
        "state_dict": sum(tensor.numel() for tensor in model.state_dict().values()),
        "decoder_layers": config["text_config"]["num_hidden_layers"],
        "decoder_class": type(model.text_decoder).__name__,
        "cross_attention_layers": sum(
            1 for layer in model.text_decoder.bert.encoder.layer if getattr(layer, "crossattention", None) is not None
        ),
        "image_size": config["vision_config"]["image_size"],
        "patch_size": config["vision_config"]["patch_size"],
    }


@functools.cache
def _transformer_elements(key: str) -> int:
    """State-dict elements of an SD3.5 MMDiT (with its pos_embed table), on the meta device."""
    from pipelines.architectures import build_on_meta, measure_module

    return measure_module(build_on_meta(key, "transformer")).checkpoint_elements


def _verdict(agrees: bool) -> str:
    return "agrees" if agrees else "disagrees"


def _check_blip_size(_: list[Measurement]) -> tuple[str, str, str]:
    facts = _blip_architecture()
    agrees = round(facts["parameters"] / 1e6) == 139 and facts["decoder_layers"] == 6
    found = (
        f"{facts['parameters'] / 1e6:.1f}M unique parameters ({facts['state_dict'] / 1e6:.1f}M state-dict elements, "
        f"the LM head is tied); text decoder: {facts['decoder_layers']}-layer BERT-style {facts['decoder_class']}"
    )
    return found, _verdict(agrees), "real config on the meta device; text_config.num_hidden_layers"


def _check_blip_input_size(_: list[Measurement]) -> tuple[str, str, str]:
    config = json.loads(
        (MODEL_CONFIGS_DIR / CATALOG["blip-caption"].config_dir / "preprocessor_config.json").read_text()
    )
    size = config["size"]
    side = size if isinstance(size, int) else size.get("height")
    return f"preprocessor size {side}×{side}", _verdict(side == 384), "preprocessor_config.json"


def _check_image_to_text(_: list[Measurement]) -> tuple[str, str, str]:
    import transformers
    from transformers.pipelines import SUPPORTED_TASKS

    if "image-to-text" in SUPPORTED_TASKS:
        return "the task exists", "agrees", f"transformers {transformers.__version__} SUPPORTED_TASKS"
    found = f"transformers {transformers.__version__} has no 'image-to-text' pipeline task"
    return found, "disagrees", "transformers.pipelines.SUPPORTED_TASKS at run time"


def _check_cross_attention_layers(_: list[Measurement]) -> tuple[str, str, str]:
    layers = _blip_architecture()["cross_attention_layers"]
    return f"{layers} decoder layers with cross-attention", _verdict(layers == 6), "real config on the meta device"


def _check_patch_grid(_: list[Measurement]) -> tuple[str, str, str]:
    facts = _blip_architecture()
    side = facts["image_size"] // facts["patch_size"]
    found = f"{facts['image_size']} px / {facts['patch_size']} px patches = {side}×{side} grid (+1 CLS token)"
    return found, _verdict(side == 24), "vision_config in config.json"


def _parameter_check(key: str, published_billions: float) -> tuple[str, str, str]:
    elements = _transformer_elements(key)
    agrees = round(elements / 1e9, 1) == published_billions
    found = f"MMDiT: {elements:,} state-dict elements ({elements / 1e9:.2f}B)"
    return found, _verdict(agrees), "real transformer config on the meta device"


def _resolution_check(key: str, low_mp: float, high_mp: float) -> tuple[str, str, str]:
    preset = CATALOG[key].image_preset
    low, high = preset.min_pixels / 2**20, preset.max_pixels / 2**20
    # The Studio's bounds allow 10% over a round megapixel; the claim holds if it sits inside them.
    agrees = math.isclose(low, low_mp, rel_tol=0.01) and high_mp <= high <= high_mp * 1.1
    return f"Studio preset: {low:.2f}–{high:.2f} MP", _verdict(agrees), f"pipelines.catalog preset for {key}"


def _check_turbo_steps(_: list[Measurement]) -> tuple[str, str, str]:
    steps = CATALOG["sd35-large-turbo"].image_preset.steps
    return f"Studio preset: {steps} steps", _verdict(steps == 4), "pipelines.catalog preset for sd35-large-turbo"


def _check_turbo_speed(measured: list[Measurement]) -> tuple[str, str, str]:
    # Compare like with like: the same machine and memory mode, real-size models.
    for turbo in measured:
        if turbo.studio_model != "sd35-large-turbo" or turbo.seconds_per_image is None:
            continue
        for large in measured:
            if (
                large.studio_model == "sd35-large"
                and large.seconds_per_image is not None
                and large.machine == turbo.machine
                and large.setting.split(",")[0] == turbo.setting.split(",")[0]
            ):
                ratio = large.seconds_per_image / turbo.seconds_per_image
                found = (
                    f"Turbo {turbo.seconds_per_image:.2f} s vs Large {large.seconds_per_image:.2f} s per image "
                    f"({ratio:.1f}× faster; {turbo.setting})"
                )
                return found, _verdict(ratio > 1.5), turbo.source
    return NOT_MEASURED, NOT_MEASURED, "no results file times both Large and Large Turbo on one machine"


def _check_blip_lora_share(_: list[Measurement]) -> tuple[str, str, str]:
    """What the Studio's default BLIP caption LoRA adds, counted on the real architecture."""
    import re

    from pipelines.blip_adapters import text_decoder_targets

    facts = _blip_architecture()
    model = _blip_meta_model()
    rank = settings.BLIP_TRAIN_DEFAULT_RANK
    pattern = re.compile(text_decoder_targets())
    added = sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)
    )
    share = added / facts["parameters"]
    found = f"rank {rank} on the decoder's q/k/v/dense (self + cross): {added / 1e6:.2f}M = {share:.2%} of BLIP base"
    return found, _verdict(0.005 <= share <= 0.02), "real config on the meta device; pipelines.train_blip_lora defaults"


@functools.cache
def _blip_meta_model():
    from pipelines.architectures import build_on_meta

    return build_on_meta("blip-caption")


CLAIM_CHECKS = {
    "blip-lora-share": _check_blip_lora_share,
    "blip-size": _check_blip_size,
    "blip-input-size": _check_blip_input_size,
    "image-to-text-pipeline": _check_image_to_text,
    "blip-cross-attention-layers": _check_cross_attention_layers,
    "blip-patch-grid": _check_patch_grid,
    "sd35-large-size": lambda _: _parameter_check("sd35-large", 8.1),
    "sd35-medium-size": lambda _: _parameter_check("sd35-medium", 2.5),
    "sd35-large-resolution": lambda _: _resolution_check("sd35-large", 0.25, 1.0),
    "sd35-medium-resolution": lambda _: _resolution_check("sd35-medium", 0.25, 2.0),
    "sd35-turbo-steps": _check_turbo_steps,
    "sd35-turbo-speed": _check_turbo_speed,
}


def check_claims(data: ScoreboardData, measured: list[Measurement] | None = None) -> list[ClaimCheck]:
    """Every published claim next to what the Studio finds; claims it cannot check say so."""
    measured = [] if measured is None else measured
    checks = []
    for model in data.models:
        for capability in model.capabilities:
            for claim in capability.claims:
                if claim.check is None:
                    found, verdict, how = "—", NOT_CHECKED, "the Studio has no measurement for this claim"
                else:
                    found, verdict, how = CLAIM_CHECKS[claim.check](measured)
                checks.append(ClaimCheck(model.name, capability.name, claim.text, found, verdict, how))
    return checks


# 3. Measurements from bench/results -------------------------------------------------------------


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


def measurements(data: ScoreboardData | None, payloads: list[dict]) -> list[Measurement]:
    """One Measurement per timed row and per round-trip category, with its source."""
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
            if not isinstance(row, dict) or "error" in row:
                continue
            seconds = _seconds_per_image(row)
            peak = _number(row.get("peak_gib"))
            if seconds is None and peak is None:
                continue  # a speed-up comparison, not a per-image figure
            studio_model = row.get("model") or BENCHMARK_MODELS.get(payload["benchmark"], payload["benchmark"])
            setting = ", ".join(
                template.format(row[name]) for name, template in SETTING_FIELDS.items() if row.get(name) is not None
            )
            found.append(
                Measurement(
                    model=owners.get(studio_model, studio_model),
                    studio_model=str(studio_model),
                    setting=setting or payload["benchmark"],
                    machine=payload["machine"],
                    seconds_per_image=seconds,
                    peak_gib=peak,
                    adherence=None,
                    source=source,
                )
            )
    return found


def failed_runs(payloads: list[dict]) -> list[str]:
    """Rows a benchmark recorded as failed: the cell stays 'not measured' and the reason is shown."""
    return [
        f"{payload['file']}: {row.get('model', payload['benchmark'])} was not measured ({row['error']})"
        for payload in payloads
        for row in payload.get("rows", [])
        if isinstance(row, dict) and "error" in row
    ]


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


# 4. Everything together -------------------------------------------------------------------------


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
    report.warnings += failed_runs(payloads)
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
    report.ranking = ranking_rows(data)
    report.capabilities = capability_rows(data)
    report.summary = summary_rows(data, measured)
    if with_claims:
        report.claims = [asdict(item) for item in check_claims(data, measured)]
    return report
