"""Training runs in the background: start a trainer as a subprocess, follow its loss, cancel it.

The Train tab (and anything else) starts ``python -m pipelines.training.train_sd3_lora``
or ``python -m pipelines.training.train_blip_lora`` through ``TrainingRuns.start``. A run
is its own process group with its output in a log file, so it never holds the
app's request queue, survives a closed browser tab, and can be cancelled as a
whole (an ``accelerate launch`` spawns workers). The loss curve is read back
from the trainer's log lines (``step N/M ... loss X``).

On an app that strangers share: a run id is random and a run answers only the
visitor who started it; the log tail a visitor sees names no server path; each
run's folder holds its log, its dataset, its output (``output/``: the LoRA or
adapter, its checkpoints) and a PID file, so a restarted app stops trainers a
crashed one left behind, and ``stop_on_exit`` stops them on SIGTERM. The output
never lands in the shared LoRA or adapter folders: it is its owner's, loaded
through "Load the result" (``pipelines.studio.Studio.load_training_result``).

Datasets come in as uploads: a zip (the Batch tab's export, edited or not) or
loose files, laid out by ``unpack_training_upload`` into an imagefolder with a
``metadata.jsonl``. Kohya-style sidecar ``.txt`` captions are turned into that
file when it is missing.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import settings
from pipelines.blip.batch_caption import collect_uploads, member_path, sidecar_clashes
from pipelines.training.dataset import METADATA_FILE, read_dataset
from pipelines.workspace import hide_paths

logger = logging.getLogger(__name__)

TRAINER_MODULES = {"sd3": "pipelines.training.train_sd3_lora", "blip": "pipelines.training.train_blip_lora"}
# One log line per logged step, e.g. "step 40/200  loss 0.1234  lr 1.0e-04  0.52 s/step".
LOSS_LINE = re.compile(r"\bstep\s*[=:]?\s*(\d+)(?:\s*/\s*(\d+))?\b.*?\bloss\s*[=:]?\s*(-?[0-9.]+(?:e[-+]?\d+)?)", re.I)
RUN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def run_name(text: str) -> str:
    """A safe folder name for a run's output: lower case, [a-z0-9_-], at most 64 characters."""
    name = re.sub(r"[^a-z0-9_-]+", "-", str(text or "").strip().lower()).strip("-_")[:64]
    if not name or not RUN_NAME.match(name):
        raise ValueError(f"{text!r} cannot name a training run; use letters, digits, '-' or '_' (e.g. my-style).")
    return name


def renaming_sentence(given: str, folder_name: str, lora_name: str | None = None) -> str:
    """One sentence for each change a run's name goes through, or "" when it is kept as typed.

    ``given`` is what the user typed, ``folder_name`` the run's folder (``run_name``), ``lora_name``
    what the LoRA is called once loaded (``pipelines.lora.sources.sanitize_lora_name``), if known.
    """
    sentences = []
    if str(given or "").strip() != folder_name:
        sentences.append(
            f"The run name {str(given or '').strip()!r} became the folder {folder_name!r} "
            "(folder names use a-z, 0-9, - and _)."
        )
    if lora_name is not None and lora_name != folder_name:
        sentences.append(
            f"Its LoRA is called {lora_name!r} in the Generate tab (LoRA names use a-z, 0-9 and _, "
            "so prompts and the LoRA box can name it)."
        )
    return " ".join(sentences)


def smoothed_losses(losses: Sequence[float], weight: float = settings.TRAINING_LOSS_SMOOTHING) -> list[float]:
    """The exponential moving average of ``losses``, debiased as TensorBoard's smoothing is.

    Point ``t`` is ``sum(weight**(t-i) * (1-weight) * loss_i) / (1 - weight**(t+1))``: the EMA started
    from 0, divided by the weight it has gathered, so the first points are not pulled towards 0.
    """
    if not 0 <= weight < 1:
        raise ValueError(f"The smoothing weight must be in [0, 1), not {weight}.")
    smoothed, average = [], 0.0
    for step, loss in enumerate(losses, start=1):
        average = weight * average + (1 - weight) * float(loss)
        smoothed.append(average / (1 - weight**step))
    return smoothed


@dataclass(frozen=True)
class LoadedTrainingResult:
    """What "Load the result" did: where the LoRA (or BLIP adapter) is now, in data and in one sentence."""

    kind: str  # sd3 | blip
    name: str  # the LoRA's (adapter's) name where it is loaded
    sentence: str  # for the user
    model: str | None = None  # sd3: the short name of the SD3.5 model it is loaded on (large, medium, ...)
    trigger_words: tuple[str, ...] = ()
    weight: float = 1.0  # its default weight in the active set

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "model": self.model,
            "trigger_words": list(self.trigger_words),
            "weight": self.weight,
        }


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


OWNER_LOCAL = "local"  # the owner of runs started from Python or the CLI (no visitor)
PID_FILE = "trainer.pid"  # in each run's folder while its trainer may be running
LOG_FILE = "trainer.log"
COMMAND_PROMPT = "$ "  # the log's first line: the command, as a shell runs it
DATASET_FOLDER = "dataset"
OUTPUT_FOLDER = "output"  # in each run's folder: what the trainer writes (its owner's, never a shared folder)


def new_run_id(kind: str, name: str = "") -> str:
    """A run id nobody can guess: random hex from ``secrets``, then the kind and readable name."""
    return f"{secrets.token_hex(settings.TRAINING_RUN_ID_BYTES)}-{kind}-{run_name(name or kind)}"


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
    log_tail: str  # the last lines of the log, for the user to read; server paths are placeholders
    command: str = ""  # the command the run runs, as the log's first line shows it (placeholders too)

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
    owner: str = OWNER_LOCAL  # the visitor who started it (components.common.visitor_id); only they see it
    folder: Path | None = None  # the run's own folder: its log, PID file, dataset and output
    name: str = ""  # the readable name (run_name) the run id ends with; what its loaded result is called
    placeholders: dict[str, str] = field(default_factory=dict)  # server path -> what the log tail shows
    # What "Load the result" needs from the form it started with: {"model": "medium", "trigger": "sks", "name": ...}.
    options: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    cancelled: bool = False

    def status(self) -> RunStatus:
        code = self.process.poll()
        if code is not None and self.finished is None:
            self.finished = time.monotonic()
            self._forget_pid()
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
        lines = text.splitlines()
        tail = "\n".join(lines[-settings.TRAINING_LOG_TAIL_LINES :])
        command = lines[0].removeprefix(COMMAND_PROMPT) if lines and lines[0].startswith(COMMAND_PROMPT) else ""
        return RunStatus(
            run_id=self.run_id,
            kind=self.kind,
            state=state,
            step=losses[-1][0] if losses else 0,
            total_steps=total,
            losses=losses,
            seconds=end - self.started,
            output_dir=self.output_dir,
            log_tail=hide_paths(tail, self.placeholders),
            command=hide_paths(command, self.placeholders),
        )

    def cancel(self, grace: float = settings.TRAINING_CANCEL_GRACE_SECONDS) -> None:
        """Stop the run and every process it started; its checkpoints stay on disk."""
        if self.process.poll() is not None:
            return
        self.cancelled = True
        stop_process_groups([self.process.pid], grace, reap=[self.process])
        self.process.wait()
        self._forget_pid()

    def _forget_pid(self) -> None:
        if self.folder is not None:
            (self.folder / PID_FILE).unlink(missing_ok=True)


class TrainingRuns:
    """The runs this app started; at most ``max_running`` at a time.

    Each run has a folder ``runs_dir/<run id>/`` with its log, its dataset and, while it may
    be running, a PID file. A new ``TrainingRuns`` stops the trainers an earlier app process
    left running there (a crash, a SIGKILL), so the limit holds across restarts;
    ``stop_on_exit`` stops this app's trainers when it exits.

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
        # Dataset checks unpack and decode up to MAX_TRAINING_IMAGES images: one at a time, in their own thread.
        self._dataset_checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="training-dataset-check")
        self._dataset_slot = threading.Lock()
        self._previous_handlers: dict[int, object] = {}
        self.survivors_stopped = self.stop_survivors()

    # -- starting

    def run_folder(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def output_folder(self, run_id: str) -> Path:
        """Where run ``run_id``'s trainer writes: inside the run's own folder, which Gradio never serves."""
        return self.run_folder(run_id) / OUTPUT_FOLDER

    def check_room(self, owner: str = OWNER_LOCAL) -> None:
        """ValueError with a sentence when ``max_running`` runs are going; names only ``owner``'s own runs."""
        running = [run for run in self._runs.values() if run.process.poll() is None]
        if len(running) >= self.max_running:
            own = [run.run_id for run in running if run.owner == owner]
            yours = f" (yours: {', '.join(own)})" if own else ""
            raise ValueError(
                f"{len(running)} training run(s) already going on this server{yours}; "
                "wait for it to finish or cancel it first."
            )

    def check_dataset(self, uploads: Sequence[str | Path], work_dir: Path, *, wait: float | None = None) -> Path:
        """``unpack_training_upload(uploads, work_dir)`` in the dataset-check thread, one check at a time.

        Waits up to ``wait`` seconds (default: settings) for another check to end, then refuses
        with a sentence. On any failure ``work_dir`` is deleted, and the sentence names files
        relative to the upload, never a server path.
        """
        wait = settings.TRAINING_DATASET_CHECK_WAIT_SECONDS if wait is None else wait
        work_dir = Path(work_dir)
        if not self._dataset_slot.acquire(timeout=wait):
            raise ValueError("Another training dataset is being checked right now; try again in a minute.")
        try:
            return self._dataset_checker.submit(unpack_training_upload, list(uploads), work_dir).result()
        except BaseException as error:
            shutil.rmtree(work_dir, ignore_errors=True)
            if isinstance(error, ValueError):
                message = str(error).replace(f"{work_dir}/", "").replace(str(work_dir), "the upload")
                if hide_paths(message) != str(error):
                    raise type(error)(hide_paths(message)) from None
            raise
        finally:
            self._dataset_slot.release()

    def start_with_dataset(
        self,
        kind: str,
        uploads: Sequence[str | Path],
        output_dir: Path,
        arguments_for: Callable[[Path], Sequence[str]],
        *,
        name: str = "",
        owner: str = OWNER_LOCAL,
        run_id: str | None = None,
        placeholders: dict[str | Path, str] | None = None,
        run_settings: dict[str, str] | None = None,
    ) -> TrainingRun:
        """Check an uploaded dataset into a new run's folder and start the trainer on it.

        ``arguments_for(dataset)`` gives the trainer's arguments (and raises ValueError for bad
        settings); it is called once before the dataset check, so bad settings cost nothing. A run
        that does not start leaves no folder behind; one that starts keeps its dataset in its folder.
        ``run_id`` is a fresh ``new_run_id`` unless given (a caller that writes into
        ``output_folder(run_id)`` reserves it first).
        """
        if kind not in TRAINER_MODULES:
            raise ValueError(f"Unknown trainer {kind!r}; choose one of: {', '.join(TRAINER_MODULES)}.")
        run_id = run_id or new_run_id(kind, name)
        folder = self.run_folder(run_id)
        arguments_for(folder / DATASET_FOLDER)  # settings first: cheap, and named before any upload is opened
        self.check_room(owner)
        try:
            dataset = self.check_dataset(uploads, folder / DATASET_FOLDER)
            return self.start(
                kind,
                arguments_for(dataset),
                output_dir,
                name=name,
                owner=owner,
                run_id=run_id,
                placeholders={**(placeholders or {}), dataset: "<dataset>"},
                run_settings=run_settings,
            )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def start(
        self,
        kind: str,
        arguments: Sequence[str],
        output_dir: Path,
        *,
        name: str = "",
        owner: str = OWNER_LOCAL,
        run_id: str | None = None,
        placeholders: dict[str | Path, str] | None = None,
        run_settings: dict[str, str] | None = None,
    ) -> TrainingRun:
        """Start ``python -m <trainer> <arguments>``; the trainer writes into ``output_dir``.

        ``run_id`` is a fresh ``new_run_id`` unless given (``start_with_dataset`` reserves one);
        ``placeholders`` maps server paths in the arguments to what the log tail shows instead;
        ``run_settings`` is kept with the run (``TrainingRun.options``). The log's first line is the
        command as a shell runs it from any folder (``shell_command``).
        """
        if kind not in TRAINER_MODULES:
            raise ValueError(f"Unknown trainer {kind!r}; choose one of: {', '.join(TRAINER_MODULES)}.")
        with self._lock:
            self.check_room(owner)
            run_id = run_id or new_run_id(kind, name)
            folder = self.run_folder(run_id)
            folder.mkdir(parents=True, exist_ok=True)
            log_path = folder / LOG_FILE
            module = TRAINER_MODULES[kind]
            argv = [self.python, "-u", "-m", module, *map(str, arguments)]
            environment = {**os.environ, **self.environment, "PYTHONUNBUFFERED": "1"}
            app_root = Path(__file__).resolve().parents[2]
            with open(log_path, "w", encoding="utf-8") as log:
                log.write(COMMAND_PROMPT + shell_command(argv, app_root, self.environment) + "\n")
                log.flush()
                process = subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=app_root,
                    env=environment,
                    start_new_session=True,  # its own process group: cancel reaches every worker
                )
            _write_pid_file(folder / PID_FILE, process.pid, module)
            shown = {
                **(placeholders or {}),
                Path(output_dir): "<output>",
                folder: "<run>",
                self.runs_dir: "<runs>",
                app_root: "<app>",
                self.python: "python",  # the interpreter's path names no secret, but says nothing either
            }
            run = TrainingRun(
                run_id,
                kind,
                argv,
                Path(output_dir),
                log_path,
                process,
                owner=owner,
                folder=folder,
                name=run_name(name or kind),
                placeholders={str(path): label for path, label in shown.items()},
                options=dict(run_settings or {}),
            )
            self._runs[run_id] = run
            return run

    # -- finding

    def get(self, run_id: str, owner: str = OWNER_LOCAL) -> TrainingRun:
        """``owner``'s run ``run_id``; another visitor's run is answered exactly like one that never existed."""
        run = self._runs.get(str(run_id))
        if run is None or run.owner != owner:
            raise ValueError(
                f"No such training run {_shown_id(run_id)}; start one first (run ids come from /train_start)."
            )
        return run

    def runs(self, owner: str | None = None) -> list[TrainingRun]:
        """Every run this app started, or ``owner``'s only."""
        return [run for run in list(self._runs.values()) if owner is None or run.owner == owner]

    # -- stopping

    def cancel_all(self, grace: float = settings.TRAINING_CANCEL_GRACE_SECONDS) -> None:
        """Stop every running trainer's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        running = [run for run in self.runs() if run.process.poll() is None]
        for run in running:
            run.cancelled = True
        stop_process_groups([run.process.pid for run in running], grace, reap=[run.process for run in running])
        for run in running:
            run._forget_pid()

    def stop_on_exit(self) -> None:
        """Stop every trainer when this app exits: at interpreter exit and on SIGTERM or SIGINT.

        Call from the main thread (signal handlers can only be set there). A signal handler stops
        the trainers, then hands the signal on: to the handler that was there before (SIGINT's
        KeyboardInterrupt lets Gradio close), or to the default action, so the app still exits.
        """
        atexit.register(self.cancel_all, settings.TRAINING_EXIT_GRACE_SECONDS)
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue  # whoever started the app chose to ignore it
            self._previous_handlers[signum] = previous
            signal.signal(signum, self._on_exit_signal)

    def _on_exit_signal(self, signum: int, frame) -> None:
        self.cancel_all(settings.TRAINING_EXIT_GRACE_SECONDS)
        previous = self._previous_handlers.get(signum)
        if callable(previous):
            previous(signum, frame)
            raise SystemExit(128 + signum)  # the previous handler returned: exit all the same
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def stop_survivors(self, grace: float = settings.TRAINING_EXIT_GRACE_SECONDS) -> list[int]:
        """Stop trainers that an earlier, no longer running app process left behind; returns their PIDs.

        A PID file whose app is still running (another app sharing the folder) is left alone. A
        PID is stopped only if it is still the trainer it names: the same start time and the
        trainer module in its command line, so a reused PID is never killed.
        """
        stopped: list[int] = []
        if not self.runs_dir.is_dir():
            return stopped
        for pid_file in sorted(self.runs_dir.glob(f"*/{PID_FILE}")):
            try:
                record = json.loads(pid_file.read_text(encoding="utf-8"))
                pid, started, module = int(record["pid"]), int(record["started"]), str(record["module"])
                app_pid, app_started = int(record["app_pid"]), int(record["app_started"])
            except (OSError, ValueError, KeyError, TypeError):
                logger.warning("ignoring an unreadable training PID file %s", pid_file)
                pid_file.unlink(missing_ok=True)
                continue
            if _is_process(app_pid, app_started):
                continue  # its app is alive: that app's run, not a survivor
            if pid > 1 and _is_process(pid, started) and module in _command_line(pid):
                logger.warning("stopping trainer %s (pid %d) left running by an earlier app", pid_file.parent.name, pid)
                stop_process_groups([pid], grace)
                stopped.append(pid)
            pid_file.unlink(missing_ok=True)
        return stopped


def shell_command(argv: Sequence[str], folder: Path, environment: dict[str, str] | None = None) -> str:
    """``argv`` as one shell line that runs the same thing from anywhere: ``cd FOLDER && [VAR=value] python ...``.

    ``-u`` (unbuffered output, for the log) is left out: it changes nothing a user would see in a terminal.
    """
    words = [argv[0], *(word for word in argv[1:2] if word != "-u"), *argv[2:]]
    variables = [f"{name}={shlex.quote(value)}" for name, value in sorted((environment or {}).items())]
    return " ".join(["cd", shlex.quote(str(folder)), "&&", *variables, *map(shlex.quote, map(str, words))])


def stop_process_groups(
    groups: Sequence[int], grace: float, *, reap: Sequence[subprocess.Popen] = (), poll: float = 0.05
) -> None:
    """SIGTERM each process group, wait up to ``grace`` seconds for all to end, then SIGKILL what is left.

    ``reap``: our own child processes among them, polled so that they do not linger as zombies.
    """
    groups = list(groups)
    for group in groups:
        _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while True:
        for process in reap:
            process.poll()
        alive = [group for group in groups if _group_alive(group)]
        if not alive:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
    for group in alive:
        _signal_group(group, signal.SIGKILL)
    for process in reap:
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("trainer pid %d did not end after SIGKILL", process.pid)


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()


def _start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (stat field 22); None if it is gone or unknowable."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _is_process(pid: int, started: int) -> bool:
    """Whether ``pid`` is alive and is the process that started at ``started`` (not a reused PID)."""
    return pid > 0 and _start_time(pid) == started


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _group_alive(group: int) -> bool:
    """Whether any process of the group is still running (zombies, which only wait to be reaped, are not)."""
    proc = Path("/proc")
    if not proc.is_dir():  # no /proc: ask the kernel (a zombie leader then counts as alive)
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in proc.iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields and len(fields) > 2 and fields[2] == str(group) and fields[0] != "Z":
                return True
    return False


def _write_pid_file(path: Path, pid: int, module: str) -> None:
    """Enough to find the trainer after a crash, and to tell it from a process that reused its PID."""
    record = {
        "pid": pid,
        "started": _start_time(pid) or 0,
        "module": module,
        "app_pid": os.getpid(),
        "app_started": _start_time(os.getpid()) or 0,
    }
    path.write_text(json.dumps(record), encoding="utf-8")


def _shown_id(run_id) -> str:
    text = repr(str(run_id))
    return text if len(text) <= 80 else text[:77] + "..."
