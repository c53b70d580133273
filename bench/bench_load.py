"""The Studio under load: 30 concurrent API requests against one request at a time.

    python -m bench.bench_load [--requests 30] [--queue-size 8] [--rounds 5]

Starts its own ``python app.py --tiny`` on a loopback port with ``STUDIO_QUEUE_SIZE`` set
small, so that some of the burst is refused with Gradio's queue-full message, as a public
instance would refuse it. Single-request latency is the median of ``--rounds`` rounds of
/caption, /match and /generate sent one after another; the burst sends ``--requests`` of the
same mix from as many threads at once. Every model event shares one GPU concurrency id with
a limit of 1, so under load requests wait their turn: the ratio says how much longer a user
waits in the crowd than alone. Tiny models: the work per request is small, so the figures
measure the serving path (queue, pre/postprocessing, HTTP), not the models.

A second burst repeats the first while one more visitor uploads the worst zip to
/caption_batch at the same moment: 8000 members all named ``a.png`` (the zip that once held
the GPU queue for minutes while its duplicate names were renamed one by one). The others'
p50/p95 are printed beside the first burst's, with how long the zip took to be answered.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import write_results

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "assets" / "examples" / "chelsea.png"
KINDS = ("caption", "match", "generate")
GENERATE = {"prompt": "a lighthouse at dusk", "seed": 7, "steps": 2, "width": 64, "height": 64, "preview_every": 0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(port: int, queue_size: int, log_path: Path) -> subprocess.Popen:
    """``app.py --tiny`` on 127.0.0.1:``port`` with a queue of ``queue_size``; returns once it answers."""
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "STUDIO_QUEUE_SIZE": str(queue_size),
        "STUDIO_RESULTS_DIR": tempfile.mkdtemp(prefix="bench-load-results-"),
    }
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--tiny", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise SystemExit(f"app.py --tiny exited early; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2):
                return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"app.py --tiny did not answer in 180 s; see {log_path}") from None
            time.sleep(0.5)


def request(client, kind: str) -> tuple[float, bool]:
    """(seconds, refused) for one request of ``kind``; any error other than a full queue is raised."""
    from gradio_client import handle_file
    from gradio_client.utils import QueueError

    started = time.perf_counter()
    try:
        if kind == "caption":
            job = client.submit(handle_file(str(PHOTO)), api_name="/caption")
        elif kind == "match":
            job = client.submit(handle_file(str(PHOTO)), texts="a cat\na cup of coffee", api_name="/match")
        else:
            job = client.submit(**GENERATE, api_name="/generate")
        result = job.result(timeout=300)
    except QueueError:
        return time.perf_counter() - started, True
    if not result:
        raise RuntimeError(f"/{kind} returned nothing")
    return time.perf_counter() - started, False


def worst_zip(folder: Path, members: int = 8000) -> Path:
    """A zip of ``members`` copies of one small PNG, every member named ``a.png``."""
    import io
    import warnings
    import zipfile

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    path = folder / "worst.zip"
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        warnings.simplefilter("ignore")  # zipfile warns about every duplicate name: that is the point
        for _ in range(members):
            archive.writestr("a.png", buffer.getvalue())
    return path


def upload_zip(client, path: Path) -> tuple[float, str]:
    """(seconds, outcome) for /caption_batch with ``path``: its summary's first line, or the refusal."""
    from gradio_client import handle_file

    started = time.perf_counter()
    try:
        _, _, summary = client.submit([handle_file(str(path))], api_name="/caption_batch").result(timeout=600)
        outcome = summary.splitlines()[0]
    except Exception as error:  # the refusal sentence is the expected answer
        outcome = f"refused: {str(error).splitlines()[0][:120]}"
    return time.perf_counter() - started, outcome


def burst(client, kinds: list[str], zip_path: Path | None = None) -> tuple[list[tuple[float, bool]], float, tuple]:
    """Every request of ``kinds`` at once (and the zip upload, if given); (outcomes, wall seconds, zip answer)."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(kinds) + 1) as pool:
        zipped = pool.submit(upload_zip, client, zip_path) if zip_path is not None else None
        if zipped is not None:
            time.sleep(0.5)  # the zip's upload starts first, so it holds a place in the queue
        outcomes = list(pool.map(lambda kind: request(client, kind), kinds))
        zip_answer = zipped.result() if zipped is not None else ()
    return outcomes, time.perf_counter() - started, zip_answer


def summary_of(outcomes: list[tuple[float, bool]]) -> dict:
    completed = [seconds for seconds, refused in outcomes if not refused]
    return {
        "completed": len(completed),
        "refused": sum(refused for _, refused in outcomes),
        "p50_s": round(statistics.median(completed), 4) if completed else None,
        "p95_s": round(percentile(completed, 0.95), 4) if completed else None,
    }


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the mix for the single-request latency")
    args = parser.parse_args(argv)

    from gradio_client import Client

    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"bench-load-{port}.log"
    app = start_app(port, args.queue_size, log_path)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        for kind in KINDS:
            request(client, kind)  # warm-up: the first request of each kind loads its model

        # 1. One request at a time.
        single = {kind: [] for kind in KINDS}
        for _ in range(args.rounds):
            for kind in KINDS:
                single[kind].append(request(client, kind)[0])
        single_all = [seconds for values in single.values() for seconds in values]

        # 2. The burst: every request at once, from its own thread.
        kinds = [KINDS[index % len(KINDS)] for index in range(args.requests)]
        outcomes, wall, _ = burst(client, kinds)

        # 3. The same burst while another visitor uploads the worst zip.
        with tempfile.TemporaryDirectory(prefix="bench-load-zip-") as folder:
            zip_path = worst_zip(Path(folder))
            with_zip, wall_with_zip, (zip_seconds, zip_outcome) = burst(client, kinds, zip_path)
    finally:
        app.terminate()
        try:
            app.wait(timeout=20)
        except subprocess.TimeoutExpired:
            app.kill()

    completed = [seconds for seconds, refused in outcomes if not refused]
    refused = sum(refused for _, refused in outcomes)
    single_p50 = statistics.median(single_all)
    row = {
        "requests": args.requests,
        "mix": list(KINDS),
        "queue_max_size": args.queue_size,
        "concurrency_limit": 1,
        "completed": len(completed),
        "refused": refused,
        "burst_wall_s": round(wall, 3),
        "single_p50_s": round(single_p50, 4),
        "single_p50_by_kind_s": {kind: round(statistics.median(values), 4) for kind, values in single.items()},
        "load_p50_s": round(statistics.median(completed), 4) if completed else None,
        "load_p95_s": round(percentile(completed, 0.95), 4) if completed else None,
        "ratio_p50": round(statistics.median(completed) / single_p50, 2) if completed else None,
        "with_worst_zip": {
            **summary_of(with_zip),
            "burst_wall_s": round(wall_with_zip, 3),
            "zip": "8000 members named a.png",
            "zip_seconds": round(zip_seconds, 3),
            "zip_outcome": zip_outcome,
        },
    }
    print(f"{args.requests} concurrent requests ({', '.join(KINDS)}), queue max_size {args.queue_size}, tiny models")
    print(f"| one at a time, p50 | {single_p50:.3f} s |")
    for kind, values in single.items():
        print(f"|   {kind} | {statistics.median(values):.3f} s |")
    if completed:
        print(f"| under load, p50 | {row['load_p50_s']:.3f} s |")
        print(f"| under load, p95 | {row['load_p95_s']:.3f} s |")
        print(f"| ratio (load p50 / single p50) | {row['ratio_p50']:.2f} |")
    print(f"| completed / refused (queue full) | {len(completed)} / {refused} |")
    zipped = row["with_worst_zip"]
    print(f"the same burst while one visitor uploads {zipped['zip']}:")
    if zipped["p50_s"] is not None:
        print(f"| under load + zip, p50 | {zipped['p50_s']:.3f} s |")
        print(f"| under load + zip, p95 | {zipped['p95_s']:.3f} s |")
    print(f"| completed / refused (queue full) | {zipped['completed']} / {zipped['refused']} |")
    print(f"| the zip answered in | {zipped['zip_seconds']:.2f} s: {zipped['zip_outcome']} |")
    path = write_results("load-cpu", "tiny", [row])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
