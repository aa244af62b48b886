"""Collapse detection maths: spike detectors, divergence, dead units, effective rank, the risk score, snapshots.

Pure functions and small stateful detectors without Lightning imports; :class:`EarlyCollapseCallback
<lightning_gradflow.callbacks.early_collapse.EarlyCollapseCallback>` is the thin shell that feeds them.

**Spike detectors** score each new value ``x`` (the loss or the global gradient norm, on a log scale by default so a
spike is a *ratio*) against the history of healthy values before it:

* :class:`RobustZScore` (default): ``z = (x - median) / max(1.4826 · MAD, min_scale)`` over a window of the last
  ``window`` accepted values. The median and the median absolute deviation ignore the outliers they are meant to
  find; ``1.4826`` makes the MAD a consistent estimate of the standard deviation of normal noise.
* :class:`EmaZScore`: ``z = (x - m) / max(sqrt(v), min_scale)`` with an exponential moving mean ``m`` and variance
  ``v`` (ZClip's estimator).

Both return ``z = 0`` until ``min_history`` values were accepted, and the caller decides which values enter the
history (the callback keeps spikes, non-finite values and fp16 overflow steps out, so a spike cannot hide the next).

**Slow divergence** (:class:`DivergenceDetector`): a running median of ``log(loss)`` (last 9 steps) is compared with
the lowest value it has reached; the excess ``e = m - best - 5 σ_m`` (σ_m: the running median's own noise, from the
MAD of the step-to-step changes of ``log(loss)``) is the log of how many times the smoothed loss has grown from its
best beyond what noise explains. Its score is ``ramp(e, log(ratio)/2, log(ratio))``: 1 when the smoothed loss is
``ratio`` times its best (default 1.5, so the alarm comes before the loss has doubled).

**Risk** (:func:`combine_risk`): each signal is mapped to a score in [0, 1] and combined as a probabilistic OR,
``risk = 1 - Π (1 - s_i)``: any one signal at 1 makes the risk 1, two half-way signals make 0.75.

**Representations**: :func:`dead_fraction` (units of a ReLU-family layer that are zero on the whole probe sample,
or τ-dormant as in Sokar et al. 2023), :func:`effective_rank` (RankMe, Garrido et al. 2023) and
:func:`feature_std` (the mean per-dimension standard deviation of L2-normalised features: about ``1/sqrt(d)`` for
spread-out features, 0 for collapsed ones).

**Snapshots** (:class:`SnapshotRing`): a ring of ``N`` deep copies (on the CPU by default) of everything a rollback
restores.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

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
        min_scale: floor on the noise scale (on a log scale, 0.05 means a 5% change is one σ at least), so a nearly
            constant history does not turn tiny changes into huge z-scores.

    Example::

        >>> det = RobustZScore(window=100, min_history=5, min_scale=0.01)
        >>> for v in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]:
        ...     det.update(v)
        >>> det.score(1.0), det.score(2.0) > 6
        (0.0, True)
    """

    def __init__(self, window: int = 100, min_history: int = 20, min_scale: float = 0.05) -> None:
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
        self.values = deque((float(v) for v in state["values"]), maxlen=self.window)


class EmaZScore:
    """EMA mean/variance z-score (ZClip's estimator) of each new value against the values accepted before it.

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

    def __init__(self, alpha: float = 0.97, min_history: int = 20, min_scale: float = 0.05) -> None:
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
        delta = x - self.mean
        self.mean += (1 - self.alpha) * delta
        self.var = self.alpha * (self.var + (1 - self.alpha) * delta * delta)

    def state_dict(self) -> dict[str, Any]:
        """The running moments, as plain data."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.mean = None if state["mean"] is None else float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])


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
        self, smoothing: int = 9, ratio: float = 1.5, min_history: int = 20, margin: float = 5.0, window: int = 100
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
        self.recent = deque((float(v) for v in state["recent"]), maxlen=self.smoothing)
        self.diffs = deque((float(d) for d in state["diffs"]), maxlen=self.diffs.maxlen)
        self.smoothed, self.best, self.count = state["smoothed"], state["best"], int(state["count"])


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


# ------------------------------------------------------------------------------------------------ representations


def unit_dim(activation: Tensor) -> int:
    """The dimension that indexes units: channels (dim 1) for 4-D/5-D conv maps, the last dimension otherwise."""
    return 1 if activation.dim() in (4, 5) else activation.dim() - 1


def unit_abs_sums(activation: Tensor) -> tuple[Tensor, int]:
    """Per-unit ``Σ |h|`` over every other dimension (float32) and how many values each unit summed."""
    dim = unit_dim(activation)
    moved = activation.detach().movedim(dim, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    return flat.abs().float().sum(0), flat.shape[0]


def dead_fraction(abs_sums: Tensor, counts: int | float | Tensor = 1, tau: float = 0.0) -> Tensor:
    """Fraction of dead (``tau = 0``: zero on every sample) or τ-dormant units.

    The τ-dormant score of unit ``i`` (Sokar et al. 2023, ReDo) is ``s_i = E|h_i| / mean_j E|h_j|``; a unit is
    dormant when ``s_i <= tau``. With ``tau = 0`` that is exactly the dead-ReLU fraction.

    Args:
        abs_sums: per-unit ``Σ |h|`` over the probe sample (see :func:`unit_abs_sums`).
        counts: how many samples each sum covers (cancels out in the ratio; kept for clarity).
        tau: the dormancy threshold.

    Example::

        >>> dead_fraction(torch.tensor([0.0, 0.0, 2.0, 6.0]))
        tensor(0.5000)
        >>> dead_fraction(torch.tensor([0.05, 1.0, 1.0, 1.95]), tau=0.1)  # mean 1: the first unit scores 0.05
        tensor(0.2500)
    """
    mean_abs = abs_sums.double() / counts
    if tau <= 0:
        return (mean_abs == 0).float().mean()
    overall = mean_abs.mean()
    if overall <= 0:
        return torch.ones((), device=abs_sums.device)
    return (mean_abs / overall <= tau).float().mean()


def effective_rank(features: Tensor, eps: float = 1e-7) -> Tensor:
    """RankMe (Garrido et al. 2023): ``exp(-Σ p_k log p_k)`` with ``p_k = σ_k / ‖σ‖₁ + ε``.

    ``σ_k`` are the singular values of the ``(N, D)`` feature matrix (not centred, as in the paper; rows holding
    non-finite values are left out, NaN when none is left). The value lies
    in ``[1, min(N, D)]`` (up to ε); it needs ``N ≫ D`` samples to estimate the rank of the representation rather
    than of the sample.

    Args:
        features: ``(N, D)`` features (leading dimensions are flattened into ``N``; the last one is ``D``).
        eps: the paper's ε (1e-7 for float32).

    Example::

        >>> x = torch.randn(100, 2) @ torch.randn(2, 16)  # rank 2
        >>> 1.0 <= float(effective_rank(x)) <= 2.0 + 1e-4
        True
    """
    x = features.detach().reshape(-1, features.shape[-1]).double()
    x = x[torch.isfinite(x).all(dim=1)]  # rows with NaN/Inf say nothing about the rank
    if x.shape[0] == 0:
        return torch.full((), math.nan, dtype=torch.float64, device=features.device)
    sigma = torch.linalg.svdvals(x)
    total = sigma.sum()
    if total <= 0:
        return torch.ones((), dtype=torch.float64, device=x.device)
    p = sigma / total + eps
    return torch.exp(-(p * p.log()).sum())


def feature_std(features: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension std of L2-normalised features (``1/sqrt(D)`` ≈ healthy, 0 collapsed).

    Example::

        >>> float(feature_std(torch.ones(8, 4)))  # every sample the same direction: collapsed
        0.0
    """
    x = features.detach().reshape(-1, features.shape[-1]).double()
    z = torch.nn.functional.normalize(x, dim=1)
    if z.shape[0] < 2:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    return z.std(dim=0).mean()


class FeatureBuffer:
    """A ring of the most recent ``capacity`` feature rows of one layer, kept on the features' device.

    Example::

        >>> buf = FeatureBuffer(4)
        >>> buf.add(torch.arange(6.0).reshape(3, 2)); buf.add(torch.arange(6.0, 10.0).reshape(2, 2))
        >>> buf.features().shape, buf.seen
        (torch.Size([4, 2]), 5)
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: Tensor | None = None
        self.seen = 0

    def add(self, features: Tensor) -> None:
        """Appends rows (leading dimensions flattened), overwriting the oldest when full."""
        x = features.detach().reshape(-1, features.shape[-1]).float()[-self.capacity :]
        if self.rows is None or self.rows.shape[1] != x.shape[1] or self.rows.device != x.device:
            self.rows = torch.empty(self.capacity, x.shape[1], device=x.device)
            self.seen = 0
        start = self.seen % self.capacity
        first = min(self.capacity - start, x.shape[0])
        self.rows[start : start + first] = x[:first]
        if first < x.shape[0]:
            self.rows[: x.shape[0] - first] = x[first:]
        self.seen += x.shape[0]

    def features(self) -> Tensor:
        """The rows kept (in ring order, not time order)."""
        assert self.rows is not None
        return self.rows[: min(self.seen, self.capacity)]

    def __len__(self) -> int:
        return min(self.seen, self.capacity)


# ------------------------------------------------------------------------------------------------------ snapshots


def copy_tree(obj: Any, device: torch.device | str | None = None) -> Any:
    """A deep copy of nested dicts/lists/tuples, tensors cloned (to ``device`` when given; never aliased).

    Example::

        >>> t = torch.zeros(2)
        >>> c = copy_tree({"a": [t, 1.0]})
        >>> _ = c["a"][0].add_(1)
        >>> t
        tensor([0., 0.])
    """
    if isinstance(obj, Tensor):
        out = obj.detach().to(device if device is not None else obj.device, copy=True)
        return out
    if isinstance(obj, dict):
        return type(obj)((k, copy_tree(v, device)) for k, v in obj.items())
    if isinstance(obj, list):
        return [copy_tree(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(copy_tree(v, device) for v in obj)
    return copy.deepcopy(obj)


def tree_nbytes(obj: Any) -> int:
    """Bytes held by the tensors of a nested structure."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tree_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tree_nbytes(v) for v in obj)
    return 0


@dataclass
class Snapshot:
    """Everything a rollback restores, copied at the end of optimizer step ``step`` (``global_step`` after it).

    Attributes:
        step: ``trainer.global_step`` when taken.
        model: the module's ``state_dict`` (parameters and buffers).
        optimizers: each optimizer's ``state_dict``.
        schedulers: each LR scheduler's ``state_dict``.
        scaler: the GradScaler's ``state_dict`` (None without one).
        rng: the RNG states (torch, CUDA, Python, NumPy), None when not kept.
        extra: the owner's own state (e.g. the detectors), as plain data.
    """

    step: int
    model: dict[str, Any]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes held by the snapshot's tensors."""
        return tree_nbytes([self.model, self.optimizers, self.schedulers])


def take_snapshot(
    step: int,
    module: torch.nn.Module,
    optimizers: Sequence[Any],
    schedulers: Sequence[Any] = (),
    scaler: Any = None,
    rng: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> Snapshot:
    """Deep copies (tensors moved to ``device``) of a module, its optimizers, schedulers and GradScaler.

    Example::

        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(net.parameters())
        >>> snap = take_snapshot(0, net, [opt])
        >>> with torch.no_grad(): _ = net.weight.add_(1)
        >>> restore_snapshot(snap, net, [opt])
        >>> bool(torch.equal(net.weight, snap.model["weight"]))
        True
    """
    return Snapshot(
        step=step,
        model=copy_tree(module.state_dict(), device),
        optimizers=[copy_tree(o.state_dict(), device) for o in optimizers],
        schedulers=[copy_tree(s.state_dict(), device) for s in schedulers],
        scaler=None if scaler is None else copy_tree(scaler.state_dict(), device),
        rng=None if rng is None else copy_tree(rng),
        extra=copy_tree(extra or {}),
    )


def restore_snapshot(
    snapshot: Snapshot,
    module: torch.nn.Module,
    optimizers: Sequence[Any],
    schedulers: Sequence[Any] = (),
    scaler: Any = None,
) -> None:
    """Restores a :func:`take_snapshot` in place (parameters keep their identity; the snapshot stays intact).

    Optimizer states are loaded from fresh copies: ``Optimizer.load_state_dict`` keeps tensors that are already on
    the right device and dtype, so loading the snapshot itself would let the optimizer mutate it.
    """
    module.load_state_dict(snapshot.model)  # copies into the existing tensors
    if len(optimizers) != len(snapshot.optimizers) or len(schedulers) != len(snapshot.schedulers):
        raise RuntimeError(
            f"The snapshot holds {len(snapshot.optimizers)} optimizer(s) and {len(snapshot.schedulers)} scheduler(s),"
            f" the trainer has {len(optimizers)} and {len(schedulers)}: they cannot be restored."
        )
    for optimizer, state in zip(optimizers, snapshot.optimizers, strict=True):
        optimizer.load_state_dict(copy_tree(state))
    for scheduler, state in zip(schedulers, snapshot.schedulers, strict=True):
        scheduler.load_state_dict(copy_tree(state))
    if scaler is not None and snapshot.scaler is not None:
        scaler.load_state_dict(copy_tree(snapshot.scaler))


class SnapshotRing:
    """The last ``capacity`` snapshots, oldest first.

    Args:
        capacity: how many snapshots are kept (the oldest is dropped first).

    Example::

        >>> ring = SnapshotRing(2)
        >>> for step in (10, 20, 30):
        ...     ring.push(Snapshot(step, {}, [], []))
        >>> ring.steps(), ring.latest().step, ring.pop_latest().step, ring.steps()
        ([20, 30], 30, 30, [20])
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Snapshot] = deque(maxlen=capacity)

    def push(self, snapshot: Snapshot) -> None:
        """Adds a snapshot, dropping the oldest when full."""
        self._items.append(snapshot)

    def latest(self) -> Snapshot | None:
        """The newest snapshot (None when empty)."""
        return self._items[-1] if self._items else None

    def pop_latest(self) -> Snapshot | None:
        """Removes and returns the newest snapshot (None when empty)."""
        return self._items.pop() if self._items else None

    def steps(self) -> list[int]:
        """The steps of the snapshots kept, oldest first."""
        return [s.step for s in self._items]

    def clear(self) -> None:
        """Drops every snapshot."""
        self._items.clear()

    def nbytes(self) -> int:
        """Bytes held by all snapshots' tensors."""
        return sum(s.nbytes() for s in self._items)

    def __len__(self) -> int:
        return len(self._items)
