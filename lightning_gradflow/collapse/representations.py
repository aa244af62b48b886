"""Representation signals: dead and τ-dormant units, effective rank (RankMe), feature spread, a feature buffer.

:func:`dead_fraction` (units of a ReLU-family layer that are zero on the whole probe sample, or τ-dormant as in
Sokar et al. 2023), :func:`effective_rank` (RankMe, Garrido et al. 2023) and :func:`feature_std` (the mean
per-dimension standard deviation of L2-normalised features: about ``1/sqrt(d)`` for spread-out features, 0 for
collapsed ones). :class:`FeatureBuffer` keeps the last rows of a layer's input on its device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
