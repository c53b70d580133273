"""Calling any event of the running app over raw HTTP, as a browser or a hostile script would.

``/config`` lists every dependency (fn_index), private ones included: ``api_visibility="private"``
hides an event from the API page, it does not stop anyone from calling it. Queued events go through
``/gradio_api/queue/join`` and the session's event stream; the others through
``/gradio_api/run/predict``. Shared by the guards that walk every event (tests/test_event_paths.py,
tests/test_every_event_under_attack.py), so an event added to the app is walked without anyone
listing it.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path

REQUEST_TIMEOUT_S = 60


class EventTimeout(Exception):
    """The event did not complete before the caller's deadline."""


def read_config(base_url: str) -> dict:
    return json.loads(get_bytes(base_url + "config"))


def component_types(config: dict) -> dict[int, str]:
    """Component id -> its type (``textbox``, ``image``, ``state``, ...)."""
    return {component["id"]: component["type"] for component in config["components"]}


def page_defaults(config: dict) -> dict[int, object]:
    """Component id -> the value the page starts with (what a browser would send untouched)."""
    return {component["id"]: component.get("props", {}).get("value") for component in config["components"]}


def event_name(dependency: dict) -> str:
    """The name an event is known by: its api_name (Gradio makes them unique), else ``fn_<index>``."""
    return dependency.get("api_name") or f"fn_{dependency['id']}"


def post_json(url: str, payload: dict | bytes, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, dict | None]:
    """POST a JSON body (a dict, or bytes already encoded) and return (status, decoded body or None)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body or b"null")
        except ValueError:
            return error.code, None


def queue_call(
    base_url: str, payload: dict | bytes, session_hash: str, timeout: float = REQUEST_TIMEOUT_S
) -> tuple[int, list]:
    """Join the queue as the browser does and read the session's stream until this event completes.

    Returns the status of the join and every message's ``output`` (generators stream several);
    raises EventTimeout once ``timeout`` seconds have passed without completion.
    """
    deadline = time.monotonic() + timeout
    status, joined = post_json(base_url + "gradio_api/queue/join", payload, timeout=timeout)
    if status != 200 or not isinstance(joined, dict):
        return status, [joined]
    event_id = joined["event_id"]
    stream_url = f"{base_url}gradio_api/queue/data?session_hash={session_hash}"
    outputs = []
    remaining = max(deadline - time.monotonic(), 0.1)
    try:
        with urllib.request.urlopen(stream_url, timeout=remaining) as stream:
            for raw in stream:
                if time.monotonic() > deadline:
                    raise EventTimeout(f"no process_completed within {timeout:.0f} s")
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[len("data:") :])
                if message.get("event_id") != event_id:
                    continue
                if "output" in message:
                    outputs.append(message["output"])
                if message.get("msg") == "process_completed":
                    return (200 if message.get("success") else 500), outputs
    except TimeoutError as error:  # the socket waited past the deadline for a line
        raise EventTimeout(f"no process_completed within {timeout:.0f} s") from error
    return status, outputs


def call_event(
    base_url: str,
    dependency: dict,
    data: list,
    event_data=None,
    session_hash: str | None = None,
    timeout: float = REQUEST_TIMEOUT_S,
    encode=json.dumps,
) -> tuple[int, list]:
    """Call one dependency by fn_index as the page does: through the queue when it is queued.

    ``encode`` turns the request dict into its JSON text (a caller may splice in raw JSON that
    Python cannot produce). Returns (status, outputs): a list of every output for queued events,
    a one-element list holding the response body otherwise.
    """
    session_hash = session_hash or "walk-" + secrets.token_hex(6)
    targets = dependency.get("targets") or [[None, None]]
    payload = {
        "data": data,
        "event_data": event_data,
        "fn_index": dependency["id"],
        "trigger_id": targets[0][0],
        "session_hash": session_hash,
    }
    body = encode(payload).encode()
    if dependency.get("queue"):
        return queue_call(base_url, body, session_hash, timeout=timeout)
    status, answer = post_json(base_url + "gradio_api/run/predict", body, timeout=timeout)
    return status, [answer]


def upload(base_url: str, name: str, content: bytes, timeout: float = REQUEST_TIMEOUT_S) -> dict:
    """Upload a file through Gradio's upload route, as a client does; returns its FileData dict."""
    boundary = "walk" + secrets.token_hex(12)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        base_url + "gradio_api/upload",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        (path,) = json.loads(response.read())
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def get_bytes(url: str, timeout: float = REQUEST_TIMEOUT_S) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError):
        return None


def file_payloads(value) -> list[dict]:
    """Every file object (a dict with a ``path`` or ``url``) anywhere inside a response."""
    found = []
    if isinstance(value, dict):
        if isinstance(value.get("path"), str) or (isinstance(value.get("url"), str) and "file=" in value["url"]):
            found.append(value)
        for item in value.values():
            found += file_payloads(item)
    elif isinstance(value, list | tuple):
        for item in value:
            found += file_payloads(item)
    return found


def as_file(path: Path | str) -> dict:
    """A FileData dict naming a server path directly (never uploaded): every file input must refuse it."""
    return {"path": str(path), "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}
