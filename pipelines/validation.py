"""Checks for numbers that arrive from sliders, scripts and strangers alike.

Every check raises ValueError with a sentence naming the value, what was
expected and the allowed range, so the UI and API can show it as it is.
"""

from __future__ import annotations

import math
import unicodedata

# Bidirectional embedding, override and isolate controls: they can make text display in another
# order than it reads (a "Trojan source" trick) and no caption or prompt needs them. Right-to-left
# scripts themselves are untouched; so are zero-width joiners (emoji sequences, Indic scripts).
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


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
    expected = f"{name} must be {noun} between {_number(low)} and {_number(high)}, not {_shown(value)}."
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(expected) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(expected)
    try:
        value = float(value)  # an int past float's range (JSON allows 10**400) raises OverflowError
    except OverflowError:
        raise ValueError(expected) from None
    if not math.isfinite(value):
        raise ValueError(expected)
    if low_open and not low < value <= high:
        raise ValueError(f"{name} must be above {_number(low)} and at most {_number(high)}, not {_number(value)}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {_number(low)} and {_number(high)}, not {_number(value)}.")
    return value


def _shown(value, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a hostile value cannot flood the message."""
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python will print
        return "a number too long to print"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def strip_control_characters(text):
    """``text`` without control characters (NUL, escape sequences, ...) or bidi overrides.

    Newlines, carriage returns and tabs stay (candidate texts come one per line).
    Lists and tuples of strings are cleaned item by item; anything else is returned
    unchanged, for the request's own validation to refuse with its sentence.
    """
    if isinstance(text, (list, tuple)):
        return type(text)(strip_control_characters(item) for item in text)
    if not isinstance(text, str):
        return text
    return "".join(
        char for char in text if char in "\n\r\t" or (unicodedata.category(char) != "Cc" and char not in _BIDI_CONTROLS)
    )


def _number(value: float) -> str:
    """Whole numbers in full (4294967295, not 4.29497e+09); others as %g (0.05, 1e+30)."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e16 else f"{value:g}"
