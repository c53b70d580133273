"""The image history: every SD3.5 image an owner made, newest first, paged; it survives a restart.

The images are PNGs under one root, in AUTOMATIC1111's layout (a folder per mode and per day):

    <root>/txt2img-images/2026-12-08/20261208-101501-sd35-large-42-ab12cd.png     the local owner
    <root>/visitors/<digest>/img2img-images/2026-12-08/...png                      a public visitor

The local owner (the person at the machine) writes where A1111 does; a public visitor's images go
under a digest of the owner key, so the key itself (a secret kept in the visitor's browser) never
becomes a path and never enters a PNG.

``<root>/history.sqlite3`` indexes them, one row per image: a random id, the owner's digest, when,
the mode, model, prompt, seed, size, bytes on disk, the file (relative to the root) and the settings
JSON the PNG carries. The first page of 10,000 records is one indexed query, not a scan of the
folder. The PNG stays the truth: ``rebuild()`` reads every Studio PNG under the root into the index
again (a lost index, a folder copied from another machine).

Every read and delete takes the owner: another owner's id is "no such record", never its settings.

    history = History(Path("outputs"))
    folder = history.folder_for(owner, "txt2img")          # where the PNGs of a job go
    record = history.add(owner, png_path, studio_settings)
    page = history.page(owner, page=0)                     # page.records, page.total, page.pages
    history.delete(owner, record.id); history.forget(owner)
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines import settings
from pipelines.sd3.png_metadata import read_png_settings

INDEX_NAME = "history.sqlite3"
VISITORS_FOLDER = "visitors"
LOCAL_OWNER = "local"  # the person at the machine: one history for every page in local mode
MODE_FOLDERS = {  # A1111's folder names; the Studio's own modes keep A1111's word where one exists
    "txt2img": "txt2img-images",
    "controlnet": "txt2img-images",
    "img2img": "img2img-images",
    "inpaint": "img2img-images",
    "variations": "img2img-images",
}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    mode TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER,
    width INTEGER,
    height INTEGER,
    bytes INTEGER NOT NULL,
    file TEXT NOT NULL UNIQUE,
    settings TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_owner ON records (owner, created DESC);
CREATE INDEX IF NOT EXISTS records_by_age ON records (created);
"""
_COLUMNS = "id, owner, created, mode, model, prompt, seed, width, height, bytes, file, settings"


def owner_digest(owner: str) -> str:
    """What the index and the folders know of an owner: a digest, never the key itself."""
    return hashlib.sha256(f"studio-owner:{owner}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class HistoryRecord:
    """One image of the history: its id, when and how it was made, and where it lies (relative to the root)."""

    id: str
    created: float
    mode: str
    model: str
    prompt: str
    seed: int | None
    width: int | None
    height: int | None
    bytes: int
    file: str  # relative to the history's root; never shown to a visitor
    settings: dict  # the PNG's Studio JSON: every setting that redraws it, and its job

    def summary(self) -> dict:
        """What a client may see of the record: no file path, no owner."""
        return {
            "id": self.id,
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created)),
            "mode": self.mode,
            "model": self.model,
            "prompt": self.prompt,
            "seed": self.seed,
            "size": f"{self.width}x{self.height}" if self.width and self.height else None,
            "settings": self.settings,
        }


@dataclass(frozen=True)
class HistoryPage:
    records: list[HistoryRecord]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


class History:
    """The index of one root's images (see the module docstring); safe to share between threads."""

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / INDEX_NAME, check_same_thread=False, isolation_level=None)
        # WAL: a page read never waits for a save, and a save costs no journal rewrite.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- where images go

    def owner_root(self, owner: str) -> Path:
        """The local owner's images sit in the root itself (as A1111's outputs/); a visitor's in a digest folder."""
        if owner == LOCAL_OWNER:
            return self.root
        return self.root / VISITORS_FOLDER / owner_digest(owner)

    def folder_for(self, owner: str, mode: str) -> Path:
        """The folder for today's images of ``mode`` (created): ``<owner root>/<mode>-images/<YYYY-MM-DD>``."""
        if mode not in MODE_FOLDERS:
            raise ValueError(f"Unknown image mode {mode!r}; one of {', '.join(MODE_FOLDERS)}.")
        day = time.strftime("%Y-%m-%d", time.localtime(self._clock()))
        folder = self.owner_root(owner) / MODE_FOLDERS[mode] / day
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -- records

    def add(self, owner: str, path: Path, studio_settings: dict | None) -> HistoryRecord:
        """Index the PNG at ``path`` (inside this owner's root) with its Studio settings; returns its record."""
        path = Path(path).resolve()
        if not path.is_relative_to(self.owner_root(owner).resolve()):
            raise ValueError("That image lies outside its owner's folder of the history.")
        return self._insert(owner_digest(owner), path, studio_settings or {}, self._clock())

    def _insert(self, digest: str, path: Path, studio_settings: dict, created: float) -> HistoryRecord:
        job = studio_settings.get("job") or {}
        record = HistoryRecord(
            id=secrets.token_hex(8),
            created=created,
            mode=str(job.get("mode") or "txt2img"),
            model=str(studio_settings.get("model_key") or ""),
            prompt=str(studio_settings.get("prompt") or "")[: settings.MAX_PROMPT_CHARS],
            seed=_int_or_none(studio_settings.get("seed")),
            width=_int_or_none(studio_settings.get("width")),
            height=_int_or_none(studio_settings.get("height")),
            bytes=path.stat().st_size,
            file=path.relative_to(self.root.resolve()).as_posix(),
            settings=studio_settings,
        )
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    digest,
                    record.created,
                    record.mode,
                    record.model,
                    record.prompt,
                    record.seed,
                    record.width,
                    record.height,
                    record.bytes,
                    record.file,
                    json.dumps(studio_settings, ensure_ascii=False, sort_keys=True),
                ),
            )
        return record

    def page(self, owner: str, page: int = 0, per_page: int = settings.HISTORY_PAGE_SIZE) -> HistoryPage:
        """Page ``page`` (0 = newest) of ``owner``'s records, newest first; an out-of-range page is empty."""
        per_page = max(1, min(int(per_page), settings.HISTORY_PAGE_SIZE_MAX))
        page = max(0, int(page))
        digest = owner_digest(owner)
        with self._lock:
            (total,) = self._db.execute("SELECT COUNT(*) FROM records WHERE owner = ?", (digest,)).fetchone()
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM records WHERE owner = ? ORDER BY created DESC, rowid DESC LIMIT ? OFFSET ?",
                (digest, per_page, page * per_page),
            ).fetchall()
        return HistoryPage([_record(row) for row in rows], total, page, per_page)

    def get(self, owner: str, record_id: str) -> HistoryRecord | None:
        """``owner``'s record ``record_id``, or None (another owner's id is no record of this one's)."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM records WHERE id = ? AND owner = ?", (str(record_id), owner_digest(owner))
            ).fetchone()
        return _record(row) if row else None

    def path(self, record: HistoryRecord) -> Path:
        """The PNG of ``record`` on disk (for the server only: never sent to a client as a path)."""
        return self.root / record.file

    def delete(self, owner: str, record_id: str) -> bool:
        """Delete ``owner``'s record and its PNG; False when ``owner`` has no such record."""
        record = self.get(owner, record_id)
        if record is None:
            return False
        self._remove([record])
        return True

    def forget(self, owner: str) -> int:
        """Delete every record and image of ``owner`` ("Delete my data"); how many records went."""
        digest = owner_digest(owner)
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM records WHERE owner = ?", (digest,)).fetchall()
        records = [_record(row) for row in rows]
        self._remove(records)
        return len(records)

    def expire(self, *, max_age_seconds: float, owner_bytes: int, total_bytes: int) -> int:
        """Delete, oldest first, what is older than ``max_age_seconds``, then what keeps an owner over
        ``owner_bytes`` or everyone over ``total_bytes``; how many records went."""
        cutoff = self._clock() - max_age_seconds
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM records ORDER BY created DESC, rowid DESC").fetchall()
            owners = [row[1] for row in rows]
        doomed, kept_total, kept_by_owner = [], 0, {}
        for row, owner in zip(rows, owners, strict=True):  # newest first: what is kept is counted first
            record = _record(row)
            owner_kept = kept_by_owner.get(owner, 0)
            if (
                record.created < cutoff
                or owner_kept + record.bytes > owner_bytes
                or kept_total + record.bytes > total_bytes
            ):
                doomed.append(record)
                continue
            kept_by_owner[owner] = owner_kept + record.bytes
            kept_total += record.bytes
        self._remove(doomed)
        return len(doomed)

    def owner_bytes(self, owner: str) -> int:
        with self._lock:
            (used,) = self._db.execute(
                "SELECT COALESCE(SUM(bytes), 0) FROM records WHERE owner = ?", (owner_digest(owner),)
            ).fetchone()
        return int(used)

    def _remove(self, records: list[HistoryRecord]) -> None:
        for record in records:
            self.path(record).unlink(missing_ok=True)
        with self._lock:
            self._db.executemany("DELETE FROM records WHERE id = ?", [(record.id,) for record in records])

    # -- after a restart

    def rebuild(self) -> int:
        """Index every Studio PNG under the root that the index lacks (a lost index, a copied folder);
        files that are gone leave the index. Returns how many records were added."""
        root = self.root.resolve()
        with self._lock:
            known = {file for (file,) in self._db.execute("SELECT file FROM records")}
        present, added = set(), 0
        for path in _pngs(root):
            relative = path.relative_to(root).as_posix()
            present.add(relative)
            if relative in known:
                continue
            try:
                _, studio_settings = read_png_settings(path)
            except (OSError, ValueError):
                continue  # not a Studio PNG the index can read: left alone, not indexed
            if studio_settings is None:
                continue
            parts = path.relative_to(root).parts
            digest = parts[1] if parts[0] == VISITORS_FOLDER and len(parts) > 2 else owner_digest(LOCAL_OWNER)
            self._insert(digest, path, studio_settings, path.stat().st_mtime)
            added += 1
        with self._lock:
            self._db.executemany("DELETE FROM records WHERE file = ?", [(file,) for file in known - present])
        return added


def _pngs(root: Path) -> Iterator[Path]:
    for folder in [root / name for name in sorted(set(MODE_FOLDERS.values()))]:
        yield from sorted(folder.glob("*/*.png"))
    visitors = root / VISITORS_FOLDER
    if visitors.is_dir():
        for visitor in sorted(visitors.iterdir()):
            for name in sorted(set(MODE_FOLDERS.values())):
                yield from sorted((visitor / name).glob("*/*.png"))


def _record(row) -> HistoryRecord:
    record_id, _owner, created, mode, model, prompt, seed, width, height, size, file, text = row
    return HistoryRecord(record_id, created, mode, model, prompt, seed, width, height, size, file, json.loads(text))


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
