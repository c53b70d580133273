"""The BLIP LoRA adapters an app (or a CLI run) has loaded: load them from a folder, the Hub or an upload.

``BlipAdapterSet`` finds adapters by name in the adapters folder, on the Hub
(``pipelines.blip.adapter_sources``) or in an upload, reads and checks their files
(``pipelines.blip.adapter_files``), attaches them to the captioner
(``pipelines.blip.adapter_layers``) and attaches them again whenever BLIP is loaded
again. Uploads belong to the visitor who made them (``pipelines.ownership``), and
so does a training run's adapter loaded with ``load_owned_folder``. An upload is
unpacked into its visitor's folder under the Studio's work root
(``pipelines.workspace``), so it goes with the visitor's other files, and with
the work root of a process that was killed. Nothing here answers a visitor with
a server path: the adapters folder is named by its last component.

Attached adapters rest inactive. A caption request activates its adapter for
the duration of its decode (``BlipCaptioner.using_adapter``); matching and
attention always run on the base model.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipelines import settings, workspace
from pipelines.blip.adapter_files import (
    ADAPTER_CONFIG_FILE,
    AdapterFiles,
    read_adapter_folder,
    text_decoder_targets,  # noqa: F401  (pipelines.scoreboard imports it from here)
)
from pipelines.blip.adapter_layers import attach_adapter, describe_targets, detach_adapter
from pipelines.blip.adapter_sources import HUB_ID, download_adapter, unpack_adapter_upload
from pipelines.blip.captioner import BlipCaptioner
from pipelines.blip.tiny_adapter import TINY_ADAPTER_DIR, ensure_tiny_demo_adapter
from pipelines.ownership import SHARED, UploadSlots, may_see

logger = logging.getLogger(__name__)

UPLOADS_FOLDER = "blip-adapters"  # in a visitor's session folder: their uploaded adapters, unpacked
LOCAL_UPLOADER = "local"  # whose folder an upload without a visitor (Python, the CLI) unpacks into


@dataclass(frozen=True)
class BlipAdapterInfo:
    """One adapter as the Studio lists it."""

    name: str  # what requests and the UI call it
    source: str  # a Hub id, a folder name in the adapters folder, a resolved path (CLI), the uploaded file names,
    # or run:<name> (a training run's output)
    kind: str  # folder (in the adapters folder) | path (any folder; CLI) | hub | upload | run (a run's output)
    folder: Path  # where its two files are; it is attached again from here after BLIP reloads
    rank: int
    alpha: float
    target_modules: str  # as its config states them
    lora_layers: int  # text-decoder layers it changes
    base_model: str  # the base model its config names ("" if none)
    owner: str | None = SHARED  # an upload's (a run's) visitor (pipelines.ownership); None: shared, read-only

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "shared": self.owner is SHARED,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.target_modules,
            "lora_layers": self.lora_layers,
            "base_model": self.base_model,
        }


def adapter_name(text: str) -> str:
    """A name for requests and the UI: letters, digits, '.', '_' and '-' (other runs become '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text or "")).strip("-._")[:64]
    return name or "adapter"


class BlipAdapterSet:
    """The adapters one app (or CLI run) has loaded, re-attached whenever BLIP is loaded again.

    Adapter folders are found by name in ``adapter_dir``; API callers may give
    only names inside it (no absolute paths, no ``..``, no symbolic link out of
    it). ``tiny_blip_source`` (``--tiny`` mode) makes the random ``tiny-demo``
    adapter appear there, built on first use.

    Ownership (``pipelines.ownership``): an uploaded adapter belongs to the ``visitor`` who
    loaded it, a training run's adapter to the run's owner; others neither see nor use them.
    Folder and Hub adapters are shared. ``visitor=None`` is the operator (Python, the CLI),
    who sees everything.

    Uploads unpack into ``work_dir`` when given (tests, the CLI), else into the uploading
    visitor's folder under the work root (``pipelines.workspace.session_folder``).
    """

    def __init__(
        self, adapter_dir: Path, *, tiny_blip_source: str | Path | None = None, work_dir: Path | None = None
    ) -> None:
        self.adapter_dir = Path(adapter_dir).expanduser()
        self.tiny_blip_source = tiny_blip_source
        self._work_dir = Path(work_dir) if work_dir is not None else None
        self._adapters: dict[str, BlipAdapterInfo] = {}
        self._slots = UploadSlots("BLIP adapter")
        self._lock = threading.RLock()
        self._demo_ready = False
        logger.info("BLIP adapters are read by name from %s", self.adapter_dir)  # the path for the operator only

    @property
    def shown_dir(self) -> str:
        """The adapters folder as visitors see it: its name, never the server path."""
        return f"{self.adapter_dir.name or 'adapters'}/"

    # -- what is there

    def loaded(self, visitor: str | None = None) -> list[BlipAdapterInfo]:
        """The adapters ``visitor`` may use: the shared ones and their own uploads."""
        with self._lock:
            return [info for info in self._adapters.values() if may_see(info.owner, visitor)]

    def names(self, visitor: str | None = None) -> list[str]:
        return [info.name for info in self.loaded(visitor)]

    def use(self, name: str | None, visitor: str | None = None) -> str | None:
        """``name`` tidied (None or blank: the base model) once ``visitor`` may use it; marks it as used now.

        Another visitor's upload is "not loaded", in the same sentence as a name nobody loaded.
        """
        if name is None or not str(name).strip():
            return None
        name = str(name).strip()
        with self._lock:
            if not self._slots.visible(name, visitor):
                names = self.names(visitor)
                loaded = f"the loaded ones are: {', '.join(names)}" if names else "none is loaded yet"
                raise ValueError(
                    f"No BLIP adapter named {name!r} is loaded ({loaded}); load it first, or leave the adapter "
                    "empty for the base model."
                )
            self._slots.touch(name)
        return name

    def available(self) -> list[str]:
        """Folder names in ``adapter_dir`` (one or two levels deep) that hold an adapter config."""
        self._ensure_demo()
        if not self.adapter_dir.is_dir():
            return []
        root = self.adapter_dir.resolve()
        found = []
        for config in sorted(self.adapter_dir.glob(f"*/{ADAPTER_CONFIG_FILE}")) + sorted(
            self.adapter_dir.glob(f"*/*/{ADAPTER_CONFIG_FILE}")
        ):
            folder = config.parent
            if folder.name.startswith(".") or not folder.resolve().is_relative_to(root):
                continue
            found.append(folder.relative_to(self.adapter_dir).as_posix())
        return found

    def describe(self, visitor: str | None = None) -> dict:
        """What ``/blip_adapter_list`` answers: the adapters folder's name (never its server path), the adapters
        ``visitor`` may use, the folders there."""
        return {
            "adapter_dir": self.shown_dir,
            "loaded": [info.as_dict() for info in self.loaded(visitor)],
            "available": self.available(),
        }

    # -- loading

    def load(
        self,
        captioner: BlipCaptioner,
        source: str = "",
        uploads: Iterable[str | Path] = (),
        *,
        name: str | None = None,
        trusted_paths: bool = False,
        visitor: str | None = None,
    ) -> BlipAdapterInfo:
        """Load an adapter onto ``captioner`` from a folder name, a Hub id or uploaded files; returns its entry.

        ``trusted_paths`` (the command line) also accepts any folder path. The
        same folder loaded twice returns the adapter already loaded. Uploaded files
        become ``visitor``'s (at most ``settings.MAX_UPLOADS_PER_SESSION`` each); when all
        ``settings.MAX_BLIP_ADAPTERS`` slots are taken, the least recently used upload is
        removed to make room, never a shared adapter.
        """
        # 1. Check inputs: one source, within limits.
        uploads = [Path(path) for path in uploads or ()]
        source = " ".join(str(source or "").split())
        if bool(source) == bool(uploads):
            raise ValueError(
                "Give an adapter folder name or Hub id, or upload its files, not both."
                if source
                else "Give an adapter: a folder name in the adapters folder, a Hub id (owner/name), or upload its files."
            )

        owner = visitor if uploads else SHARED
        if uploads:  # before anything is unpacked
            with self._lock:
                self._slots.check_visitor_cap(owner, settings.MAX_UPLOADS_PER_SESSION)

        # 2. Its files in a local folder.
        if uploads:
            folder, suggested = unpack_adapter_upload(uploads, self._uploads_dir(owner))
            kind, described = "upload", ", ".join(path.name for path in uploads)
        else:
            folder, kind, suggested, described = self._resolve(source, trusted_paths)

        # 3. Read, check and attach under a free name; then make room (the least recently used upload).
        try:
            files = read_adapter_folder(folder, label=suggested if kind == "upload" else source)
            with self._lock:
                return self._attach_new(captioner, files, folder, kind, described, name or suggested, owner)
        except BaseException:
            if kind == "upload":
                shutil.rmtree(folder, ignore_errors=True)  # a refused upload leaves nothing behind
            raise

    def load_owned_folder(
        self, captioner: BlipCaptioner, folder: Path, *, name: str, owner: str | None, described: str
    ) -> BlipAdapterInfo:
        """Load an adapter folder the server itself made (a training run's output) as ``owner``'s own entry.

        ``folder`` is never a visitor's word: the caller found it (``TrainingRuns``). Like an upload,
        the entry is listed, used and removed by ``owner`` only, counts against their upload cap,
        and may be evicted to make room; unlike one, its files stay where they are. The same folder
        loaded again by ``owner`` returns the entry already there.
        """
        folder = Path(folder).resolve()
        files = read_adapter_folder(folder, label=described)
        with self._lock:
            return self._attach_new(captioner, files, folder, "run", described, name, owner)

    def _attach_new(
        self, captioner, files: AdapterFiles, folder: Path, kind: str, described: str, wanted: str, owner
    ) -> BlipAdapterInfo:
        """Attach checked ``files`` as a new entry owned by ``owner``, evicting an upload if full (lock held)."""
        for info in self.loaded(owner):
            if info.folder.resolve() == folder.resolve() and info.name in captioner.adapter_names():
                self._slots.touch(info.name)
                return info
        if owner is not SHARED:
            self._slots.check_visitor_cap(owner, settings.MAX_UPLOADS_PER_SESSION)
        try:
            victim = self._slots.victim(settings.MAX_BLIP_ADAPTERS)
        except ValueError:
            raise ValueError(
                f"{len(self._adapters)} adapters are loaded, the most at once, and none is an upload that could "
                "make room; remove one before loading another."
            ) from None
        chosen = self._free_name(adapter_name(wanted), captioner)
        changed = attach_adapter(captioner, chosen, files)
        info = BlipAdapterInfo(
            name=chosen,
            source=described,
            kind=kind,
            folder=folder,
            rank=int(files.config.r),
            alpha=float(files.config.lora_alpha),
            target_modules=describe_targets(files.config),
            lora_layers=changed,
            base_model=files.base_model,
            owner=owner,
        )
        self._adapters[chosen] = info
        self._slots.add(chosen, owner)
        if victim is not None:
            self._forget(captioner, victim)
            logger.info("BLIP adapter upload %s removed to make room for %s", victim, chosen)
        logger.info("BLIP adapter %s loaded from %s (%d LoRA layers)", chosen, described, changed)
        return info

    def attached(self, captioner: BlipCaptioner) -> BlipCaptioner:
        """``captioner`` with every loaded adapter on it (after BLIP was unloaded and loaded again, they are not)."""
        with self._lock:  # two requests meeting a freshly loaded BLIP attach each adapter once
            present = set(captioner.adapter_names())
            for info in list(self._adapters.values()):
                if info.name in present:
                    continue
                try:
                    attach_adapter(captioner, info.name, read_adapter_folder(info.folder, label=info.source))
                except ValueError as error:  # its files went away or changed: drop it rather than fail every caption
                    logger.warning("BLIP adapter %s could not be attached again and was dropped: %s", info.name, error)
                    self._adapters.pop(info.name, None)
                    self._slots.remove(info.name)
        return captioner

    def remove(self, captioner: BlipCaptioner, name: str, *, visitor: str | None = None, shared: bool = True) -> None:
        """Unload adapter ``name``; ValueError if ``visitor`` has no such adapter.

        With ``shared=False`` (a public instance's visitors) shared adapters are refused: only
        the operator removes those. An upload's unpacked files are deleted with it.
        """
        with self._lock:
            if not self._slots.visible(name, visitor):
                loaded = ", ".join(self.names(visitor)) or "none"
                raise ValueError(f"No BLIP adapter named {name!r} is loaded; the loaded ones: {loaded}.")
            if not shared and not self._slots.is_upload(name):
                raise ValueError(
                    f"The BLIP adapter {name!r} is shared by every visitor of this public instance; only the operator "
                    "can remove it (leave the adapter empty to caption without it)."
                )
            self._forget(captioner, name)

    def _forget(self, captioner: BlipCaptioner, name: str) -> None:
        """Detach ``name``, drop its entry and delete an upload's files (the lock is held)."""
        detach_adapter(captioner, name)
        info = self._adapters.pop(name)
        self._slots.remove(name)
        # An upload's folder is the one load() unpacked it into; a run's output (and anything else) stays.
        if info.kind == "upload" and info.folder.is_relative_to(self._work_dir or workspace.work_root()):
            shutil.rmtree(info.folder, ignore_errors=True)

    # -- helpers

    def _free_name(self, wanted: str, captioner: BlipCaptioner) -> str:
        taken = set(self._adapters) | set(captioner.adapter_names())
        candidate, counter = wanted, 2
        while candidate in taken:
            candidate, counter = f"{wanted}-{counter}", counter + 1
        return candidate

    def _uploads_dir(self, owner: str | None) -> Path:
        """Where ``owner``'s uploads unpack: ``work_dir``, else the visitor's folder under the work root
        (deleted with the visitor's files, and by the next start if this process is killed)."""
        if self._work_dir is not None:
            return self._work_dir
        visitor = LOCAL_UPLOADER if owner is SHARED else owner
        return workspace.session_folder(visitor) / UPLOADS_FOLDER

    def _resolve(self, source: str, trusted_paths: bool) -> tuple[Path, str, str, str]:
        """(folder, kind, suggested name, normalised source) for a folder name, a path (trusted) or a Hub id."""
        if trusted_paths:
            path = Path(source).expanduser()
            if path.is_dir():
                return path.resolve(), "path", path.resolve().name, str(path.resolve())
        folder = self.folder_in_dir(source)
        if folder is not None:
            return folder, "folder", Path(source).name, source
        if HUB_ID.match(source):
            return download_adapter(source, self.shown_dir), "hub", source.split("/")[-1], source
        raise ValueError(
            f"There is no adapter folder {source!r} in {self.shown_dir}, and it is not a Hub id (owner/name); "
            f"pick one of: {', '.join(self.available()) or '(the folder is empty)'}, or upload the adapter."
        )

    def folder_in_dir(self, name: str) -> Path | None:
        """The folder ``name`` inside ``adapter_dir`` (resolved), None if there is none; ValueError if it escapes."""
        self._ensure_demo()
        text = name.strip()
        if Path(text).is_absolute() or text.startswith("~") or "\\" in text or ":" in text:
            raise ValueError(
                f"Give the adapter folder's name inside {self.shown_dir} (e.g. my-adapter), not a path: {text!r}."
            )
        if ".." in Path(text).parts:
            raise ValueError(f"An adapter name may not contain '..' ({text!r}); give a folder inside {self.shown_dir}.")
        if any(part.startswith(".") for part in Path(text).parts):  # available() lists no hidden folder either
            raise ValueError(f"{text!r} is in a hidden folder; give a folder the adapter list shows.")
        candidate = self.adapter_dir / text
        if not candidate.exists():
            return None
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.adapter_dir.resolve()):
            raise ValueError(
                f"{text!r} leads outside {self.shown_dir} (through a symbolic link); copy the adapter into that "
                "folder instead."
            )
        if not resolved.is_dir():
            raise ValueError(f"{text!r} in {self.shown_dir} is a file; give the folder that holds the adapter.")
        return resolved

    def _ensure_demo(self) -> None:
        if self.tiny_blip_source is None or self._demo_ready:
            return
        with self._lock:
            if not self._demo_ready:
                ensure_tiny_demo_adapter(self.adapter_dir, self.tiny_blip_source)
                self._demo_ready = True


def default_adapter_dir(tiny_root: Path | None = None) -> Path:
    """``$STUDIO_BLIP_ADAPTER_DIR``; else ``<tiny root>/blip-adapters`` in --tiny mode; else ``adapters/``."""
    import os

    if tiny_root is not None and not os.environ.get(settings.BLIP_ADAPTER_DIR_ENV):
        return Path(tiny_root) / TINY_ADAPTER_DIR
    return settings.BLIP_ADAPTER_DIR
