"""Sharpness beyond eigenvalues: batch sharpness (the curvature along the step), SAM and random perturbations.

Batch sharpness is defined once, here, for plain and preconditioned (Adam) steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from lightning_gradflow.curvature.hvp import (
    HessianVectorProduct,
    HvpMethod,
    LossFn,
    _flat,
    gradients,
)


def batch_sharpness(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    hvp: HvpMethod = "double_backward",
    preconditioner: Sequence[Tensor] | None = None,
) -> float:
    """The curvature along the optimizer's step: ``uᵀHu / gᵀu`` with ``u = P⁻¹g`` (``u = g`` without ``P``).

    Without a preconditioner it is ``gᵀHg / ‖g‖²``, the curvature along the gradient — for SGD what stabilises at
    ``2/η`` with minibatches (Andreyev & Beneventano 2024). With Adam's diagonal ``P``
    (:func:`~lightning_gradflow.curvature.stability.adam_preconditioner`) it is the Rayleigh quotient of
    ``P^{-1/2} H P^{-1/2}`` along ``P^{-1/2} g``, so it never exceeds
    :func:`~lightning_gradflow.curvature.spectrum.preconditioned_sharpness` (this library's extension of batch
    sharpness to Adam). One gradient and one Hessian-vector product; 0 when the gradient is 0.

    Args:
        loss_fn: recomputes the loss.
        params: the parameters.
        hvp: how the product is computed.
        preconditioner: a positive diagonal ``P`` per parameter (same shapes), or ``None``.

    Example::

        >>> w = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
        >>> loss = lambda: 3 * w[0] ** 2 + 0.5 * w[1] ** 2  # Hessian diag(6, 1), gradient (6, 1)
        >>> round(batch_sharpness(loss, [w]), 6)  # (36·6 + 1·1) / 37
        5.864865
    """
    op = HessianVectorProduct(loss_fn, params, hvp)
    try:
        g = op.gradient()
        u = g if preconditioner is None else g / _flat([q.detach().to(op.dtype) for q in preconditioner])
        denominator = float(torch.dot(g, u))
        if denominator == 0:
            return 0.0
        return float(torch.dot(u, op(u))) / denominator
    finally:
        op.release()


def preconditioned_batch_sharpness(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    preconditioner: Sequence[Tensor] | None = None,
    hvp: HvpMethod = "double_backward",
) -> float:
    """:func:`batch_sharpness` with the preconditioner as third argument (the older name; the same quantity)."""
    return batch_sharpness(loss_fn, params, hvp, preconditioner)


def sam_sharpness(loss_fn: LossFn, params: Sequence[Tensor], rho: float = 0.05, adaptive: bool = False) -> float:
    """``L(w + ε) − L(w)`` with SAM's ascent step ``ε = ρ g / ‖g‖`` (Foret et al. 2021).

    With ``adaptive=True`` the step is ASAM's (Kwon et al. 2021), ``ε = ρ T² g / ‖T g‖`` with ``T = |w|``, so it is
    invariant to rescaling the weights. The weights are restored bit-exactly.
    """
    params = list(params)
    with torch.enable_grad():
        loss = loss_fn()
        g = gradients(loss, params)
    if adaptive:
        scaled = [p.detach().abs() * gi for p, gi in zip(params, g, strict=True)]
        norm = float(torch.linalg.vector_norm(_flat(scaled)))
        step = [p.detach().abs() * s for p, s in zip(params, scaled, strict=True)]
    else:
        norm = float(torch.linalg.vector_norm(_flat(g)))
        step = g
    if norm == 0:
        return 0.0
    with _perturbed(params, step, rho / norm):
        perturbed = float(loss_fn().detach())
    return perturbed - float(loss.detach())


@contextlib.contextmanager
def _perturbed(params: Sequence[Tensor], direction: Sequence[Tensor], scale: float) -> Iterator[None]:
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(d, alpha=scale)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


class SharpnessClass(str, Enum):
    """Coarse classes of random-perturbation sharpness (see :func:`random_sharpness` for the quantity)."""

    FLAT = "flat"
    MODERATE = "moderate"
    SHARP = "sharp"
    VERY_SHARP = "very_sharp"

    @classmethod
    def of(cls, score: float) -> SharpnessClass:
        """FLAT < 0.1 ≤ MODERATE < 0.5 ≤ SHARP < 2.0 ≤ VERY_SHARP."""
        if score < 0.1:
            return cls.FLAT
        if score < 0.5:
            return cls.MODERATE
        if score < 2.0:
            return cls.SHARP
        return cls.VERY_SHARP


@dataclass(frozen=True)
class RandomSharpness:
    """Mean loss increase per perturbation scale, and the score the classes apply to."""

    increases: dict[float, float]
    score: float
    label: SharpnessClass


DEFAULT_SCALES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def random_sharpness(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    scales: Sequence[float] = DEFAULT_SCALES,
    num_directions: int = 4,
    *,
    filter_normalized: bool = True,
    generator: torch.Generator | None = None,
) -> RandomSharpness:
    """Mean loss increase ``E[L(w + σ d)] − L(w)`` over random directions ``d``, per scale ``σ``.

    Directions are Gaussian; with ``filter_normalized`` (Li et al. 2018) each filter (row of a weight, a whole bias)
    is rescaled to the norm of the weights it perturbs, so ``σ`` is a *relative* perturbation and networks of
    different scale compare; otherwise ``d`` has unit norm overall.

    The **score** the classes apply to is the *relative* mean loss increase at the largest scale,
    ``(E[L(w + σ_max d)] − L(w)) / max(L(w), 1e-12)``: FLAT < 0.1 (a 10 % relative perturbation of every filter
    costs under 10 % of the loss), MODERATE < 0.5, SHARP < 2, VERY_SHARP beyond.

    The directions are drawn one at a time (memory: one copy of the parameters, whatever ``num_directions``).
    """
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"Expected positive `scales`, but got {tuple(scales)}.")
    if num_directions < 1:
        raise ValueError(f"Expected `num_directions` >= 1, but got {num_directions}.")
    params = list(params)
    with torch.no_grad():
        base = float(loss_fn())
        totals = dict.fromkeys((float(s) for s in scales), 0.0)
        for _ in range(num_directions):
            d = _direction(params, filter_normalized, generator)
            for scale in totals:  # each distinct scale once
                with _perturbed(params, d, scale):
                    totals[scale] += float(loss_fn()) - base
        increases = {scale: total / num_directions for scale, total in totals.items()}
    score = increases[float(max(scales))] / max(abs(base), 1e-12)
    return RandomSharpness(increases, score, SharpnessClass.of(score))


def _direction(params: Sequence[Tensor], filter_normalized: bool, generator: torch.Generator | None) -> list[Tensor]:
    d = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    if not filter_normalized:
        norm = torch.linalg.vector_norm(_flat(d))
        return [x / norm for x in d]
    out = []
    for p, x in zip(params, d, strict=True):
        w = p.detach()
        if w.ndim <= 1:
            out.append(x * torch.linalg.vector_norm(w) / torch.linalg.vector_norm(x).clamp(min=1e-12))
        else:
            dims = tuple(range(1, w.ndim))
            w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
            x_norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True).clamp(min=1e-12)
            out.append(x * w_norm / x_norm)
    return out
