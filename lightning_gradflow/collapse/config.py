"""The thresholds of collapse detection and of the intervention ladder: each default is declared here, once.

:class:`MonitorConfig` configures :class:`~lightning_gradflow.collapse.CollapseMonitor` (what a step's signals mean),
:class:`LadderConfig` configures :class:`~lightning_gradflow.collapse.InterventionLadder` (what to do about them).
:class:`~lightning_gradflow.EarlyCollapseCallback` takes the same names as flat arguments (LightningCLI-friendly)
and uses these fields as its defaults, so a default changes in one place. Each config validates itself on
construction (a ``TypeError``/``ValueError`` naming the argument), for the callback and a plain loop alike.

Upper bounds: a window of healthy steps, the running median and the feature
sample are kept in memory and re-sorted or decomposed on every step or probe, and every snapshot is a full copy of
the model and optimizer state.

Example::

    >>> MonitorConfig().min_scale, LadderConfig().min_lr_factor
    (0.1, 0.01)
    >>> MonitorConfig(window=20, min_history=50)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Expected `min_history` <= `window`, but got min_history=50 > window=20: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_gradflow.checks import check_bool, check_choice, check_float, check_int

MAX_WINDOW = 10_000  # `window`, `divergence_smoothing`: a median over this many floats per step stays cheap
MAX_SNAPSHOTS = 100  # `num_snapshots`: each one a full copy of the model, optimizer and scheduler states
MAX_RANK_SAMPLE_SIZE = 65_536  # `rank_sample_size`: feature rows per layer, decomposed (SVD) on each probe


@dataclass(frozen=True)
class MonitorConfig:
    """How :class:`~lightning_gradflow.collapse.CollapseMonitor` scores a step (see the callback for each meaning).

    Args:
        spike_detector: ``"mad"`` (median/MAD over ``window`` healthy steps) or ``"ema"`` (EMA mean and variance).
        window: healthy steps in the median/MAD window and in the divergence noise estimate (<= ``MAX_WINDOW``).
        min_history: healthy steps observed before spikes and divergence are scored (<= ``window``).
        loss_z_threshold: loss z-score that scores 1.
        grad_z_threshold: gradient-norm z-score that scores 1 (a gradient spike alone weighs half).
        min_scale: floor on the noise scale of the z-scores (on the log scale: 0.1 ≈ 10%).
        ema_alpha: the EMA decay of ``spike_detector="ema"``.
        log_scale: score ``log(x + scale_floor · x₀)`` rather than ``x``.
        scale_floor: the offset of the log scale, as a multiple of the run's first value.
        divergence_ratio: growth of the smoothed loss over its best that scores 1.
        divergence_smoothing: steps of the running median the divergence is judged on (<= ``MAX_WINDOW``).
        warn_threshold: step risk (spikes, divergence, non-finite values) at which an episode opens and warns.
        risk_threshold: risk at which a step is an alarm.
        dormant_threshold: τ of τ-dormant units (0: dead units).
        max_dead_fraction: dead fraction that scores the representation signal fully.
        min_effective_rank: RankMe at or below which the representation signal scores fully (0 at twice it).
        overflow_patience: consecutive fp16 overflow steps tolerated before they count as non-finite.
    """

    spike_detector: Literal["mad", "ema"] = "mad"
    window: int = 100
    min_history: int = 20
    loss_z_threshold: float = 6.0
    grad_z_threshold: float = 6.0
    min_scale: float = 0.1
    ema_alpha: float = 0.97
    log_scale: bool = True
    scale_floor: float = 0.05
    divergence_ratio: float = 1.5
    divergence_smoothing: int = 9
    warn_threshold: float = 0.5
    risk_threshold: float = 0.95
    dormant_threshold: float = 0.0
    max_dead_fraction: float = 0.5
    min_effective_rank: float = 1.5
    overflow_patience: int = 25

    def __post_init__(self) -> None:
        check_choice("spike_detector", self.spike_detector, ("mad", "ema"))
        check_bool("log_scale", self.log_scale)
        check_int("window", self.window, high=MAX_WINDOW)
        check_int("divergence_smoothing", self.divergence_smoothing, high=MAX_WINDOW)
        check_int("min_history", self.min_history)
        check_int("overflow_patience", self.overflow_patience)
        if self.min_history > self.window:
            raise ValueError(
                f"Expected `min_history` <= `window`, but got min_history={self.min_history} > window={self.window}:"
                " the window could never hold enough history, so spike detection would stay off. Raise `window` or"
                " lower `min_history`."
            )
        for name in ("loss_z_threshold", "grad_z_threshold", "min_scale", "min_effective_rank"):
            check_float(name, getattr(self, name))
        check_float("scale_floor", self.scale_floor, closed_low=True)
        check_float("divergence_ratio", self.divergence_ratio, 1.0)  # a growth factor
        check_float("ema_alpha", self.ema_alpha, 0.0, 1.0)
        for name in ("warn_threshold", "risk_threshold", "max_dead_fraction"):
            check_float(name, getattr(self, name), 0.0, 1.0, closed_high=True)
        check_float("dormant_threshold", self.dormant_threshold, 0.0, 1.0, closed_low=True)
        if self.warn_threshold > self.risk_threshold:
            raise ValueError(
                f"Expected `warn_threshold` <= `risk_threshold`, but got {self.warn_threshold} >"
                f" {self.risk_threshold}: an alarm would come before its warning. Lower `warn_threshold`."
            )


@dataclass(frozen=True)
class LadderConfig:
    """What :class:`~lightning_gradflow.collapse.InterventionLadder` does about alarms (rungs can be switched off).

    Args:
        skip_nonfinite: rung 1, skip a step whose loss or gradients are non-finite.
        lr_cut_factor: rung 2, the LR multiplier of a cut; None disables cuts.
        min_lr_factor: the cumulative LR factor is never cut below this, in (0, 1].
        lr_recovery_steps: after this many calm steps in a row, one cut is undone (× ``1 / lr_cut_factor``, up to
            the original LR); 0 never recovers.
        rollback: rung 3, restore the newest healthy snapshot.
        rollback_patience: consecutive alarm steps before a rollback.
        snapshot_every_n_steps: a snapshot of the state at global step ``g`` is kept when ``g`` is a multiple of it
            and the step that led there was calm.
        num_snapshots: snapshots kept (<= ``MAX_SNAPSHOTS``).
        skip_batches: batches whose gradients are dropped after a rollback.
        max_rollbacks: rollbacks before the run stops.
        stop_on_failure: rung 4, stop the run when the ladder is exhausted.
        stop_patience: with ``rollback=False``, consecutive alarm steps before the run stops.
    """

    skip_nonfinite: bool = True
    lr_cut_factor: float | None = 0.5
    min_lr_factor: float = 0.01
    lr_recovery_steps: int = 100
    rollback: bool = True
    rollback_patience: int = 2
    snapshot_every_n_steps: int = 50
    num_snapshots: int = 2
    skip_batches: int = 0
    max_rollbacks: int = 3
    stop_on_failure: bool = True
    stop_patience: int = 10

    def __post_init__(self) -> None:
        for name in ("skip_nonfinite", "rollback", "stop_on_failure"):
            check_bool(name, getattr(self, name))
        check_float("lr_cut_factor", self.lr_cut_factor, 0.0, 1.0, allow_none=True)
        check_float("min_lr_factor", self.min_lr_factor, 0.0, 1.0, closed_high=True)
        check_int("num_snapshots", self.num_snapshots, high=MAX_SNAPSHOTS)
        for name in ("rollback_patience", "snapshot_every_n_steps", "stop_patience"):
            check_int(name, getattr(self, name))
        for name in ("lr_recovery_steps", "skip_batches", "max_rollbacks"):
            check_int(name, getattr(self, name), low=0)
