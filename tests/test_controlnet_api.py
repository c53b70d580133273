"""/generate with a control image through gradio_client against `python app.py --tiny`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.catalog import CATALOG
from pipelines.sd3.control_maps import controlnet_refusal

pytestmark = pytest.mark.api

PHOTO = "assets/examples/astronaut.png"
SMALL = {"steps": 2, "width": 64, "height": 64, "seed": 7, "preview_every": 0}


def first_image(gallery) -> np.ndarray:
    return np.asarray(Image.open(gallery[0]["image"])).astype(np.int16)


@pytest.mark.slow
def test_generate_with_a_canny_control_image_changes_the_image_and_shows_the_map(tiny_client):
    from gradio_client import handle_file

    plain, *_ = tiny_client.predict("a red house", api_name="/generate", **SMALL)
    gallery, _, summary, *_, control_map, details = tiny_client.predict(
        "a red house",
        control_image=handle_file(PHOTO),
        control_type="canny",
        control_scale=1.0,
        api_name="/generate",
        **SMALL,
    )
    assert np.abs(first_image(gallery) - first_image(plain)).max() > 20
    assert details["controlnet"]["type"] == "canny" and details["controlnet"]["scale"] == 1.0
    assert "ControlNet canny 1" in summary
    shown = np.asarray(Image.open(control_map))
    assert shown.shape[:2] == Image.open(PHOTO).size[::-1] and set(np.unique(shown)) == {0, 255}


def test_a_control_image_with_medium_is_refused_with_the_sentence(tiny_client):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as refused:
        tiny_client.predict(
            "a red house", model="medium", control_image=handle_file(PHOTO), api_name="/generate", **SMALL
        )
    assert controlnet_refusal("sd35-medium") in str(refused.value)
    assert CATALOG["sd35-medium"].title in str(refused.value)


def test_system_plans_large_with_a_controlnet_in_every_mode(tiny_client):
    from pipelines.memory import SD3_MODES

    _, _, table, auto, details = tiny_client.predict(api_name="/system")
    plans = [plan for plan in details["planner"]["plans"] if plan["controlnet"]]
    assert [plan["mode"] for plan in plans] == [mode.key for mode in SD3_MODES]
    rows = [row for row in table["data"] if row[0] == "sd35-large + ControlNet"]
    assert len(rows) == len(SD3_MODES) and all(row[5] > 0 for row in rows)
    assert "sd35-large + ControlNet" in details["planner"]["auto"] and "sd35-large + ControlNet" in auto
