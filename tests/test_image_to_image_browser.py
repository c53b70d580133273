"""A person at the browser inpaints: upload into the editor, brush a stroke, Inpaint (tests/test_browser.py's way)."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from tests.test_browser import block, browser, page, screenshot  # noqa: F401 - fixtures, shared

pytestmark = pytest.mark.browser

SIDE = 128


def test_brush_a_mask_and_inpaint(page, tmp_path):  # noqa: F811 - the fixture
    grid = np.random.default_rng(4).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    photo = tmp_path / "photo.png"
    Image.fromarray(grid).resize((SIDE, SIDE), Image.Resampling.BICUBIC).save(photo)

    page.get_by_role("tab", name="Image to image", exact=True).click()
    page.get_by_role("tab", name="Inpaint", exact=True).click()
    editor = page.locator(".block", has_text="Image: brush over what to repaint").last
    editor.locator("input[type=file]").set_input_files(str(photo))
    editor.get_by_role("button", name="Brush", exact=True).click()
    canvas = editor.locator("canvas").first
    box = canvas.bounding_box()
    middle_x, middle_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(middle_x - 30, middle_y)
    page.mouse.down()
    for step in range(10):  # a short stroke through the middle of the picture
        page.mouse.move(middle_x - 30 + 6 * step, middle_y + 2 * step)
    page.mouse.up()

    panel = page.locator("[role=tabpanel]:visible").last
    panel.get_by_label("Prompt (empty = BLIP's caption of the image)").fill("a red fox")
    panel.get_by_label("Steps (empty = preset)").fill("2")
    page.get_by_role("button", name="Inpaint", exact=True).click()
    page.get_by_text(re.compile(r"inpaint: 1 image\(s\), 128x128, strength 0.75 = 2/2 denoising steps")).wait_for()

    shown = block(panel, "Images").locator("img").first
    shown.wait_for()
    result = np.asarray(Image.open(io.BytesIO(page.request.get(shown.get_attribute("src")).body())).convert("RGB"))
    source = np.asarray(Image.open(photo).convert("RGB"))
    assert result.shape == source.shape
    assert np.array_equal(result[:16, :16], source[:16, :16])  # a corner far from the stroke: pasted back
    middle = (slice(SIDE // 2 - 8, SIDE // 2 + 8),) * 2
    assert not np.array_equal(result[middle], source[middle])  # under the stroke: repainted
    screenshot(page, tmp_path, "inpaint")
