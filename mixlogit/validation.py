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
