"""Many users at once: 30 concurrent gradio_client requests, and one GPU queue for every model.

The load test fires a mix of /caption, /match and /generate at a `--tiny` app from 30 threads:
ten clients (ten X-Forwarded-For addresses behind one trusted proxy hop), three requests each,
so no client passes its pending-job limit (STUDIO_MAX_PENDING_PER_CLIENT, 4). Every request must
either come back with a correct result (the same result a single request gives: concurrent
requests must not leak into each other) or be refused with Gradio's queue-full message. ``python -m bench.bench_load`` runs the same mix against an app
with a small queue, where refusals really happen.
"""

from __future__ import annotations

import concurrent.futures
import io
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.utils import QueueError
from PIL import Image

from pipelines import settings

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "assets" / "examples" / "chelsea.png"
REQUESTS = 30
CLIENTS = 10  # each sends REQUESTS / CLIENTS, under the per-client limit of waiting jobs
KINDS = ("caption", "match", "generate")
REQUEST_TIMEOUT = 120  # seconds one request may take, queue included
OVERALL_TIMEOUT = 180  # seconds for all of them: a hang fails the test instead of stalling the suite
MATCH_TEXTS = "a cat on a sofa\na cup of coffee\na rocket launch"
GENERATE = {"prompt": "a lighthouse at dusk", "seed": 7, "steps": 2, "width": 64, "height": 64, "preview_every": 0}

# Every event that serves a user and runs a model (or changes one a running event uses) must
# share the GPU concurrency id. A new endpoint fails test_no_queued_event_escapes_the_classification
# until it is listed here or below.
MODEL_EVENTS = (
    "caption",
    "caption_batch",
    "blip_adapter_load",  # attaches LoRA weights to the BLIP a running caption uses
    "blip_adapter_unload",  # takes them out again
    "match",
    "attention",
    "generate",
    "lora_load",  # changes the SD3 pipeline a running generation uses
    "lora_unload",
    "roundtrip",
    "roundtrip_image",
    "img2img",
    "inpaint",
    "variations",
    "evaluate",
    "train_load_result",  # loads a trained adapter into the pipeline
    "unload",  # would pull a model away from a running generation (issue 15, attack 6)
)
OUTSIDE_GPU_QUEUE = (
    "system",  # the planner works on the meta device: no weights run
    "scoreboard",  # reads files and meta-device architectures
    "train_start",  # checks a dataset (one at a time, its own concurrency id) and starts a subprocess
    "caption_batch_export",  # rewrites the last batch's zip with edited captions: file copying, no model
    "png_info",  # reads an upload's metadata chunks (no pixel decoded) on the CPU queue
)


def send(client: Client, kind: str):
    """Submit one request of ``kind``; returns the job."""
    if kind == "caption":
        return client.submit(handle_file(str(PHOTO)), api_name="/caption")
    if kind == "match":
        return client.submit(handle_file(str(PHOTO)), texts=MATCH_TEXTS, api_name="/match")
    return client.submit(**GENERATE, api_name="/generate")


def essence(kind: str, result) -> object:
    """What must be identical between a single request and the same request under load; checks it is sane."""
    if kind == "caption":
        table, _, details = result
        text = details["captions"][0]["text"]
        assert table["data"][0][1] == text and text.strip() and details["captions"][0]["score"] <= 0
        return text
    if kind == "match":
        _, _, _, details = result
        ranking = details["text_ranking"]
        means = [details["scores"][0][index]["mean_logprob"] for index in ranking]
        assert sorted(ranking) == [0, 1, 2] and means == sorted(means, reverse=True)
        return tuple(ranking), tuple(round(mean, 5) for mean in means)
    gallery, seed, *_ = result
    assert seed == GENERATE["seed"] and len(gallery) == 1
    response = httpx.get(gallery[0]["image"]["url"], timeout=REQUEST_TIMEOUT)  # the client only names the file
    response.raise_for_status()
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.format == "PNG" and image.size == (GENERATE["width"], GENERATE["height"])
        return np.asarray(image.convert("RGB")).tobytes()


def run_one(client: Client, kind: str) -> tuple[str, float, object]:
    """(kind, seconds, essence) or (kind, seconds, QueueError) for one request."""
    started = time.perf_counter()
    try:
        result = send(client, kind).result(timeout=REQUEST_TIMEOUT)
    except QueueError as error:
        return kind, time.perf_counter() - started, error
    return kind, time.perf_counter() - started, essence(kind, result)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@pytest.fixture(scope="module")
def proxied_app_url(tiny_root, tmp_path_factory):
    """`python app.py --tiny` behind one trusted proxy hop: clients are told apart by X-Forwarded-For."""
    from tests.app_server import tiny_app

    log_path = tmp_path_factory.mktemp("load-app") / "app.log"
    with tiny_app(tiny_root, log_path, environment={"STUDIO_TRUSTED_PROXY_HOPS": "1"}) as (_, url):
        yield url


@pytest.mark.api
@pytest.mark.slow
def test_thirty_concurrent_requests_complete_correctly_or_are_refused_as_queue_full(proxied_app_url):
    # Sessions of their own, so Stop requests of other tests never reach them; files are fetched only where checked.
    clients = [
        Client(proxied_app_url, verbose=False, download_files=False, headers={"X-Forwarded-For": f"192.0.2.{number}"})
        for number in range(1, CLIENTS + 1)
    ]
    expected = {kind: run_one(clients[0], kind)[2] for kind in KINDS}  # one at a time: the reference answers

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=REQUESTS) as pool:
        futures = [
            pool.submit(run_one, clients[index % CLIENTS], KINDS[index % len(KINDS)]) for index in range(REQUESTS)
        ]
        done, not_done = concurrent.futures.wait(futures, timeout=OVERALL_TIMEOUT)
        assert not not_done, f"{len(not_done)} of {REQUESTS} requests hung past {OVERALL_TIMEOUT} s"
    wall = time.perf_counter() - started

    outcomes = [future.result() for future in futures]  # re-raises any error that was not a queue refusal
    refused = [seconds for _, seconds, answer in outcomes if isinstance(answer, QueueError)]
    for kind, _, answer in outcomes:
        if isinstance(answer, QueueError):
            assert "Queue is full" in str(answer)
        else:
            assert answer == expected[kind], f"a concurrent {kind} request gave another answer than a single one"
    latencies = [seconds for _, seconds, answer in outcomes if not isinstance(answer, QueueError)]
    print(
        f"\nload: {REQUESTS} requests ({', '.join(KINDS)}) in {wall:.1f} s; completed {len(latencies)}, "
        f"refused {len(refused)} (queue max_size {settings.QUEUE_MAX_SIZE}); "
        f"p50 {statistics.median(latencies):.2f} s, p95 {percentile(latencies, 0.95):.2f} s"
    )
    assert len(latencies) + len(refused) == REQUESTS
    assert latencies, "every request was refused"


@pytest.fixture(scope="module")
def tiny_blocks(tiny_root):
    """The whole app, built in this process on the tiny models (no server)."""
    import app
    from pipelines.startup import build_studio

    studio = build_studio(["--tiny", "--tiny-dir", str(tiny_root), "--no-preload"])
    return app.build_app(studio)


def queued_events(blocks) -> dict:
    return {fn.api_name: fn for fn in blocks.fns.values() if fn.api_name and fn.queue}


@pytest.mark.parametrize("event", MODEL_EVENTS)
def test_every_event_that_runs_a_model_shares_the_gpu_concurrency_id(tiny_blocks, event):
    events = queued_events(tiny_blocks)
    assert event in events, f"/{event} is not a queued event"
    assert events[event].concurrency_id == settings.GPU_CONCURRENCY_ID


def test_no_queued_event_escapes_the_classification(tiny_blocks):
    """A new endpoint must be listed above: with a model it joins the GPU queue, without one it says why not."""
    public = {
        name
        for name, fn in queued_events(tiny_blocks).items()
        if getattr(fn, "api_visibility", "public") == "public" and not name.startswith("lambda")
    }
    assert public - set(MODEL_EVENTS) - set(OUTSIDE_GPU_QUEUE) == set()
    for name in OUTSIDE_GPU_QUEUE:
        assert queued_events(tiny_blocks)[name].concurrency_id != settings.GPU_CONCURRENCY_ID, name
