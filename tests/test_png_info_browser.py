"""PNG Info at the browser: drop an A1111 PNG, read its settings, "Send to Generate" fills the form.

Uses the Chromium fixtures of tests/test_browser.py (skipped without Chromium and Playwright).
"""

from __future__ import annotations

import re

import pytest
from PIL import Image, PngImagePlugin

from tests.test_browser import browser, open_tab, page, screenshot, upload  # noqa: F401 - fixtures

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Another model than the Generate tab's first one (Large), so the model switch and its preset run too.
A1111_TEXT = (
    "a paper boat on a puddle <lora:ink:0.5>\nNegative prompt: blurry\n"
    "Steps: 7, Sampler: Euler, CFG scale: 5.5, Seed: 424242, Size: 256x192, Model: sd3.5_medium"
)


def test_send_to_generate_fills_the_generate_form(page, tmp_path):  # noqa: F811 - the fixture
    chunk = PngImagePlugin.PngInfo()
    chunk.add_text("parameters", A1111_TEXT)
    path = tmp_path / "boat.png"
    Image.new("RGB", (64, 48), "skyblue").save(path, pnginfo=chunk)

    panel = open_tab(page, "PNG Info")
    upload(panel, path)
    panel.get_by_text("Read from png parameters.").wait_for()
    assert panel.locator("textarea").first.input_value() == A1111_TEXT  # the raw text, the tab's one text box
    panel.get_by_role("button", name="Send to Generate →").click()

    generate = page.locator("[role=tabpanel]:visible")
    page.get_by_role("tab", name="Generate", exact=True, selected=True).wait_for()
    prompt = generate.get_by_label("Prompt", exact=True)
    seed = generate.get_by_label("Seed (-1 = random)")
    prompt.wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('input')].some(el => el.value === '424242')", timeout=10_000
    )
    page.wait_for_timeout(1500)  # let the model switch's preset land, if it were to overwrite anything
    assert prompt.input_value() == "a paper boat on a puddle <lora:ink:0.5>"
    assert seed.input_value() == "424242"
    assert generate.get_by_label("Negative prompt").input_value() == "blurry"
    steps = generate.get_by_label("Steps (empty = preset)")
    assert steps.input_value() == "7" and steps.get_attribute("placeholder") == "preset: 40"  # after Medium's preset
    assert generate.get_by_label("Guidance / CFG (empty = preset)").input_value() == "5.5"
    assert generate.get_by_role("radio", name=re.compile("Medium")).is_checked()
    screenshot(page, tmp_path, "png-info-send-to-generate")

    # Again with the model already chosen (no preset to wait for): the values land at once.
    steps.fill("3")
    panel = open_tab(page, "PNG Info")
    panel.get_by_role("button", name="Send to Generate →").click()
    page.get_by_role("tab", name="Generate", exact=True, selected=True).wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('textarea, input')].some(el => el.placeholder === 'preset: 40' && el.value === '7')",
        timeout=10_000,
    )
