"""Small pieces every callback needs: validation of constructor arguments, refusing unsupported strategies."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch.utilities.exceptions import MisconfigurationException

if TYPE_CHECKING:
    import lightning.pytorch as pl

_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def check_positive_int(name: str, value: object, allow_none: bool = False, allow_zero: bool = False) -> None:
    """Raises a ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a positive int (or None / 0)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}: {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Expected `{name}` {bound}, but got {value}.")


def check_positive_float(name: str, value: object, allow_none: bool = False) -> None:
    """Raises a ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a finite number > 0 (or None)."""
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a float, but got {type(value).__name__}: {value!r}.")
    if not 0 < value < float("inf"):
        raise ValueError(f"Expected `{name}` to be a finite number > 0, but got {value}.")


def check_bool(name: str, value: object) -> None:
    """Raises a ``TypeError`` naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, but got {type(value).__name__}: {value!r}.")


def check_float_in(name: str, value: object, low: float, high: float, closed_high: bool = False) -> None:
    """Raises a ``TypeError``/``ValueError`` naming ``name`` unless ``low < value < high`` (``<= high`` if closed)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a float, but got {type(value).__name__}: {value!r}.")
    if not (low < value <= high if closed_high else low < value < high):
        bound = "]" if closed_high else ")"
        raise ValueError(f"Expected `{name}` in ({low}, {high}{bound}, but got {value}.")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raises a ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices}, but got {value!r}.")


def refuse_sharded_strategy(trainer: pl.Trainer, callback: str, reads: str = "whole gradients") -> None:
    """Sharded strategies hold shards per rank; until they are supported, say so instead of reporting shards.

    Args:
        trainer: the trainer.
        callback: the callback's name, for the message.
        reads: what the callback needs whole (e.g. ``"whole gradients"``, ``"whole weight rows"``).
    """
    name = type(trainer.strategy).__name__
    if name in _SHARDED_STRATEGIES:
        raise MisconfigurationException(
            f"{callback} does not support `strategy={name}` yet: it reads {reads}, which this strategy shards"
            " across ranks. Use a single device or `strategy='ddp'`, or remove the callback."
        )


def log_interval(trainer: pl.Trainer, own: int | None) -> int:
    """Optimizer steps between logs: the callback's own ``log_every_n_steps``, else the Trainer's (50 if unset)."""
    if own is not None:
        return own
    every = int(getattr(trainer, "log_every_n_steps", 50))
    return every if every > 0 else 50
