"""The general guard against denial of service: every event answers its nastiest small payloads in time.

It reads the running app's ``/config`` and walks EVERY dependency (fn_index), private and js-only ones
included, so an event added tomorrow is attacked without anyone listing it. Each event gets payloads
chosen by the type of each input: long single lines (384 kB of A1111-shaped ``a: b, `` pairs, a
parameters text whose settings line is a megabyte of words without a colon, a megabyte of control and
bidirectional characters), numbers (1e308, -1, "NaN", a 5000-digit integer), JSON nested 10,000 deep
and dicts declaring huge counts, and files uploaded through Gradio's upload route as a client would: a
PNG declaring 100000x100000 pixels, a 1 kB PNG whose zTXt ``parameters`` chunk inflates to that
megabyte of words, a zip declaring 4 GB unpacked, an image editor value with a thousand layers, one
file more than a Batch run takes, and a FileData naming ``/etc/passwd`` directly. Sizes are declared,
never real: the whole walk sends a few tens of megabytes.

Time is the point here (a hung or quadratic event is a denial of service), so the test measures it,
with a generous limit: each call must complete within ANSWER_LIMIT_S, and while it is in flight a
bystander (``GET /config`` and a light queued event) must be answered within the same limit. An
answer may be a refusal; what fails is a hang, a stalled bystander, a server that died, or an answer
holding a file whose path the client sent.

Every event is walked by ``test_every_event_answers_in_time``; its first version found ``/png_info``
holding the server far past the limit on a zTXt chunk (fixed since, and guarded here).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass, field

import pytest

from pipelines import settings
from tests.app_server import tiny_app
from tests.event_calls import (
    EventTimeout,
    as_file,
    call_event,
    component_types,
    event_name,
    file_payloads,
    get_bytes,
    page_defaults,
    read_config,
    upload,
)

pytestmark = [pytest.mark.api, pytest.mark.slow]

# A denial-of-service guard measures time: a tiny-model event answers in well under a second here,
# so 10 s on 2 shared cores is generous, and a hang or a quadratic parse of a megabyte blows it.
ANSWER_LIMIT_S = 10
MAX_CALLS = 1500  # a bound on the whole walk (today 424 calls for 72 events)
BYSTANDER_AFTER_S = 0.3  # an attack still in flight after this has a bystander asking until it ends
BYSTANDER_EVENT = "forget_visitor"  # queued, no inputs, its own concurrency group: the lightest queued event


# Input component types, grouped by the payloads that fit them.
TEXT = {"textbox", "dropdown", "radio", "code", "markdown", "html"}
NUMBER = {"number", "slider"}
FLAG = {"checkbox"}
CHOICES = {"checkboxgroup"}
STRUCTURED = {"json", "state", "dataframe", "dataset"}
IMAGE = {"image"}
FILE = {"file", "uploadbutton"}
EDITOR = {"imageeditor"}

A_B_LINE = "a: b, " * 65_536  # 384 kB on one line, shaped like A1111's "Steps: 20, Sampler: ..." line
# A parameters text (prompt, then the settings line) whose settings line is 1 MB of words without a colon:
# a backtracking "key: value" pattern retries every start position over the whole line.
WORDS_TEXT = "a prompt\n" + "a " * 500_000
CONTROL_LINE = ("a\u202eb\u2066c\x00d\x1b[2J\re\u200f" * 100_000)[:1_000_000]  # 1 MB, no newline
DEEP = 10_000  # nesting depth of the deep JSON: past Python's recursion limit
# Placeholders spliced into the request's JSON text: values Python's json cannot write.
RAW_DEEP_JSON = "@@deep-json@@"
RAW_HUGE_INT = "@@huge-int@@"
RAW_VALUES = {
    json.dumps(RAW_DEEP_JSON): "[" * DEEP + "]" * DEEP,
    json.dumps(RAW_HUGE_INT): "9" * 5000,  # past Python's 4300-digit int conversion limit
}
HUGE_COUNTS = {
    "count": 10**12,
    "n": 10**12,
    "num_images": 10**12,
    "batch_size": 10**12,
    "steps": 10**12,
    "Steps": "1000000000000",
    "width": 100_000,
    "height": 100_000,
    "Size": "100000x100000",
    "index": 10**18,
    "layers": 10**12,
    "images": [{"width": 100_000, "height": 100_000}] * 1000,
}
HUGE_TABLE = {
    "headers": ["#", "caption", "score", "tokens", "adapter"],
    "data": [[10**12, "a: b, " * 8, 1e308, 10**12, ""]] * 5000,
    "metadata": None,
}
EDITOR_LAYERS = 1000  # the editor reads at most settings.MAX_MASK_LAYERS brush layers
# One more than a Batch run takes. Not more: Gradio checks and caches every FileData of a request in its
# event loop before the app sees it, which stalls every other request about 2 ms per file here.
MANY_FILES = settings.MAX_BATCH_FILES + 1


def encode_with_raw_values(payload: dict) -> str:
    text = json.dumps(payload)
    for placeholder, raw in RAW_VALUES.items():
        text = text.replace(placeholder, raw)
    return text


# 1. Files: a few hundred bytes each, built here, declaring sizes they do not have.


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, *chunks: bytes) -> bytes:
    """An 8-bit RGB PNG whose header declares width x height; its pixel data is one black row pixel."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + b"\x00\x00\x00" * width if width <= 64 else b"\x00\x00\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + b"".join(chunks)
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


def ztxt_png() -> bytes:
    """A 1x1 PNG whose zTXt ``parameters`` chunk inflates to WORDS_TEXT, 1 MB (Pillow's text cap is 1 MiB)."""
    return png(1, 1, png_chunk(b"zTXt", b"parameters\x00\x00" + zlib.compress(WORDS_TEXT.encode(), 9)))


def zip_declaring_4_gb() -> bytes:
    """A zip whose one member (a tiny PNG) declares 4 GB unpacked, in the local and the central header."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", png(1, 1))
    data = bytearray(buffer.getvalue())
    declared = struct.pack("<I", 0xFFFF_FFFE)
    local = data.index(b"PK\x03\x04")
    data[local + 22 : local + 26] = declared
    central = data.index(b"PK\x01\x02")
    data[central + 24 : central + 28] = declared
    return bytes(data)


# 2. Rounds: one payload per kind of input; a round fills every input of its kinds at once, the
#    others keep the page's defaults (so the nasty value gets past the other checks).


@dataclass
class Round:
    name: str
    values: dict  # input type -> value (a FileData name in `files` is resolved after upload)
    event_data: object = None
    alone: set[str] = field(default_factory=set)  # input types also attacked one input at a time


def rounds(files: dict[str, dict]) -> list[Round]:
    small, huge_png, bomb_png, big_zip = files["small"], files["huge_png"], files["ztxt_png"], files["zip"]
    passwd = as_file("/etc/passwd")

    def editor(background, layers):
        return {"background": background, "layers": layers, "composite": background, "id": None}

    def for_files(value, many=None):
        return {
            **dict.fromkeys(IMAGE, value),
            **dict.fromkeys(FILE, many if many is not None else [value]),
            **dict.fromkeys(EDITOR, editor(value, [value])),
        }

    return [
        Round(
            "a 384 kB line of 'a: b, '",
            {**dict.fromkeys(TEXT, A_B_LINE), **dict.fromkeys(CHOICES, [A_B_LINE])},
            {"index": 0, "value": A_B_LINE},
            alone={"textbox"},
        ),
        Round(
            "a parameters text whose settings line is 1 MB of words",
            {**dict.fromkeys(TEXT, WORDS_TEXT), **dict.fromkeys(CHOICES, [WORDS_TEXT])},
            {"index": 0, "value": WORDS_TEXT},
        ),
        Round(
            "a 1 MB line of control and bidi characters",
            {**dict.fromkeys(TEXT, CONTROL_LINE), **dict.fromkeys(CHOICES, [CONTROL_LINE])},
            {"index": 0, "value": CONTROL_LINE},
        ),
        Round(
            "1e308",
            {**dict.fromkeys(NUMBER, 1e308), **dict.fromkeys(FLAG, 1e308), "dataset": 10**18},
            {"index": 10**18, "value": 1e308},
        ),
        Round("-1", {**dict.fromkeys(NUMBER, -1), "dataset": -1}, {"index": -1, "value": None}),
        Round("'NaN'", {**dict.fromkeys(NUMBER, "NaN"), **dict.fromkeys(FLAG, "NaN"), "dataset": "NaN"}),
        Round("a 5000-digit integer", {**dict.fromkeys(NUMBER, RAW_HUGE_INT), "dataset": RAW_HUGE_INT}),
        Round(
            f"JSON nested {DEEP} deep",
            {**dict.fromkeys(STRUCTURED, RAW_DEEP_JSON), **dict.fromkeys(CHOICES, RAW_DEEP_JSON)},
            RAW_DEEP_JSON,
        ),
        Round(
            f"JSON text nested {DEEP} deep",
            {**dict.fromkeys(STRUCTURED | TEXT, "[" * DEEP + "]" * DEEP)},
            {"index": 0, "value": "[" * DEEP + "]" * DEEP},
        ),
        Round(
            "huge declared counts",
            {
                **dict.fromkeys(STRUCTURED, HUGE_COUNTS),
                "dataframe": HUGE_TABLE,
                **dict.fromkeys(CHOICES, ["x"] * 100_000),
            },
            {"index": [10**18, 10**18], "value": HUGE_COUNTS, "selected": True},
        ),
        Round("a PNG declaring 100000x100000", for_files(huge_png)),
        Round("a 1 kB PNG whose zTXt parameters inflate to 1 MB of words", for_files(bomb_png), alone=IMAGE | FILE),
        Round("a zip declaring 4 GB unpacked", for_files(big_zip)),
        Round(
            "/etc/passwd named directly",
            for_files(passwd),  # as text too in tests/test_event_paths.py
            {"index": 0, "value": {"image": passwd, "caption": None}},
        ),
        Round(
            f"{EDITOR_LAYERS} editor layers, {MANY_FILES} files",
            {
                **dict.fromkeys(IMAGE, small),
                **dict.fromkeys(FILE, [small] * MANY_FILES),
                **dict.fromkeys(EDITOR, editor(small, [small] * EDITOR_LAYERS)),
            },
        ),
    ]


def calls_for(dependency: dict, types: dict[int, str], defaults: dict, files: dict) -> list[tuple[str, list, object]]:
    """(what was sent, data, event data) for every attack on one event: every round that touches one
    of its inputs, all such inputs at once, then each input alone for the rounds marked ``alone``."""
    inputs = dependency["inputs"]
    kinds = [types[component_id] for component_id in inputs]
    base = [defaults.get(component_id) for component_id in inputs]
    planned = []
    for attack in rounds(files):
        hit = [position for position, kind in enumerate(kinds) if kind in attack.values]
        if not hit and (attack.event_data is None or not dependency.get("collects_event_data")):
            continue
        data = [attack.values[kinds[position]] if position in hit else value for position, value in enumerate(base)]
        planned.append((f"{attack.name} as every {sorted({kinds[p] for p in hit})} input", data, attack.event_data))
        alone = [position for position in hit if kinds[position] in attack.alone]
        if len(hit) > 1:
            for position in alone:
                data = list(base)
                data[position] = attack.values[kinds[position]]
                planned.append((f"{attack.name} as input {position} ({kinds[position]})", data, None))
    if not planned:  # no inputs and no event data: the event is still called once, as a page would
        planned.append(("no inputs", [], None))
    return planned


# 3. The server: restarted when an attack leaves it hung or dead, so one failure does not cascade.


@dataclass
class Server:
    tiny_root: object
    log_dir: object
    process: object = None
    url: str = ""
    restarts: int = 0
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def start(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        log = self.log_dir / f"app-{self.restarts}.log"
        self.process, self.url = self._stack.enter_context(tiny_app(self.tiny_root, log))

    def restart(self) -> None:
        self.restarts += 1
        self.start()

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def server(tiny_root, tmp_path_factory):
    running = Server(tiny_root, tmp_path_factory.mktemp("attacked-app"))
    running.start()
    yield running
    running.close()


@pytest.fixture(scope="module")
def uploaded(server):
    """The attack files, uploaded once (a restarted server gets them again)."""
    cache = {}

    def files() -> dict[str, dict]:
        if cache.get("url") != server.url:
            cache["url"] = server.url
            cache["files"] = {
                "small": upload(server.url, "small.png", png(1, 1)),
                "huge_png": upload(server.url, "huge.png", png(100_000, 100_000)),
                "ztxt_png": upload(server.url, "ztxt.png", ztxt_png()),
                "zip": upload(server.url, "four-gb.zip", zip_declaring_4_gb()),
            }
        return cache["files"]

    return files


# 4. One attack: the call in a thread, the bystander polled while it is in flight.

POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="attack")


def bystander(url: str, light_event: dict | None) -> float:
    """Seconds for ``GET /config`` and (if there is one) a light queued event; raises on a timeout."""
    started = time.monotonic()
    if get_bytes(url + "config", timeout=ANSWER_LIMIT_S) is None:
        raise EventTimeout("GET /config got no answer")
    if light_event is not None:
        call_event(url, light_event, [], timeout=ANSWER_LIMIT_S)
    return time.monotonic() - started


def attack(server: Server, dependency: dict, data: list, event_data, light_event: dict | None) -> str | None:
    """Send one attack; None if it and the bystander were answered in time, else what went wrong."""
    url = server.url
    started = time.monotonic()
    future = POOL.submit(
        call_event,
        url,
        dependency,
        data,
        event_data,
        timeout=ANSWER_LIMIT_S,
        encode=encode_with_raw_values,
    )
    # Most attacks are refused at once; the bystander asks while one is still in flight.
    with contextlib.suppress(concurrent.futures.TimeoutError):
        future.exception(timeout=BYSTANDER_AFTER_S)
    while not future.done() and time.monotonic() - started < ANSWER_LIMIT_S:
        try:
            bystander(url, light_event)
        except (EventTimeout, OSError) as error:
            return f"the bystander was not answered within {ANSWER_LIMIT_S} s while it ran ({error})"
        time.sleep(0.2)
    try:
        status, outputs = future.result(timeout=max(ANSWER_LIMIT_S - (time.monotonic() - started), 0.1) + 1)
    except (EventTimeout, concurrent.futures.TimeoutError):
        return f"no answer within {ANSWER_LIMIT_S} s"
    except OSError as error:
        if server.process.poll() is not None:
            return f"the server died (exit {server.process.returncode}) after {time.monotonic() - started:.1f} s"
        return f"the connection failed after {time.monotonic() - started:.1f} s: {error!r}"
    elapsed = time.monotonic() - started
    if server.process.poll() is not None:
        return f"the server died (exit {server.process.returncode}) after {elapsed:.1f} s"
    if elapsed > ANSWER_LIMIT_S:
        return f"answered (status {status}) only after {elapsed:.1f} s"
    for payload in file_payloads(outputs):
        if payload.get("path") == "/etc/passwd" or payload.get("orig_name") == "passwd":
            return f"answered with the file the client named: {payload}"
    return None


def walk(server: Server, uploaded, names: set[str] | None, skip: set[str] = frozenset()) -> tuple[list, int]:
    """Attack every event (or only ``names``) but those in ``skip``; returns (failures, calls made)."""
    config = read_config(server.url)
    types, defaults = component_types(config), page_defaults(config)
    by_name = {event_name(dependency): dependency for dependency in config["dependencies"]}
    light = by_name.get(BYSTANDER_EVENT)
    assert light is not None and light.get("queue") and not light["inputs"], "the bystander event changed"
    failures, calls = [], 0
    for name, dependency in by_name.items():
        if (names is not None and name not in names) or name in skip:
            continue
        for sent, data, event_data in calls_for(dependency, types, defaults, uploaded()):
            calls += 1
            assert calls <= MAX_CALLS, "the walk is bounded; raise MAX_CALLS only with a reason"
            started = time.monotonic()
            problem = attack(server, dependency, data, event_data, light)
            if problem is not None:
                failures.append(
                    f"{name} (fn_index {dependency['id']}), {sent}: {problem} [{time.monotonic() - started:.1f} s]"
                )
                server.restart()  # a hung or dead server would fail every event after this one
                config = read_config(server.url)
                light = {event_name(d): d for d in config["dependencies"]}[BYSTANDER_EVENT]
    return failures, calls


def test_every_event_answers_in_time(server, uploaded):
    config = read_config(server.url)
    dependencies = config["dependencies"]
    assert len(dependencies) >= 30  # the whole app, private events included
    assert any(dependency.get("api_visibility") == "private" for dependency in dependencies)
    failures, calls = walk(server, uploaded, None)
    assert calls >= len(dependencies)
    assert not failures, f"{len(failures)} of {calls} attacks failed:\n" + "\n".join(failures)
