"""Visitors' words shown in Markdown (trigger words, LoRA names, captions) stay text: no link, image or HTML."""

from __future__ import annotations

import pytest
from markdown_it import MarkdownIt

from components.common import markdown_text
from components.generate import generation_summary
from components.image_to_image import image_to_image_summary

HOSTILE = ["[x](http://evil)", "![i](http://evil/x.png)", "<img src=x onerror=alert(1)>", "**loud**", "a\n# heading"]


def rendered(markdown: str) -> str:
    return MarkdownIt("commonmark").render(markdown)


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_renders_as_itself(text):
    html = rendered(markdown_text(text))
    assert "<a " not in html and "<img" not in html and "<strong>" not in html and "<h1>" not in html
    shown = " ".join(text.splitlines()).replace("<", "&lt;").replace(">", "&gt;")
    assert html == f"<p>{shown}</p>\n"


def test_a_trigger_word_and_a_lora_name_come_back_escaped_in_the_generate_summary():
    details = {
        "seeds": [1], "files": ["a.png"], "num_images": 1, "size": "64x64", "steps_done": 2, "steps": 2,
        "guidance": 1.0, "timings": {"generate_seconds": 0.1}, "tiny": False, "stopped": False,
        "memory_mode": {"mode": "bf16", "reason": "fits", "dtype": "bfloat16"}, "controlnet": None,
        "loras": [{"name": "[pixel](http://evil)", "weight": 0.8}], "lora_fused": False,
        "trigger_words_added": ["[x](http://evil)"],
    }  # fmt: skip
    summary = generation_summary(details)
    assert r"trigger words added: \[x\]\(http\://evil\)" in summary
    html = rendered(summary)
    assert "<a " not in html and "[x](http://evil)" in html and "[pixel](http://evil):0.8" in html


def test_blips_caption_comes_back_escaped_in_the_image_to_image_summary():
    details = {
        "mode": "img2img", "seeds": [1], "output_size": "64x64", "strength": 0.5, "steps_done": 1,
        "denoising_steps": 1, "steps": 2, "guidance": 1.0, "timings": {"generate_seconds": 0.1}, "loras": [],
        "caption": "![i](http://evil/x.png)", "resized": False, "stopped": False, "tiny": False,
    }  # fmt: skip
    html = rendered(image_to_image_summary(details))
    assert "<img" not in html and "![i](http://evil/x.png)" in html
