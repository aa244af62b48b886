"""Argument checks of the curvature package's plain objects (no Lightning).

Each error names the argument in backticks, the accepted range and the value given.
"""

from __future__ import annotations

import math


def check_number(name: str, value: object) -> float:
    """``value`` as a float; a ``TypeError`` naming ``name`` unless it is a real number (bools are not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a float, but got {type(value).__name__}: {value!r}.")
    return float(value)


def check_in(name: str, value: object, low: float, high: float, closed_high: bool = False, what: str = "") -> float:
    """``value`` as a float in ``(low, high)`` (``(low, high]`` if ``closed_high``), else a ``ValueError``."""
    number = check_number(name, value)
    if not (low < number <= high if closed_high else low < number < high):
        if high == math.inf:
            bound = f"to be a finite number > {low:g}"
        else:
            bound = f"in ({low:g}, {high:g}{']' if closed_high else ')'}"
        raise ValueError(f"Expected `{name}` {bound}{f' ({what})' if what else ''}, but got {value!r}.")
    return number


def check_int(name: str, value: object, low: int, high: int | None = None, what: str = "") -> int:
    """``value`` if it is an int in ``[low, high]`` (``high=None``: no bound), else a ``TypeError``/``ValueError``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}: {value!r}.")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"Expected `{name}` {bound}{f' ({what})' if what else ''}, but got {value}.")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool, else a ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, but got {type(value).__name__}: {value!r}.")
    return value
