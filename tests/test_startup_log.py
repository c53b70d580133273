"""`python app.py --tiny`'s start-up log: none of the library lines that tell the user nothing actionable."""

from __future__ import annotations

import logging
import time

import pytest

from pipelines.startup import KNOWN_NOISE, silence_known_noise
from tests.app_server import tiny_app

NOISE = [fragment for _, fragment, *_ in KNOWN_NOISE]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_each_known_line_is_dropped_at_its_logger_and_nothing_else_is():
    silence_known_noise()
    silence_known_noise()  # twice: still one filter per logger
    for logger_name, fragment in KNOWN_NOISE:
        logger = logging.getLogger(logger_name)
        assert len(logger.filters) == 1
        collect = _Collect()  # on the logger itself: transformers' loggers do not propagate to the root
        logger.addHandler(collect)
        level = logger.level
        # conftest quiets transformers (TRANSFORMERS_VERBOSITY=error); the app does not.
        logger.setLevel(logging.WARNING)
        try:
            logger.warning("`BlipImageProcessor` %s; falling back", fragment)
            logger.warning("another warning from %s", logger_name)
        finally:
            logger.removeHandler(collect)
            logger.setLevel(level)
        assert collect.messages == [f"another warning from {logger_name}"]


@pytest.mark.api
@pytest.mark.slow
def test_tiny_start_up_log_has_no_kernel_or_torchvision_noise(tmp_path):
    # An empty tiny folder: the app builds every tiny model (BLIP's and SD3.5's processors, diffusers
    # and with it bitsandbytes) and preloads BLIP, the steps that printed both lines.
    log_path = tmp_path / "app.log"
    # transformers' own default verbosity, as a user has it (conftest sets "error" for the test process).
    with tiny_app(tmp_path / "tiny-models", log_path, environment={"TRANSFORMERS_VERBOSITY": "warning"}):
        deadline = time.monotonic() + 90
        while "loaded blip-caption" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
    log = log_path.read_text()
    assert "loaded blip-caption" in log, log[-3000:]
    assert (tmp_path / "tiny-models" / "sd35-large" / "model_index.json").is_file()
    for line in NOISE:
        assert line not in log, f"the start-up log still has {line!r}"
    assert "torchvision" not in log and "kernels-community" not in log
