"""Validation: a configuration value or a restored state value that makes no sense raises, naming it.

Numbers go through the package's pure checks (:func:`~lightning_gradflow.stats._common.check_int`,
:func:`~lightning_gradflow.stats._common.check_float`): one wording everywhere.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_gradflow.stats._common import check_float, check_int


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, but got {type(value).__name__}: {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """A ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices}, but got {value!r}.")


def finite(name: str, value: Any) -> float:
    """``value`` as a finite float, else a ``ValueError``/``TypeError`` naming ``name``."""
    return check_float(name, value, -math.inf, math.inf)


def optional_finite(name: str, value: Any) -> float | None:
    """None, or ``value`` as a finite float."""
    return None if value is None else finite(name, value)


def count(name: str, value: Any) -> int:
    """``value`` if it is an int >= 0, else a ``ValueError``/``TypeError`` naming ``name``."""
    check_int(name, value, low=0)
    return int(value)


def floats(name: str, values: Any) -> list[float]:
    """A list of finite floats."""
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"Expected `{name}` to be a list of numbers, but got {type(values).__name__}.")
    return [finite(name, v) for v in values]
