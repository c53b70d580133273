"""`python app.py` (the real models) on a machine that cannot reach the Hub: one sentence in seconds, and it keeps serving.

The app gets an empty Hugging Face cache, HF_ENDPOINT on a loopback port where nothing listens,
and HF_HUB_OFFLINE unset, as on a fresh machine without network. It cannot reach the real
network either: HTTP(S)_PROXY and ALL_PROXY point at the same closed port for every other
host, and analytics and telemetry are off.
"""

from __future__ import annotations

import time
import urllib.request

import pytest

from tests.app_server import app_process, free_port

EXAMPLE_IMAGE = "assets/examples/coffee.png"
SENTENCE_WITHIN_SECONDS = 45


@pytest.mark.api
@pytest.mark.slow
def test_no_network_gives_one_sentence_within_seconds_and_the_app_keeps_serving(tmp_path):
    from gradio_client import Client, handle_file

    closed = f"http://127.0.0.1:{free_port()}"  # bound once, then released: nothing listens there
    environment = {
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_ENDPOINT": closed,
        "HTTP_PROXY": closed,
        "HTTPS_PROXY": closed,
        "ALL_PROXY": closed,
        "NO_PROXY": "127.0.0.1,localhost",  # the app's own port and the closed endpoint only
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "STUDIO_RESULTS_DIR": str(tmp_path / "results"),
    }
    flags = ("--lora-dir", str(tmp_path / "loras"), "--adapter-dir", str(tmp_path / "adapters"))
    log_path = tmp_path / "app.log"
    started = time.monotonic()
    unset = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")
    with app_process(log_path, *flags, environment=environment, unset=unset) as (process, url):
        client = Client(url, verbose=False)
        with pytest.raises(Exception) as raised:  # gradio_client's AppError carries the gr.Error sentence
            client.predict(handle_file(EXAMPLE_IMAGE), api_name="/caption")
        elapsed = time.monotonic() - started
        message = str(raised.value)
        assert f"cannot reach the Hugging Face Hub at {closed}" in message, message
        assert "connection refused" in message
        for way_out in ("--model blip-caption=DIR", "HF_HUB_OFFLINE=1", "--tiny"):
            assert way_out in message, message
        assert "Check the files" not in message
        assert elapsed <= SENTENCE_WITHIN_SECONDS, f"the sentence took {elapsed:.0f} s"

        # Still serving: the page configuration answers, and a second caption fails just as fast.
        with urllib.request.urlopen(url + "config", timeout=5) as response:
            assert response.status == 200
        again = time.monotonic()
        with pytest.raises(Exception, match="cannot reach the Hugging Face Hub"):
            client.predict(handle_file(EXAMPLE_IMAGE), api_name="/caption")
        assert time.monotonic() - again < 10
        assert process.poll() is None

    log = log_path.read_text()
    assert "preloading blip-caption failed: This machine cannot reach the Hugging Face Hub" in log
    assert "Retrying in" not in log, "huggingface_hub retried requests: the probe did not stop the load"
