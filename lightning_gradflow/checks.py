"""Argument and state checks: one wording for every error, used by the pure layer and the callbacks alike.

No Lightning import: the rules, monitors and controllers validate their own settings and restored states with these,
and the callbacks call the same functions. Every error names the argument in backticks, the accepted range and the
value given.

Example::

    >>> check_int("patience", 5, high=10)
    5
    >>> check_float("ema_alpha", 1.0, 0.0, 1.0)
    Traceback (most recent call last):
    ...
    ValueError: Expected `ema_alpha` in (0.0, 1.0), but got 1.0.
"""

from __future__ import annotations

import math
from typing import Any, Literal, overload


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool, else a ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, but got {type(value).__name__}: {value!r}.")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """A ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices}, but got {value!r}.")


@overload
def check_int(
    name: str,
    value: object,
    low: int = 1,
    high: int | None = None,
    what: str = "",
    *,
    allow_none: Literal[False] = False,
) -> int: ...


@overload
def check_int(
    name: str, value: object, low: int = 1, high: int | None = None, what: str = "", *, allow_none: bool
) -> int | None: ...


def check_int(
    name: str, value: object, low: int = 1, high: int | None = None, what: str = "", *, allow_none: bool = False
) -> int | None:
    """``value`` if it is an int in ``[low, high]`` (``high=None``: no bound; None passes with ``allow_none``).

    Args:
        name: the argument, for the message.
        value: the value given.
        low: the smallest accepted value.
        high: the largest accepted value, or None.
        allow_none: accept None.
        what: why the bound exists, added to the message (e.g. ``"memory: one float per value"``).

    Raises:
        TypeError: ``value`` is not an int (a bool is not an int here).
        ValueError: ``value`` is outside ``[low, high]``.

    Example::

        >>> check_int("patience", 11, high=10)
        Traceback (most recent call last):
        ...
        ValueError: Expected `patience` in [1, 10], but got 11.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}: {value!r}.")
    why = f" ({what})" if what else ""
    if value < low or (high is not None and value > high):
        lower = "> 0" if low == 1 else f">= {low}"
        bound = lower if high is None else f"in [{low}, {high}]"
        raise ValueError(f"Expected `{name}` {bound}{why}, but got {value}.")
    return value


@overload
def check_float(
    name: str,
    value: object,
    low: float = 0.0,
    high: float = math.inf,
    *,
    closed_low: bool = False,
    closed_high: bool = False,
    allow_none: Literal[False] = False,
    what: str = "",
) -> float: ...


@overload
def check_float(
    name: str,
    value: object,
    low: float = 0.0,
    high: float = math.inf,
    *,
    closed_low: bool = False,
    closed_high: bool = False,
    allow_none: bool,
    what: str = "",
) -> float | None: ...


def check_float(
    name: str,
    value: object,
    low: float = 0.0,
    high: float = math.inf,
    *,
    closed_low: bool = False,
    closed_high: bool = False,
    allow_none: bool = False,
    what: str = "",
) -> float | None:
    """``value`` as a ``float`` in the interval (None stays None with ``allow_none``).

    ``high=inf`` means any finite number: infinities and NaN are always refused, and so is an int too large for a
    float.

    Args:
        name: the argument, for the message.
        value: the value given.
        low: the lower end of the interval.
        high: the upper end of the interval.
        closed_low: accept ``low`` itself.
        closed_high: accept ``high`` itself.
        allow_none: accept None.
        what: why the bound exists, added to the message.

    Raises:
        TypeError: ``value`` is not an int or float (a bool is not a number here).
        ValueError: ``value`` is outside the interval, not finite or beyond the float range.

    Example::

        >>> check_float("z_threshold", 3)
        3.0
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a float, but got {type(value).__name__}: {value!r}.")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"Expected `{name}` to be a finite number, but got {value} (beyond float range).") from None
    above = number >= low if closed_low else number > low
    below = number <= high if closed_high else number < high
    if not (above and below and math.isfinite(number)):
        why = f" ({what})" if what else ""
        if high == math.inf:
            bound = f">= {low:g}" if closed_low else f"> {low:g}"
            raise ValueError(f"Expected `{name}` to be a finite number {bound}{why}, but got {value}.")
        interval = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
        raise ValueError(f"Expected `{name}` in {interval}{why}, but got {value}.")
    return number


@overload
def check_finite(name: str, value: object, allow_none: Literal[False] = False) -> float: ...


@overload
def check_finite(name: str, value: object, allow_none: bool) -> float | None: ...


def check_finite(name: str, value: object, allow_none: bool = False) -> float | None:
    """``value`` as a finite float of any sign (None stays None with ``allow_none``)."""
    if value is None and allow_none:
        return None
    return check_float(name, value, -math.inf, math.inf)


def check_count(name: str, value: object) -> int:
    """``value`` if it is an int >= 0."""
    return check_int(name, value, low=0)


def check_floats(name: str, values: Any) -> list[float]:
    """``values`` as a list of finite floats."""
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"Expected `{name}` to be a list of numbers, but got {type(values).__name__}.")
    return [check_float(name, v, -math.inf, math.inf) for v in values]
