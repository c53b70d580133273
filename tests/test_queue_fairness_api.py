"""One client cannot monopolise the queue (security issue 9), through the API of `python app.py --tiny`.

An app of its own with STUDIO_MAX_PENDING_PER_CLIENT=2 and STUDIO_TRUSTED_PROXY_HOPS=1, so two
clients on 127.0.0.1 are told apart by the X-Forwarded-For address the (pretend) proxy appended;
every ``gradio_client.Client`` is a fresh session hash, as a flooder's would be. A long generation
holds the GPU while the admissions are checked, and is stopped (its own session's Stop) when they are:
the test waits on job states, never on the clock.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.client import Job, Status
from gradio_client.exceptions import AppError

from tests.app_server import tiny_app

pytestmark = [pytest.mark.api, pytest.mark.slow]  # starts an app of its own

LIMIT = 2
PHOTO = Path(__file__).resolve().parent.parent / "assets" / "examples" / "chelsea.png"
# Minutes on the tiny models at 256² (4 images x 100 steps, as in the flood): it holds the GPU
# until the test presses its Stop.
HOLD = {"prompt": "a fox", "steps": 100, "num_images": 4, "width": 256, "height": 256, "preview_every": 0}
# A few seconds each: still waiting when the bystander's caption is done, if the turns are right.
WAITING = {"prompt": "a cat", "steps": 20, "width": 128, "height": 128, "preview_every": 0}
STATE_TIMEOUT = 120  # seconds a job may take to reach a state (app start-up and BLIP loading included)
REFUSAL = f"You already have {LIMIT} jobs waiting; wait for one to finish, then send this again."


@pytest.fixture(scope="module")
def app_url(tiny_root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("fair-queue-app") / "app.log"
    environment = {"STUDIO_MAX_PENDING_PER_CLIENT": str(LIMIT), "STUDIO_TRUSTED_PROXY_HOPS": "1"}
    with tiny_app(tiny_root, log_path, environment=environment) as (_, url):
        yield url


def client(url: str, address: str) -> Client:
    """A new session (a fresh session hash) of the client that the proxy saw at ``address``."""
    return Client(url, verbose=False, download_files=False, headers={"X-Forwarded-For": address})


def reach(job: Job, *codes: Status) -> Status:
    """Wait until ``job`` is in one of ``codes`` or finished; its state then."""
    deadline = time.monotonic() + STATE_TIMEOUT
    while time.monotonic() < deadline:
        code = job.status().code
        if code in codes or job.done():
            return Status.FINISHED if job.done() else code
        time.sleep(0.05)
    raise AssertionError(f"the job did not reach {codes} in {STATE_TIMEOUT} s (it is {job.status().code})")


def test_one_client_gets_limit_jobs_waiting_and_another_client_goes_first(app_url):
    holder = client(app_url, "203.0.113.7")
    hold = holder.submit(**HOLD, api_name="/generate")
    assert reach(hold, Status.PROCESSING) == Status.PROCESSING

    # The flooder, one fresh session per job: LIMIT jobs wait, the next is refused with the sentence.
    waiting = [client(app_url, "203.0.113.7").submit(**WAITING, api_name="/generate") for _ in range(LIMIT)]
    for job in waiting:
        assert reach(job, Status.IN_QUEUE) == Status.IN_QUEUE
    refused = client(app_url, "203.0.113.7").submit(**WAITING, api_name="/generate")
    with pytest.raises(AppError) as error:
        refused.result(timeout=STATE_TIMEOUT)
    assert str(error.value) == REFUSAL

    # Another client (another address behind the same proxy) is admitted, and goes before the flooder's
    # waiting jobs: the running job was the flooder's turn.
    bystander = client(app_url, "198.51.100.2")
    caption = bystander.submit(handle_file(str(PHOTO)), strategy="greedy", api_name="/caption")
    assert reach(caption, Status.IN_QUEUE, Status.PROCESSING) != Status.FINISHED
    assert hold.status().code == Status.PROCESSING  # everything above happened while the GPU was held

    # Stop is unqueued, no job: the flooder is served it with LIMIT jobs waiting.
    holder.predict(api_name="/generate_stop")
    table, _, details = caption.result(timeout=STATE_TIMEOUT)
    assert details["captions"][0]["text"] and table["data"][0][1] == details["captions"][0]["text"]
    assert not any(job.done() for job in waiting), "the bystander's caption waited behind the flooder's queue"

    held_details = next(
        value for value in hold.result(timeout=STATE_TIMEOUT) if isinstance(value, dict) and "stopped" in value
    )
    assert held_details["stopped"] and held_details["steps_done"] < HOLD["steps"]
    for job in waiting:  # admitted for real: each draws its image
        gallery, *_ = job.result(timeout=STATE_TIMEOUT)
        assert len(gallery) == 1
    # Nothing of the flooder waits now: it is admitted again.
    again = client(app_url, "203.0.113.7").submit(**{**WAITING, "steps": 2}, api_name="/generate")
    gallery, *_ = again.result(timeout=STATE_TIMEOUT)
    assert len(gallery) == 1
