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
    """``min(1, threshold / norm)``; 1 for a non-finite norm (such a step is skipped, not scaled)."""
    coef = (threshold / (norm + NORM_EPS)).clamp(max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))


class ZScoreClipper:
    """ZClip (Kumar et al. 2025, arXiv 2504.02507): clip norms whose z-score against an EMA exceeds a threshold.

    For ``warmup_steps`` steps the norms are only collected; their mean and variance then seed the EMA. Afterwards
    a norm ``g`` with ``z = (g − μ) / σ > z_threshold`` is clipped to ``μ + σ · z_threshold² / z`` (ZClip's
    reciprocal rule: the larger the spike, the harder the clip) and the EMA is updated with the *clipped* norm, so a
    spike does not inflate the baseline. Non-finite norms leave the state untouched.

    Args:
        z_threshold: z-score above which a norm is clipped (ZClip: 2.5).
        alpha: EMA decay of mean and variance (ZClip: 0.97).
        warmup_steps: norms collected before clipping starts (ZClip: 25).
        max_norm: optional hard cap applied on top (``None`` for none).
    """

    def __init__(
        self, z_threshold: float = 2.5, alpha: float = 0.97, warmup_steps: int = 25, max_norm: float | None = None
    ) -> None:
        self.z_threshold = z_threshold
        self.alpha = alpha
        self.warmup_steps = warmup_steps
        self.max_norm = max_norm
        self.steps = 0  # host counter: the number of norms seen, known without reading the device
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self._warmup: Tensor | None = None

    def __call__(self, norm: Tensor) -> Tensor:
        """The threshold for this step's global norm (0-dim, on ``norm``'s device); updates the statistics."""
        norm = norm.detach().float()
        finite = torch.isfinite(norm)
        if self.steps < self.warmup_steps:
            if self._warmup is None:
                self._warmup = torch.zeros(self.warmup_steps, device=norm.device)
            self._warmup[self.steps] = torch.where(finite, norm, self._warmup[max(self.steps - 1, 0)])
            self.steps += 1
            if self.steps == self.warmup_steps:
                self.mean, self.var = self._warmup.mean(), self._warmup.var(correction=0)
            threshold = torch.where(finite, norm, torch.full_like(norm, float("inf")))
            return self._cap(threshold)
        assert self.mean is not None and self.var is not None
        std = self.var.clamp(min=0).sqrt()
        z = (norm - self.mean) / (std + NORM_EPS)
        clipped = torch.where(z > self.z_threshold, self.mean + std * self.z_threshold**2 / z, norm)
        new_mean = self.alpha * self.mean + (1 - self.alpha) * clipped
        new_var = self.alpha * self.var + (1 - self.alpha) * (clipped - new_mean) ** 2
        self.mean = torch.where(finite, new_mean, self.mean)
        self.var = torch.where(finite, new_var, self.var)
        self.steps += 1
        # a non-finite norm (skipped, never scaled) reports the bound above which clipping starts
        return self._cap(torch.where(finite, clipped, self.mean + self.z_threshold * std))

    def _cap(self, threshold: Tensor) -> Tensor:
        return threshold if self.max_norm is None else threshold.clamp(max=self.max_norm)

    def state_dict(self) -> dict[str, Any]:
        """Host copies of the statistics (read at checkpoint time only)."""
        return {
            "steps": self.steps,
            "mean": None if self.mean is None else float(self.mean),
            "var": None if self.var is None else float(self.var),
            "warmup": None if self._warmup is None else self._warmup.cpu().tolist(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Restores :meth:`state_dict` output (onto ``device``)."""
        self.steps = int(state["steps"])
        self.mean = None if state["mean"] is None else torch.tensor(state["mean"], device=device)
        self.var = None if state["var"] is None else torch.tensor(state["var"], device=device)
        self._warmup = None if state["warmup"] is None else torch.tensor(state["warmup"], device=device)

    def to(self, device: torch.device) -> None:
        """Moves the statistics to ``device``."""
        for name in ("mean", "var", "_warmup"):
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
    """

    def __init__(self, percentile: float = 10.0, window: int = 10_000) -> None:
        self.percentile = percentile
        self.window = window
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
        return torch.nanquantile(filled, self.percentile / 100.0).nan_to_num(nan=float("inf"))

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
