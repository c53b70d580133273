"""A person at the browser: one test per tab, in a real Chromium, against `python app.py --tiny`.

Debian's Chromium (``apt-get install chromium``) driven by Playwright for Python; Playwright's
own browser download is never used. Each test does what a person does (upload, type, click),
asserts on what the page shows, and leaves a screenshot in its tmp dir. Without Chromium or
Playwright the tests skip, unless ``STUDIO_REQUIRE_BROWSER=1`` (as ``.ci/run`` sets) makes
that a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
# The sandbox needs privileges CI containers lack; the rest keeps Chromium off a network it cannot reach.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
TIMEOUT_MS = 30_000  # one step on 2 busy cores; a healthy tiny run takes a second or two


def _missing_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -r requirements.txt)"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _missing_browser()
    if missing:
        if os.environ.get("STUDIO_REQUIRE_BROWSER") == "1":
            pytest.fail(f"STUDIO_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(f"browser tests need Chromium and Playwright: {missing}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tiny_app_url):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(tiny_app_url)
    page.get_by_role("tab", name="Caption").wait_for()
    yield page
    context.close()


def open_tab(page, name: str):
    """Click the tab ``name`` and return its panel, the only tab panel shown."""
    page.get_by_role("tab", name=name, exact=True).click()
    panel = page.locator("[role=tabpanel]:visible")
    panel.wait_for()
    return panel


def upload(panel, *paths: Path) -> None:
    # Gradio keeps several hidden file inputs per tab (every table has a CSV import): pick the image one.
    panel.locator('input[type=file][accept*="image"]').first.set_input_files([str(path) for path in paths])


def screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not an empty frame


def block(panel, label: str):
    """The component whose label reads ``label`` (Gallery and Image labels are not tied to an input)."""
    title = panel.page.locator("[data-testid=block-label]", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))
    return panel.locator(".block").filter(has=title).last


def status_line_empties(status, timeout_ms: int = 10_000) -> None:
    """Wait until the status line ``status`` shows nothing (the listener that clears it runs after the result)."""
    status.page.wait_for_function(
        "element => !element.innerText.trim()", arg=status.element_handle(), timeout=timeout_ms
    )


def cell(panel, row: int, column: int) -> str:
    return panel.locator(f"[data-testid=cell-{row}-{column}]").first.inner_text().strip()


def test_caption_an_uploaded_image(page, tmp_path):
    panel = open_tab(page, "Caption")
    upload(panel, EXAMPLES / "chelsea.png")
    panel.get_by_role("button", name="Caption", exact=True).click()
    panel.get_by_text(re.compile(r"1 caption\(s\) in [\d.]+ s")).wait_for()
    assert cell(panel, 0, 0) == "1"
    assert len(cell(panel, 0, 1).split()) >= 3  # a caption of several words (gibberish in tiny mode)
    assert -20 < float(cell(panel, 0, 2)) <= 0  # its score, a mean log-probability
    screenshot(page, tmp_path, "caption")


def test_batch_caption_then_download_the_zip(page, tmp_path):
    panel = open_tab(page, "Batch")
    names = ["chelsea.png", "coffee.png", "rocket.jpg"]
    upload(panel, *(EXAMPLES / name for name in names))
    panel.get_by_role("button", name="Caption all").click()
    panel.get_by_text("3 of 3 images captioned").wait_for()
    shown = {cell(panel, row, 1): cell(panel, row, 2) for row in range(3)}
    assert set(shown) == set(names) and all(text.strip() for text in shown.values())

    with page.expect_download() as download:
        panel.locator('a[data-testid=download-link][download$=".zip"]').click()  # the Dataset zip's link
    archive = tmp_path / "captions.zip"
    download.value.save_as(archive)
    with zipfile.ZipFile(archive) as zipped:
        metadata = {
            entry["file_name"]: entry["text"]
            for entry in map(json.loads, zipped.read("metadata.jsonl").decode().splitlines())
        }
        assert metadata == shown  # the zip holds what the page showed
        for name, text in metadata.items():
            assert zipped.read(Path(name).with_suffix(".txt").as_posix()).decode().strip() == text
    screenshot(page, tmp_path, "batch")


def test_attention_heatmap_gallery(page, tmp_path):
    panel = open_tab(page, "Attention")
    upload(panel, EXAMPLES / "chelsea.png")
    caption = panel.get_by_label("Caption (any text)")
    caption.fill("a cat on a sofa")
    panel.get_by_role("button", name="Show attention").click()
    panel.get_by_text(re.compile(r"5 word\(s\) of your caption")).wait_for()
    thumbnails = block(panel, "Word → where BLIP looked").locator("img")
    thumbnails.first.wait_for()
    assert thumbnails.count() == 5  # one heatmap per word, each captioned with its word
    assert [thumbnails.nth(index).get_attribute("alt") for index in range(5)] == ["a", "cat", "on", "a", "sofa"]
    assert all(thumbnails.nth(index).evaluate("img => img.complete && img.naturalWidth > 0") for index in range(5))
    screenshot(page, tmp_path, "attention")


def test_generate_then_stop_a_second_run(page, tmp_path):
    panel = open_tab(page, "Generate")
    panel.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    steps = panel.get_by_label("Steps (empty = preset)")
    steps.fill("2")
    panel.get_by_role("button", name="Generate", exact=True).click()
    panel.get_by_text(re.compile(r"1 image\(s\), \d+x\d+, 2/2 steps")).wait_for()
    assert block(panel, "Images").locator("img").count() >= 1

    steps.fill("100")
    panel.get_by_role("button", name="Generate", exact=True).click()
    block(panel, "Preview").wait_for()  # live previews appear: the second run is under way
    # Page-wide (hidden tabs' buttons do not count): the panel re-renders as the previews stream in.
    page.get_by_role("button", name="Stop", exact=True).click()
    stopped = panel.get_by_text(re.compile(r"stopped at step \d+"))
    stopped.wait_for()
    done = int(re.search(r"(\d+)/100 steps", stopped.inner_text())[1])
    assert 0 < done < 100
    screenshot(page, tmp_path, "generate")


def test_round_trip_prompt_image_caption_score(page, tmp_path):
    panel = open_tab(page, "Round trip")
    panel.get_by_label("Prompt", exact=True).fill("a red cube on a blue sphere")
    panel.get_by_label("Steps (empty = preset)").fill("2")
    panel.get_by_role("button", name="Run the round trip").click()
    panel.get_by_text("BLIP wrote:").wait_for()
    assert block(panel, "SD3.5's image").locator("img").count() == 1
    assert cell(panel, 0, 0) == "prompt" and cell(panel, 1, 0) == "BLIP's caption"
    assert float(cell(panel, 0, 1)) < 0 and float(cell(panel, 1, 1)) < 0  # both fits, as mean log-probs (column 1)
    assert block(panel, "Prompt vs caption, word by word").get_by_text("cube").count() >= 1
    screenshot(page, tmp_path, "roundtrip")


def test_open_the_scoreboard(page, tmp_path):
    panel = open_tab(page, "Scoreboard")
    panel.get_by_text("Rank", exact=True).wait_for()
    assert panel.get_by_text("🏆").count() >= 1  # the leader is marked
    verdicts = panel.locator("[data-testid^=cell-]", has_text=re.compile(r"(✅ agrees|❌ disagrees)"))
    verdicts.first.wait_for()  # the claims check is filled in
    assert verdicts.count() >= 3
    assert panel.get_by_text(re.compile(r"BLIP")).count() >= 1
    screenshot(page, tmp_path, "scoreboard")


def test_load_a_lora_and_draw_with_it(page, tmp_path):
    panel = open_tab(page, "Generate")
    panel.get_by_text("LoRA", exact=True).first.click()  # open the accordion
    panel.get_by_label("Source: registry name, file in the LoRA folder, or Hub repo id").fill("tiny_large_style")
    panel.get_by_role("button", name="Load LoRA").click()
    panel.get_by_text(re.compile(r"Loaded tiny_large_style \(\w+ keys, \d+ layers changed\)")).wait_for()
    active = panel.get_by_label("Active LoRAs (name:weight, comma-separated; empty = the base model)")
    assert active.input_value() == "tiny_large_style:1"
    assert panel.locator("[data-testid^=cell-]", has_text="tiny_large_style").count() >= 1  # the loaded-LoRA table
    try:
        panel.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
        panel.get_by_label("Steps (empty = preset)").fill("2")
        panel.get_by_role("button", name="Generate", exact=True).click()
        summary = panel.get_by_text(re.compile(r"2/2 steps.*LoRA tiny_large_style:1"))
        summary.wait_for()
        assert "trigger words added: tinystyle" in summary.inner_text()
        screenshot(page, tmp_path, "lora")
    finally:
        panel.get_by_role("button", name="Unload", exact=True).click()
        panel.get_by_text("Unloaded tiny_large_style from sd35-large.").wait_for()
    assert active.input_value() == ""
