"""The Generate tab in a real Chromium, as a person uses it (issue 19): live previews in view, the
selected image's caption and seed, Ctrl+Enter, the last error beside the button, and a phone-width page.

Same set-up as tests/test_browser.py (its fixtures and helpers), against `python app.py --tiny`.
"""

from __future__ import annotations

import io
import json
import re
import time

import pytest
from PIL import Image

from tests import test_browser
from tests.test_browser import TIMEOUT_MS, block, open_tab, screenshot, status_line_empties

# tests/test_browser.py's fixtures: one Chromium per module, one fresh desktop-sized page per test.
browser, page = test_browser.browser, test_browser.page

pytestmark = pytest.mark.browser

PHONE = {"width": 390, "height": 844}  # an iPhone 12-14 in CSS pixels
SUMMARY = re.compile(r"\d+ image\(s\), \d+x\d+, (\d+)/(\d+) steps")


def generate(panel, prompt: str, steps: int = 2, seed: int | None = None, images: int | None = None) -> str:
    """Fill the form, click Generate, wait for this run's summary and return it."""
    panel.get_by_label("Prompt", exact=True).fill(prompt)
    panel.get_by_label("Steps (empty = preset)").fill(str(steps))
    if seed is not None:
        panel.get_by_label("Seed (-1 = random)").fill(str(seed))
    if images is not None:
        panel.get_by_label("number input for Images").fill(str(images))
        panel.get_by_label("number input for Images").press("Enter")
    before = summary_text(panel)
    panel.get_by_role("button", name="Generate", exact=True).click()
    return wait_for_new_summary(panel, before)


def summary_text(panel) -> str:
    found = panel.get_by_text(SUMMARY)
    return found.first.inner_text() if found.count() else ""


def wait_for_new_summary(panel, before: str, timeout_s: float = TIMEOUT_MS / 1000) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = summary_text(panel)
        if now and now != before:
            return now
        time.sleep(0.1)
    raise AssertionError(f"no new summary within {timeout_s} s (still {before!r})")


def png_settings(page, url: str) -> dict:
    """The studio settings chunk of the PNG the app serves at ``url``."""
    response = page.request.get(url)
    assert response.ok, url
    with Image.open(io.BytesIO(response.body())) as image:
        return json.loads(image.text["studio"])


# For each element: [its src, what lies over its middle ("" if nothing does)].
COVERING_JS = """elements => elements.map(element => {
    element.scrollIntoView({block: "center"});
    const box = element.getBoundingClientRect();
    const top = document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2);
    const over = top === element || element.contains(top) ? "" :
        top ? `${top.tagName}.${top.className} ${top.textContent.slice(0, 60)}` : "nothing";
    return [element.src, over];
})"""


def test_live_previews_are_in_view_and_change_during_a_run(page, tmp_path):
    panel = open_tab(page, "Generate")
    panel.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    panel.get_by_label("Steps (empty = preset)").fill("100")
    panel.get_by_label("number input for Preview every N steps (0 = off)").fill("2")
    panel.get_by_label("number input for Preview every N steps (0 = off)").press("Enter")
    panel.get_by_role("button", name="Generate", exact=True).click()
    preview = block(panel, "Preview").locator("img")
    preview.wait_for()
    seen: set[str] = set()
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while len(seen) < 3 and time.monotonic() < deadline:
        state = preview.evaluate_all(COVERING_JS)  # [] once the run has ended and the preview is gone
        if not state:
            break
        source, over = state[0]
        assert not over, f"the live preview is covered by {over}"
        seen.add(source)
        time.sleep(0.15)
    screenshot(page, tmp_path, "generate-preview")
    page.get_by_role("button", name="Stop", exact=True).click()
    panel.get_by_text(SUMMARY).wait_for()
    assert len(seen) >= 2, f"the preview did not change during the run ({len(seen)} image seen)"


def test_caption_the_selected_older_history_image(page, tmp_path):
    panel = open_tab(page, "Generate")
    generate(panel, "first picture, a red barn", seed=5)
    generate(panel, "second picture, a blue boat", seed=6)
    history = block(panel, "History")  # locally the saved history is open from the start
    history.locator("button.thumbnail-item").nth(1).click()  # newest first: the second is the older one
    panel.get_by_role("button", name="Caption the selected image with BLIP →").click()

    caption_panel = page.locator("[role=tabpanel]:visible")
    caption_panel.get_by_text(re.compile(r"1 caption\(s\) in [\d.]+ s")).wait_for()  # it also ran the caption
    assert page.get_by_role("tab", name="Caption", exact=True).get_attribute("aria-selected") == "true"
    source = block(caption_panel, "Image").locator("img").first.get_attribute("src")
    assert png_settings(page, source)["prompt"] == "first picture, a red barn"
    screenshot(page, tmp_path, "caption-selected-history")


def test_reuse_the_seed_of_the_second_image(page, tmp_path):
    panel = open_tab(page, "Generate")
    generate(panel, "two cats on a sofa", seed=77, images=2)
    gallery = block(panel, "Images")
    gallery.locator("button.thumbnail-item").nth(1).click()
    panel.get_by_role("button", name="♻ Seed of the selected image").click()
    seed = panel.get_by_label("Seed (-1 = random)")
    page.wait_for_function("element => element.value === '78'", arg=seed.element_handle(), timeout=TIMEOUT_MS)
    # The first image's seed comes back when the first is selected.
    gallery.locator("button.thumbnail-item").nth(0).click()
    panel.get_by_role("button", name="♻ Seed of the selected image").click()
    page.wait_for_function("element => element.value === '77'", arg=seed.element_handle(), timeout=TIMEOUT_MS)
    screenshot(page, tmp_path, "reuse-seed")


def test_ctrl_enter_in_the_prompt_generates_once(page, tmp_path, tiny_app_url):
    from gradio_client import Client

    panel = open_tab(page, "Generate")
    assert panel.get_by_text("Ctrl+Enter (⌘+Enter on a Mac) generates.").is_visible()  # the shortcut is shown
    prompt = panel.get_by_label("Prompt", exact=True)
    words = f"a lighthouse at dusk {time.time_ns()}"  # this test's own prompt, to count its images by
    prompt.fill(words)
    panel.get_by_label("Steps (empty = preset)").fill("2")
    prompt.press("Control+Enter")
    assert "2/2 steps" in wait_for_new_summary(panel, "")
    assert prompt.input_value() == words  # no newline typed into the prompt
    time.sleep(1.0)  # a second run, if the key had started one, would have finished by now
    _shown, records = Client(tiny_app_url, verbose=False).predict(0, api_name="/history")
    assert [record["prompt"] for record in records["records"]].count(words) == 1  # one run, one image
    screenshot(page, tmp_path, "ctrl-enter")


def test_a_failed_run_leaves_its_sentence_beside_the_button(page, tmp_path):
    panel = open_tab(page, "Generate")
    panel.get_by_label("Prompt", exact=True).fill("   ")
    panel.get_by_role("button", name="Generate", exact=True).click()
    status = panel.locator("#generate-error")
    status.get_by_text("Write a prompt first: describe the image you want.").wait_for()
    # The button and the sentence are neighbours: the sentence starts within 120 px below the button.
    button_box = panel.get_by_role("button", name="Generate", exact=True).bounding_box()
    status_box = status.bounding_box()
    assert 0 <= status_box["y"] - (button_box["y"] + button_box["height"]) < 120
    # The next successful run clears it.
    generate(panel, "a lighthouse at dusk")
    status_line_empties(status)
    screenshot(page, tmp_path, "error-beside-button")


def test_switching_model_keeps_valid_values(page, tmp_path):
    panel = open_tab(page, "Generate")
    steps = panel.get_by_label("Steps (empty = preset)")
    steps.fill("12")
    width = panel.get_by_label("number input for Width")
    width.fill("256")
    width.press("Enter")
    panel.get_by_label("3.5 Medium").check()
    panel.get_by_text(re.compile(r"Kept your steps 12; empty the box to use 3.5 Medium's preset")).first.wait_for()
    assert steps.input_value() == "12" and width.input_value() == "256"
    assert panel.get_by_label("Guidance / CFG (empty = preset)").get_attribute("placeholder") == "preset: 4.5"
    # The memory mode's choice is shown whole ("auto: the fastest that fits"), not cut off.
    memory_mode = panel.get_by_label("Memory mode (quantization / offload)")
    assert memory_mode.input_value() == "auto: the fastest that fits"
    assert memory_mode.evaluate("element => element.scrollWidth <= element.clientWidth")
    screenshot(page, tmp_path, "model-switch")


def test_phone_layout_keeps_generate_and_its_result_together(browser, tiny_app_url, tmp_path):
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    context.set_default_timeout(TIMEOUT_MS)
    phone = context.new_page()
    try:
        phone.goto(tiny_app_url)
        tab = phone.get_by_role("tab", name="Generate", exact=True)
        tab.wait_for()
        assert tab.is_visible() and phone.get_by_role("tab", name="Caption", exact=True).is_visible()
        tab.click()
        panel = phone.locator("[role=tabpanel]:visible")
        panel.get_by_label("Steps (empty = preset)").wait_for(state="hidden")  # the settings start closed
        panel.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
        button = panel.get_by_role("button", name="Generate", exact=True)
        button.click()
        panel.get_by_text(SUMMARY).wait_for()
        image = block(panel, "Images").locator("img").first
        image.wait_for()

        button.evaluate("element => element.scrollIntoView({block: 'start'})")  # the button at the top
        button_box, image_box = button.bounding_box(), image.bounding_box()  # in viewport coordinates
        phone.screenshot(path=str(tmp_path / "phone-generate-viewport.png"))  # what the phone shows now
        screenshot(phone, tmp_path, "phone-generate")
        # One screen holds both: the button, and under it (Stop and the shortcut hint between) the image.
        assert button_box["y"] >= 0 and button_box["x"] >= 0 and button_box["x"] + button_box["width"] <= PHONE["width"]
        gap = image_box["y"] - (button_box["y"] + button_box["height"])
        assert 0 < gap < PHONE["height"] / 3, f"the image starts {gap:.0f} px below the button"
        assert image_box["y"] + image_box["height"] / 2 < PHONE["height"], "the image's middle is off screen"
        assert image_box["x"] >= 0 and image_box["x"] + image_box["width"] <= PHONE["width"]
    finally:
        context.close()
