"""Exception types shared across pipelines/ and the UI; at the bottom of the import graph.

Everything here imports nothing from the project (and only the standard library), so any module may raise or catch these
without importing the high-level module that happens to raise them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class ModelLoadError(RuntimeError):
    """A model could not be loaded. The message is one sentence for the user."""


def exit_from_command(run: Callable[[], object], *, kept_on_interrupt: str) -> NoReturn:
    """Run the body of a ``python -m pipelines...`` tool and exit as such tools do.

    An int it returns is the exit status; anything else (None, a trainer's result) means 0. A ``ValueError`` (a bad folder, dataset or setting)
    or ``ModelLoadError`` prints ``error: <its sentence>`` and exits 2, with no traceback. Ctrl+C
    prints ``interrupted: <kept_on_interrupt>`` (what was kept, how to resume) and exits 130.
    """
    try:
        result = run()
        code = result if isinstance(result, int) else 0
    except (ValueError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"interrupted: {kept_on_interrupt}", file=sys.stderr)
        code = 130
    raise SystemExit(code)
