"""The guard: no event of the app hands back a file that the client named.

It reads the running app's ``/config`` and walks EVERY dependency, private ones
included (``api_visibility="private"`` hides an event from the API page, it does
not stop anyone from calling it). Each event gets server paths (a secret file in
the temp folder and the app's own ``app.py``) as every input value, as plain text
and as a file payload, and as its ``event_data`` (what a ``select`` sends). Then
every event is called again, so a path planted in session state by one event and
handed out by another is caught too (attack 1 of issue 15: gallery ``select``,
then "Caption the selected image").

An event may refuse (most do, with a sentence); what fails the test is a response
holding a file whose path is the client's, whose name is the secret's, or whose
URL serves the secret's or ``app.py``'s bytes. New events are covered as soon as
they exist.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

import pytest

from tests.event_calls import as_file, call_event, file_payloads, get_bytes, page_defaults, read_config

pytestmark = pytest.mark.api

APP_PY = Path(__file__).resolve().parent.parent / "app.py"
MAX_CALLS = 1200  # a bound on the walk, far above what today's ~50 events need


@pytest.fixture
def secret_file():
    token = secrets.token_hex(16)
    path = Path(tempfile.gettempdir()) / f"studio-guard-secret-{token}.png"
    path.write_bytes(f"SECRET {token}\n".encode())
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.slow  # over 3 s: the full suite runs it, the fast lane does not
def test_no_event_hands_back_a_file_the_client_named(tiny_app_url, secret_file):
    config = read_config(tiny_app_url)
    dependencies = config["dependencies"]
    assert len(dependencies) >= 30  # the whole app, private events included
    assert any(dependency.get("api_visibility") == "private" for dependency in dependencies)
    session = "guard-" + secrets.token_hex(6)
    forbidden_paths = {str(secret_file), str(secret_file.resolve()), str(APP_PY), str(APP_PY.resolve())}
    forbidden_bytes = {secret_file.read_bytes(), APP_PY.read_bytes()}
    values = [str(secret_file), as_file(secret_file), str(APP_PY), as_file(APP_PY)]
    event_datas = [
        {"value": str(secret_file), "index": 0},
        {"value": {"image": as_file(secret_file), "caption": None}, "index": 0},
        {"value": str(APP_PY), "index": 0},
    ]
    defaults = page_defaults(config)
    calls, leaks, answered, files_seen = 0, [], 0, 0

    def call(dependency: dict, data: list, event_data) -> None:
        nonlocal calls, answered, files_seen
        calls += 1
        assert calls <= MAX_CALLS, "the walk is bounded; raise MAX_CALLS only with a reason"
        # Queued events go through the queue, as the browser sends them (every yield of a generator
        # is seen); the others through /run/predict. One session throughout, so state persists.
        status, body = call_event(tiny_app_url, dependency, data, event_data, session_hash=session)
        if status == 200:
            answered += 1
        payloads = file_payloads(body)
        files_seen += len(payloads)
        for payload in payloads:
            name = f"{dependency.get('api_name')} (fn {dependency['id']})"
            if payload.get("path") in forbidden_paths:
                leaks.append(f"{name} returned the client's path {payload['path']}")
            if Path(str(payload.get("path") or "")).name == secret_file.name or payload.get("orig_name") in (
                secret_file.name,
                APP_PY.name,
            ):
                leaks.append(f"{name} returned a file named like the client's: {payload}")
            url = payload.get("url")
            if url:
                url = url if url.startswith("http") else tiny_app_url + url.lstrip("/")
                if get_bytes(url) in forbidden_bytes:
                    leaks.append(f"{name} served the client's file at {url}")

    # 1. Every event, with a path as every input at once, and as its event data.
    for dependency in dependencies:
        for index, value in enumerate(values):
            call(dependency, [value] * len(dependency["inputs"]), event_datas[index % len(event_datas)])
    # 2. Every input alone, the others at the page's defaults (so the path gets past choice checks).
    for dependency in dependencies:
        inputs = dependency["inputs"]
        for position in range(len(inputs)):
            for value in values[:2]:
                data = [defaults.get(component_id) for component_id in inputs]
                data[position] = value
                call(dependency, data, event_datas[position % 2])
    # 3. Every event again, as a page would send it: a path planted in session state by one event
    #    (e.g. a gallery selection) must not come out of another.
    for dependency in dependencies:
        call(dependency, [defaults.get(component_id) for component_id in dependency["inputs"]], None)

    assert answered > 0, "no event answered at all: the walk reached nothing"
    assert files_seen > 0, "no event returned any file: the check for leaks was never exercised"
    assert not leaks, "\n".join(leaks)
