"""pipelines.errors.exit_from_command: the exit statuses and sentences of every `python -m pipelines...` tool."""

from __future__ import annotations

import pytest

from pipelines.errors import ModelLoadError, exit_from_command


def exit_status(run, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        exit_from_command(run, kept_on_interrupt="captions so far are kept")
    return stopped.value.code, capsys.readouterr().err


def test_a_returned_int_is_the_status_and_anything_else_is_success(capsys):
    assert exit_status(lambda: 1, capsys) == (1, "")
    assert exit_status(lambda: None, capsys) == (0, "")
    assert exit_status(lambda: {"steps": 2}, capsys) == (0, "")  # a trainer's result is not a status


@pytest.mark.parametrize("error", [ValueError("No images in /data."), ModelLoadError("Could not load blip.")])
def test_a_bad_input_or_model_is_one_sentence_and_status_2(error, capsys):
    def run():
        raise error

    assert exit_status(run, capsys) == (2, f"error: {error}\n")


def test_ctrl_c_says_what_was_kept_and_exits_130(capsys):
    def run():
        raise KeyboardInterrupt

    assert exit_status(run, capsys) == (130, "interrupted: captions so far are kept\n")


def test_any_other_exception_is_a_bug_and_keeps_its_traceback():
    def run():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        exit_from_command(run, kept_on_interrupt="")
