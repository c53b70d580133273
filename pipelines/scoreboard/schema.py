"""The scoreboard's shared vocabulary: the page's data types, a measurement, the words for "no figure".

The bottom of the scoreboard modules: pipelines/scoreboard/page.py (the page data), pipelines/scoreboard/claims.py
(claims against the Studio's own figures) and pipelines/scoreboard/bench_results.py (what the benchmarks measured)
all import from here, and this module imports none of them, so they form no cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Every tab a capability may link to: the ids app.py gives its gr.Tab()s.
STUDIO_TAB_IDS = (
    "caption",
    "generate",
    "image_to_image",
    "batch",
    "match",
    "attention",
    "png_info",
    "roundtrip",
    "train",
    "scoreboard",
    "system",
)
# "works here": runs in `python app.py --tiny` on a CPU; "needs a GPU": the tab runs but not usefully
# without one; "needs the real weights": tiny models cannot show it (e.g. caption quality).
CAPABILITY_STATUSES = ("works here", "needs a GPU", "needs the real weights", "not built yet")
NOT_MEASURED = "not measured"
NOT_CHECKED = "not checked"


class ScoreboardDataError(ValueError):
    """The scoreboard data file is missing or does not hold what the tab needs."""


@dataclass(frozen=True)
class Claim:
    text: str
    check: str | None  # the name of a check in scoreboard.claims.CLAIM_CHECKS, or None when the Studio cannot check it


@dataclass(frozen=True)
class Capability:
    name: str
    tab: str | None  # a STUDIO_TAB_IDS entry, or None while no tab shows it
    status: str  # one of CAPABILITY_STATUSES
    claims: tuple[Claim, ...]
    status_note: str = ""  # why the status is what it is, when that is not obvious (e.g. "runs on a CPU, slowly")


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
    models: tuple[RankedModel, ...]  # as listed in the file; see scoreboard.ranked()
    terms: dict[str, str] = field(default_factory=dict)  # the page's terms (UnfragileRank, ...), one sentence each
    shared_scale: str = ""  # why a captioner and a generator stand on one scale


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
    not_measured: str | None = None  # a row the benchmark could not measure: one sentence saying why

    def cells(self) -> list[str]:
        """Key numbers first (s / image, peak GPU, round trip), then what they were measured on."""
        if self.not_measured is not None:
            missing = f"{NOT_MEASURED}: {self.not_measured}"
            numbers = [missing, "—", "—"]
        else:
            numbers = [
                NOT_MEASURED if self.seconds_per_image is None else f"{self.seconds_per_image:.3g} s",
                NOT_MEASURED if self.peak_gib is None else f"{self.peak_gib:.1f} GiB",
                NOT_MEASURED if self.adherence is None else self.adherence,
            ]
        return [self.model, *numbers, self.setting, self.machine, self.studio_model, self.source]
