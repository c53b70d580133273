"""A person at the browser, issue 19: Train → Load the result → Generate, and an edited Batch caption exported.

Same setup as tests/test_browser.py (Debian's Chromium driven by Playwright, `python app.py --tiny`);
its fixtures and helpers are reused.
"""

from __future__ import annotations

import json
import re
import uuid
import zipfile
from pathlib import Path

import pytest

from tests import test_browser
from tests.test_browser import EXAMPLES, cell, open_tab, screenshot, status_line_empties, upload

browser, page = test_browser.browser, test_browser.page  # the same fixtures: one Chromium, a fresh page per test

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TRAINING_TIMEOUT_MS = 240_000  # a 2-step tiny run: a subprocess that loads torch and diffusers on busy cores


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory) -> Path:
    """The Batch tab's export layout: one folder with the images and metadata.jsonl, zipped."""
    from tests.test_train_blip_lora import make_dataset

    root = tmp_path_factory.mktemp("browser-train-upload")
    folder = make_dataset(root / "dataset")
    archive = root / "dataset.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.iterdir()):
            zipped.write(path, f"dataset/{path.name}")
    return archive


def test_train_then_load_the_result_then_generate_with_it(page, tmp_path, dataset_zip):
    run_name = f"ux-sks-{uuid.uuid4().hex[:4]}"
    lora_name = run_name.replace("-", "_")
    panel = open_tab(page, "Train")
    assert panel.get_by_label("3.5 Medium").is_checked()  # labelled as the Generate tab labels models
    panel.locator('input[type=file][accept*=".zip"]').first.set_input_files([str(dataset_zip)])
    panel.get_by_label("Run name (the output folder)").fill(run_name)
    panel.get_by_label("Trigger word (put before every caption; SD3.5 only)").fill("sks")
    panel.get_by_text("Settings", exact=True).first.click()
    panel.get_by_label("Steps", exact=True).fill("2")
    panel.get_by_label("Gradient checkpointing").uncheck()
    panel.get_by_role("button", name="Start training").click()
    panel.get_by_text(re.compile(rf"{run_name}\*?\*?: finished")).wait_for(timeout=TRAINING_TIMEOUT_MS)
    # The command as printed, then the newest log lines, scrolled into view.
    assert panel.get_by_text(
        re.compile(r"cd <app> && HF_HUB_OFFLINE=1 python -m pipelines\.training\.train_sd3_lora")
    ).count()
    log = page.locator("#train-log textarea")
    page.wait_for_function(
        "box => box.scrollHeight <= box.clientHeight || box.scrollTop + box.clientHeight >= box.scrollHeight - 4",
        arg=log.element_handle(),
    )
    screenshot(page, tmp_path, "train")

    panel.get_by_role("button", name="Load the result").click()
    # Generate opens on the run's base model, with its LoRA active and listed, and says the renaming.
    generate = page.locator("[role=tabpanel]:visible")
    generate.get_by_text(re.compile(rf"{lora_name} from the Train tab is active on 3\.5 Medium")).wait_for(
        timeout=TRAINING_TIMEOUT_MS  # the first load of the Medium pipeline on busy cores
    )
    assert page.get_by_role("tab", name="Generate", exact=True).get_attribute("aria-selected") == "true"
    assert generate.get_by_label("3.5 Medium").is_checked()
    assert generate.get_by_text("Trigger word: sks").count() >= 1
    active = generate.get_by_label("Active LoRAs (name:weight, comma-separated; empty = the base model)")
    assert active.input_value() == f"{lora_name}:1"
    assert generate.locator("[data-testid^=cell-]", has_text=lora_name).count() >= 1  # the Loaded LoRAs table
    try:
        generate.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
        generate.get_by_label("Steps (empty = preset)").fill("2")
        generate.get_by_role("button", name="Generate", exact=True).click()
        summary = generate.get_by_text(re.compile(rf"2/2 steps.*LoRA {lora_name}:1"))
        summary.wait_for()
        assert "trigger words added: sks" in summary.inner_text()
        assert page.get_by_text("No LoRA is loaded").count() == 0
        screenshot(page, tmp_path, "train-then-generate")
    finally:
        generate.get_by_label("Unload (name; empty = all)").fill(lora_name)
        generate.get_by_role("button", name="Unload", exact=True).click()
        generate.get_by_text(f"Unloaded {lora_name} from sd35-medium.").wait_for()


def test_a_fresh_page_lists_the_loaded_loras(page, tiny_client):
    """The Loaded LoRAs table is filled on page load (the folder listing: tests/test_lora.py)."""
    tiny_client.predict(source="tiny_large_style", model="large", api_name="/lora_load")
    try:
        page.reload()
        panel = open_tab(page, "Generate")
        panel.get_by_text("LoRA", exact=True).first.click()  # open the accordion
        panel.locator("[data-testid^=cell-]", has_text="tiny_large_style").first.wait_for()
    finally:
        tiny_client.predict(name="tiny_large_style", model="large", active="", api_name="/lora_unload")


def test_an_edited_batch_caption_ends_up_in_the_exported_zip(page, tmp_path):
    panel = open_tab(page, "Batch")
    upload(panel, EXAMPLES / "chelsea.png", EXAMPLES / "coffee.png")
    panel.get_by_role("button", name="Caption all").click()
    panel.get_by_text("2 of 2 images captioned").wait_for()
    row = next(index for index in range(2) if cell(panel, index, 1) == "coffee.png")
    other = cell(panel, 1 - row, 2)

    caption = panel.locator(f"[data-testid=cell-{row}-2]").first
    caption.dblclick()
    editor = caption.locator("textarea, input").first
    editor.fill("sks, a cup of black coffee on a saucer")
    editor.press("Enter")
    panel.get_by_role("button", name="Save edited captions").click()
    panel.get_by_text("Saved 1 edited caption(s)").wait_for()

    with page.expect_download() as download:
        panel.locator('a[data-testid=download-link][download$=".zip"]').click()
    archive = tmp_path / "edited.zip"
    download.value.save_as(archive)
    with zipfile.ZipFile(archive) as zipped:
        metadata = {
            entry["file_name"]: entry["text"]
            for entry in map(json.loads, zipped.read("metadata.jsonl").decode().splitlines())
        }
        assert metadata["coffee.png"] == "sks, a cup of black coffee on a saucer"
        assert zipped.read("coffee.txt").decode().strip() == "sks, a cup of black coffee on a saucer"
        assert metadata["chelsea.png"] == other  # the caption nobody touched
    screenshot(page, tmp_path, "batch-edited")


def test_a_failed_caption_leaves_its_sentence_beside_the_button(page, tmp_path):
    panel = open_tab(page, "Caption")
    button = panel.get_by_role("button", name="Caption", exact=True)
    button.click()  # no image yet
    status = panel.locator("#caption-error")
    status.get_by_text(re.compile(r"Upload an image .* first\.")).wait_for()
    # The sentence sits right under the button, and stays after the toast is closed.
    assert 0 <= status.bounding_box()["y"] - (button.bounding_box()["y"] + button.bounding_box()["height"]) < 120
    # The next successful caption clears it.
    upload(panel, EXAMPLES / "chelsea.png")
    button.click()
    panel.get_by_text(re.compile(r"1 caption\(s\) in [\d.]+ s")).wait_for()
    status_line_empties(status)
    screenshot(page, tmp_path, "caption-error-beside-button")
