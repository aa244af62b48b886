"""Adaptive gradient clipping rules: pure tensor code, no Lightning, no host synchronisation.

Every rule turns the current global gradient norm into a threshold and a coefficient ``min(1, threshold / norm)``
kept on the device, so a training step never waits for the host. ``agc`` works per unit instead (see
:func:`agc_clip_`). State lives in plain tensors and round-trips through ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

ClipMode = Literal["zscore", "percentile", "agc", "norm"]
CLIP_MODES: tuple[str, ...] = ("zscore", "percentile", "agc", "norm")

#: Added to norms before dividing (as in ``torch.nn.utils.clip_grad_norm_``).
NORM_EPS = 1e-6


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
        z_threshold: z-score above which a norm is clipped (ZClip: 2.5).
        alpha: EMA decay of mean and variance (ZClip: 0.97).
        warmup_steps: finite norms collected before z-score clipping starts (ZClip: 25).
        max_norm: optional hard cap applied on top (``None`` for none).
        std_floor: floor on σ relative to μ.
        warmup_factor: spike bound during warm-up, as a multiple of the running median.
    """

    def __init__(
        self,
        z_threshold: float = 2.5,
        alpha: float = 0.97,
        warmup_steps: int = 25,
        max_norm: float | None = None,
        std_floor: float = 1e-2,
        warmup_factor: float = 10.0,
    ) -> None:
        self.z_threshold = z_threshold
        self.alpha = alpha
        self.warmup_steps = warmup_steps
        self.max_norm = max_norm
        self.std_floor = std_floor
        self.warmup_factor = warmup_factor
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
        clipped = torch.where(z > self.z_threshold, self.mean + std * self.z_threshold**2 / z, norm)
        update = ~warming & finite
        new_mean = self.alpha * self.mean + (1 - self.alpha) * clipped
        new_var = self.alpha * self.var + (1 - self.alpha) * (clipped - new_mean) ** 2
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
        """Restores :meth:`state_dict` output (onto ``device``)."""
        self.steps = int(state["steps"])
        if "count" not in state:
            self.count = self.mean = self.var = self._warmup = None
            return
        self.count = torch.tensor(float(state["count"]), device=device)
        self.mean = torch.tensor(float(state["mean"]), device=device)
        self.var = torch.tensor(float(state["var"]), device=device)
        self._warmup = torch.tensor(state["warmup"], device=device)

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
        percentile: in (0, 100] (AutoClip: 10).
        window: how many past norms are kept.
        max_norm: optional hard cap on the threshold.
    """

    def __init__(self, percentile: float = 10.0, window: int = 10_000, max_norm: float | None = None) -> None:
        self.percentile = percentile
        self.window = window
        self.max_norm = max_norm
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
        """Restores :meth:`state_dict` output."""
        self.steps = int(state["steps"])
        history = state["history"]
        self._history = None if history is None else torch.tensor(history, device=device)

    def to(self, device: torch.device) -> None:
        """Moves the history to ``device``."""
        if self._history is not None:
            self._history = self._history.to(device)


def unitwise_norm(x: Tensor) -> Tensor:
    """Norm per output unit (over every dim but the first), as in NFNets; the whole norm for 0-/1-D tensors."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x.float())
    return torch.linalg.vector_norm(x.float(), dim=tuple(range(1, x.ndim)), keepdim=True)


def agc_clip_(params: Sequence[Tensor], grads: Sequence[Tensor], clip_factor: float, eps: float) -> Tensor:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021), in place; returns the fraction of units clipped.

    Each unit's gradient is scaled so that ``‖G_i‖ ≤ clip_factor · max(‖W_i‖, eps)``.

    Args:
        params: the weights.
        grads: their gradients (modified in place).
        clip_factor: λ (NFNets: 0.01 for batch 4096; larger for smaller batches).
        eps: floor on the weight norm, so zero-initialised units can still move (NFNets: 1e-3).
    """
    clipped, units = [], 0
    for p, g in zip(params, grads, strict=True):
        max_norm = unitwise_norm(p.detach()).clamp(min=eps) * clip_factor
        g_norm = unitwise_norm(g)
        scale = (max_norm / g_norm.clamp(min=NORM_EPS)).clamp(max=1.0)
        scale = torch.where(torch.isfinite(g_norm), scale, torch.ones_like(scale))
        g.mul_(scale.to(g.dtype))
        clipped.append((scale < 1).float().sum().reshape(1))
        units += scale.numel()
    if not clipped:
        return torch.zeros(())
    return torch.cat(clipped).sum() / max(units, 1)
