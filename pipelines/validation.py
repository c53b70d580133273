"""Checks for numbers that arrive from sliders, scripts and strangers alike.

Every check raises ValueError with a sentence naming the value, what was
expected and the allowed range, so the UI and API can show it as it is.
"""

from __future__ import annotations

import math


def as_float(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (or (low, high] with ``low_open``)."""
    return _as_number(name, value, low, high, noun="a number", low_open=low_open)


def as_int(name: str, value, low: int, high: int) -> int:
    """``value`` as an int in [low, high]; whole floats such as 3.0 (what sliders send) are accepted."""
    number = _as_number(name, value, low, high, noun="a whole number")
    if not number.is_integer():
        raise ValueError(f"{name} must be a whole number between {low} and {high}, not {value!r}.")
    return int(number)


def _as_number(name: str, value, low: float, high: float, *, noun: str, low_open: bool = False) -> float:
    expected = f"{name} must be {noun} between {low:g} and {high:g}, not {value!r}."
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(expected) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(expected)
    if low_open and not low < value <= high:
        raise ValueError(f"{name} must be above {low:g} and at most {high:g}, not {value:g}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, not {value:g}.")
    return float(value)
