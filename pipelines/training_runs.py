"""Training runs in the background: start a trainer as a subprocess, follow its loss, cancel it.

The Train tab (and anything else) starts ``python -m pipelines.train_sd3_lora``
or ``python -m pipelines.train_blip_lora`` through ``TrainingRuns.start``. A run
is its own process group with its output in a log file, so it never holds the
app's request queue, survives a closed browser tab, and can be cancelled as a
whole (an ``accelerate launch`` spawns workers). The loss curve is read back
from the trainer's log lines (``step N/M ... loss X``).

Datasets come in as uploads: a zip (the Batch tab's export, edited or not) or
loose files, laid out by ``unpack_training_upload`` into an imagefolder with a
``metadata.jsonl``. Kohya-style sidecar ``.txt`` captions are turned into that
file when it is missing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import settings
from pipelines.batch_caption import collect_uploads, member_path, sidecar_clashes
from pipelines.training_data import METADATA_FILE, read_dataset

TRAINER_MODULES = {"sd3": "pipelines.train_sd3_lora", "blip": "pipelines.train_blip_lora"}
# One log line per logged step, e.g. "step 40/200  loss 0.1234  lr 1.0e-04  0.52 s/step".
LOSS_LINE = re.compile(r"\bstep\s*[=:]?\s*(\d+)(?:\s*/\s*(\d+))?\b.*?\bloss\s*[=:]?\s*(-?[0-9.]+(?:e[-+]?\d+)?)", re.I)
RUN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def run_name(text: str) -> str:
    """A safe folder name for a run's output: lower case, [a-z0-9_-], at most 64 characters."""
    name = re.sub(r"[^a-z0-9_-]+", "-", str(text or "").strip().lower()).strip("-_")[:64]
    if not name or not RUN_NAME.match(name):
        raise ValueError(f"{text!r} cannot name a training run; use letters, digits, '-' or '_' (e.g. my-style).")
    return name


def unpack_training_upload(paths: Iterable[str | Path], work_dir: Path) -> Path:
    """Lay uploaded images, captions and zips out as an imagefolder under ``work_dir``; returns it.

    Images go through the Batch tab's safe unpacking (zip-slip, bombs, file
    limits). From zips and loose uploads, ``metadata.jsonl`` and sidecar
    ``.txt`` files are taken too (small text files only). Without a
    ``metadata.jsonl``, one is written from the sidecars. The result is then
    checked with ``read_dataset``, so a bad dataset fails here, before a run.
    """
    paths = [Path(path) for path in paths]
    if not paths:
        raise ValueError("Upload a dataset first: a zip of images with metadata.jsonl or .txt captions.")
    work_dir = Path(work_dir)
    uploaded = collect_uploads(
        paths,
        work_dir,
        max_files=settings.MAX_TRAINING_IMAGES,
        max_unpacked_bytes=settings.MAX_ZIP_UNCOMPRESSED_BYTES,
        max_ratio=settings.MAX_ZIP_RATIO,
    )
    texts: dict[str, str] = {}  # relative path -> content, for metadata.jsonl and sidecars
    for path in paths:
        if path.suffix.lower() in (".txt", ".jsonl"):
            texts[path.name] = _read_small_text(path, path.name)
        elif path.suffix.lower() == ".zip":
            texts.update(_zip_texts(path))
    metadata_names = sorted((name for name in texts if Path(name).name == METADATA_FILE), key=lambda n: n.count("/"))
    if metadata_names:  # a zip of a folder holds "folder/metadata.jsonl": that folder is the dataset
        root = work_dir / Path(metadata_names[0]).parent
        root.mkdir(parents=True, exist_ok=True)
        (root / METADATA_FILE).write_text(texts[metadata_names[0]], encoding="utf-8")
    else:
        root = work_dir
        image_names = [file.relative_to(work_dir).as_posix() for file in uploaded.files]
        if clashes := sidecar_clashes(image_names):  # kohya would train both images on one caption
            sidecar, images = min(clashes.items())
            raise ValueError(
                f"{' and '.join(images)} would both be captioned by {sidecar}; rename one of them "
                f"(the Batch tab's zip does this for you) or add a metadata.jsonl with a caption for each."
            )
        lines = []
        for file in uploaded.files:
            image = file.relative_to(work_dir).as_posix()
            caption = texts.get(Path(image).with_suffix(".txt").as_posix(), "").strip()
            if caption:
                lines.append(json.dumps({"file_name": image, "text": caption}, ensure_ascii=False))
        if not lines:
            raise ValueError(
                "The upload has no captions: include metadata.jsonl (the Batch tab's zip has one) "
                "or a .txt file beside each image."
            )
        (root / METADATA_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    read_dataset(root)  # every problem named now, not an hour into a run
    return root


def _text_limit(name: str) -> int:
    return settings.MAX_METADATA_BYTES if name.endswith(".jsonl") else settings.MAX_SIDECAR_BYTES


def _read_small_text(path: Path, label: str) -> str:
    if path.stat().st_size > _text_limit(label):
        raise ValueError(f"{label} is {path.stat().st_size} bytes: too large for captions; check it is the right file.")
    return path.read_text(encoding="utf-8", errors="replace")


def _zip_texts(path: Path) -> dict[str, str]:
    texts: dict[str, str] = {}
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return texts  # collect_uploads has already reported it
    with archive:
        for member in archive.infolist():
            if member.is_dir() or Path(member.filename).suffix.lower() not in (".txt", ".jsonl"):
                continue
            name = member_path(member)
            if name is None:
                raise ValueError(f"{path.name}:{member.filename} points outside the archive (zip-slip); refused.")
            limit = _text_limit(name)
            if member.file_size > limit:
                raise ValueError(
                    f"{path.name}:{member.filename} is {member.file_size} bytes: too large for captions; "
                    "check it is the right file."
                )
            with archive.open(member) as source:
                texts[name] = source.read(limit + 1).decode("utf-8", errors="replace")
    return texts


@dataclass
class RunStatus:
    run_id: str
    kind: str
    state: str  # running | finished | failed | cancelled
    step: int  # the last logged step
    total_steps: int | None
    losses: list[tuple[int, float]]  # (step, loss) for every logged step
    seconds: float
    output_dir: Path
    log_tail: str  # the last lines of the log, for the user to read

    @property
    def done(self) -> bool:
        return self.state != "running"


@dataclass
class TrainingRun:
    run_id: str
    kind: str
    argv: list[str]
    output_dir: Path
    log_path: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    cancelled: bool = False

    def status(self) -> RunStatus:
        code = self.process.poll()
        if code is not None and self.finished is None:
            self.finished = time.monotonic()
        if code is None:
            state = "running"
        elif self.cancelled:
            state = "cancelled"
        else:
            state = "finished" if code == 0 else "failed"
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        losses: list[tuple[int, float]] = []
        total = None
        for line in text.splitlines():
            match = LOSS_LINE.search(line)
            if match:
                losses.append((int(match.group(1)), float(match.group(3))))
                total = int(match.group(2)) if match.group(2) else total
        end = self.finished if self.finished is not None else time.monotonic()
        return RunStatus(
            run_id=self.run_id,
            kind=self.kind,
            state=state,
            step=losses[-1][0] if losses else 0,
            total_steps=total,
            losses=losses,
            seconds=end - self.started,
            output_dir=self.output_dir,
            log_tail="\n".join(text.splitlines()[-settings.TRAINING_LOG_TAIL_LINES :]),
        )

    def cancel(self) -> None:
        """Stop the run and every process it started; its checkpoints stay on disk."""
        if self.process.poll() is not None:
            return
        self.cancelled = True
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=settings.TRAINING_CANCEL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


class TrainingRuns:
    """The runs this app started; at most ``max_running`` at a time.

    ``python`` is the interpreter the trainers run under (this one by default);
    ``environment`` is added to the subprocess environment (e.g. HF_HUB_OFFLINE).
    """

    def __init__(
        self,
        runs_dir: Path,
        *,
        max_running: int = settings.MAX_RUNNING_TRAININGS,
        python: str = sys.executable,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.runs_dir = Path(runs_dir)
        self.max_running = max_running
        self.python = python
        self.environment = dict(environment or {})
        self._runs: dict[str, TrainingRun] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, arguments: Sequence[str], output_dir: Path, *, name: str = "") -> TrainingRun:
        """Start ``python -m <trainer> <arguments>``; the trainer writes into ``output_dir``."""
        if kind not in TRAINER_MODULES:
            raise ValueError(f"Unknown trainer {kind!r}; choose one of: {', '.join(TRAINER_MODULES)}.")
        with self._lock:
            running = [run for run in self._runs.values() if run.process.poll() is None]
            if len(running) >= self.max_running:
                raise ValueError(
                    f"{len(running)} training run(s) already going ({', '.join(run.run_id for run in running)}); "
                    "wait for it to finish or cancel it first."
                )
            run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{run_name(name or kind)}"
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.runs_dir / f"{run_id}.log"
            argv = [self.python, "-u", "-m", TRAINER_MODULES[kind], *map(str, arguments)]
            environment = {**os.environ, **self.environment, "PYTHONUNBUFFERED": "1"}
            with open(log_path, "w", encoding="utf-8") as log:
                log.write("$ " + " ".join(argv[2:]) + "\n")
                log.flush()
                process = subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=Path(__file__).resolve().parent.parent,
                    env=environment,
                    start_new_session=True,  # its own process group: cancel reaches every worker
                )
            run = TrainingRun(run_id, kind, argv, Path(output_dir), log_path, process)
            self._runs[run_id] = run
            return run

    def get(self, run_id: str) -> TrainingRun:
        try:
            return self._runs[run_id]
        except KeyError:
            raise ValueError(f"No training run {run_id!r} in this app; start one first.") from None

    def runs(self) -> list[TrainingRun]:
        return list(self._runs.values())

    def cancel_all(self) -> None:
        for run in self.runs():
            run.cancel()
