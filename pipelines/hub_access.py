"""Can this machine reach the Hugging Face Hub? One short probe, its answer kept for a while, and what to do if not.

Without it, a machine with no route to the Hub and an empty cache waits minutes before a load
fails: transformers asks for each file of a model and huggingface_hub retries every request five
times with back-off (about a hundred requests for BLIP), and the error at the end talks about
files, not the network. One HEAD request to the endpoint, with a short timeout and no retry,
answers the same question in seconds; the manager asks it before loading a model by repo id.

``VisitorDownloads`` keeps the book of Hub files a visitor has the Studio fetch (per-client and
total byte caps, a folder of their own under the work root, deleted when done).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipelines import settings, workspace
from pipelines.catalog import ModelSpec

logger = logging.getLogger(__name__)


def set_hub_timeouts(environ: dict[str, str] = os.environ) -> None:
    """huggingface_hub's metadata and download timeouts, unless the user set them.

    Set in the environment (so the trainers this process starts inherit them) and on
    huggingface_hub's constants, which it read once at import, before any flag was parsed.
    """
    from huggingface_hub import constants

    for name, seconds in (
        ("HF_HUB_ETAG_TIMEOUT", settings.HUB_METADATA_TIMEOUT_SECONDS),
        ("HF_HUB_DOWNLOAD_TIMEOUT", settings.HUB_DOWNLOAD_TIMEOUT_SECONDS),
    ):
        if not environ.get(name):
            environ[name] = str(seconds)
            setattr(constants, name, seconds)


def _probe_endpoint(endpoint: str, timeout: float) -> str | None:
    """One HEAD request through huggingface_hub's own HTTP session (its proxies and headers), no retry.

    None when anything answers (any status: the host is there); else a few words on why not.
    """
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout, follow_redirects=False)
    except OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except httpx2.TimeoutException:
        return f"no answer within {timeout:g} s"
    except httpx2.TransportError as error:
        text = str(error).strip() or type(error).__name__
        # "[Errno 111] Connection refused" -> "connection refused"
        text = text.split("] ", 1)[-1] if text.startswith("[Errno") else text
        return text[:1].lower() + text[1:120]
    return None


class HubProbe:
    """Whether the Hub answers, asked at most once per ``ttl`` seconds (thread-safe).

    ``probe(endpoint, timeout)`` is the request (injectable for tests); the endpoint is
    huggingface_hub's (``HF_ENDPOINT`` when set), read at each probe.
    """

    def __init__(
        self,
        *,
        timeout: float = settings.HUB_PROBE_TIMEOUT_SECONDS,
        ttl: float = settings.HUB_PROBE_TTL_SECONDS,
        probe: Callable[[str, float], str | None] = _probe_endpoint,
    ) -> None:
        self.timeout = timeout
        self.ttl = ttl
        self._probe = probe
        self._lock = threading.Lock()
        self._answer: tuple[float, str, str | None] | None = None  # (when, endpoint, problem)

    @staticmethod
    def endpoint() -> str:
        from huggingface_hub import constants

        return constants.ENDPOINT

    def problem(self) -> str | None:
        """None when the Hub answered (recently); else why it did not, in a few words."""
        endpoint = self.endpoint()
        with self._lock:  # concurrent loads wait for one probe instead of sending several
            now = time.monotonic()
            if self._answer is not None and self._answer[1] == endpoint and now - self._answer[0] < self.ttl:
                return self._answer[2]
            problem = self._probe(endpoint, self.timeout)
            self._answer = (time.monotonic(), endpoint, problem)
        if problem is not None:
            logger.warning("the Hugging Face Hub at %s cannot be reached: %s", endpoint, problem)
        return problem


def cached_snapshot(repo_id: str) -> str | None:
    """The folder of ``repo_id``'s cached snapshot in the local Hugging Face cache, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def unreachable_sentence(spec: ModelSpec, endpoint: str, problem: str, *, tiny: bool = False) -> str:
    """One sentence: the Hub cannot be reached, the model is not cached, and the three ways out."""
    ways = f"pass a local copy with --model {spec.key}=DIR, or set HF_HUB_OFFLINE=1 with a Hugging Face cache that holds it"
    if not tiny:
        ways += ", or start with --tiny to try every tab on tiny offline models"
    return (
        f"This machine cannot reach the Hugging Face Hub at {endpoint} ({problem}), and {spec.title} "
        f"({spec.repo_id}) is not in the local cache, so it cannot be downloaded: {ways}."
    )


# ----------------------------------------------------------------------------- files a visitor has the Studio fetch


class VisitorDownload:
    """One Hub file a visitor named: its own folder under the visitor cache, and the bytes charged for it.

    ``delete_files()`` removes the folder (the weights live on in memory once loaded); ``release()``
    also gives the charge back. Both are idempotent.
    """

    def __init__(self, ledger: VisitorDownloads, client: str, size: int, folder: Path) -> None:
        self.client, self.size, self.folder = client, size, folder
        self._ledger = ledger
        self.released = False

    def delete_files(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def release(self) -> None:
        self.delete_files()
        self._ledger._release(self)


class VisitorDownloads:
    """Bytes of Hub files that visitors had the Studio fetch, per client and in all, with a cap on each.

    Never the operator's Hugging Face cache: each download gets a fresh folder under ``root`` (so one
    visitor's file is never another's, and nothing cached with the operator's token is ever read).
    A charge lasts until ``release`` (its LoRA unloaded or evicted, or its load refused).
    """

    def __init__(self, root: Path | Callable[[], Path], *, per_client: int, total: int) -> None:
        self._root = root
        self.per_client, self.total = per_client, total
        self._lock = threading.Lock()
        self._charges: dict[int, VisitorDownload] = {}

    def root(self) -> Path:
        root = Path(self._root() if callable(self._root) else self._root)
        root.mkdir(parents=True, exist_ok=True)
        return root

    def held(self, client: str | None = None) -> int:
        """Bytes charged now to ``client`` (None: to everyone)."""
        with self._lock:
            return sum(item.size for item in self._charges.values() if client is None or item.client == client)

    def reserve(self, client: str, size: int, label: str) -> VisitorDownload:
        """Charge ``size`` bytes to ``client`` before ``label`` is downloaded; ValueError past either cap."""
        with self._lock:
            mine = sum(item.size for item in self._charges.values() if item.client == client)
            everyone = sum(item.size for item in self._charges.values())
            if mine + size > self.per_client:
                raise ValueError(
                    f"{label} ({size / 2**20:,.1f} MB) would take the Hub LoRAs you keep loaded past "
                    f"{self.per_client / 2**20:,.0f} MB (STUDIO_MAX_HUB_MB_PER_CLIENT); unload one of them first."
                )
            if everyone + size > self.total:
                raise ValueError(
                    f"Visitors' Hub LoRAs already take {everyone / 2**20:,.1f} of the {self.total / 2**20:,.0f} MB "
                    f"this instance keeps for them (STUDIO_MAX_HUB_MB_TOTAL), so {label} was not downloaded; "
                    "try again later or upload the file."
                )
            folder = Path(tempfile.mkdtemp(prefix="download-", dir=self.root()))
            download = VisitorDownload(self, client, size, folder)
            self._charges[id(download)] = download
            return download

    def _release(self, download: VisitorDownload) -> None:
        with self._lock:
            self._charges.pop(id(download), None)
            download.released = True


_visitor_downloads: VisitorDownloads | None = None
_visitor_downloads_lock = threading.Lock()


def visitor_downloads() -> VisitorDownloads:
    """This process's ledger of visitors' Hub downloads, under ``<work root>/settings.VISITOR_HUB_DIR``."""
    global _visitor_downloads
    with _visitor_downloads_lock:
        if _visitor_downloads is None:
            _visitor_downloads = VisitorDownloads(
                lambda: workspace.work_root() / settings.VISITOR_HUB_DIR,
                per_client=settings.MAX_HUB_BYTES_PER_CLIENT,
                total=settings.MAX_HUB_BYTES_TOTAL,
            )
        return _visitor_downloads
