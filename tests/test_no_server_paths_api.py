"""No server path in what /blip_adapter_list, /caption and /system return (security issue, low items).

The app runs from the checkout, with tiny models in a temporary folder and its work root under the
system temp folder: none of those folders may appear anywhere in the JSON these endpoints return.
The operator still sees the real folders in the server's log.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from gradio_client import handle_file

pytestmark = pytest.mark.api

APP_ROOT = Path(__file__).resolve().parent.parent
PHOTO = APP_ROOT / "assets" / "examples" / "chelsea.png"


def text_of(value) -> str:
    return json.dumps(value, default=str)


def test_no_server_path_in_the_adapter_list_caption_details_or_system(tiny_client, tiny_root):
    forbidden = {str(APP_ROOT), str(Path(tiny_root).resolve()), str(tiny_root), tempfile.gettempdir() + "/"}
    listing = tiny_client.predict(api_name="/blip_adapter_list")
    *_, details = tiny_client.predict(handle_file(str(PHOTO)), strategy="greedy", api_name="/caption")
    report = tiny_client.predict(api_name="/system")
    for name, value in (("/blip_adapter_list", listing), ("/caption", details), ("/system", report)):
        shown = text_of(value)
        leaked = sorted(path for path in forbidden if path in shown)
        assert not leaked, f"{name} shows server paths {leaked}: {shown[:500]}"
    assert listing["available"] and details["captions"]  # the endpoints answered with real content
