"""Fair shares of the queue, in-process: the counting and ordering rules, the job-cost bound, and the
Gradio internals that ``components/queue_limits.py`` relies on (this fails loudly if an upgrade moves them).

Through the API against ``python app.py --tiny``: tests/test_queue_fairness_api.py.
"""

from __future__ import annotations

import inspect

import gradio as gr
import pytest
from gradio import queueing, route_utils, routes
from gradio.server_messages import ProcessCompletedMessage
from gradio.utils import error_payload
from PIL import Image

from components.queue_limits import ClientLimitedQueue, install_client_limits
from pipelines import settings
from pipelines.quotas import check_job_cost, fair_position, job_cost, pending_refusal
from pipelines.sd3.generation import GenerationRequest, GenerationService
from pipelines.sd3.image_to_image import ImageToImageRequest, check_request

# --- who waits, and who goes next -------------------------------------------------------------


def test_a_client_with_limit_jobs_waiting_is_refused_with_a_sentence_and_others_are_not():
    waiting = ["addr:x", "addr:x", "addr:y"]
    assert pending_refusal(waiting, "addr:x", 3) is None
    assert pending_refusal(waiting, "addr:x", 2) == (
        "You already have 2 jobs waiting; wait for one to finish, then send this again."
    )
    assert pending_refusal(waiting, "addr:y", 2) is None
    assert pending_refusal(waiting, "addr:z", 1) is None
    assert pending_refusal(["addr:x"], "addr:x", 1) == (
        "You already have 1 job waiting; wait for one to finish, then send this again."
    )


def test_a_newcomer_waits_for_one_job_of_each_client_not_for_all_of_them():
    # x runs one job and has four waiting: y's first job goes ahead of all four (x's running job was x's turn).
    assert fair_position(["x", "x", "x", "x"], "y", running={"x": 1}) == 0
    # Nothing running: y goes after x's first job.
    assert fair_position(["x", "x", "x"], "y", running={}) == 1
    # Round robin builds up: x0 y0 z0 x1 y1 x2 ...
    queue: list[str] = []
    for client in ["x", "x", "x", "y", "y", "z"]:
        queue.insert(fair_position(queue, client, running={}), client)
    assert queue == ["x", "y", "z", "x", "y", "x"]
    # A client's second job goes after everyone's first: first come, first served within a round.
    assert fair_position(["a", "b"], "a", running={}) == 2


# --- what one job may cost ----------------------------------------------------------------------


def test_the_public_job_cost_admits_every_preset_with_four_images_and_refuses_minutes_of_gpu():
    assert job_cost(28, 4, 1024, 1024, 1024) == 112  # Large's preset, 4 images: about 26 s on an H100
    for steps in (28, 4, 40):  # Large, Turbo, Medium presets
        check_job_cost(steps, 4, 1024, 1024, 1024, settings.MAX_PUBLIC_JOB_COST)
    with pytest.raises(ValueError) as refused:
        check_job_cost(100, 4, 1024, 1024, 1024, settings.MAX_PUBLIC_JOB_COST)
    assert str(refused.value) == (
        "100 steps x 4 images at 1024x1024 cost 400 image-steps at 1024x1024, and this public instance runs "
        "at most 160 a job; use at most 40 steps, or fewer images or a smaller size."
    )
    check_job_cost(100, 4, 1024, 1024, 1024, None)  # locally: no bound


def test_every_sd35_request_is_checked_against_the_cost_bound_before_a_model_loads(tiny_manager):
    bounded = GenerationService(tiny_manager, max_job_cost=settings.MAX_PUBLIC_JOB_COST)
    local = GenerationService(tiny_manager)
    heavy = GenerationRequest(prompt="a fox", steps=100, num_images=4, width=256, height=256)  # 1600 at 128²
    with pytest.raises(ValueError, match="cost 1600 image-steps at 128x128, and this public instance runs at most"):
        bounded.check(heavy)
    assert local.check(heavy).steps == 100
    # Image to image: the uploaded image sets the size (512² is 16 tiny default images), checked the same way.
    redraw = ImageToImageRequest(
        image=Image.new("RGB", (512, 512)), generation=GenerationRequest(prompt="a fox", steps=20)
    )
    with pytest.raises(ValueError, match="20 steps x 1 image at 512x512 cost 320 image-steps"):
        check_request(bounded, redraw, redraw.image)
    assert check_request(local, redraw, redraw.image).job.width == 512


# --- the Gradio internals the queue hook relies on ------------------------------------------------


def test_gradio_still_admits_jobs_where_the_client_limits_hook_in():
    """If this fails after a Gradio upgrade, re-read gradio/queueing.py and routes.py and adapt
    components/queue_limits.py (its docstring lists what it uses)."""
    # /queue/join and /call/<api_name> admit through blocks._queue.push(body=..., request=..., username=...).
    join = inspect.getsource(routes.App.create_app)
    assert "blocks._queue.push(" in join and '"queue_full": status.HTTP_503_SERVICE_UNAVAILABLE' in join
    assert list(inspect.signature(queueing.Queue.push).parameters) == ["self", "body", "request", "username"]
    # The queue's own cache path answers a join with a completed message, as a refusal does.
    push = inspect.getsource(queueing.Queue.push)
    assert "ProcessCompletedMessage(" in push and "event_queue.queue.append(event)" in push
    assert list(inspect.signature(queueing.Event).parameters) == ["session_hash", "fn", "request", "username"]
    assert {"output", "success", "title"} <= set(ProcessCompletedMessage.model_fields)
    assert error_payload(gr.Error("a sentence"), False)["error"] == "a sentence"
    assert callable(route_utils.get_fn)
    # Blocks.queue() builds a fresh Queue; install_client_limits replaces it with the same settings.
    with gr.Blocks() as demo:
        box = gr.Textbox()
        box.submit(lambda text: text, box, box, api_name="echo")
    demo.queue(max_size=7, default_concurrency_limit=2)
    original = demo._queue
    queue = install_client_limits(demo, 3)
    assert isinstance(queue, ClientLimitedQueue) and demo._queue is queue and queue.limit == 3
    for name in ("live_updates", "max_thread_count", "update_intervals", "max_size", "default_concurrency_limit"):
        assert getattr(queue, name) == getattr(original, name), name
    assert queue.max_size == 7 and queue.default_concurrency_limit == 2 and queue.blocks is demo
    for name in ("event_queue_per_concurrency_id", "active_jobs", "event_ids_to_events", "pending_event_ids_session"):
        assert hasattr(queue, name), name
    for name in ("pending_messages_per_session", "pending_message_lock", "send_message", "broadcast_estimations"):
        assert hasattr(queue, name), name
    assert hasattr(queueing.EventQueue("gpu", 1), "queue")
    # The event's BlockFunction says whether it is queued.
    assert all(hasattr(fn, "queue") for fn in demo.fns.values())
