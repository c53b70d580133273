"""Exception types shared across pipelines/ and the UI; at the bottom of the import graph.

Everything here imports nothing from the project, so any module may raise or catch these
without importing the high-level module that happens to raise them.
"""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model could not be loaded. The message is one sentence for the user."""
