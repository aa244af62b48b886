"""Hessian-vector products of a loss closure, and the context that keeps curvature probes off the training run.

``loss_fn()`` must recompute the loss from the current parameter values (it is called at perturbed weights).
Sparse gradients (``nn.Embedding(sparse=True)``) are made dense (coalesced: repeated indices summed) wherever a
product needs them, so every estimator built on :class:`HessianVectorProduct` is exact for them too.

``method="auto"`` (:func:`choose_method`) takes the exact double-backward product when the model has one — run
under :func:`exact_kernels`: PyTorch's math attention kernel, whose backward is differentiable, instead of the fused
CPU/CUDA kernels of ``scaled_dot_product_attention`` (``nn.MultiheadAttention``, ``nn.TransformerEncoder``, Hugging
Face SDPA attention), and cuDNN off so RNNs have a double backward — and central finite differences otherwise
(``EmbeddingBag(sparse=True)``, reentrant ``torch.utils.checkpoint``, custom autograd functions without a double
backward). Finite differences need only what ``loss.backward()`` needs: when ``torch.autograd.grad`` is refused
(reentrant checkpointing), gradients are read from ``.backward()``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

LossFn = Callable[[], Tensor]
HvpMethod = Literal["auto", "double_backward", "finite_difference"]
HVP_METHODS: tuple[str, ...] = ("auto", "double_backward", "finite_difference")
#: Finite differences: the step is divided by this at each retry, and retried at most this many times, when the
#: forward and backward differences disagree (a ReLU kink, a max-pool switch inside ``w ± h v``).
STEP_SHRINK, STEP_RETRIES = 4, 3
#: The agreement of the forward and backward differences that accepts a central difference (relative).
STEP_AGREEMENT = 0.01
#: The share of a finite-difference product on gradients the double backward reads as constant above which
#: :func:`choose_method` distrusts the exact product.
TRIAL_AGREEMENT = 0.2


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


def backward_gradients(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``∂loss/∂params`` through ``loss.backward()``: for graphs that refuse ``torch.autograd.grad``.

    Reentrant ``torch.utils.checkpoint`` (``use_reentrant=True``) only supports ``.backward()`` without ``inputs``.
    The ``.grad`` of ``params`` is set aside and put back; other leaf tensors that require grad (not in ``params``)
    accumulate this gradient in their ``.grad``, as any ``backward()`` does.

    Example::

        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> w.grad = torch.ones(2)
        >>> backward_gradients((w**2).sum(), [w])[0].tolist(), w.grad.tolist()
        ([2.0, 4.0], [1.0, 1.0])
    """
    if not loss.requires_grad:
        gradients(loss, params)  # the same error as `gradients`
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        return [torch.zeros_like(p) if p.grad is None else _dense(p.grad).clone() for p in params]
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def exact_kernels(params: Sequence[Tensor]) -> contextlib.AbstractContextManager[Any]:
    """Kernels with a double backward: the math ``scaled_dot_product_attention`` backend, and cuDNN off on CUDA.

    The fused attention kernels (flash / memory-efficient, on CPU too) that ``nn.MultiheadAttention``,
    ``nn.TransformerEncoder`` and Hugging Face SDPA attention call in training have no double backward; the math
    kernel computes the same attention from differentiable operations. (``nn.MultiheadAttention``'s fused "fast
    path" only runs without gradients, so never inside a probe.)
    """
    stack = contextlib.ExitStack()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the math kernel is chosen for double backward by the dispatcher, if at all
        pass
    else:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    if any(p.device.type == "cuda" for p in params):
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
    return stack


def choose_method(loss_fn: LossFn, params: Sequence[Tensor]) -> tuple[HvpMethod, Exception | None]:
    """``"double_backward"`` when one exact product of ``loss_fn`` works, else ``"finite_difference"`` and why not.

    Tries one double-backward product (under :func:`exact_kernels`) along a fixed random direction (about two
    training steps). When that product reads the gradient of some parameters as constant in the weights, a
    finite-difference product checks it: a custom autograd function marked ``@once_differentiable`` at the end of
    the graph makes the double backward silently zero instead of failing; if those gradients carry more than
    :data:`TRIAL_AGREEMENT` of the finite-difference product, finite differences are chosen. (The exact and
    finite-difference products are not compared otherwise: on a ReLU network with BatchNorm, finite differences in
    float32 cannot step below the kinks, and the exact product is the reliable one.)

    Raises:
        ValueError: the loss does not depend on ``params`` (no method can measure anything).

    Example::

        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> choose_method(lambda: (w**3).sum(), [w])
        ('double_backward', None)
        >>> table = torch.nn.EmbeddingBag(4, 2, sparse=True)  # its backward has no derivative
        >>> loss = lambda: table(torch.tensor([[0, 1]])).square().sum()
        >>> method, error = choose_method(loss, list(table.parameters()))
        >>> method, type(error).__name__
        ('finite_difference', 'NotImplementedError')
    """
    op = HessianVectorProduct(loss_fn, params, "double_backward")
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=op.dtype).to(op.device)
    try:
        op(v)
        gradients_read = list(op._grads or [])
    except ValueError:
        raise
    except Exception as error:  # no double backward somewhere in the graph: finite differences it is
        return "finite_difference", error
    finally:
        op.release()
    constant = [not g.requires_grad for g in gradients_read]
    if not any(constant):  # every gradient depends on the weights: the exact product is what it says
        return "double_backward", None
    try:  # gradients that read as constant: truly (a loss linear in them), or a backward that was not recorded?
        estimate = _unflat(HessianVectorProduct(loss_fn, params, "finite_difference")(v), params)
    except Exception:  # the exact product works and finite differences do not: keep the exact one
        return "double_backward", None
    moved = math.sqrt(sum(float(e.square().sum()) for e, c in zip(estimate, constant, strict=True) if c))
    total = math.sqrt(sum(float(e.square().sum()) for e in estimate))
    if moved > TRIAL_AGREEMENT * total:
        return "finite_difference", RuntimeError(
            "the double backward reads the gradients of some parameters as constant in the weights, but they change"
            " with the weights: a function in the graph does not differentiate its own backward (e.g. a custom"
            " autograd function marked `@once_differentiable`), and its second derivative silently reads zero"
        )
    return "double_backward", None


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
        method: ``"double_backward"`` (exact, under :func:`exact_kernels`), ``"finite_difference"`` or ``"auto"``
            (the first that works, :func:`choose_method`; the choice is :attr:`method`, the reason of a fallback
            :attr:`fallback_error`).
        eps: the relative finite-difference step ``ε`` (default ``finfo(dtype).eps ** (1/3)``, the optimum of a central
            difference: truncation error ``O(h²)`` against rounding ``O(ε_dtype/h)``).

    The finite-difference step along ``v`` is ``h = ε · s(v) / ‖v‖`` with ``s(v)² = Σ_k ‖v_k‖² (1 + rms(w_k))² / ‖v‖²``:
    the scale of the weights ``v`` actually moves (``v_k``, ``w_k``: the part of ``v`` on, and the values of, parameter
    tensor ``k``), so ``w ± h v`` is a relative perturbation of about ``ε`` of those tensors whatever the norm of the
    others. (A step relative to ``1 + ‖w‖`` of *all* weights, as before, let one large tensor — an N(0, 1) embedding —
    inflate the step for every direction: λ_max of a 4 M-parameter transformer came out 43 % low.)

    **Step selection.** Each product also compares the forward and backward differences ``(g(w + hv) − g(w))/h`` and
    ``(g(w) − g(w − hv))/h`` (``g(w)`` is computed once per operator): on a smooth loss they agree to ``O(h)``; when
    ``w ± hv`` crosses a kink of a piecewise-linear network (a ReLU changing sign, a max-pool switch) the gradient
    jumps and they do not. Then the step is divided by :data:`STEP_SHRINK` (up to :data:`STEP_RETRIES` times) until
    they agree within :data:`STEP_AGREEMENT`; failing that, the central difference of the step where they agreed best
    is returned. Without this a ReLU network's products were off by up to 36× for random directions and λ_max by 2-3 %
    (the exact Hessian of a piecewise-linear loss is the one of its linear piece, which double backward computes).
    A product costs two gradients on a smooth loss (tanh, SiLU: 2-4) and 5-8 on a ReLU network.

    A loss that is linear in some parameters has a gradient there that does not depend on the weights: those parts
    of the Hessian are zero (a linear loss gives ``H v = 0``, λ = 0), not an error. Sparse gradients are made dense.

    Attributes:
        num_products: products computed so far (the unit of cost of every estimator here).
        num_gradients: gradients evaluated so far by finite differences (two per product, two more per step
            shrink, one for ``g(w)``).

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
        if method not in HVP_METHODS:
            raise ValueError(
                f"Expected `method` to be 'auto', 'double_backward' or 'finite_difference', but got {method!r}."
            )
        if not params:
            raise ValueError("Expected at least one parameter in `params`, but got none.")
        self.loss_fn = loss_fn
        self.params = list(params)
        self.num_products = 0
        self.num_gradients = 0
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self._grads: list[Tensor] | None = None
        self._center: Tensor | None = None
        self._use_backward = False
        self.fallback_error: Exception | None = None
        if method == "auto":
            method, self.fallback_error = choose_method(loss_fn, self.params)
        self.method: HvpMethod = method
        if method == "finite_difference":
            self.eps = eps if eps is not None else torch.finfo(self.dtype).eps ** (1 / 3)
            # 1 + RMS of each parameter tensor (the 1 keeps zero-initialised biases from getting a zero step)
            self._scales = torch.tensor(
                [1 + float(p.detach().double().square().mean().sqrt()) if p.numel() else 1.0 for p in self.params],
                dtype=torch.float64,
            )

    def gradient(self) -> Tensor:
        """The flat gradient at the current weights (one extra forward/backward, no graph kept).

        Through ``torch.autograd.grad``; when that is refused (reentrant checkpointing), through ``.backward()``
        (:func:`backward_gradients`) from then on.
        """
        self.num_gradients += 1
        with torch.enable_grad():
            if not self._use_backward:
                try:
                    return _flat(gradients(self.loss_fn(), self.params))
                except RuntimeError:
                    self._use_backward = True  # and if `.backward()` fails too, its error is the one raised
            return _flat(backward_gradients(self.loss_fn(), self.params))

    def __call__(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (same dtype and device as the parameters)."""
        self.num_products += 1
        if self.method == "double_backward":
            return self._double_backward(v)
        return self._finite_difference(v)

    def _double_backward(self, v: Tensor) -> Tensor:
        with torch.enable_grad(), exact_kernels(self.params):
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
        if self._center is None:
            self._center = self.gradient()
        center = self._center
        best: tuple[float, Tensor] | None = None
        for _ in range(STEP_RETRIES + 1):
            plus, minus = self._gradients_at(v, step)
            central = (plus - minus) / (2 * step)
            gap = float(torch.linalg.vector_norm((plus - center) - (center - minus))) / step
            size = float(torch.linalg.vector_norm(central))
            if not (math.isfinite(gap) and math.isfinite(size)):
                return central
            if best is None or gap < best[0]:
                best = (gap, central)
            if gap <= STEP_AGREEMENT * size:
                return central
            step /= STEP_SHRINK
        assert best is not None  # the loop ran at least once
        return best[1]

    def _gradients_at(self, v: Tensor, step: float) -> tuple[Tensor, Tensor]:
        saved = [p.detach().clone() for p in self.params]
        try:
            self._shift(v, step)
            plus = self.gradient()
            self._restore(saved)
            self._shift(v, -step)
            minus = self.gradient()
        finally:
            self._restore(saved)
        return plus, minus

    def _shift(self, v: Tensor, step: float) -> None:
        with torch.no_grad():
            for p, d in zip(self.params, _unflat(v, self.params), strict=True):
                p.add_(d, alpha=step)

    def _restore(self, saved: list[Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, saved, strict=True):
                p.copy_(s)

    def release(self) -> None:
        """Frees the retained double-backward graph and the kept gradient."""
        self._grads = None
        self._center = None
