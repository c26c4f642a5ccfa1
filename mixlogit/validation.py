"""Checks of scalar arguments shared by the estimators: each error names the argument and what is accepted."""

from __future__ import annotations

import math

import numpy as np


def check_int(name: str, value, minimum: int = 1) -> int:
    """An integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value) -> float:
    """A finite number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_seed(seed) -> int:
    """A non-negative integer seed (numpy's and torch's generators accept these)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be a non-negative integer (or None to draw one), got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer (or None to draw one), got {seed!r}")
    return int(seed)


# The checks below serve the alignment package (strength parameters, batching, command-line flags); each error
# still names the argument and what is accepted.
def _scalar(value):
    """A one-element tensor as its Python number (a learned parameter passed back as an initial value is taken
    like the number it holds); anything else unchanged."""
    numel = getattr(value, "numel", None)
    if callable(numel) and hasattr(value, "item") and numel() == 1:
        return value.item()
    return value


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def check_count(name: str, value, allow_none: bool = False) -> int | None:
    """A positive integer (not a bool), such as a number of nodes or a batch size; with ``allow_none`` also None.

    The same rule as ``check_int(name, value, 1)``, worded "a positive integer" as counts are usually described.
    """
    if allow_none and value is None:
        return None
    try:
        return check_int(name, value, 1)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}") from None


def check_positive_number(name: str, value) -> float:
    """:func:`check_positive`, with a value that is no number at all (a bool is not) a TypeError instead, and a
    one-element tensor taken as its value."""
    value = _scalar(value)
    if not _is_real(value):
        raise TypeError(f"{name} must be a positive finite number, got {value!r}")
    return check_positive(name, value)


def check_finite(name: str, value) -> float:
    """A finite real number (not a bool); a one-element tensor is taken as its value."""
    value = _scalar(value)
    if not (_is_real(value) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def check_non_negative(name: str, value) -> float:
    """A finite number >= 0 (not a bool)."""
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_fraction(name: str, value, closed: bool = False) -> float:
    """A number strictly between 0 and 1, or in [0, 1] with ``closed`` (not a bool; NaN is neither)."""
    if not (_is_real(value) and (0 <= value <= 1 if closed else 0 < value < 1)):
        what = "a number in [0, 1]" if closed else "a number between 0 and 1 (exclusive)"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices):
    """One of ``choices``; the error lists them: "mode must be 'a' or 'b', got 'c'"."""
    if value not in choices:
        quoted = [repr(c) for c in choices]
        listing = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        raise ValueError(f"{name} must be {listing}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """True or False only (numpy's bool too): a truthy string such as "no" is refused, never taken as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)
