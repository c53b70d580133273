"""The Studio's one work root: every file the app writes while serving lives under it.

Layout (``<root>`` is ``$STUDIO_WORK_DIR`` or ``<system temp>/blip-sd3-studio-work``, plus one
folder per process, ``<pid>-<random>``, removed when the process exits, or by the next process to
start if it was killed)::

    <root>/sessions/<visitor>/          what one visitor's session made (generated images); the app
                                        returns these files itself, Gradio copies them to its cache
    <root>/sessions/<visitor>/request-*/ one request's scratch files, deleted when the request ends
    <root>/datasets/                    training datasets; never served (app.py blocks it)

``<visitor>`` is a digest of ``components.common.visitor_id(request)``: the session hash comes from
the client, so it is never used as a path itself. No function here takes a path from a visitor.

    from pipelines import workspace

    folder = workspace.session_folder(visitor)          # kept while the session lives
    with workspace.request_folder(visitor) as scratch:  # gone when the block ends
        ...
    name = workspace.unique_name("20250101-120000", "sd35-large", 42, suffix=".png")
    path = workspace.exclusive_path(outputs_dir, name)  # never an existing file

What a visitor reads names no server path: ``hide_paths`` (text) and ``hide_paths_in`` (a details
dict) put a placeholder such as ``<models>`` for each known folder and ``<path>`` for any other
absolute path; the operator finds the real folders in the server log.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

WORK_DIR_ENV = "STUDIO_WORK_DIR"
DEFAULT_BASE_NAME = "blip-sd3-studio-work"
MAX_NAME_ATTEMPTS = 10_000  # exclusive_path's counter; past it something is wrong with the folder
# An absolute POSIX path in a log line or message (after a space, quote, '=' or '(' and the like, not inside a word).
# Two components at least, so an endpoint name such as /train_start stays as it is.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~<>-])/[^\s'\"(),;:/]+/[^\s'\"(),;:]*")

_lock = threading.Lock()
_root: Path | None = None


def work_root() -> Path:
    """This process's work root (created on first use, removed at exit)."""
    global _root
    with _lock:
        if _root is None:
            base = Path(os.environ.get(WORK_DIR_ENV) or Path(tempfile.gettempdir()) / DEFAULT_BASE_NAME)
            base.mkdir(parents=True, exist_ok=True)
            _remove_dead_roots(base)
            _root = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base)).resolve()
            atexit.register(shutil.rmtree, _root, ignore_errors=True)
        return _root


def _remove_dead_roots(base: Path) -> None:
    """Delete the roots of processes that are gone (atexit does not run after SIGTERM or a crash)."""
    for folder in base.iterdir():
        pid_text = folder.name.partition("-")[0]
        if not folder.is_dir() or not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (PermissionError, OverflowError):
            continue  # alive (another user's) or not a pid: leave it


def visitor_key(visitor: str) -> str:
    """The folder name for ``visitor``: a digest, so a client-chosen session hash never becomes a path."""
    return hashlib.sha256(str(visitor).encode()).hexdigest()[:32]


def sessions_root() -> Path:
    """The folder holding every session's folder (the app returns files from here, and only its own)."""
    path = work_root() / "sessions"
    path.mkdir(exist_ok=True)
    return path


def session_folder(visitor: str) -> Path:
    """The folder for what ``visitor``'s session keeps (e.g. its generated images); created if missing."""
    path = sessions_root() / visitor_key(visitor)
    path.mkdir(exist_ok=True)
    os.utime(path)  # last use, for sweep()
    return path


@contextlib.contextmanager
def request_folder(visitor: str, prefix: str = "request-") -> Iterator[Path]:
    """A fresh folder for one request's scratch files inside ``visitor``'s session; deleted on exit.

    Gradio copies a returned file into its cache after the event function returns, so a function
    that returns a file from here must be a generator that yields it inside the ``with`` block (the
    block then ends after Gradio has copied it), or copy it to ``session_folder`` first.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=session_folder(visitor)))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def datasets_root() -> Path:
    """Where uploaded training datasets are unpacked; app.py keeps Gradio from serving anything here."""
    path = work_root() / "datasets"
    path.mkdir(exist_ok=True)
    return path


def forget_session(visitor: str) -> None:
    """Delete everything ``visitor``'s session kept (its page was closed)."""
    shutil.rmtree(sessions_root() / visitor_key(visitor), ignore_errors=True)


def sweep(max_age_seconds: float) -> list[Path]:
    """Delete session folders unused for ``max_age_seconds`` (sessions that never said goodbye)."""
    removed = []
    cutoff = time.time() - max_age_seconds
    for folder in sessions_root().iterdir():
        try:
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        except FileNotFoundError:
            continue
    return removed


def unique_name(*parts: object, suffix: str) -> str:
    """``part-part-...-<8 hex>.suffix``: two requests with the same parts in the same second never collide."""
    stem = "-".join(str(part) for part in parts if str(part))
    return f"{stem}-{secrets.token_hex(4)}{suffix}" if stem else f"{secrets.token_hex(4)}{suffix}"


def exclusive_path(folder: Path, name: str) -> Path:
    """A path in ``folder`` named ``name`` (or ``stem-2.suffix``, ``stem-3`` ...) that no file holds yet.

    The file is created empty here (exclusive create), so two writers never get the same path;
    the caller overwrites it with its content.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = Path(name).stem, Path(name).suffix
    for attempt in range(1, MAX_NAME_ATTEMPTS + 1):
        candidate = folder / (name if attempt == 1 else f"{stem}-{attempt}{suffix}")
        try:
            with open(candidate, "xb"):
                return candidate
        except FileExistsError:
            continue
    raise ValueError(f"{folder} already holds {MAX_NAME_ATTEMPTS} files named like {name}; clear it out first.")


def hide_paths(text: str, placeholders: dict[str | Path, str] | None = None) -> str:
    """``text`` with server paths replaced: each of ``placeholders`` by its label, any other absolute path
    by ``<path>`` (a Python file keeps its name, so a traceback stays readable)."""
    variants: dict[str, str] = {}
    for path, label in (placeholders or {}).items():
        for variant in (str(path), os.path.abspath(path), str(Path(path).resolve())):
            if len(variant) > 1 and "/" in variant:
                variants.setdefault(variant.rstrip("/"), label)
    for variant in sorted(variants, key=len, reverse=True):  # the longest first: a dataset inside its run folder
        text = text.replace(variant, variants[variant])

    def generic(match: re.Match) -> str:
        name = match.group(0).rstrip("/").rsplit("/", 1)[-1]
        return f"<path>/{name}" if name.endswith(".py") else "<path>"

    return ABSOLUTE_PATH.sub(generic, text)


def hide_paths_in(value, placeholders: dict[str | Path, str] | None = None):
    """``value`` (what an endpoint returns: dicts, lists, tuples, strings, numbers) with ``hide_paths``
    applied to every string in it, dict keys included; a ``Path`` becomes a string first."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return hide_paths(value, placeholders)
    if isinstance(value, dict):
        return {hide_paths_in(key, placeholders): hide_paths_in(item, placeholders) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(hide_paths_in(item, placeholders) for item in value)
    return value
