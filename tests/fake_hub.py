"""A fake Hugging Face Hub on 127.0.0.1 for tests that must see huggingface_hub's real requests (CI is offline).

It answers the few routes huggingface_hub calls for a model repo: model info
(``/api/models/<repo>[/revision/<rev>]``), paths-info, and HEAD/GET ``/<repo>/resolve/<rev>/<file>``
(with ``Range``). A private repo answers "not found" unless the request carries the operator's token.
Every request is recorded (method, path, whether it carried a token, the Range asked, bytes sent).

    with FakeHub({"someone/style": HubRepo({"style.safetensors": data})}) as hub:
        hub.point_huggingface_hub_here(monkeypatch)   # constants.ENDPOINT etc., offline mode off
        ...
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

OPERATOR_TOKEN = "hf_operator_secret"
MAX_REQUESTS = 500  # a test that makes more has a loop gone wrong: the server answers 429 past it
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_INFO = re.compile(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?$")
_PATHS = re.compile(r"^/api/models/([^/]+/[^/]+)/paths-info/([^/]+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class HubRepo:
    files: dict[str, bytes]
    private: bool = False
    sha: str = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str
    authorized: bool
    range: str | None
    sent: int = 0


@dataclass
class FakeHub:
    repos: dict[str, HubRepo]
    requests: list[Request] = field(default_factory=list)

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

            def do_POST(self):
                length = min(int(self.headers.get("Content-Length") or 0), 1 << 16)
                self.rfile.read(length)
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def point_huggingface_hub_here(self, monkeypatch) -> None:
        """huggingface_hub read HF_ENDPOINT into its constants at import: set those, and online mode."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_TOKEN", OPERATOR_TOKEN)  # set, so a test proves it is never sent

    # -- what happened

    def downloaded_bytes(self) -> int:
        """Bytes of file content sent by GETs on resolve URLs (ranged header reads included)."""
        return sum(item.sent for item in self.requests if item.method == "GET" and "/resolve/" in item.path)

    def full_downloads(self) -> list[str]:
        return [
            item.path for item in self.requests if item.method == "GET" and "/resolve/" in item.path and not item.range
        ]

    # -- answering

    def _answer(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        authorized = handler.headers.get("authorization") == f"Bearer {OPERATOR_TOKEN}"
        record = Request(handler.command, path, authorized, handler.headers.get("range"))
        self.requests.append(record)
        if len(self.requests) > MAX_REQUESTS:
            return self._send(handler, 429, b"{}", record, body)
        if match := _INFO.match(path):
            return self._info(handler, match[1], authorized, record, body)
        if match := _PATHS.match(path):
            repo = self._visible(match[1], authorized)
            if repo is None:
                return self._not_found(handler, record, body)
            items = [{"type": "file", "path": name, "size": len(data), "oid": "x"} for name, data in repo.files.items()]
            return self._send(handler, 200, json.dumps(items).encode(), record, body)
        if match := _RESOLVE.match(path):
            return self._file(handler, match[1], match[3], authorized, record, body)
        return self._send(handler, 404, b"{}", record, body)

    def _visible(self, repo_id: str, authorized: bool) -> HubRepo | None:
        repo = self.repos.get(repo_id)
        return None if repo is None or (repo.private and not authorized) else repo

    def _info(self, handler, repo_id, authorized, record, body) -> None:
        repo = self._visible(repo_id, authorized)
        if repo is None:
            return self._not_found(handler, record, body)
        siblings = [
            {
                "rfilename": name,
                "size": len(data),
                "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134},
            }
            for name, data in repo.files.items()
        ]
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.sha,
            "private": repo.private,
            "gated": False,
            "siblings": siblings,
        }
        self._send(handler, 200, json.dumps(info).encode(), record, body)

    def _file(self, handler, repo_id, filename, authorized, record, body) -> None:
        repo = self._visible(repo_id, authorized)
        if repo is None:
            return self._not_found(handler, record, body)
        if filename not in repo.files:
            return self._send(handler, 404, b"{}", record, body, {"X-Error-Code": "EntryNotFound"})
        data = repo.files[filename]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        status, payload = 200, data
        if record.range and (match := _RANGE.match(record.range)):
            start = int(match[1])
            end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
            status, payload = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(handler, status, payload, record, body, headers)

    def _not_found(self, handler, record, body) -> None:
        headers = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
        self._send(handler, 404, b'{"error": "Repository not found"}', record, body, headers)

    @staticmethod
    def _send(handler, status, payload, record, body, headers=None) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if body:
            handler.wfile.write(payload)
            record.sent = len(payload)
