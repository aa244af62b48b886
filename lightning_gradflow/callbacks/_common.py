"""Small pieces every callback needs: argument checks, refusing strategies, AMP-correct norms, TensorBoard writes.

:func:`write_layout` and :func:`write_interventions` write a callback's custom-scalars layout and interventions to
every TensorBoard logger through the callback's guard; the formatting itself is :mod:`lightning_gradflow.tensorboard`'s.

The argument checks are thin names over the pure checks of :mod:`lightning_gradflow.checks`, which the pure
rules (``FlowRule``, ``ZClipConfig``, ...) use to validate their own settings: one wording everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_gradflow import tensorboard as tb
from lightning_gradflow.checks import check_float, check_int
from lightning_gradflow.stats import TensorStats

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.optim import Optimizer

    from lightning_gradflow.callbacks._base import HealthCallback

_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def check_positive_int(name: str, value: object, allow_none: bool = False, allow_zero: bool = False) -> None:
    """Raises a ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a positive int (or None / 0)."""
    check_int(name, value, low=0 if allow_zero else 1, allow_none=allow_none)


def check_positive_float(name: str, value: object, allow_none: bool = False) -> None:
    """Raises a ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a finite number > 0 (or None)."""
    check_float(name, value, allow_none=allow_none)


def check_float_in(name: str, value: object, low: float, high: float, closed_high: bool = False) -> None:
    """Raises a ``TypeError``/``ValueError`` naming ``name`` unless ``low < value < high`` (``<= high`` if closed)."""
    check_float(name, value, low, high, closed_high=closed_high)


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
    return stats.scaled(1.0 / scale.to(stats.table.device).float())


def global_norm_or_nan(stats: TensorStats) -> Tensor:
    """The global norm of all rows (0-dim, on the device); NaN when any value was non-finite."""
    norm = stats.total_norm()
    return torch.where(stats.nonfinite.sum() > 0, torch.full_like(norm, math.nan), norm)


def write_layout(callback: HealthCallback, trainer: pl.Trainer, charts: Mapping[str, Sequence[str]], step: int) -> None:
    """Writes the callback's custom-scalars category (``charts`` relative to its family) to every TensorBoard logger.

    A writer that raises is warned about once (``add_custom_scalars``) and training goes on.
    """
    absolute = tb.family_charts(callback.family, charts)
    for logger in tb.tensorboard_loggers(trainer):
        write = partial(tb.add_layout_category, logger, callback.family, absolute)
        callback._tensorboard(trainer, "add_custom_scalars", write, step)


def write_interventions(callback: HealthCallback, trainer: pl.Trainer, step: int, what: str = "add_text") -> None:
    """Writes the callback's interventions not written yet as a table to every TensorBoard logger (rank zero).

    Records count as written only when a TensorBoard logger exists; a writer that raises is warned about once
    (as ``what``) and training goes on.
    """
    loggers = tb.tensorboard_loggers(trainer)
    new = callback._log.unreported() if loggers else []
    for logger in loggers if new else []:
        callback._tensorboard(trainer, what, partial(tb.add_interventions, logger, callback.family, new, step), step)
