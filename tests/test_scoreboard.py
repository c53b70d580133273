"""Scoreboard: ranking from the data file, tab links, claims checked at run time, measured cells with sources."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from components.scoreboard import MEASURED_HEADERS, capability_table, measured_table, terms_markdown
from pipelines.scoreboard.bench_results import FAILED_ROW_SENTENCE, RESULTS_DIR, read_results
from pipelines.scoreboard.claims import check_claims
from pipelines.scoreboard.page import SCOREBOARD_PATH, build_report, load_scoreboard, ranked
from pipelines.scoreboard.schema import (
    CAPABILITY_STATUSES,
    NOT_MEASURED,
    STUDIO_TAB_IDS,
    ScoreboardDataError,
)

APP_PATH = Path(__file__).resolve().parent.parent / "app.py"


def _data_copy(tmp_path: Path, edit=None) -> Path:
    raw = json.loads(SCOREBOARD_PATH.read_text())
    if edit is not None:
        edit(raw)
    path = tmp_path / "scoreboard.json"
    path.write_text(json.dumps(raw))
    return path


def _result_file(folder: Path, name: str, **payload) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(payload))
    return path


def test_ranking_follows_the_data_file(tmp_path):
    data = load_scoreboard()
    assert [model.name for model in ranked(data)] == ["Stable Diffusion 3.5 Large", "blip-image-captioning-base"]

    def swap(raw):
        raw["models"][0]["score"], raw["models"][1]["score"] = 70, 40

    report = build_report(_data_copy(tmp_path, swap), tmp_path / "no-results", with_claims=False)
    assert [row["model"] for row in report.ranking] == ["blip-image-captioning-base", "Stable Diffusion 3.5 Large"]
    assert [row["leader"] for row in report.ranking] == [True, False]
    assert report.ranking[0]["features"]["UnfragileRank"] == "70/100"


def test_every_capability_links_to_a_studio_tab_or_says_not_built():
    data = load_scoreboard()
    capabilities = [capability for model in data.models for capability in model.capabilities]
    assert len(data.models[0].capabilities) == 6 and len(data.models[1].capabilities) == 18
    for capability in capabilities:
        assert capability.status in CAPABILITY_STATUSES
        assert capability.tab is None or capability.tab in STUDIO_TAB_IDS
        assert (capability.tab is None) == (capability.status == "not built yet")
    assert {c.name for c in capabilities if c.tab is None} == set()  # every capability is built
    lora = {c.name: (c.tab, c.status) for c in capabilities if "LoRA" in c.name}
    # Both trainers run on a CPU (tests/test_train_*), so neither LoRA capability "needs a GPU".
    assert lora == {
        "Multilingual and domain adaptation with LoRA": ("train", "works here"),
        "LoRA fine-tuning and loading": ("train", "works here"),
    }
    needs_gpu = {c.name: c.status_note for c in capabilities if c.status == "needs a GPU"}
    assert set(needs_gpu) == {"Quantization (NF4 / 8-bit)", "CPU offload", "Compiled fast path and fp8"}
    assert all(note.endswith(".") for note in needs_gpu.values())  # each says why


def test_the_page_terms_and_the_shared_scale_are_explained():
    data = load_scoreboard()
    for term in ("UnfragileRank", "Match Graph", "Times Matched"):
        assert term in data.features and data.terms[term].endswith(".")
    assert "captioner and a generator" in data.shared_scale
    report = build_report(with_claims=False)
    text = terms_markdown(report)
    assert "**Match Graph**:" in text and "One scale for a captioner and a generator" in text


def test_a_failed_row_is_stored_and_shown_as_not_measured_with_a_sentence(tmp_path):
    results = tmp_path / "results"
    _result_file(
        results,
        "gpu-test.json",
        benchmark="gpu-test",
        machine="NVIDIA H200 (CUDA 13.0)",
        date="2026-11-28T04:07:57+00:00",
        model_size="real-size random weights",
        rows=[
            {"model": "sd35-large", "mode": "bf16", "steps": 28, "seconds_per_image": 5.5, "peak_gib": 28.5},
            {"model": "blip-caption", "not_measured": "the BLIP pass failed before timing anything."},
            # A row written before failures were sentences: its exception text never reaches the page.
            {
                "model": "blip-itm",
                "error": "AttributeError: 'CausalLMOutputWithCrossAttentions' object has no attribute",
            },
        ],
    )
    report = build_report(_data_copy(tmp_path), results, with_claims=False)
    assert report.warnings == []  # no toast: the row itself says it
    rows = {
        row["Studio model"]: row
        for row in (dict(zip(MEASURED_HEADERS, cells, strict=True)) for cells in measured_table(report))
    }
    assert rows["blip-caption"]["s / image"] == f"{NOT_MEASURED}: the BLIP pass failed before timing anything"
    assert rows["blip-itm"]["s / image"] == f"{NOT_MEASURED}: {FAILED_ROW_SENTENCE}"
    assert rows["blip-caption"]["model"] == "blip-image-captioning-base"
    cells = [row["s / image"] for row in rows.values()]
    assert "5.5 s" in cells
    assert "AttributeError" not in json.dumps(report.as_dict())
    # Failed rows never stand in for a figure in the summary.
    blip = next(row for row in report.summary if row["studio_model"] == "blip-caption")
    assert blip["GPU latency"] == NOT_MEASURED


def test_committed_results_store_failures_as_sentences_not_exceptions():
    payloads, warnings = read_results(RESULTS_DIR)
    assert warnings == [] and payloads
    for payload in payloads:
        for row in payload.get("rows", []):
            assert "error" not in row, f"{payload['file']}: a failed row must be 'not_measured': '<one sentence>'"


def test_capability_table_leads_with_the_status_and_its_reason():
    status, capability, *_ = next(
        row for row in capability_table(build_report(with_claims=False)) if row[1] == "CPU offload"
    )
    assert status.startswith("🖥️ needs a GPU: ") and "without a GPU" in status


def test_app_defines_the_linked_tab_ids():
    app_ids = set(re.findall(r'id="([^"]+)"', APP_PATH.read_text()))
    linked = {capability.tab for model in load_scoreboard().models for capability in model.capabilities}
    linked.discard(None)
    # "roundtrip" and "scoreboard" are the two tabs issue 9 adds to app.py; the others exist already.
    expected = linked | {"roundtrip", "scoreboard"}
    assert expected <= set(STUDIO_TAB_IDS)
    assert expected <= app_ids, f"app.py lacks tab ids: {sorted(expected - app_ids)}"


def test_missing_or_corrupt_data_file_is_a_clear_error_not_a_crash(tmp_path):
    with pytest.raises(ScoreboardDataError, match="missing"):
        load_scoreboard(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"models": [')
    with pytest.raises(ScoreboardDataError, match="not valid JSON"):
        load_scoreboard(broken)

    def bad_tab(raw):
        raw["models"][0]["capabilities"][0]["tab"] = "nowhere"

    with pytest.raises(ScoreboardDataError, match="'nowhere' is not one of"):
        load_scoreboard(_data_copy(tmp_path, bad_tab))

    report = build_report(broken, tmp_path / "no-results", with_claims=False)
    assert report.error and "not valid JSON" in report.error
    assert report.error in report.warnings and report.ranking == []


def test_corrupt_results_file_is_skipped_with_a_warning(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu-cuda.json").write_text("{ not json")
    report = build_report(_data_copy(tmp_path), results, with_claims=False)
    assert any("gpu-cuda.json" in warning and "not valid JSON" in warning for warning in report.warnings)
    assert report.measured == []
    for row in report.summary:
        assert all(row[column] == NOT_MEASURED for column in row if column not in ("model", "studio_model"))


def test_measured_cell_names_its_source_and_refreshes_when_a_file_appears(tmp_path):
    results = tmp_path / "results"
    data_path = _data_copy(tmp_path)
    _result_file(
        results,
        "gpu-test.json",
        benchmark="gpu-test",
        machine="NVIDIA H200 (CUDA 13.0)",
        date="2026-11-28T04:07:57+00:00",
        model_size="real weights",
        rows=[{"model": "sd35-large", "mode": "bf16", "steps": 28, "seconds_per_image": 5.5, "peak_gib": 28.5}],
    )
    sd3 = build_report(data_path, results, with_claims=False).summary[0]
    assert sd3["model"] == "Stable Diffusion 3.5 Large"
    assert sd3["GPU latency"].startswith("5.5 s/image (bf16, 28 steps)")
    assert "gpu-test.json · NVIDIA H200 (CUDA 13.0) · 2026-11-28 · real weights" in sd3["GPU latency"]
    assert sd3["CPU latency"] == NOT_MEASURED and sd3["round-trip adherence"] == NOT_MEASURED

    # A round-trip evaluation written later shows up on the next call, without a restart.
    _result_file(
        results,
        "roundtrip-gpu.json",
        benchmark="roundtrip-eval",
        machine="CPU x86_64, 2 threads",
        date="2026-11-29T10:00:00+00:00",
        model_size="tiny",
        rows=[],
        summary={"sd35-large": {"objects": {"mean": 0.61, "std": 0.05, "n": 12}}},
    )
    sd3 = build_report(data_path, results, with_claims=False).summary[0]
    assert sd3["round-trip adherence"].startswith("0.610 ± 0.050 (n=12) (round trip: objects)")
    assert sd3["round-trip adherence"].endswith("roundtrip-gpu.json · CPU x86_64, 2 threads · 2026-11-29 · tiny")


def test_claims_check_uses_the_real_architecture_and_this_install():
    checks = {check.published: check for check in check_claims(load_scoreboard())}
    size = checks["139M total parameters, 6-layer GPT-2 text decoder"]
    assert size.verdict == "disagrees"
    assert "224.0M unique parameters" in size.studio and "247.4M state-dict elements" in size.studio
    assert "12-layer BERT-style" in size.studio
    pipeline = next(check for text, check in checks.items() if "pipeline('image-to-text'" in text)
    assert pipeline.verdict == "disagrees" and "no 'image-to-text'" in pipeline.studio
    large = checks["8.1 billion parameters"]
    assert large.verdict == "agrees" and "8,146,280,768" in large.studio
    assert checks["Pre-trained on 14M image-text pairs"].verdict == "not checked"
    lora = checks["LoRA adapters add 0.5–2% parameters per language"]
    # 12 decoder layers x 8 projections (768 -> 768) x rank 16 x (768 + 768) = 2,359,296 of 224.0M
    assert lora.verdict == "agrees" and "2.36M = 1.05% of BLIP base" in lora.studio


@pytest.mark.api
def test_scoreboard_api(tiny_client):
    ranking, chart, verdict, capabilities, claims, summary, measured, warnings, details = tiny_client.predict(
        api_name="/scoreboard"
    )
    assert "🏆 **Stable Diffusion 3.5 Large**" in ranking
    assert details["ranking"][0]["model"] == "Stable Diffusion 3.5 Large" and details["error"] is None
    assert any(row["verdict"] == "disagrees" and "224.0M" in row["studio"] for row in details["claims"])
    assert {row["tab"] for row in details["capabilities"]} - {None} <= set(STUDIO_TAB_IDS)
    assert len(details["summary"]) == 2 and details["tiny_mode"] is True
    everything = json.dumps([ranking, verdict, capabilities, claims, summary, measured, warnings, details])
    for exception_text in ("Error:", "Error(", "Traceback", "object has no attribute"):
        assert exception_text not in everything
    assert "was not measured (" not in everything
    assert "UnfragileRank" in verdict and "Times Matched" in verdict
