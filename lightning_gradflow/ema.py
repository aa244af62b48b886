"""The exponential moving mean and variance behind every EMA z-score of the package (one definition).

ZClip's estimator (Kumar et al. 2025): ``μ' = α·μ + (1 − α)·x`` and ``σ²' = α·σ² + (1 − α)·(x − μ')²``. It is used on
the device by :class:`~lightning_gradflow.clipping.ZScoreClipper` (tensors, no host sync) and on the host by
:class:`~lightning_gradflow.collapse.EmaZScore` (floats): the arithmetic is the same for both.

Example::

    >>> mean, var = 1.0, 0.0
    >>> for x in [1.0, 3.0]:
    ...     mean, var = ema_update(mean, var, x, alpha=0.5)
    >>> mean, var
    (2.0, 0.5)
"""

from __future__ import annotations

from typing import TypeVar

from torch import Tensor

T = TypeVar("T", float, Tensor)


def ema_update(mean: T, var: T, x: T, alpha: float) -> tuple[T, T]:
    """One EMA step of the mean and variance with decay ``alpha`` (the weight of the past)."""
    new_mean = alpha * mean + (1 - alpha) * x
    new_var = alpha * var + (1 - alpha) * (x - new_mean) ** 2
    return new_mean, new_var
