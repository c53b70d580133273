"""Scoreboard tab: the published ranking of the two models, its claims checked, and what we measured (API ``/scoreboard``)."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from components.common import launch_alone, named_endpoint
from pipelines.scoreboard.page import SUMMARY_COLUMNS, ScoreboardReport, build_report
from pipelines.scoreboard.schema import NOT_MEASURED, Measurement
from pipelines.studio import Studio

TAB_TITLES = {
    "caption": "Caption",
    "batch": "Batch",
    "match": "Match",
    "attention": "Attention",
    "generate": "Generate",
    "image_to_image": "Image to image",
    "png_info": "PNG Info",
    "system": "System",
    "roundtrip": "Round trip",
    "train": "Train",
    "scoreboard": "Scoreboard",
}
# Each table puts what a reader looks for first (the status, the verdict, the numbers) and the long
# text after it; every column has a width wide enough for its header's longest word, so headers wrap
# between words, and the text columns wrap inside their width.
CAPABILITY_HEADERS = ["status", "capability", "tab", "model", "published claims"]
CAPABILITY_WIDTHS = ["22%", "24%", "10%", "16%", "28%"]
CLAIM_HEADERS = ["check", "published claim", "what the Studio finds", "model", "how"]
CLAIM_WIDTHS = ["11%", "22%", "31%", "14%", "22%"]
SUMMARY_HEADERS = ["model", *SUMMARY_COLUMNS]
SUMMARY_WIDTHS = ["16%", "21%", "21%", "21%", "21%"]
MEASURED_HEADERS = ["model", "s / image", "peak GPU", "round trip", "setting", "machine", "Studio model", "source"]
MEASURED_WIDTHS = ["13%", "14%", "9%", "11%", "13%", "13%", "11%", "16%"]
STATUS_MARKS = {"works here": "✅", "needs a GPU": "🖥️", "needs the real weights": "⬇️", "not built yet": "🚧"}
VERDICT_MARKS = {"agrees": "✅ agrees", "disagrees": "❌ disagrees"}
NOTE = (
    "Ranks and feature points are the comparison page's (kept in `assets/scoreboard.json`). Claims are checked "
    "against the real architectures and this install; timings and memory come only from `bench/results/*.json`, "
    f"each with its file, machine, date and model size — anything else says *{NOT_MEASURED}*. "
    "✅ runs here in tiny mode on a CPU · 🖥️ needs a GPU · ⬇️ needs the real weights · 🚧 not built yet."
)


def terms_markdown(report: ScoreboardReport) -> str:
    """The comparison page's terms, a sentence each, and why two different models share one scale."""
    if not report.terms and not report.shared_scale:
        return ""
    lines = ["**What the page's terms mean**", ""]
    lines += [f"- **{term}**: {text}" for term, text in report.terms.items()]
    if report.shared_scale:
        lines += ["", f"**One scale for a captioner and a generator.** {report.shared_scale}"]
    return "\n".join(lines)


def ranking_markdown(report: ScoreboardReport) -> str:
    """The feature table with one column per model, best first; the leader in bold with a trophy."""
    if not report.ranking:
        return ""
    names = [("🏆 **" + row["model"] + "**") if row["leader"] else row["model"] for row in report.ranking]
    lines = [f"### {report.title}", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines.append("| Rank | " + " | ".join(f"#{row['rank']}" for row in report.ranking) + " |")
    for feature in report.ranking[0]["features"]:
        lines.append(f"| {feature} | " + " | ".join(str(row["features"][feature]) for row in report.ranking) + " |")
    return "\n".join(lines)


def score_frame(report: ScoreboardReport) -> pd.DataFrame:
    return pd.DataFrame(
        {"model": [row["model"] for row in report.ranking], "score": [row["score"] for row in report.ranking]}
    )


def capability_table(report: ScoreboardReport) -> list[list[str]]:
    return [
        [
            f"{STATUS_MARKS[row['status']]} {row['status']}"
            + (f": {row['status_note']}" if row["status_note"] else ""),
            row["capability"],
            f"[{TAB_TITLES[row['tab']]}](#{row['tab']})" if row["tab"] else "—",
            row["model"],
            "; ".join(row["claims"]),
        ]
        for row in report.capabilities
    ]


def claim_table(report: ScoreboardReport) -> list[list[str]]:
    return [
        [VERDICT_MARKS.get(row["verdict"], row["verdict"]), row["published"], row["studio"], row["model"], row["how"]]
        for row in report.claims
    ]


def summary_table(report: ScoreboardReport) -> list[list[str]]:
    return [[row["model"], *(row[column] for column in SUMMARY_COLUMNS)] for row in report.summary]


def measured_table(report: ScoreboardReport) -> list[list[str]]:
    return [Measurement(**row).cells() for row in report.measured]


def warnings_markdown(report: ScoreboardReport) -> str:
    if not report.warnings:
        return ""
    return "**Warnings**\n\n" + "\n".join(f"- ⚠️ {warning}" for warning in report.warnings)


def make_scoreboard_function(studio: Studio, *, toasts: bool = True):
    """The `/scoreboard` endpoint: no input; the tables plus everything as JSON.

    The data file and the results folder are read on every call (unchanged files
    come from a cache), so new benchmark results appear without a restart. A
    broken file shows as a warning on the page (and as a toast with ``toasts``,
    for the Refresh button); the rest of the board still renders. A benchmark row
    that could not be measured is no warning: its row says "not measured: <why>".
    """

    def scoreboard():
        report = build_report()
        for warning in report.warnings if toasts else ():
            gr.Warning(warning)
        verdict = f"**Verdict.** {report.verdict}" if report.verdict else ""
        details = {**report.as_dict(), "tiny_mode": studio.tiny}
        return (
            ranking_markdown(report),
            score_frame(report),
            "\n\n".join(part for part in (verdict, terms_markdown(report)) if part),
            capability_table(report),
            claim_table(report),
            summary_table(report),
            measured_table(report),
            warnings_markdown(report),
            details,
        )

    return named_endpoint(scoreboard, [])


def build_scoreboard_tab(studio: Studio, tab: gr.Tab | None = None) -> dict:
    """Build the Scoreboard tab inside the current Blocks; returns its main components.

    With ``tab``, the board is rebuilt each time the tab is opened (the first time
    builds the real architectures on the meta device, a few seconds of CPU);
    without it, on page load.
    """
    gr.Markdown(NOTE)
    with gr.Row():
        ranking = gr.Markdown()
        chart = gr.BarPlot(x="model", y="score", y_lim=[0, 100], title="UnfragileRank (out of 100)", height=260)
    verdict = gr.Markdown()
    refresh = gr.Button("Refresh (re-read bench/results)", variant="secondary")
    warnings = gr.Markdown()
    gr.Markdown("### Capabilities, and the tab that shows each")
    capabilities = gr.Dataframe(
        headers=CAPABILITY_HEADERS,
        datatype=["str", "str", "markdown", "str", "str"],
        interactive=False,
        wrap=True,
        column_widths=CAPABILITY_WIDTHS,
    )
    gr.Markdown("### Claims check: what the page says, what the Studio finds")
    claims = gr.Dataframe(headers=CLAIM_HEADERS, interactive=False, wrap=True, column_widths=CLAIM_WIDTHS)
    gr.Markdown("### Measured at a glance")
    summary = gr.Dataframe(headers=SUMMARY_HEADERS, interactive=False, wrap=True, column_widths=SUMMARY_WIDTHS)
    with gr.Accordion("Every measurement", open=False):
        measured = gr.Dataframe(headers=MEASURED_HEADERS, interactive=False, wrap=True, column_widths=MEASURED_WIDTHS)
    with gr.Accordion("Raw result (JSON)", open=False):
        details = gr.JSON(label="Scoreboard")

    scoreboard = make_scoreboard_function(studio)
    quiet_scoreboard = make_scoreboard_function(studio, toasts=False)  # opening the tab: warnings stay on the page
    outputs = [ranking, chart, verdict, capabilities, claims, summary, measured, warnings, details]
    refresh.click(scoreboard, outputs=outputs, api_name="scoreboard")
    gr.on(
        triggers=[tab.select] if tab is not None else None,  # None: on page load
        fn=lambda: quiet_scoreboard(),  # a lambda, so Gradio does not derive a second "scoreboard" name from it
        outputs=outputs,
        api_visibility="private",
    )
    return {"ranking": ranking, "chart": chart, "claims": claims, "measured": measured, "details": details}


if __name__ == "__main__":
    launch_alone(build_scoreboard_tab, "Scoreboard")
