"""The README and docs/ stay true: the README is a short front door whose install and test commands
CI reads, every relative link lands on a file (and heading), and every ``python -m MODULE`` /
``python app.py`` command they show names a real module and only flags its parser accepts.

In-process and fast: each program's own argparse parser is caught as it is about to parse (its
``parse_args``/``main`` is called with ``ArgumentParser.parse_args`` patched to hand the parser
back), so nothing runs and no subprocess starts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200  # a front door: what it is, how to install, run and test, and where the rest is
# .ci/run evals these two lines as they are: CI installs and tests exactly what a reader is told to.
CI_COMMANDS = {"install": "pip install -r requirements.txt", "test": "python -m pytest"}
# Packages of this repository whose command lines the docs show; other modules (pytest) only need to exist.
OWN_PACKAGES = ("pipelines", "bench")

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_fences(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The prose lines (outside code fences) and each fenced block as (language, lines)."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if FENCE.match(line):
            if current is None:
                current = []
                blocks.append((line.strip("`~ ").lower(), current))
            else:
                current = None
            continue
        (prose if current is None else current).append(line)
    assert current is None, "a code fence is never closed"
    return prose, blocks


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    return {github_slug(line.lstrip("#")) for line in prose if re.match(r"^#{1,6} ", line)}


# ----------------------------------------------------------------------------- the README's shape


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("marker", sorted(CI_COMMANDS))
def test_ci_marker_is_followed_by_one_bash_command(marker):
    """``.ci/run`` takes the line after ``<!-- ci:MARKER -->`` and its ```bash fence, and evals it."""
    lines = README.read_text(encoding="utf-8").splitlines()
    tag = f"<!-- ci:{marker} -->"
    assert lines.count(tag) == 1, f"README.md must hold {tag} exactly once"
    at = lines.index(tag)
    assert lines[at + 1] == "```bash", f"{tag} must be followed by a ```bash fence"
    assert FENCE.match(lines[at + 3]), f"the bash block after {tag} must hold exactly one line"
    assert lines[at + 2] == CI_COMMANDS[marker]
    if marker == "install":
        assert (ROOT / "requirements.txt").is_file()


# ----------------------------------------------------------------------------- links


def relative_links(path: Path) -> list[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    text = CODE_SPAN.sub("", "\n".join(prose))  # a link written inside `code` is not a link
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


def test_docs_folder_holds_the_moved_pages():
    pages = {path.name for path in DOC_FILES[1:]}
    for name in ("api.md", "lora.md", "training.md", "memory.md", "fast-path.md", "public-instance.md", "layout.md"):
        assert name in pages, f"docs/{name} is missing"
    linked = {Path(target.split("#")[0]).name for target in relative_links(README)}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


@pytest.mark.parametrize("path", DOC_FILES, ids=relative)
def test_relative_links_resolve(path):
    targets = relative_links(path)
    broken = []
    for target in targets:
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading with that anchor)")
        elif not resolved.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
    assert not broken, f"{relative(path)}: broken links: {broken}"


# ----------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    source: str  # file:line, for the failure message
    text: str  # as printed
    program: str  # "app.py", or a module name
    args: tuple[str, ...]
    fenced: bool  # in a bash block (run as printed), or a `span` in prose (names flags)


def parse_command(source: str, text: str, fenced: bool) -> Command | None:
    """The program and its arguments of one shell command line, or None when it runs neither python nor
    accelerate launch. ``accelerate launch [its flags] -m MODULE args`` counts as ``MODULE args``."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError as error:
        raise AssertionError(f"{source}: `{text}` is not a shell command: {error}") from error
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value before the command
        words = words[1:]
    if len(words) >= 2 and words[0] == "accelerate" and words[1] == "launch":
        if "-m" not in words:  # a mention of accelerate's own flags (`accelerate launch --cpu`)
            return None
        at = words.index("-m")
        return Command(source, text, words[at + 1], tuple(words[at + 2 :]), fenced)
    if not words or words[0] not in ("python", "python3"):
        return None
    if len(words) >= 3 and words[1] == "-m":
        return Command(source, text, words[2], tuple(words[3:]), fenced)
    if len(words) >= 2 and words[1].endswith(".py"):
        return Command(source, text, words[1], tuple(words[2:]), fenced)
    return None


def commands_in(path: Path) -> list[Command]:
    text = path.read_text(encoding="utf-8")
    prose, blocks = split_fences(text)
    found = []
    for language, lines in blocks:
        if language not in ("bash", "sh", "shell", "console"):
            continue
        joined = "\n".join(lines).replace("\\\n", " ")  # continuation lines are one command
        for line in joined.splitlines():
            command = parse_command(f"{relative(path)} (bash block)", line, fenced=True)
            if command:
                found.append(command)
    for line in prose:
        for span in CODE_SPAN.findall(line):
            if re.match(r"^(\S+=\S+ )*(python3? |accelerate launch )", span):
                command = parse_command(f"{relative(path)} (`{span}`)", span, fenced=False)
                if command:
                    found.append(command)
    return found


def command_id(command: Command) -> str:
    return f"{command.source}: {' '.join([command.program, *command.args])}"


ALL_COMMANDS = [command for path in DOC_FILES for command in commands_in(path)]


class _Caught(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def parser_of(program: str) -> argparse.ArgumentParser:
    """The program's own parser: its ``parse_args`` (else ``main``) runs until it calls
    ``ArgumentParser.parse_args``, which hands the parser back instead of parsing."""
    if program not in _PARSERS:
        module = importlib.import_module("pipelines.startup" if program == "app.py" else program)
        entry = getattr(module, "parse_args", None) or module.main
        original = argparse.ArgumentParser.parse_args

        def catch(self, *args, **kwargs):
            raise _Caught(self)

        argparse.ArgumentParser.parse_args = catch
        try:
            entry([])
        except _Caught as caught:
            _PARSERS[program] = caught.parser
        else:
            raise AssertionError(f"{program}: its entry point built no argparse parser")
        finally:
            argparse.ArgumentParser.parse_args = original
    return _PARSERS[program]


def own_program(program: str) -> bool:
    return program == "app.py" or program.split(".")[0] in OWN_PACKAGES


def test_the_docs_show_commands():
    """The extraction itself works: the commands a reader needs first are found."""
    shown = {(command.program, command.args) for command in ALL_COMMANDS}
    assert ("app.py", ("--tiny",)) in shown
    assert ("pytest", ()) in shown
    programs = {command.program for command in ALL_COMMANDS}
    assert {"pipelines.blip.caption_folder", "pipelines.training.train_sd3_lora", "bench.gpu"} <= programs


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=command_id)
def test_command_names_a_real_program(command):
    if command.program.endswith(".py"):
        assert (ROOT / command.program).is_file(), f"{command.source}: {command.program} does not exist"
    else:
        assert importlib.util.find_spec(command.program) is not None, f"{command.source}: no module {command.program}"


OWN_COMMANDS = [command for command in ALL_COMMANDS if own_program(command.program)]


@pytest.mark.parametrize("command", OWN_COMMANDS, ids=command_id)
def test_command_flags_are_accepted(command):
    """Every --flag is one the program's parser defines (spelled out, not an abbreviation argparse
    would guess); a command in a bash block also parses as a whole (values, choices, positionals)."""
    parser = parser_of(command.program)
    flags = [word.split("=", 1)[0] for word in command.args if word.startswith("--")]
    unknown = [flag for flag in flags if flag not in parser._option_string_actions]
    assert not unknown, f"{command.source}: `{command.text}` uses flags {command.program} does not define: {unknown}"
    if command.fenced:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            try:
                parser.parse_args(list(command.args))
            except SystemExit:
                pytest.fail(f"{command.source}: `{command.text}` does not parse: {errors.getvalue().strip()}")


OWN_PROGRAMS = sorted({command.program for command in OWN_COMMANDS})


@pytest.mark.parametrize("program", OWN_PROGRAMS)
def test_help_prints(program):
    """The docs send readers to each program's ``--help`` (a bare % in a help string once made
    ``caption_folder --help`` crash): it formats and names every flag the docs use."""
    parser = parser_of(program)
    text = parser.format_help()
    used = {word.split("=", 1)[0] for command in OWN_COMMANDS if command.program == program for word in command.args}
    assert {flag for flag in used if flag.startswith("--")} <= set(re.findall(r"--[a-z0-9-]+", text))


def test_every_app_flag_is_documented_in_the_flags_page():
    """docs/flags.md's table names every flag of ``python app.py``, and nothing else."""
    parser = parser_of("app.py")
    defined = {flag for flag in parser._option_string_actions if flag.startswith("--")} - {"--help"}
    table = [
        line
        for line in (ROOT / "docs" / "flags.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| `--")
    ]
    documented = {flag for line in table for flag in re.findall(r"`(--[a-z0-9-]+)", line.split("|")[1])}
    assert defined - documented == set(), f"app.py flags missing from docs/flags.md: {sorted(defined - documented)}"
    assert documented - defined == set(), f"docs/flags.md lists flags app.py lacks: {sorted(documented - defined)}"


def test_anchors_are_spelled_as_github_spells_them():
    assert github_slug("Reading an image's settings: PNG Info") == "reading-an-images-settings-png-info"
    assert github_slug("The fast path (GPU)") == "the-fast-path-gpu"
    assert "captions-scores-beam-search-uploads" in anchors(ROOT / "docs" / "api.md")
