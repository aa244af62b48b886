"""Adaptive gradient clipping rules: pure tensor code, no Lightning, no host synchronisation.

Every rule turns the current global gradient norm into a threshold and a coefficient ``min(1, threshold / norm)``
kept on the device, so a training step never waits for the host. ``agc`` works per unit instead (see
:func:`agc_clip_`). State lives in plain tensors and round-trips through ``state_dict``; :meth:`~ZScoreClipper.
rollback_state` / :meth:`~ZScoreClipper.restore_rollback_state` keep device copies for in-memory rollbacks.

Each setting is declared, with its default and its bounds, once: :class:`TrendClipConfig`, :class:`ZClipConfig` and
:class:`AutoClipConfig` (the callback takes the same names as flat arguments).

``"trend"`` (:class:`TrendClipper`, the default) and ``"zscore"`` (:class:`ZScoreClipper`, ZClip's exact rule) differ in
what they call a spike. ZClip compares the norm with an EMA of the norm itself: while norms rise in healthy early
training every new norm sits above the lagging mean, and with a small variance a rise of 20 % is a "spike" that gets
clipped, slowing the run. The trend rule compares the *logarithm* of the norm with a level-plus-slope forecast (Holt's
linear EMA), so a steady rise or fall is predicted rather than punished, and clips only a norm that is both far
outside the forecast's usual error and at least ``trend_min_ratio`` times the forecast norm.

Gradients may be dense or sparse (:func:`scale_grads_`, :func:`agc_clip_`), real or complex.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_gradflow.checks import check_float, check_int
from lightning_gradflow.ema import ema_update

ClipMode = Literal["trend", "zscore", "percentile", "agc", "norm"]
CLIP_MODES: tuple[str, ...] = ("trend", "zscore", "percentile", "agc", "norm")

#: Added to norms before dividing (as in ``torch.nn.utils.clip_grad_norm_``).
NORM_EPS = 1e-6
#: Upper bound of ``warmup_steps``: the warm-up norms are kept on the device to take their median.
MAX_WARMUP_STEPS = 100_000
#: Upper bound of ``percentile_window``: the window is kept on the device and sorted every step.
MAX_PERCENTILE_WINDOW = 1_000_000
#: Thresholds are float32 on the device: a cap above this is no cap (every finite float32 norm is below it).
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def max_norm_threshold(value: float | None, name: str = "max_norm") -> float | None:
    """A validated fixed threshold (finite, > 0) as a float32-representable float; None stays None.

    Any finite value works: one above float32's range caps nothing, exactly like ``float32.max``.

    Example::

        >>> max_norm_threshold(1e300) == float(torch.finfo(torch.float32).max)
        True
    """
    number = check_float(name, value, allow_none=True)
    return None if number is None else min(number, _FLOAT32_MAX)


@dataclass(frozen=True)
class ZClipConfig:
    """ZClip's settings (see :class:`ZScoreClipper`): each default and bound declared, and validated, here only.

    Args:
        z_threshold: z-score above which a norm is clipped (ZClip: 2.5); any finite value > 0 (a huge one never
            clips after the warm-up).
        ema_alpha: EMA decay of mean and variance, in (0, 1) (ZClip: 0.97).
        warmup_steps: finite norms collected before z-score clipping starts (ZClip: 25), at most
            :data:`MAX_WARMUP_STEPS`.

    Raises:
        TypeError: for a value of the wrong type.
        ValueError: for a value out of its bounds.

    Example::

        >>> ZClipConfig(z_threshold=3).z_threshold
        3.0
        >>> ZClipConfig(warmup_steps=10**9)
        Traceback (most recent call last):
        ...
        ValueError: Expected `warmup_steps` in [1, 100000], but got 1000000000.
    """

    z_threshold: float = 2.5
    ema_alpha: float = 0.97
    warmup_steps: int = 25

    def __post_init__(self) -> None:
        object.__setattr__(self, "z_threshold", check_float("z_threshold", self.z_threshold))
        object.__setattr__(self, "ema_alpha", check_float("ema_alpha", self.ema_alpha, 0.0, 1.0))
        check_int("warmup_steps", self.warmup_steps, high=MAX_WARMUP_STEPS)


@dataclass(frozen=True)
class AutoClipConfig:
    """AutoClip's settings (see :class:`PercentileClipper`), declared and validated here only.

    Args:
        percentile: percentile of past norms used as the threshold, in (0, 100] (AutoClip: 10).
        percentile_window: how many past norms are kept, at most :data:`MAX_PERCENTILE_WINDOW`.

    Raises:
        TypeError: for a value of the wrong type.
        ValueError: for a value out of its bounds.
    """

    percentile: float = 10.0
    percentile_window: int = 10_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "percentile", check_float("percentile", self.percentile, 0.0, 100.0, closed_high=True))
        check_int("percentile_window", self.percentile_window, high=MAX_PERCENTILE_WINDOW)


@dataclass(frozen=True)
class TrendClipConfig:
    """The trend rule's settings (see :class:`TrendClipper`), declared and validated here only.

    Args:
        trend_threshold: how many mean absolute forecast errors (of the log-norm) above the forecast a norm must be
            to be clipped; any finite value > 0 (a huge one never clips after the warm-up).
        trend_min_ratio: a norm is never clipped below this multiple of the forecast norm; finite, > 1.
        trend_alpha: EMA decay of the level and of the forecast error, in (0, 1).
        trend_warmup_steps: finite norms during which only norms above ``warmup_factor`` times the forecast are
            clipped, at most :data:`MAX_WARMUP_STEPS`.

    Raises:
        TypeError: for a value of the wrong type.
        ValueError: for a value out of its bounds.

    Example::

        >>> TrendClipConfig(trend_min_ratio=3).trend_min_ratio
        3.0
        >>> TrendClipConfig(trend_min_ratio=1)
        Traceback (most recent call last):
        ...
        ValueError: Expected `trend_min_ratio` to be a finite number > 1, but got 1.
    """

    trend_threshold: float = 4.0
    trend_min_ratio: float = 3.0
    trend_alpha: float = 0.95
    trend_warmup_steps: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "trend_threshold", check_float("trend_threshold", self.trend_threshold))
        object.__setattr__(self, "trend_min_ratio", check_float("trend_min_ratio", self.trend_min_ratio, 1.0))
        object.__setattr__(self, "trend_alpha", check_float("trend_alpha", self.trend_alpha, 0.0, 1.0))
        check_int("trend_warmup_steps", self.trend_warmup_steps, high=MAX_WARMUP_STEPS)


#: Norms at or below this are not measured in log space (a zero gradient says nothing about the trend).
_TINY_NORM = 1e-30
#: Log-margins are capped here: ``exp`` of the threshold stays inside float32 (a larger margin clips nothing anyway).
_MAX_LOG_MARGIN = 80.0


class TrendClipper:
    """Clips isolated spikes of the global norm against a robust trend of its logarithm (the default rule).

    With ``y = log(norm)``, a level ``L`` and a slope ``b`` follow ``y`` (Holt's linear EMA) and ``s``, the EMA of
    ``|y − (L + b)|``, measures how far the forecast usually misses. A norm is clipped when it exceeds

    ``threshold = exp(L + b + m)``, ``m = max(trend_threshold · s, log(trend_min_ratio))`` (at most
    ``log(warmup_factor)``)

    so (a) a healthy trend, rising or falling, is forecast instead of flagged; (b) working in log space makes the
    rule scale-free and keeps one large norm from inflating the spread; (c) nothing within ``trend_min_ratio`` × the
    forecast is ever clipped, however quiet the run was before; (d) nothing above ``warmup_factor`` × the forecast
    passes, however noisy it was. As in ZClip, an outlier enters the statistics clipped by the reciprocal rule,
    ``forecast + m0² / residual`` with ``m0 = log(trend_min_ratio)``: the larger the spike, the less it moves the
    level, and it never moves the slope or the spread. A non-finite (or zero) norm leaves the statistics untouched.
    Like ZClip, the rule judges a norm against the run's own history: a lasting jump of the norm by more than
    ``trend_min_ratio`` is clipped until the trend has caught up (slowly, by design); ``clip_value`` adds a hard cap.

    Adaptive warm-up: the EMA weights start as running means (``α_t = min(α, t / (t + 1))``), so the statistics are
    usable from the second norm on, and during the first ``warmup_steps`` finite norms only norms above
    ``warmup_factor`` × the forecast are clipped (a run that explodes in its first steps is still bounded).

    Everything is kept on the device: no call reads a value back to the host.

    Args:
        threshold: ``trend_threshold`` of :class:`TrendClipConfig`.
        min_ratio: ``trend_min_ratio`` of :class:`TrendClipConfig`.
        alpha: ``trend_alpha`` of :class:`TrendClipConfig` (the slope uses ``slope_alpha``).
        warmup_steps: ``trend_warmup_steps`` of :class:`TrendClipConfig`.
        max_norm: optional hard cap applied on top (``None`` for none).
        slope_alpha: EMA decay of the slope, in (0, 1).
        warmup_factor: the spike bound during warm-up and the widest margin after it, as a multiple of the forecast
            norm (> 1).
        max_slope: bound on ``|b|``, the trend's log-growth per step (0.05: about 5 % a step). A healthy rise is
            slower; a divergence grows faster than the trend may, falls behind it and is clipped. For about 35 steps
            after a clip, the trend may not rise at all.

    Example::

        >>> clipper = TrendClipper()
        >>> norms = [1.0 * 1.02**t for t in range(60)]  # a healthy rise: never clipped
        >>> all(float(clipper(torch.tensor(g))) >= g for g in norms)
        True
        >>> float(clipper(torch.tensor(100.0))) < 10  # a spike: clipped to about three times the trend
        True
    """

    _STATE = ("count", "level", "slope", "spread", "clip_rate")

    def __init__(
        self,
        threshold: float = TrendClipConfig.trend_threshold,
        min_ratio: float = TrendClipConfig.trend_min_ratio,
        alpha: float = TrendClipConfig.trend_alpha,
        warmup_steps: int = TrendClipConfig.trend_warmup_steps,
        max_norm: float | None = None,
        slope_alpha: float = 0.9,
        warmup_factor: float = 10.0,
        max_slope: float = 0.05,
    ) -> None:
        config = TrendClipConfig(threshold, min_ratio, alpha, warmup_steps)
        self.threshold = config.trend_threshold
        self.min_ratio = config.trend_min_ratio
        self.alpha = config.trend_alpha
        self.warmup_steps = config.trend_warmup_steps
        self.max_norm = max_norm_threshold(max_norm)
        self.slope_alpha = check_float("slope_alpha", slope_alpha, 0.0, 1.0)
        self.warmup_factor = check_float("warmup_factor", warmup_factor, 1.0)
        self.max_slope = check_float("max_slope", max_slope)
        # float32 margins: a threshold beyond 1e30 (times a zero spread) must not become inf · 0
        self._min_margin = min(math.log(self.min_ratio), _MAX_LOG_MARGIN)
        self._warm_margin = min(math.log(self.warmup_factor), _MAX_LOG_MARGIN)
        self.steps = 0  # calls so far (host counter)
        self.count: Tensor | None = None  # finite norms seen (device)
        self.level: Tensor | None = None
        self.slope: Tensor | None = None
        self.spread: Tensor | None = None
        self.clip_rate: Tensor | None = None  # EMA of the fraction of steps clipped

    def __call__(self, norm: Tensor) -> Tensor:
        """The threshold for this step's global norm (0-dim, on ``norm``'s device); updates the statistics."""
        norm = norm.detach().float()
        if self.count is None:
            zeros = [torch.zeros((), device=norm.device) for _ in self._STATE]
            self.count, self.level, self.slope, self.spread, self.clip_rate = zeros
        assert self.level is not None and self.slope is not None and self.spread is not None
        assert self.clip_rate is not None
        self.steps += 1
        t = self.count
        usable = torch.isfinite(norm) & (norm > _TINY_NORM)
        y = norm.clamp(min=_TINY_NORM).log()
        forecast = self.level + self.slope
        # between trend_min_ratio and warmup_factor times the forecast: a chaotic run cannot widen its own tolerance
        margin = (min(self.threshold, 1e30) * self.spread).clamp(min=self._min_margin)
        margin = torch.where(t < self.warmup_steps, torch.full_like(margin, math.inf), margin)
        margin = margin.clamp(max=max(self._warm_margin, self._min_margin))
        log_threshold = torch.where(t > 0, forecast + margin, torch.full_like(y, math.inf))
        outlier = (t > 0) & (y > log_threshold)
        # an outlier enters the statistics at forecast + m0 · m0 / residual, m0 = log(min_ratio) (ZClip's reciprocal
        # rule, in log space): the larger the spike, the less it moves the trend; a divergence cannot drag it along
        residual = (y - forecast).clamp(min=1e-6)
        m0 = self._min_margin
        y_fed = torch.where(outlier, forecast + m0 * (m0 / residual).clamp(max=1.0), y)
        a = torch.minimum(torch.full_like(t, self.alpha), t / (t + 1))  # 0 for the first norm: the level is y
        a_slope = torch.minimum(torch.full_like(t, self.slope_alpha), (t - 1).clamp(min=0) / t.clamp(min=1))
        level = a * forecast + (1 - a) * y_fed
        slope = (a_slope * self.slope + (1 - a_slope) * (level - self.level)).clamp(-self.max_slope, self.max_slope)
        slope = torch.where((t > 0) & ~outlier, slope, self.slope)  # outliers never steer the trend
        # while it keeps clipping, the run is not trending up healthily: the trend may fall or hold, not rise
        clip_rate = torch.where(t > 0, 0.98 * self.clip_rate + 0.02 * outlier.float(), self.clip_rate)
        slope = torch.where(clip_rate > 0.01, slope.clamp(max=0.0), slope)
        spread = torch.where((t > 0) & ~outlier, a * self.spread + (1 - a) * (y - forecast).abs(), self.spread)
        self.level = torch.where(usable, level, self.level)
        self.slope = torch.where(usable, slope, self.slope)
        self.spread = torch.where(usable, spread, self.spread)
        self.clip_rate = torch.where(usable, clip_rate, self.clip_rate)
        self.count = t + usable.float()
        threshold = log_threshold.exp()  # inf before the first norm; a non-finite norm gets the bound it faced
        return threshold if self.max_norm is None else threshold.clamp(max=self.max_norm)

    def state_dict(self) -> dict[str, Any]:
        """Host copies of the statistics (read at checkpoint time only)."""
        if self.count is None:
            return {"steps": self.steps}
        return {"steps": self.steps, **{name: float(getattr(self, name)) for name in self._STATE}}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Restores :meth:`state_dict` output (onto ``device``).

        Raises:
            ValueError: for statistics that cannot come from this clipper: a negative or non-finite count or spread,
                or a non-finite level or slope.
        """
        steps = _non_negative_int("steps", state["steps"])
        if "count" not in state:
            self.steps = steps
            self.count = self.level = self.slope = self.spread = self.clip_rate = None
            return
        values = {name: float(state[name]) for name in self._STATE}
        bad = values["count"] < 0 or values["spread"] < 0 or not 0 <= values["clip_rate"] <= 1
        if not all(math.isfinite(v) for v in values.values()) or bad:
            raise ValueError(f"trend clip statistics out of range: {values}")
        self.steps = steps
        for name, value in values.items():
            setattr(self, name, torch.tensor(value, device=device))

    def rollback_state(self) -> dict[str, Any]:
        """Device copies of the statistics (no host sync), for :meth:`restore_rollback_state`."""
        state: dict[str, Any] = {"steps": self.steps}
        for name in self._STATE:
            value = getattr(self, name)
            state[name] = None if value is None else value.clone()
        return state

    def restore_rollback_state(self, state: dict[str, Any]) -> None:
        """Returns to the statistics of :meth:`rollback_state` (copied again: the state can be restored twice)."""
        self.steps = int(state["steps"])
        for name in self._STATE:
            value = state[name]
            setattr(self, name, None if value is None else value.clone())

    def to(self, device: torch.device) -> None:
        """Moves the statistics to ``device``."""
        for name in self._STATE:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))


def clip_coefficient(norm: Tensor, threshold: Tensor) -> Tensor:
    """``threshold / norm`` where the norm exceeds the threshold, else exactly 1.

    A non-finite norm also gets 1: such a step is skipped, not scaled.
    """
    over = torch.isfinite(norm) & (norm > threshold)
    return torch.where(over, threshold / (norm + NORM_EPS), torch.ones_like(norm))


class ZScoreClipper:
    """ZClip (Kumar et al. 2025, arXiv 2504.02507): clip norms whose z-score against an EMA exceeds a threshold.

    The first ``warmup_steps`` *finite* norms are collected; their mean and variance then seed the EMA. Afterwards a
    norm ``g`` with ``z = (g − μ) / σ > z_threshold`` is clipped to ``μ + σ · z_threshold² / z`` (ZClip's reciprocal
    rule: the larger the spike, the harder the clip) and the EMA is updated with the *clipped* norm, so a spike does
    not inflate the baseline. Non-finite norms (overflow or skipped steps) leave the state untouched.

    Two guards ZClip lacks: ``σ`` is floored at ``std_floor · μ``, so a warm-up of identical norms (full-batch
    training) does not freeze the threshold at the mean; and during warm-up a norm above ``warmup_factor`` times the
    median of the norms collected so far is clipped to that bound, so a run that diverges in its first steps is not
    left unprotected.

    Everything is kept on the device: no call reads a value back to the host.

    Args:
        z_threshold: z-score above which a norm is clipped (see :class:`ZClipConfig`).
        alpha: EMA decay of mean and variance (``ema_alpha`` of :class:`ZClipConfig`, whose messages name it so).
        warmup_steps: finite norms collected before z-score clipping starts (see :class:`ZClipConfig`).
        max_norm: optional hard cap applied on top (``None`` for none).
        std_floor: floor on σ relative to μ.
        warmup_factor: spike bound during warm-up, as a multiple of the running median.
    """

    def __init__(
        self,
        z_threshold: float = ZClipConfig.z_threshold,
        alpha: float = ZClipConfig.ema_alpha,
        warmup_steps: int = ZClipConfig.warmup_steps,
        max_norm: float | None = None,
        std_floor: float = 1e-2,
        warmup_factor: float = 10.0,
    ) -> None:
        config = ZClipConfig(z_threshold, alpha, warmup_steps)
        self.z_threshold = config.z_threshold
        self.alpha = config.ema_alpha
        self.warmup_steps = config.warmup_steps
        self.max_norm = max_norm_threshold(max_norm)
        self.std_floor = check_float("std_floor", std_floor, closed_low=True)
        self.warmup_factor = check_float("warmup_factor", warmup_factor)
        self.steps = 0  # calls so far (host counter)
        self.count: Tensor | None = None  # finite norms collected during warm-up (device)
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self._warmup: Tensor | None = None

    def _init_state(self, device: torch.device) -> None:
        self.count = torch.zeros((), device=device)
        self.mean = torch.zeros((), device=device)
        self.var = torch.zeros((), device=device)
        self._warmup = torch.full((self.warmup_steps,), float("nan"), device=device)

    def __call__(self, norm: Tensor) -> Tensor:
        """The threshold for this step's global norm (0-dim, on ``norm``'s device); updates the statistics."""
        norm = norm.detach().float()
        if self.count is None:
            self._init_state(norm.device)
        assert self.count is not None and self.mean is not None and self.var is not None and self._warmup is not None
        self.steps += 1
        finite = torch.isfinite(norm)
        warming = self.count < self.warmup_steps
        # warm-up: bound spikes by a multiple of the median so far (no bound before 3 norms)
        median = torch.nanmedian(self._warmup)
        bound = torch.where(self.count >= 3, self.warmup_factor * median, torch.full_like(norm, float("inf")))
        warm_threshold = torch.where(finite, torch.minimum(norm, bound), bound)
        slot = self.count.clamp(max=self.warmup_steps - 1).long()
        collect = warming & finite
        self._warmup[slot] = torch.where(collect, warm_threshold, self._warmup[slot])
        count = self.count + collect.float()
        seeded = warming & (count >= self.warmup_steps)
        seed_mean = self._warmup.nan_to_num().mean()
        seed_var = self._warmup.nan_to_num().var(correction=0)
        # z-score phase (from the step after the warm-up completed)
        std = self.var.clamp(min=0).sqrt().maximum(self.std_floor * self.mean.abs()) + NORM_EPS
        z = (norm - self.mean) / std
        # mean + std · zt² / z, written so that no intermediate overflows for a huge zt (where z > zt, zt / z < 1)
        zt = self.z_threshold
        clipped = torch.where(z > zt, self.mean + std * zt * (zt / z), norm)
        update = ~warming & finite
        new_mean, new_var = ema_update(self.mean, self.var, clipped, self.alpha)
        self.mean = torch.where(seeded, seed_mean, torch.where(update, new_mean, self.mean))
        self.var = torch.where(seeded, seed_var, torch.where(update, new_var, self.var))
        self.count = count
        # a non-finite norm (skipped, never scaled) reports the bound above which clipping starts
        z_threshold = torch.where(finite, clipped, self.mean + self.z_threshold * std)
        return self._cap(torch.where(warming, warm_threshold, z_threshold))

    def _cap(self, threshold: Tensor) -> Tensor:
        return threshold if self.max_norm is None else threshold.clamp(max=self.max_norm)

    def state_dict(self) -> dict[str, Any]:
        """Host copies of the statistics (read at checkpoint time only)."""
        if self.count is None:
            return {"steps": self.steps}
        assert self.mean is not None and self.var is not None and self._warmup is not None
        return {
            "steps": self.steps,
            "count": float(self.count),
            "mean": float(self.mean),
            "var": float(self.var),
            "warmup": self._warmup.cpu().tolist(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Restores :meth:`state_dict` output (onto ``device``).

        Raises:
            ValueError: for statistics that cannot come from this clipper: a NaN or negative mean, variance or
                count, or a warm-up of another length than ``warmup_steps``.
        """
        steps = _non_negative_int("steps", state["steps"])
        if "count" not in state:
            self.steps = steps
            self.count = self.mean = self.var = self._warmup = None
            return
        count, mean, var = (float(state[key]) for key in ("count", "mean", "var"))
        warmup = [float(v) for v in state["warmup"]]
        if not (0 <= count <= self.warmup_steps and math.isfinite(mean) and mean >= 0 and math.isfinite(var)):
            raise ValueError(f"ZClip statistics out of range: count={count}, mean={mean}, var={var}")
        if var < 0 or len(warmup) != self.warmup_steps or any(v < 0 for v in warmup):
            raise ValueError(
                f"ZClip statistics do not fit: var={var}, a warm-up of {len(warmup)} norms for"
                f" `warmup_steps={self.warmup_steps}`"
            )
        self.steps = steps
        self.count = torch.tensor(count, device=device)
        self.mean = torch.tensor(mean, device=device)
        self.var = torch.tensor(var, device=device)
        self._warmup = torch.tensor(warmup, device=device)

    def rollback_state(self) -> dict[str, Any]:
        """Device copies of the statistics (no host sync), for :meth:`restore_rollback_state`."""
        state: dict[str, Any] = {"steps": self.steps}
        for name in ("count", "mean", "var", "_warmup"):
            value = getattr(self, name)
            state[name] = None if value is None else value.clone()
        return state

    def restore_rollback_state(self, state: dict[str, Any]) -> None:
        """Returns to the statistics of :meth:`rollback_state` (copied again: the state can be restored twice)."""
        self.steps = int(state["steps"])
        for name in ("count", "mean", "var", "_warmup"):
            value = state[name]
            setattr(self, name, None if value is None else value.clone())

    def to(self, device: torch.device) -> None:
        """Moves the statistics to ``device``."""
        for name in ("count", "mean", "var", "_warmup"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))


class PercentileClipper:
    """AutoClip (Seetharaman et al. 2020): the threshold is the ``percentile``-th percentile of past global norms.

    AutoClip keeps every norm ever seen; here the history is a ring of the last ``window`` finite norms, so memory
    and the percentile's cost stay bounded. The current norm joins the history before the percentile is taken.

    Args:
        percentile: in (0, 100] (see :class:`AutoClipConfig`).
        window: how many past norms are kept (``percentile_window`` of :class:`AutoClipConfig`).
        max_norm: optional hard cap on the threshold.
    """

    def __init__(
        self,
        percentile: float = AutoClipConfig.percentile,
        window: int = AutoClipConfig.percentile_window,
        max_norm: float | None = None,
    ) -> None:
        config = AutoClipConfig(percentile, window)
        self.percentile = config.percentile
        self.window = config.percentile_window
        self.max_norm = max_norm_threshold(max_norm)
        self.steps = 0
        self._history: Tensor | None = None

    def __call__(self, norm: Tensor) -> Tensor:
        """The threshold for this step's global norm (0-dim); records the norm."""
        norm = norm.detach().float()
        if self._history is None:
            self._history = torch.full((self.window,), float("nan"), device=norm.device)
        finite = torch.isfinite(norm)
        slot = self.steps % self.window
        self._history[slot] = torch.where(finite, norm, self._history[slot])
        self.steps += 1
        filled = self._history[: min(self.steps, self.window)]
        threshold = torch.nanquantile(filled, self.percentile / 100.0).nan_to_num(nan=float("inf"))
        return threshold if self.max_norm is None else threshold.clamp(max=self.max_norm)

    def state_dict(self) -> dict[str, Any]:
        """Host copy of the history."""
        return {"steps": self.steps, "history": None if self._history is None else self._history.cpu().tolist()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Restores :meth:`state_dict` output.

        Raises:
            ValueError: for a history of another length than ``window`` or with negative norms.
        """
        steps = _non_negative_int("steps", state["steps"])
        history = state["history"]
        if history is not None:
            history = [float(v) for v in history]
            if len(history) != self.window or any(v < 0 for v in history):  # NaN marks an empty slot
                raise ValueError(
                    f"AutoClip history of {len(history)} norms does not fit `percentile_window={self.window}`"
                )
        self.steps = steps
        self._history = None if history is None else torch.tensor(history, device=device)

    def rollback_state(self) -> dict[str, Any]:
        """A device copy of the history (no host sync), for :meth:`restore_rollback_state`."""
        return {"steps": self.steps, "history": None if self._history is None else self._history.clone()}

    def restore_rollback_state(self, state: dict[str, Any]) -> None:
        """Returns to the history of :meth:`rollback_state`."""
        self.steps = int(state["steps"])
        history = state["history"]
        self._history = None if history is None else history.clone()

    def to(self, device: torch.device) -> None:
        """Moves the history to ``device``."""
        if self._history is not None:
            self._history = self._history.to(device)


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"expected `{name}` to be a count >= 0, got {value!r}")
    return int(value)


def scale_grads_(grads: Sequence[Tensor], coef: Tensor) -> None:
    """Multiplies every gradient by ``coef`` (a 0-dim tensor) in place, on the device.

    Dense gradients take one multi-tensor operation; sparse ones (which ``torch._foreach_mul_`` refuses) are scaled
    one by one, through their stored values.
    """
    dense = [g for g in grads if g.layout == torch.strided]
    if dense:
        torch._foreach_mul_(dense, coef)
    for g in grads:
        if g.layout != torch.strided:
            _values(g).mul_(coef.to(g.device))


def _values(g: Tensor) -> Tensor:
    """The stored values of a sparse tensor, as a view that writes through (uncoalesced COO: its raw entries)."""
    if g.layout == torch.sparse_coo:
        return g._values()
    return g.values()


def unitwise_norm(x: Tensor) -> Tensor:
    """Norm per output unit (over every dim but the first), as in NFNets; the whole norm for 0-/1-D tensors.

    Complex tensors give the norm of their magnitudes; real ones are reduced in (at least) float32.
    """
    x = x if x.dtype.is_complex or x.dtype == torch.float64 else x.float()
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def _sparse_unit_scale(p: Tensor, g: Tensor, clip_factor: float, eps: float) -> tuple[Tensor, Tensor, int]:
    """AGC scales of a sparse COO gradient's units, exactly: ``(scale per unit, scale per stored entry, units)``.

    Unit norms come from the coalesced values (duplicates summed first); the scales are applied to the raw entries,
    which is the same since a unit's entries all get its scale. Units that hold no entry have a zero gradient and a
    scale of 1.
    """
    c = g.coalesce()
    values = c.values()
    squares = values.abs().double().square() if values.dtype.is_complex else values.double().square()
    if p.ndim <= 1:  # one unit: the whole tensor
        g_norm = squares.sum().sqrt().reshape(1)
        w_norm = unitwise_norm(p.detach()).double().reshape(1)
        unit_of_entry = torch.zeros(g._values().shape[0], dtype=torch.long, device=g.device)
    else:
        per_entry = squares.reshape(values.shape[0], -1).sum(1) if values.ndim > 1 else squares
        g_norm = torch.zeros(p.shape[0], dtype=torch.float64, device=g.device)
        g_norm = g_norm.index_add_(0, c.indices()[0], per_entry).sqrt()
        w_norm = unitwise_norm(p.detach()).double().reshape(-1)
        unit_of_entry = g._indices()[0]
    scale = _agc_scale(w_norm.clamp(min=eps) * clip_factor, g_norm)
    return scale, scale[unit_of_entry], scale.numel()


def _agc_scale(max_norm: Tensor, g_norm: Tensor) -> Tensor:
    """``min(1, max_norm / ‖G‖)`` per unit; 1 where the gradient norm is not finite (such steps are skipped)."""
    scale = (max_norm / g_norm.clamp(min=NORM_EPS)).clamp(max=1.0)
    return torch.where(torch.isfinite(g_norm), scale, torch.ones_like(scale))


def agc_clip_(params: Sequence[Tensor], grads: Sequence[Tensor], clip_factor: float, eps: float) -> Tensor:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021), in place; returns the fraction of units clipped.

    Each unit's gradient is scaled so that ``‖G_i‖ ≤ clip_factor · max(‖W_i‖, eps)``. A sparse COO gradient (e.g.
    of ``nn.Embedding(sparse=True)``) is clipped exactly, unit by unit, through its stored values; another sparse
    layout is clipped as one unit (its whole norm against the whole weight norm). Complex gradients use ``|z|``.

    Args:
        params: the weights.
        grads: their gradients (modified in place).
        clip_factor: λ (NFNets: 0.01 for batch 4096; larger for smaller batches).
        eps: floor on the weight norm, so zero-initialised units can still move (NFNets: 1e-3).

    Example::

        >>> w, g = torch.ones(2, 2), torch.tensor([[10.0, 0.0], [0.001, 0.0]])
        >>> float(agc_clip_([w], [g], clip_factor=0.1, eps=1e-3))  # the first unit is clipped, the second not
        0.5
        >>> round(float(g[0].norm()), 4)  # 0.1 × ‖(1, 1)‖
        0.1414
    """
    eps = min(float(eps), _FLOAT32_MAX)  # a floor beyond float32's range floors every unit at float32's largest
    clipped, units = [], 0
    for p, g in zip(params, grads, strict=True):
        if g.layout == torch.sparse_coo:
            scale, entry_scale, n = _sparse_unit_scale(p, g, clip_factor, eps)
            values = g._values()
            values.mul_(entry_scale.reshape(-1, *([1] * (values.ndim - 1))).to(values.real.dtype))
        elif g.layout != torch.strided:  # another sparse layout: one unit, the whole tensor
            values = _values(g)
            w_norm = unitwise_norm(p.detach().reshape(-1))
            scale = _agc_scale(w_norm.clamp(min=eps) * clip_factor, unitwise_norm(values.reshape(-1))).reshape(1)
            values.mul_(scale.to(values.real.dtype))
            n = 1
        else:
            scale = _agc_scale(unitwise_norm(p.detach()).clamp(min=eps) * clip_factor, unitwise_norm(g))
            g.mul_(scale.to(g.real.dtype))
            n = scale.numel()
        clipped.append((scale < 1).float().sum().reshape(1).to(grads[0].device))
        units += n
    if not clipped:
        return torch.zeros(())
    return torch.cat(clipped).sum() / max(units, 1)
