"""Shared fixtures: the tiny models are built once per test session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines.manager import ModelManager  # noqa: E402
from pipelines.runtime import choose_runtime  # noqa: E402
from pipelines.tiny import ensure_tiny_models  # noqa: E402

# Tiny models are latency-bound: one thread beats two, and it keeps OpenMP from
# spinning against a second process (an app under test) on a 2-core machine.
# STUDIO_TEST_THREADS changes it: CI runs the numeric tests again with every core, so a
# comparison that only holds at one thread fails on every machine, not on some.
torch.set_num_threads(int(os.environ.get("STUDIO_TEST_THREADS") or 1))

# The in-process tests of model numerics (BLIP, batches, matching, attention, SD3, LoRA).
# CI runs them a second time under another kernel set and thread count (`-m numeric`).
NUMERIC_MODULES = {
    "test_attention",
    "test_batch_caption",
    "test_blip",
    "test_blip_adapters",
    "test_caption_folder",
    "test_controlnet",
    "test_diverse_beam",
    "test_lora",
    "test_lora_formats",
    "test_matching",
    "test_sd3",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("browser") is not None:
            item.add_marker(pytest.mark.slow)  # a real browser against a server: the slow lane
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        in_process = item.get_closest_marker("api") is None and item.get_closest_marker("slow") is None
        if module in NUMERIC_MODULES and in_process:
            item.add_marker(pytest.mark.numeric)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """All tiny models, built once into a fresh folder (never a developer's cache)."""
    return ensure_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_manager(tiny_root):
    return ModelManager(choose_runtime("cpu"), tiny_root=tiny_root)


@pytest.fixture(scope="session")
def tiny_captioner(tiny_manager):
    return tiny_manager.get("blip-caption")


@pytest.fixture(scope="session")
def tiny_app_url(tiny_root, tmp_path_factory):
    """`python app.py --tiny` running on a loopback port for the whole session."""
    from tests.app_server import tiny_app

    log_path = tmp_path_factory.mktemp("app") / "app.log"
    results_dir = tmp_path_factory.mktemp("results")  # evaluation files the app writes stay out of the repo
    with tiny_app(tiny_root, log_path, environment={"STUDIO_RESULTS_DIR": str(results_dir)}) as (_, url):
        yield url


@pytest.fixture(scope="session")
def tiny_client(tiny_app_url):
    from gradio_client import Client

    return Client(tiny_app_url, verbose=False)
