"""ControlNet for SD3.5 Large on the tiny models, in process: control maps, the draw, the refusals, the planner."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from pipelines.architectures import component_sizes
from pipelines.catalog import CATALOG, CONTROLNET_KEYS, DEPTH_ESTIMATOR_KEY
from pipelines.manager import ModelManager
from pipelines.memory import SD3_MODES, plan, plan_table
from pipelines.runtime import choose_runtime
from pipelines.sd3 import controlnet as sd3_controlnet
from pipelines.sd3.control_maps import (
    ControlSettings,
    blur_map,
    canny_map,
    check_control,
    controlnet_refusal,
    depth_map,
)
from pipelines.sd3.generation import GenerationService
from pipelines.sd3.jobs import GenerationRequest
from pipelines.sd3.png_metadata import parse_a1111_parameters
from tests.tolerances import assert_close_pixels

PHOTO = "assets/examples/astronaut.png"
REQUEST = GenerationRequest(prompt="a red house", steps=2, seed=5, width=64, height=64)


@pytest.fixture(scope="module")
def service(tiny_root):
    # A manager of its own: these tests unload models and count what is loaded.
    return GenerationService(ModelManager(choose_runtime("cpu"), tiny_root=tiny_root))


@pytest.fixture(scope="module")
def photo():
    return Image.open(PHOTO).convert("RGB").resize((96, 80))


def controlled(control_type="canny", scale=1.0, **changes):
    return dataclasses.replace(REQUEST, control=ControlSettings(Image.open(PHOTO), control_type, scale), **changes)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# --- control maps -------------------------------------------------------------------------


def test_canny_map_is_white_edges_on_black_at_the_image_size(photo):
    edges = canny_map(photo, 100, 200)
    assert edges.size == photo.size and edges.mode == "RGB"
    values = np.unique(np.asarray(edges))
    assert set(values) == {0, 255}  # cv2.Canny marks edges 255, the rest 0
    # Thresholds matter: a higher pair keeps fewer edge pixels.
    assert (np.asarray(canny_map(photo, 200, 250)) > 0).sum() < (np.asarray(edges) > 0).sum()


def test_blur_map_keeps_the_size_and_smooths(photo):
    blurred = blur_map(photo)
    assert blurred.size == photo.size and blurred.mode == "RGB"
    # Neighbouring pixels differ much less after a Gaussian blur.
    assert np.abs(np.diff(pixels(blurred), axis=1)).mean() < np.abs(np.diff(pixels(photo), axis=1)).mean() / 2


def test_depth_map_is_grey_full_range_at_the_image_size(service, photo):
    estimator = service.manager.get(DEPTH_ESTIMATOR_KEY)
    depth = depth_map(photo, estimator)
    assert depth.size == photo.size and depth.mode == "RGB"
    array = np.asarray(depth)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    assert array.min() == 0 and array.max() == 255  # scaled to the full 8-bit range


def test_canny_thresholds_are_checked_with_a_sentence(photo):
    with pytest.raises(ValueError, match="must be below canny_high"):
        canny_map(photo, 200, 100)
    with pytest.raises(ValueError, match="canny_low"):
        canny_map(photo, 0, 100)


# --- refusals before anything loads ------------------------------------------------------------


@pytest.mark.parametrize("model", ["medium", "large-turbo"])
def test_a_controlnet_with_medium_or_turbo_is_refused_with_one_sentence(service, model):
    loaded_before = {entry.key for entry in service.manager.loaded_models()}
    request = controlled(model=model)
    with pytest.raises(ValueError) as refused:
        service.prepare(request)
    key = {"medium": "sd35-medium", "large-turbo": "sd35-large-turbo"}[model]
    assert str(refused.value) == controlnet_refusal(key)
    sentence = str(refused.value)
    assert sentence.endswith(".") and ". " not in sentence and "Large only" in sentence  # one sentence
    assert {entry.key for entry in service.manager.loaded_models()} == loaded_before  # nothing loaded


def test_bad_control_settings_are_refused_with_a_sentence():
    image = Image.open(PHOTO)
    with pytest.raises(ValueError, match="Unknown control_type 'pose'"):
        check_control(ControlSettings(image, "pose"), "sd35-large")
    with pytest.raises(ValueError, match="control_scale"):
        check_control(ControlSettings(image, "canny", 3.0), "sd35-large")
    with pytest.raises(ValueError, match="control image"):
        check_control(ControlSettings(b"not an image", "canny"), "sd35-large")


# --- drawing -------------------------------------------------------------------------------


def test_canny_at_scale_one_changes_the_image_and_at_zero_equals_no_controlnet(service):
    plain = service(REQUEST, save=False).images[0]
    full = service(controlled(scale=1.0), save=False)
    control_map = full.control_map
    off = service(controlled(scale=0.0), save=False)
    assert np.abs(pixels(full.images[0]) - pixels(plain)).max() > 20
    # Scale 0 multiplies every ControlNet residual by 0: the MMDiT adds zeros, so the same image.
    assert_close_pixels(off.images[0], plain)
    assert control_map.size == Image.open(PHOTO).size and set(np.unique(np.asarray(control_map))) == {0, 255}


@pytest.mark.parametrize("control_type", ["depth", "blur"])
def test_depth_and_blur_controlnets_change_the_image(service, control_type):
    plain = service(REQUEST, save=False).images[0]
    outcome = service(controlled(control_type), save=False)
    assert np.abs(pixels(outcome.images[0]) - pixels(plain)).max() > 20
    assert outcome.details["controlnet"]["model"] == CATALOG[CONTROLNET_KEYS[control_type]].repo_id


def test_the_controlnet_pipeline_shares_large_s_loaded_components(service):
    outcome = service(controlled(), save=False)
    base = service.manager.get("sd35-large", variant=outcome.details["memory_mode"]["mode"])
    controlnet = service.manager.get(CONTROLNET_KEYS["canny"], variant=outcome.details["memory_mode"]["mode"])
    pipeline = sd3_controlnet.controlnet_pipeline(base, controlnet)
    for name, module in base.components.items():
        assert pipeline.components[name] is module, name  # the very same MMDiT, encoders, VAE, tokenizers
    assert pipeline.controlnet is controlnet
    assert sd3_controlnet.controlnet_pipeline(base, controlnet) is pipeline  # built once
    # No second MMDiT anywhere: the ControlNet pipeline holds no transformer weights but Large's.
    base_storage = {parameter.data_ptr() for parameter in base.transformer.parameters()}
    controlnet_storage = {parameter.data_ptr() for parameter in controlnet.parameters()}
    assert not base_storage & controlnet_storage
    assert {parameter.data_ptr() for parameter in pipeline.transformer.parameters()} == base_storage


def test_details_and_png_text_record_the_controlnet(service):
    outcome = service(controlled(scale=0.5), save=False)
    details = outcome.details
    assert details["controlnet"]["type"] == "canny" and details["controlnet"]["scale"] == 0.5
    assert details["controlnet"]["preprocess"] is True and details["controlnet"]["canny_low"] == 100
    _, _, pairs = parse_a1111_parameters(outcome.result.parameters[0])
    assert pairs["ControlNet"] == "canny, weight 0.5"
    assert outcome.result.settings[0]["controlnet"]["type"] == "canny"
    assert service(REQUEST, save=False).details["controlnet"] is None


def test_same_seed_same_image_and_each_image_redraws_alone(service):
    first = service(controlled(num_images=2), save=False)
    again = service(controlled(num_images=2), save=False)
    alone = service(controlled(seed=REQUEST.seed + 1), save=False)
    assert first.result.seeds == [REQUEST.seed, REQUEST.seed + 1]
    for a, b in zip(first.images, again.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the very same computation twice
    assert_close_pixels(first.images[1], alone.images[0])


def test_preprocess_off_uses_the_upload_as_the_map(service):
    request = dataclasses.replace(controlled(), control=ControlSettings(Image.open(PHOTO), "canny", preprocess=False))
    outcome = service(request, save=False)
    control_map = outcome.control_map
    assert np.array_equal(np.asarray(control_map), np.asarray(Image.open(PHOTO).convert("RGB")))
    assert outcome.details["controlnet"]["preprocess"] is False and outcome.details["controlnet"]["canny_low"] is None


def test_unloading_large_unloads_its_controlnets(service):
    service(controlled(), save=False)
    assert service.manager.is_loaded(CONTROLNET_KEYS["canny"])
    service.manager.unload("sd35-large")
    assert not service.manager.is_loaded(CONTROLNET_KEYS["canny"])


# --- real sizes and the planner ------------------------------------------------------------


@pytest.mark.parametrize("key", list(CONTROLNET_KEYS.values()))
def test_controlnet_counts_match_the_catalog_and_the_hub_file(key):
    (size,) = component_sizes(key)
    assert size.checkpoint_elements == CATALOG[key].parameters == 2_153_518_976
    # The Hub lists diffusion_pytorch_model.safetensors at 8.61 GB: these elements in fp32.
    assert round(size.checkpoint_elements * 4 / 1e9, 2) == 8.61


def test_depth_estimator_count_matches_the_catalog_and_the_model_card():
    (size,) = component_sizes(DEPTH_ESTIMATOR_KEY)
    assert size.checkpoint_elements == CATALOG[DEPTH_ESTIMATOR_KEY].parameters
    assert round(size.checkpoint_elements / 1e6, 1) == 24.8  # the model card's "24.8M"


@pytest.mark.parametrize("mode", [mode.key for mode in SD3_MODES])
def test_planner_has_large_with_a_controlnet_in_every_mode(mode):
    alone = plan("sd35-large", mode)
    with_controlnet = plan("sd35-large", mode, controlnet=CONTROLNET_KEYS["canny"])
    part = next(component for component in with_controlnet.components if component.name == "controlnet")
    assert part.weight_bytes > 0 and part.activation.bytes > 0
    assert with_controlnet.weight_bytes == alone.weight_bytes + part.weight_bytes
    assert with_controlnet.peak_bytes >= alone.peak_bytes
    assert with_controlnet.as_dict()["controlnet"] == CONTROLNET_KEYS["canny"]


@pytest.mark.slow  # builds every real architecture on the meta device (~4 s the first time)
def test_plan_table_lists_large_with_a_controlnet_per_mode_and_refuses_it_for_medium():
    rows = [item for item in plan_table() if item.controlnet]
    assert [item.mode.key for item in rows] == [mode.key for mode in SD3_MODES]
    assert {item.title for item in rows} == {"sd35-large + ControlNet"}
    with pytest.raises(ValueError, match="fits sd35-large only"):
        plan("sd35-medium", "bf16", controlnet=CONTROLNET_KEYS["canny"])


def test_a_gated_controlnet_load_names_its_page_and_the_token():
    from types import SimpleNamespace

    from huggingface_hub.errors import GatedRepoError

    from pipelines.manager import explain_load_failure

    spec = CATALOG[CONTROLNET_KEYS["depth"]]
    try:
        raise OSError("cannot load") from GatedRepoError(
            "401 gated", response=SimpleNamespace(headers={}, request=None)
        )
    except OSError as error:
        message = explain_load_failure(spec, spec.repo_id, error)
    assert "gated" in message and "HF_TOKEN" in message and spec.hub_url in message and spec.title in message


def test_loading_a_controlnet_never_evicts_the_large_it_draws_with(tiny_root):
    sizes = {"sd35-large": 100, CONTROLNET_KEYS["canny"]: 100}
    manager = ModelManager(
        choose_runtime("cpu"),
        tiny_root=tiny_root,
        memory_budget_bytes=1,  # nothing fits: every load wants to make room
        estimate_bytes=lambda key, variant: sizes.get(key, 1),
    )
    manager.get("sd35-large", variant="bf16")
    manager.get(CONTROLNET_KEYS["canny"], variant="bf16", keep=("sd35-large",))
    assert manager.is_loaded("sd35-large") and manager.is_loaded(CONTROLNET_KEYS["canny"])
    notes = []
    manager.get(CONTROLNET_KEYS["blur"], variant="bf16", notify=notes.append, keep=("sd35-large",))
    assert manager.is_loaded("sd35-large") and not manager.is_loaded(CONTROLNET_KEYS["canny"])
    assert notes and "ControlNet (Canny)" in notes[0]
