"""Start `python app.py --tiny ...` on a free loopback port for a test, and stop it after."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

APP_ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def tiny_app(
    tiny_root: Path, log_path: Path, *flags: str, environment: dict | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python app.py --tiny --tiny-dir TINY_ROOT --port P *flags``; yields (process, url) once it answers.

    The app runs offline, without analytics, with ``environment`` on top of this process's; its
    output goes to ``log_path``, whose tail is shown if it exits early or does not start in time.
    """
    with app_process(log_path, "--tiny", "--tiny-dir", str(tiny_root), *flags, environment=environment) as running:
        yield running


@contextlib.contextmanager
def app_process(
    log_path: Path, *flags: str, environment: dict | None = None, unset: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python app.py --port P *flags`` (the real models unless ``--tiny`` is among the flags).

    The environment is this process's with HF_HUB_OFFLINE=1 and analytics off, then ``environment``
    on top, then the variables in ``unset`` removed.
    """
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(environment or {})}
    for name in unset:
        env.pop(name, None)
    if "--outputs" not in flags and "--no-outputs" not in flags:  # never the checkout's own outputs folder
        flags = (*flags, "--outputs", str(Path(log_path).parent / f"outputs-{port}"))
    command = [sys.executable, "app.py", "--port", str(port), *flags]
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, cwd=APP_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py {' '.join(flags)} exited early:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "config", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"app.py did not start in {START_SECONDS} s:\n{log_path.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
