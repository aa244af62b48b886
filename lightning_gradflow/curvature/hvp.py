"""Hessian-vector products of a loss closure, and the context that keeps curvature probes off the training run.

``loss_fn()`` must recompute the loss from the current parameter values (it is called at perturbed weights).
Sparse gradients (``nn.Embedding(sparse=True)``) are made dense (coalesced: repeated indices summed) wherever a
product needs them, so every estimator built on :class:`HessianVectorProduct` is exact for them too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

LossFn = Callable[[], Tensor]
HvpMethod = Literal["double_backward", "finite_difference"]


def _dense(t: Tensor) -> Tensor:
    """``t`` as a strided tensor: a sparse gradient (``nn.Embedding(sparse=True)``) becomes its dense equivalent."""
    return t if t.layout == torch.strided else t.to_dense()


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([_dense(t).reshape(-1) for t in tensors])


def _unflat(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def gradients(loss: Tensor, params: Sequence[Tensor], create_graph: bool = False) -> list[Tensor]:
    """``∂loss/∂params``, dense, with zeros for parameters the loss does not use.

    Args:
        loss: a scalar that depends on ``params``.
        params: the parameters.
        create_graph: keep the graph of the gradient (for a second derivative).

    Raises:
        ValueError: when ``loss`` does not depend on any parameter (it has no ``grad_fn``): the loss was computed
            under ``no_grad`` or detached, and there is no curvature to measure.
    """
    if not loss.requires_grad:
        raise ValueError(
            "Expected the loss to depend on `params`, but it has no grad_fn (it was computed under `torch.no_grad()`"
            " or detached): there is no curvature to measure."
        )
    grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else _dense(g) for p, g in zip(params, grads, strict=True)]


@contextlib.contextmanager
def isolated(module: nn.Module | None, params: Sequence[Tensor], seed: int = 0) -> Iterator[None]:
    """Runs curvature probes without a trace on training.

    Saves and restores, bit for bit: the parameter values, their ``.grad`` (sparse ones too), every buffer of
    ``module`` (BatchNorm running statistics and counters) and the CPU/CUDA random number generator states. Inside,
    the global RNG is seeded with ``seed`` so dropout draws the same masks in each :func:`fixed_dropout` evaluation.

    Args:
        module: the model whose buffers are saved (``None``: none).
        params: the parameters that will be perturbed.
        seed: seed of the probe's own random stream, in ``[0, 2**64)``.

    Example::

        >>> layer = torch.nn.Linear(2, 1)
        >>> before = layer.weight.detach().clone()
        >>> with isolated(layer, list(layer.parameters())), torch.no_grad():
        ...     _ = layer.weight.add_(1.0)
        >>> torch.equal(layer.weight, before)
        True
    """
    values = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    buffers = [] if module is None else [(b, b.detach().clone()) for b in module.buffers()]
    devices = sorted({p.device.index for p in params if p.device.type == "cuda" and p.device.index is not None})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        try:
            with torch.enable_grad():
                yield
        finally:
            for p, v, g in zip(params, values, grads, strict=True):
                p.copy_(v)
                p.grad = g
            for b, saved in buffers:
                b.copy_(saved)


def fixed_dropout(loss_fn: LossFn, seed: int) -> LossFn:
    """``loss_fn`` with the RNG re-seeded before every call: dropout masks are the same at every evaluation point.

    This makes the loss one deterministic function of the weights within an estimate (the documented choice: the
    curvature of the training loss *with* a dropout mask, not of the eval-mode network).
    """

    def wrapped() -> Tensor:
        torch.manual_seed(seed)
        return loss_fn()

    return wrapped


class HessianVectorProduct:
    """``v ↦ H v`` for the Hessian of ``loss_fn`` with respect to ``params``, on flat vectors.

    Args:
        loss_fn: recomputes the loss from the current parameter values.
        params: the parameters (``requires_grad=True``).
        method: ``"double_backward"`` or ``"finite_difference"``.
        eps: the relative finite-difference step ``ε`` (default ``finfo(dtype).eps ** (1/3)``, the optimum of a central
            difference: truncation error ``O(h²)`` against rounding ``O(ε_dtype/h)``).

    The finite-difference step along ``v`` is ``h = ε · s(v) / ‖v‖`` with ``s(v)² = Σ_k ‖v_k‖² (1 + rms(w_k))² / ‖v‖²``:
    the scale of the weights ``v`` actually moves (``v_k``, ``w_k``: the part of ``v`` on, and the values of, parameter
    tensor ``k``), so ``w ± h v`` is a relative perturbation of about ``ε`` of those tensors whatever the norm of the
    others. (A step relative to ``1 + ‖w‖`` of *all* weights, as before, let one large tensor — an N(0, 1) embedding —
    inflate the step for every direction: λ_max of a 4 M-parameter transformer came out 43 % low.)

    A loss that is linear in some parameters has a gradient there that does not depend on the weights: those parts
    of the Hessian are zero (a linear loss gives ``H v = 0``, λ = 0), not an error. Sparse gradients are made dense.

    Attributes:
        num_products: products computed so far (the unit of cost of every estimator here).

    Example::

        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> op = HessianVectorProduct(lambda: (w**2).sum() + 3 * w[0], [w])  # Hessian 2 I
        >>> op(torch.tensor([1.0, -1.0])).tolist(), op.num_products
        ([2.0, -2.0], 1)
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: Sequence[Tensor],
        method: HvpMethod = "double_backward",
        eps: float | None = None,
    ) -> None:
        if method not in ("double_backward", "finite_difference"):
            raise ValueError(f"Expected `method` to be 'double_backward' or 'finite_difference', but got {method!r}.")
        if not params:
            raise ValueError("Expected at least one parameter in `params`, but got none.")
        self.loss_fn = loss_fn
        self.params = list(params)
        self.method = method
        self.num_products = 0
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self._grads: list[Tensor] | None = None
        if method == "finite_difference":
            self.eps = eps if eps is not None else torch.finfo(self.dtype).eps ** (1 / 3)
            # 1 + RMS of each parameter tensor (the 1 keeps zero-initialised biases from getting a zero step)
            self._scales = torch.tensor(
                [1 + float(p.detach().double().square().mean().sqrt()) if p.numel() else 1.0 for p in self.params],
                dtype=torch.float64,
            )

    def gradient(self) -> Tensor:
        """The flat gradient at the current weights (one extra forward/backward, no graph kept)."""
        with torch.enable_grad():
            return _flat(gradients(self.loss_fn(), self.params))

    def __call__(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (same dtype and device as the parameters)."""
        self.num_products += 1
        if self.method == "double_backward":
            return self._double_backward(v)
        return self._finite_difference(v)

    def _double_backward(self, v: Tensor) -> Tensor:
        with torch.enable_grad():
            if self._grads is None:
                self._grads = gradients(self.loss_fn(), self.params, create_graph=True)
            # a gradient that does not require grad is constant in the weights: its rows of H are zero
            used = [(g, vi) for g, vi in zip(self._grads, _unflat(v, self.params), strict=True) if g.requires_grad]
            if not used:
                return torch.zeros_like(v)
            hv = torch.autograd.grad(
                [g for g, _ in used],
                self.params,
                grad_outputs=[vi for _, vi in used],
                retain_graph=True,
                allow_unused=True,
            )
        return _flat([torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, hv, strict=True)])

    def _finite_difference(self, v: Tensor) -> Tensor:
        pieces = torch.stack([torch.linalg.vector_norm(d) for d in _unflat(v, self.params)]).double().cpu()
        squared = float(pieces.square().sum())
        if squared == 0:
            return torch.zeros_like(v)
        if not math.isfinite(squared):
            return torch.full_like(v, math.nan)
        scale = math.sqrt(float((pieces * self._scales).square().sum()) / squared)
        step = self.eps * scale / math.sqrt(squared)
        saved = [p.detach().clone() for p in self.params]
        try:
            self._shift(v, step)
            plus = self.gradient()
            self._restore(saved)
            self._shift(v, -step)
            minus = self.gradient()
        finally:
            self._restore(saved)
        return (plus - minus) / (2 * step)

    def _shift(self, v: Tensor, step: float) -> None:
        with torch.no_grad():
            for p, d in zip(self.params, _unflat(v, self.params), strict=True):
                p.add_(d, alpha=step)

    def _restore(self, saved: list[Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, saved, strict=True):
                p.copy_(s)

    def release(self) -> None:
        """Frees the retained double-backward graph."""
        self._grads = None
