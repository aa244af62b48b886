"""Spike detectors, slow divergence and the risk score: the step signals of collapse detection.

**Spike detectors** score each new value ``x`` (the loss or the global gradient norm, on a log scale by default so a
spike is a *ratio*) against the history of healthy values before it:

* :class:`RobustZScore` (default): ``z = (x - median) / max(1.4826 · MAD, min_scale)`` over a window of the last
  ``window`` accepted values. The median and the median absolute deviation ignore the outliers they are meant to
  find; ``1.4826`` makes the MAD a consistent estimate of the standard deviation of normal noise.
* :class:`EmaZScore`: ``z = (x - m) / max(sqrt(v), min_scale)`` with an exponential moving mean ``m`` and variance
  ``v`` (ZClip's estimator).

Both return ``z = 0`` until ``min_history`` values were accepted, and the caller decides which values enter the
history (the monitor keeps spikes, non-finite values and fp16 overflow steps out, so a spike cannot hide the next).

**Slow divergence** (:class:`DivergenceDetector`): a running median of ``log(loss)`` (last 9 steps) is compared with
the lowest value it has reached; the excess ``e = m - best - 5 σ_m`` (σ_m: the running median's own noise, from the
MAD of the step-to-step changes of ``log(loss)``) is the log of how many times the smoothed loss has grown from its
best beyond what noise explains. Its score is ``ramp(e, log(ratio)/2, log(ratio))``: 1 when the smoothed loss is
``ratio`` times its best (default 1.5, so the alarm comes before the loss has doubled).

**Risk** (:func:`combine_risk`): each signal is mapped to a score in [0, 1] and combined as a probabilistic OR,
``risk = 1 - Π (1 - s_i)``: any one signal at 1 makes the risk 1, two half-way signals make 0.75.

Defaults come from :class:`~lightning_gradflow.collapse.config.MonitorConfig`; ``load_state_dict`` refuses values
that make no sense (NaN, negative counts) with a ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

from lightning_gradflow.checks import check_count, check_finite, check_floats
from lightning_gradflow.collapse.config import MonitorConfig
from lightning_gradflow.ema import ema_update

MAD_TO_STD = 1.4826  # 1 / Φ⁻¹(3/4): MAD × this estimates σ of normal noise


def robust_zscore(history: Sequence[float], x: float, min_scale: float = 0.0) -> float:
    """``(x - median) / max(1.4826 · MAD, min_scale)`` of ``x`` against ``history`` (0 for an empty history).

    Example::

        >>> robust_zscore([1.0, 2.0, 3.0, 4.0, 100.0], 3.0)  # median 3, MAD 1: the outlier 100 barely matters
        0.0
        >>> round(robust_zscore([1.0, 2.0, 3.0, 4.0, 100.0], 9.0), 3)
        4.047
    """
    if not history:
        return 0.0
    median = statistics.median(history)
    mad = statistics.median([abs(v - median) for v in history])
    scale = max(MAD_TO_STD * mad, min_scale)
    if scale <= 0:
        return 0.0 if x == median else math.copysign(math.inf, x - median)
    return (x - median) / scale


def robust_zscore_scale(history: Sequence[float]) -> float:
    """``1.4826 · MAD`` of ``history``: the standard deviation of normal noise, robust to outliers (0 if empty)."""
    if not history:
        return 0.0
    median = statistics.median(history)
    return MAD_TO_STD * statistics.median([abs(v - median) for v in history])


class RobustZScore:
    """Median/MAD z-score of each new value against a window of the values accepted before it.

    Args:
        window: how many accepted values are kept.
        min_history: values needed before any score other than 0.
        min_scale: floor on the noise scale (on a log scale, 0.1 means a 10% change is one σ at least), so a nearly
            constant history does not turn tiny changes into huge z-scores.

    Example::

        >>> det = RobustZScore(window=100, min_history=5, min_scale=0.01)
        >>> for v in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]:
        ...     det.update(v)
        >>> det.score(1.0), det.score(2.0) > 6
        (0.0, True)
    """

    def __init__(
        self,
        window: int = MonitorConfig.window,
        min_history: int = MonitorConfig.min_history,
        min_scale: float = MonitorConfig.min_scale,
    ) -> None:
        self.window = window
        self.min_history = min_history
        self.min_scale = min_scale
        self.values: deque[float] = deque(maxlen=window)

    def score(self, x: float) -> float:
        """The z-score of ``x`` (0 during warm-up; NaN for a non-finite ``x``)."""
        if not math.isfinite(x):
            return math.nan
        if len(self.values) < self.min_history:
            return 0.0
        return robust_zscore(self.values, x, self.min_scale)

    def update(self, x: float) -> None:
        """Adds ``x`` to the history (non-finite values are ignored)."""
        if math.isfinite(x):
            self.values.append(float(x))

    def state_dict(self) -> dict[str, Any]:
        """The window, as plain data."""
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.values = deque(check_floats("values", state["values"]), maxlen=self.window)


class EmaZScore:
    """EMA mean/variance z-score of each new value against the values accepted before it.

    The moments are ZClip's estimator, :func:`~lightning_gradflow.ema.ema_update` (one definition, shared with
    :class:`~lightning_gradflow.clipping.ZScoreClipper`).

    Args:
        alpha: the EMA decay (weight of the past).
        min_history: values needed before any score other than 0.
        min_scale: floor on the noise scale.

    Example::

        >>> det = EmaZScore(alpha=0.9, min_history=3, min_scale=0.01)
        >>> for v in [1.0, 1.0, 1.0, 1.0]:
        ...     det.update(v)
        >>> det.score(1.0), round(det.score(1.1), 6)
        (0.0, 10.0)
    """

    def __init__(
        self,
        alpha: float = MonitorConfig.ema_alpha,
        min_history: int = MonitorConfig.min_history,
        min_scale: float = MonitorConfig.min_scale,
    ) -> None:
        self.alpha = alpha
        self.min_history = min_history
        self.min_scale = min_scale
        self.mean: float | None = None
        self.var = 0.0
        self.count = 0

    def score(self, x: float) -> float:
        """The z-score of ``x`` (0 during warm-up; NaN for a non-finite ``x``)."""
        if not math.isfinite(x):
            return math.nan
        if self.mean is None or self.count < self.min_history:
            return 0.0
        return (x - self.mean) / max(math.sqrt(self.var), self.min_scale)

    def update(self, x: float) -> None:
        """Adds ``x`` to the running mean and variance (non-finite values are ignored)."""
        if not math.isfinite(x):
            return
        self.count += 1
        if self.mean is None:
            self.mean = float(x)
            return
        self.mean, self.var = ema_update(self.mean, self.var, float(x), self.alpha)

    def state_dict(self) -> dict[str, Any]:
        """The running moments, as plain data."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        var = check_finite("var", state["var"])
        if var < 0:
            raise ValueError(f"`var` must be >= 0, got {var}")
        self.mean, self.var, self.count = (
            check_finite("mean", state["mean"], allow_none=True),
            var,
            check_count("count", state["count"]),
        )


class DivergenceDetector:
    """Slow divergence: how far a running median of ``log(loss)`` has risen above its lowest value, beyond noise.

    ``excess = max(m - min(m) - margin · σ_m, 0)`` where ``m`` is the median of the last ``smoothing`` values of
    ``log(loss)``: the log of how many times the smoothed loss has grown from its best, less what batch noise alone
    would explain. A running median lags a trend by ``smoothing / 2`` steps whatever its slope (an EMA would lag far
    behind a steep initial descent and miss a divergence that follows it), and ignores single spikes.
    ``σ_m = 1.2533 · σ / sqrt(smoothing)`` is the noise of the median, from the per-step noise
    ``σ = 1.4826 · MAD(Δ log loss) / √2`` over the last ``window`` steps (first differences, so a trend does not count
    as noise; the median ignores the steep first steps).

    Args:
        smoothing: how many steps the running median covers.
        ratio: the smoothed-loss growth (× its best, beyond noise) that scores 1.
        min_history: values needed before any score other than 0.
        margin: how many σ_m of rise are put down to noise (the lowest value of a long noisy run lies some 3 σ_m
            below its typical value, and the current one may lie 2 σ_m above).
        window: how many differences the noise estimate uses.

    Example::

        >>> det = DivergenceDetector(smoothing=1, ratio=2.0, min_history=1, margin=0.0)  # no smoothing, no margin
        >>> det.update(1.0); det.update(0.5); det.update(0.75)
        >>> round(det.excess(), 6), round(det.score(), 6)  # 0.75 is 1.5× the best 0.5
        (0.405465, 0.169925)
    """

    def __init__(
        self,
        smoothing: int = MonitorConfig.divergence_smoothing,
        ratio: float = MonitorConfig.divergence_ratio,
        min_history: int = MonitorConfig.min_history,
        margin: float = 5.0,
        window: int = MonitorConfig.window,
    ) -> None:
        self.smoothing = smoothing
        self.ratio = ratio
        self.min_history = min_history
        self.margin = margin
        self.recent: deque[float] = deque(maxlen=smoothing)
        self.diffs: deque[float] = deque(maxlen=window)
        self.smoothed: float | None = None
        self.best: float | None = None
        self.count = 0

    def noise(self) -> float:
        """The per-step noise σ of ``log(loss)``."""
        return robust_zscore_scale(self.diffs) / math.sqrt(2) if len(self.diffs) >= 2 else 0.0

    def excess(self) -> float:
        """``m - best - margin · σ_m`` on the log scale, at least 0 (0 during warm-up)."""
        if self.smoothed is None or self.best is None or self.count < self.min_history:
            return 0.0
        sigma_m = 1.2533 * self.noise() / math.sqrt(self.smoothing)
        return max(self.smoothed - self.best - self.margin * sigma_m, 0.0)

    def score(self) -> float:
        """``ramp(excess, log(ratio) / 2, log(ratio))``: 1 once the smoothed loss is ``ratio`` × its best."""
        return ramp(self.excess(), math.log(self.ratio) / 2, math.log(self.ratio))

    def update(self, loss: float) -> None:
        """Adds one loss (positive and finite; others are ignored)."""
        if not (math.isfinite(loss) and loss > 0):
            return
        x = math.log(loss)
        if self.recent:
            self.diffs.append(x - self.recent[-1])
        self.recent.append(x)
        self.smoothed = statistics.median(self.recent)
        self.count += 1
        if self.count >= self.min_history:
            self.best = self.smoothed if self.best is None else min(self.best, self.smoothed)

    def state_dict(self) -> dict[str, Any]:
        """The recent values, differences and best, as plain data."""
        return {
            "recent": list(self.recent),
            "diffs": list(self.diffs),
            "smoothed": self.smoothed,
            "best": self.best,
            "count": self.count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.recent = deque(check_floats("recent", state["recent"]), maxlen=self.smoothing)
        self.diffs = deque(check_floats("diffs", state["diffs"]), maxlen=self.diffs.maxlen)
        self.smoothed = check_finite("smoothed", state["smoothed"], allow_none=True)
        self.best = check_finite("best", state["best"], allow_none=True)
        self.count = check_count("count", state["count"])


def ramp(x: float, low: float, high: float) -> float:
    """0 at ``x <= low``, 1 at ``x >= high``, linear between (NaN counts as 1).

    Example::

        >>> ramp(3.0, 2.0, 4.0), ramp(1.0, 2.0, 4.0), ramp(float("nan"), 2.0, 4.0)
        (0.5, 0.0, 1.0)
    """
    if math.isnan(x):
        return 1.0
    if high <= low:
        return 1.0 if x >= high else 0.0
    return min(max((x - low) / (high - low), 0.0), 1.0)


def spike_score(z: float, threshold: float) -> float:
    """Score of an upward z-score: 0 up to ``threshold / 2``, 1 from ``threshold`` on (downward moves score 0)."""
    return ramp(z, threshold / 2, threshold)


def combine_risk(scores: Sequence[float]) -> float:
    """``1 - Π (1 - s_i)``, each ``s_i`` clamped to [0, 1]: a probabilistic OR of the signals.

    Example::

        >>> combine_risk([0.5, 0.5]), combine_risk([1.0, 0.2]), combine_risk([])
        (0.75, 1.0, 0.0)
    """
    keep = 1.0
    for s in scores:
        keep *= 1.0 - min(max(float(s), 0.0), 1.0)
    return 1.0 - keep
