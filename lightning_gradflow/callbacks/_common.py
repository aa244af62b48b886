"""Small pieces every callback needs: argument checks, refusing unsupported strategies, AMP-correct gradient norms."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_gradflow.stats import Stat, TensorStats

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.optim import Optimizer

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


def unscaled_for_optimizer(stats: TensorStats, scaler: Any, optimizer: Optimizer) -> TensorStats:
    """Gradient statistics as the optimizer will use them, read in ``on_before_optimizer_step``.

    Under fp16 AMP Lightning unscales the gradients before this hook, except for fused optimizers
    (``_step_supports_amp_scaling``), which unscale inside ``step()``: their statistics are divided by the
    GradScaler's current scale here (read on the device: no sync).

    Args:
        stats: statistics of the gradients as they are.
        scaler: the precision plugin's GradScaler, or None.
        optimizer: the optimizer about to step.
    """
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return stats
    scale = scaler._get_scale_async()
    if scale is None:
        return stats
    inv = 1.0 / scale.to(stats.table.device).float()
    factors = torch.ones(stats.table.shape[1], device=stats.table.device)
    factors[Stat.SUMSQ] = inv * inv
    factors[Stat.ABSMAX] = inv
    factors[Stat.SUM] = inv
    return TensorStats(stats.table * factors)


def global_norm_or_nan(stats: TensorStats) -> Tensor:
    """The global norm of all rows (0-dim, on the device); NaN when any value was non-finite."""
    norm = stats.total_norm()
    return torch.where(stats.nonfinite.sum() > 0, torch.full_like(norm, math.nan), norm)
