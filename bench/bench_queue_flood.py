"""A bystander's caption while one client floods the queue (security issue 9).

    python -m bench.bench_queue_flood [--jobs 12] [--app-dir DIR]

Starts ``python app.py --tiny`` (from ``--app-dir``, default this checkout) behind one trusted
proxy hop. The flooder (X-Forwarded-For 203.0.113.7) joins ``--jobs`` /generate jobs of 4 images x
100 steps, each under a fresh session hash; once the first one runs, a bystander (198.51.100.2)
sends one /caption, and its wait (submit to result) is printed beside its wait on an idle app.
The flooder's jobs waiting when the bystander joins come from Gradio's /queue/status.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from gradio_client import Client, handle_file
from gradio_client.client import Status

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "assets" / "examples" / "chelsea.png"
FLOOD = {"prompt": "a fox", "steps": 100, "num_images": 4, "width": 128, "height": 128, "preview_every": 0}


def caption_seconds(client: Client) -> float:
    started = time.perf_counter()
    client.submit(handle_file(str(PHOTO)), strategy="greedy", api_name="/caption").result(timeout=3600)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--app-dir", type=Path, default=ROOT)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests import app_server

    app_server.APP_ROOT = args.app_dir.resolve()  # app_process runs app.py there
    with tempfile.TemporaryDirectory() as work:
        tiny_root, log = Path(work) / "tiny", Path(work) / "app.log"
        environment = {"STUDIO_TRUSTED_PROXY_HOPS": "1"}
        with app_server.tiny_app(tiny_root, log, environment=environment) as (_, url):
            bystander = Client(url, verbose=False, headers={"X-Forwarded-For": "198.51.100.2"})
            caption_seconds(bystander)  # BLIP loaded
            idle = caption_seconds(bystander)
            flooder = Client(url, verbose=False, download_files=False, headers={"X-Forwarded-For": "203.0.113.7"})
            jobs = []
            for _ in range(args.jobs):
                flooder.session_hash = str(uuid.uuid4())  # a fresh session per job, as the flooder chooses
                jobs.append(flooder.submit(**FLOOD, api_name="/generate"))
                if len(jobs) == 1:
                    while jobs[0].status().code != Status.PROCESSING:
                        time.sleep(0.05)
            time.sleep(2)  # let the joins land before the bystander's (not a proof: the waits are the figure)
            with urllib.request.urlopen(url + "gradio_api/queue/status", timeout=10) as response:
                waiting = json.load(response)["queue_size"]  # the flooder's jobs waiting (Gradio's status route)
            flooded = caption_seconds(bystander)
            print(
                f"{args.app_dir}: {args.jobs} flood jobs (4 images x 100 steps, tiny 128²), {waiting} waiting; "
                f"bystander caption {flooded:.1f} s with the flood, {idle:.2f} s idle"
            )


if __name__ == "__main__":
    main()
