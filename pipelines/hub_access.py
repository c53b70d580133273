"""Can this machine reach the Hugging Face Hub? One short probe, its answer kept for a while, and what to do if not.

Without it, a machine with no route to the Hub and an empty cache waits minutes before a load
fails: transformers asks for each file of a model and huggingface_hub retries every request five
times with back-off (about a hundred requests for BLIP), and the error at the end talks about
files, not the network. One HEAD request to the endpoint, with a short timeout and no retry,
answers the same question in seconds; the manager asks it before loading a model by repo id.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from pipelines import settings
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
