"""Loss-landscape curvature from Hessian-vector products: eigenvalues, trace, and sharpness measures.

Pure functions over a loss closure and a list of parameters; no Lightning. ``loss_fn()`` must recompute the loss from
the current parameter values (it is called at perturbed weights). Use :func:`isolated` around any of these to leave
training undisturbed: it restores weights, ``.grad``, buffers (BatchNorm running statistics) and the RNG states, and
fixes the dropout masks within one estimate so every evaluation sees the same function of the weights.

Hessian-vector products (:class:`HessianVectorProduct`):

* ``"double_backward"`` (default): exact, builds the gradient graph once and differentiates it again per product;
* ``"finite_difference"``: central differences of two gradients along ``v``, with a step scaled per parameter
  tensor (``ε_dtype^(1/3)`` times ``1 + RMS`` of the tensors ``v`` moves, see :class:`HessianVectorProduct`); runs
  the same kernels as training (cuDNN RNNs and fused attention have no double backward) and keeps no graph.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal, overload

import torch
from torch import Tensor, nn

LossFn = Callable[[], Tensor]
HvpMethod = Literal["double_backward", "finite_difference"]


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


@contextlib.contextmanager
def isolated(module: nn.Module | None, params: Sequence[Tensor], seed: int = 0) -> Iterator[None]:
    """Runs curvature probes without a trace on training.

    Saves and restores, bit for bit: the parameter values, their ``.grad``, every buffer of ``module`` (BatchNorm
    running statistics and counters) and the CPU/CUDA random number generator states. Inside, the global RNG is
    seeded with ``seed`` so dropout draws the same masks in each :func:`fixed_dropout` evaluation.

    Args:
        module: the model whose buffers are saved (``None``: none).
        params: the parameters that will be perturbed.
        seed: seed of the probe's own random stream.
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

    Attributes:
        num_products: products computed so far (the unit of cost of every estimator here).
    """

    def __init__(
        self, loss_fn: LossFn, params: Sequence[Tensor], method: HvpMethod = "double_backward", eps: float | None = None
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
        self._grads: tuple[Tensor, ...] | None = None
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
            grads = torch.autograd.grad(self.loss_fn(), self.params, allow_unused=True)
        return _flat([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)])

    def __call__(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (same dtype and device as the parameters)."""
        self.num_products += 1
        if self.method == "double_backward":
            return self._double_backward(v)
        return self._finite_difference(v)

    def _double_backward(self, v: Tensor) -> Tensor:
        with torch.enable_grad():
            if self._grads is None:
                loss = self.loss_fn()
                self._grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            used = [(g, p, vi) for g, p, vi in zip(self._grads, self.params, _unflat(v, self.params), strict=True)]
            outputs = [g for g, _, _ in used if g is not None]
            inputs = [vi for g, _, vi in used if g is not None]
            hv = torch.autograd.grad(outputs, self.params, grad_outputs=inputs, retain_graph=True, allow_unused=True)
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


# ---------------------------------------------------------------------------------------------------- eigenvalues


def _random_unit(dim: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None) -> Tensor:
    v = torch.randn(dim, dtype=dtype, device="cpu", generator=generator).to(device)
    return v / torch.linalg.vector_norm(v)


def _start_vector(
    v0: Tensor | None, dim: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    if v0 is None:
        return _random_unit(dim, dtype, device, generator)
    if v0.shape != (dim,):
        raise ValueError(f"Expected `v0` to be a flat vector of {dim} entries, but got shape {tuple(v0.shape)}.")
    q = v0.detach().to(dtype=dtype, device=device)
    norm = torch.linalg.vector_norm(q)
    if not (math.isfinite(float(norm)) and float(norm) > 0):
        raise ValueError("Expected `v0` to be finite and nonzero.")
    return q / norm


@overload
def lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    num_steps: int,
    *,
    dtype: torch.dtype = ...,
    device: torch.device | str = ...,
    generator: torch.Generator | None = ...,
    tol: float | None = ...,
    track_smallest: bool = ...,
    reorthogonalize: bool = ...,
    v0: Tensor | None = ...,
    return_vector: Literal[False] = ...,
) -> Tensor: ...


@overload
def lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    num_steps: int,
    *,
    dtype: torch.dtype = ...,
    device: torch.device | str = ...,
    generator: torch.Generator | None = ...,
    tol: float | None = ...,
    track_smallest: bool = ...,
    reorthogonalize: bool = ...,
    v0: Tensor | None = ...,
    return_vector: Literal[True],
) -> tuple[Tensor, Tensor | None]: ...


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    num_steps: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    tol: float | None = None,
    track_smallest: bool = False,
    reorthogonalize: bool = True,
    v0: Tensor | None = None,
    return_vector: bool = False,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Ritz values of a symmetric operator after ``num_steps`` Lanczos steps (one product each), ascending.

    The three-term recurrence followed by a full reorthogonalisation against every previous vector keeps the basis
    orthogonal in floating point, so the extreme Ritz values converge without ghost copies; the basis is one
    preallocated ``num_steps × dim`` buffer, and each step reads it twice (a matrix-vector product each way).
    With ``reorthogonalize=False`` only the recurrence runs (``O(dim)`` per step, no basis kept): orthogonality is
    lost as Ritz values converge, which adds duplicate copies of converged values but does not move the largest and
    smallest ones (Paige), so it suffices for λ_max; use the default for interior or several eigenvalues.

    With ``tol``, it stops early once the largest Ritz value (and, with ``track_smallest``, the smallest) changed by
    less than ``tol`` times the largest magnitude in the last step: ``num_steps`` becomes a cap. Lanczos converges
    to the extreme eigenvalues much faster than power iteration, so this usually stops well before the cap.

    **Warm start**: ``v0`` (a flat vector, e.g. the top Ritz vector of an earlier run on a nearby operator) replaces
    the random start (``generator`` is then unused). When ``v0`` is close to the top eigenvector the first Ritz value
    is already close to λ_max and ``tol`` stops the run after a few products (at least three: the first comparison is
    after the third). A start close to the *top* eigenvector has little weight on the bottom
    ones, so it slows λ_min; for both ends start from a mixture (see :class:`~lightning_gradflow.callbacks.sharpness.
    SharpnessCallback`).

    With ``return_vector=True`` it returns ``(ritz_values, top_ritz_vector)``: the unit-norm Ritz vector of the
    largest Ritz value (flat, ``dtype`` on ``device``; ``None`` when the values are not finite), to warm-start the
    next run. It needs the Lanczos vectors: without reorthogonalisation they are kept as the run goes (memory
    ``O(steps taken × dim)``, no extra time per step but one ``O(steps × dim)`` combination at the end).
    """
    device = torch.device(device)
    q = _start_vector(v0, dim, dtype, device, generator)
    steps = min(num_steps, dim)
    # written in place, no copies per step; without reorthogonalisation only the last two vectors are kept
    basis = torch.empty((steps if reorthogonalize else 2, dim), dtype=dtype, device=device)
    kept: list[Tensor] = []  # without reorthogonalisation, the Lanczos vectors for the Ritz vector
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    previous: Tensor | None = None
    for j in range(steps):
        row = j if reorthogonalize else j % 2
        basis[row] = q
        if return_vector and not reorthogonalize:
            kept.append(q)
        w = matvec(q)
        alpha = torch.dot(w, q)
        alphas.append(alpha)
        w = w - alpha * q  # the three-term recurrence
        if j > 0:
            w = w - betas[-1] * basis[row - 1 if reorthogonalize else 1 - row]
        if reorthogonalize:  # then full reorthogonalisation against every vector
            done = basis[: j + 1]
            w = torch.addmv(w, done.t(), done @ w, alpha=-1)
        beta = torch.linalg.vector_norm(w)
        if float(beta) <= 1e-10 * max(1.0, float(alpha.abs())):  # an invariant subspace: the Ritz values are exact
            break
        if tol is not None:
            ritz = _ritz_values(alphas, betas)
            if not bool(torch.isfinite(ritz).all()):
                break
            if previous is not None and len(alphas) >= 3:
                scale = float(ritz.abs().max())
                change = abs(float(ritz[-1] - previous[-1]))
                if track_smallest:
                    change = max(change, abs(float(ritz[0] - previous[0])))
                if change <= tol * scale:
                    break
            previous = ritz
        betas.append(beta)
        q = w / beta
    if not return_vector:
        return _ritz_values(alphas, betas)
    tridiagonal = _tridiagonal(alphas, betas)
    k = len(alphas)
    if tridiagonal is None:
        return torch.full((k,), math.nan, dtype=torch.float64), None
    values, vectors = torch.linalg.eigh(tridiagonal)
    if reorthogonalize:
        y = basis[:k].t() @ vectors[:, -1].to(dtype=dtype, device=device)
    else:
        y = torch.zeros(dim, dtype=dtype, device=device)
        for coefficient, vector in zip(vectors[:, -1].tolist(), kept, strict=True):
            y.add_(vector, alpha=coefficient)
    norm = torch.linalg.vector_norm(y)
    return values, (y / norm if math.isfinite(float(norm)) and float(norm) > 0 else None)


def _tridiagonal(alphas: list[Tensor], betas: list[Tensor]) -> Tensor | None:
    """The Lanczos tridiagonal matrix (float64, CPU) of ``alphas`` and ``betas``; ``None`` when not finite."""
    k = len(alphas)
    tridiagonal = torch.diag(torch.stack(alphas).double().cpu())
    if k > 1:
        off = torch.stack(betas[: k - 1]).double().cpu()
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    if not bool(torch.isfinite(tridiagonal).all()):  # a diverged loss: no eigenvalues to report
        return None
    return tridiagonal


def _ritz_values(alphas: list[Tensor], betas: list[Tensor]) -> Tensor:
    """Eigenvalues (ascending, float64, CPU) of the Lanczos tridiagonal matrix of ``alphas`` and ``betas``."""
    tridiagonal = _tridiagonal(alphas, betas)
    if tridiagonal is None:
        return torch.full((len(alphas),), math.nan, dtype=torch.float64)
    return torch.linalg.eigvalsh(tridiagonal)


def power_iteration(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    max_steps: int,
    *,
    tol: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The eigenvalue of largest magnitude by power iteration, stopping at relative change < ``tol`` (PyHessian).

    Kept for comparison: it converges slowly when the spectral gap is small, and returns the largest ``|λ|`` —
    which early in training can be a negative eigenvalue.
    """
    v = _random_unit(dim, dtype, torch.device(device), generator)
    value = torch.zeros((), dtype=torch.float64)
    for i in range(max_steps):
        w = matvec(v)
        new = torch.dot(w, v).double().cpu()
        norm = torch.linalg.vector_norm(w)
        if float(norm) == 0:
            return new
        v = w / norm
        if i > 0 and abs(float(new - value)) < tol * (abs(float(value)) + 1e-6):
            return new
        value = new
    return value


@overload
def hessian_eigenvalues(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    k: int = ...,
    which: Literal["largest", "smallest", "both"] = ...,
    *,
    method: Literal["lanczos", "power"] = ...,
    num_hvps: int = ...,
    hvp: HvpMethod = ...,
    generator: torch.Generator | None = ...,
    tol: float | None = ...,
    reorthogonalize: bool = ...,
    v0: Tensor | None = ...,
    return_vector: Literal[False] = ...,
) -> Tensor: ...


@overload
def hessian_eigenvalues(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    k: int = ...,
    which: Literal["largest", "smallest", "both"] = ...,
    *,
    method: Literal["lanczos", "power"] = ...,
    num_hvps: int = ...,
    hvp: HvpMethod = ...,
    generator: torch.Generator | None = ...,
    tol: float | None = ...,
    reorthogonalize: bool = ...,
    v0: Tensor | None = ...,
    return_vector: Literal[True],
) -> tuple[Tensor, Tensor | None]: ...


def hessian_eigenvalues(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    k: int = 1,
    which: Literal["largest", "smallest", "both"] = "largest",
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    num_hvps: int = 20,
    hvp: HvpMethod = "double_backward",
    generator: torch.Generator | None = None,
    tol: float | None = None,
    reorthogonalize: bool = True,
    v0: Tensor | None = None,
    return_vector: bool = False,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Extreme eigenvalues of the Hessian of ``loss_fn`` at ``params``, as a 1-D float64 tensor sorted descending.

    Args:
        loss_fn: recomputes the loss from the current parameters.
        params: the parameters.
        k: how many eigenvalues from each requested end.
        which: ``"largest"`` (the top ``k``), ``"smallest"`` (the bottom ``k``) or ``"both"`` (``2k`` values).
        method: ``"lanczos"`` (default; both ends from one run) or ``"power"`` (largest ``|λ|`` only, ``k=1``).
        num_hvps: Hessian-vector products to spend (Lanczos steps, or the power-iteration cap).
        hvp: how products are computed (see :class:`HessianVectorProduct`).
        generator: random stream of the start vector (use your own so training's RNG is untouched).
        tol: Lanczos only: stop before ``num_hvps`` products once the requested end(s) changed by less than ``tol``
            (relative to the largest magnitude) in one step (see :func:`lanczos`).
        reorthogonalize: Lanczos only: full reorthogonalisation (default); ``False`` is cheaper per product
            (no ``num_hvps × parameters`` basis) and enough for ``k=1`` (see :func:`lanczos`).
        v0: Lanczos only: the start vector (flat, one entry per parameter in ``params`` order), e.g. the Ritz
            vector of an earlier estimate: a warm start (see :func:`lanczos`); ``None``: random from ``generator``.
        return_vector: Lanczos only: return ``(eigenvalues, top_ritz_vector)`` (the vector may be ``None`` when the
            loss is not finite), to warm-start the next estimate.

    Example::

        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> loss = lambda: 3 * w[0] ** 2 + 0.5 * w[1] ** 2 - w[0] * w[1]  # Hessian [[6, -1], [-1, 1]]
        >>> [round(v, 6) for v in hessian_eigenvalues(loss, [w], which="both").tolist()]
        [6.192582, 0.807418]
        >>> values, vector = hessian_eigenvalues(loss, [w], return_vector=True)
        >>> round(float(values[0]), 6), [round(x, 4) for x in vector.abs().tolist()]  # a unit eigenvector
        (6.192582, [0.982, 0.1891])
        >>> round(float(hessian_eigenvalues(loss, [w], v0=vector, num_hvps=1)[0]), 6)  # warm: one product
        6.192582
    """
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"Expected `which` to be 'largest', 'smallest' or 'both', but got {which!r}.")
    if k < 1:
        raise ValueError(f"Expected `k` >= 1, but got {k}.")
    if num_hvps < 1:
        raise ValueError(f"Expected `num_hvps` >= 1, but got {num_hvps}.")
    op = HessianVectorProduct(loss_fn, params, hvp)
    try:
        if method == "power":
            if k != 1 or which != "largest":
                raise ValueError("`method='power'` finds only the eigenvalue of largest magnitude: use k=1, 'largest'.")
            if v0 is not None or return_vector:
                raise ValueError("`v0` and `return_vector` need `method='lanczos'`.")
            value = power_iteration(op, op.dim, num_hvps, dtype=op.dtype, device=op.device, generator=generator)
            return value.reshape(1)
        if method != "lanczos":
            raise ValueError(f"Expected `method` to be 'lanczos' or 'power', but got {method!r}.")
        vector: Tensor | None = None
        if return_vector:  # keeps the Lanczos vectors: only when asked
            ritz, vector = lanczos(
                op,
                op.dim,
                num_hvps,
                dtype=op.dtype,
                device=op.device,
                generator=generator,
                tol=tol,
                track_smallest=which != "largest",
                reorthogonalize=reorthogonalize,
                v0=v0,
                return_vector=True,
            )
        else:
            ritz = lanczos(
                op,
                op.dim,
                num_hvps,
                dtype=op.dtype,
                device=op.device,
                generator=generator,
                tol=tol,
                track_smallest=which != "largest",
                reorthogonalize=reorthogonalize,
                v0=v0,
            )
    finally:
        op.release()
    descending = ritz.flip(0).cpu()
    k = min(k, len(descending))
    if which == "largest":
        found = descending[:k]
    elif which == "smallest":
        found = descending[-k:]
    else:
        found = torch.cat([descending[:k], descending[-k:]]) if len(descending) > k else descending
    return (found, vector) if return_vector else found


# --------------------------------------------------------------------------------------------------------- trace


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate with its standard error (never a bare point estimate)."""

    value: float
    stderr: float
    num_hvps: int

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """The ``value ± z·stderr`` band (95 % for the default ``z``)."""
        return self.value - z * self.stderr, self.value + z * self.stderr


def _rademacher(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1


def hessian_trace(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    num_hvps: int = 30,
    *,
    method: Literal["hutchpp", "hutchinson"] = "hutchpp",
    hvp: HvpMethod = "double_backward",
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """Trace of the Hessian by Hutch++ (Meyer et al. 2021) or Hutchinson, with a standard error.

    Hutch++ spends a third of the products on a sketch ``Q`` of the dominant subspace, takes ``tr(QᵀHQ)`` exactly (a
    third), and estimates the rest with Hutchinson on ``(I − QQᵀ)`` (the last third); the standard error is that of
    the Hutchinson part (the sample standard deviation over √samples). With a few dominant eigenvalues — the usual
    Hessian spectrum — it is far more accurate than Hutchinson for the same budget.

    Args:
        loss_fn: recomputes the loss.
        params: the parameters.
        num_hvps: products to spend (Hutch++ needs at least 3).
        method: ``"hutchpp"`` or ``"hutchinson"``.
        hvp: how products are computed.
        generator: random stream of the probe vectors.
    """
    op = HessianVectorProduct(loss_fn, params, hvp)
    try:
        if method == "hutchinson":
            if num_hvps < 2:
                raise ValueError(f"Expected `num_hvps` >= 2 for a standard error, but got {num_hvps}.")
            samples = []
            for _ in range(num_hvps):
                z = _rademacher((op.dim,), op.dtype, generator).to(op.device)
                samples.append(float(torch.dot(z, op(z))))
            return _mean_and_stderr(samples, 0.0, op.num_products)
        if method != "hutchpp":
            raise ValueError(f"Expected `method` to be 'hutchpp' or 'hutchinson', but got {method!r}.")
        if num_hvps < 3:
            raise ValueError(f"Expected `num_hvps` >= 3 for Hutch++, but got {num_hvps}.")
        sketch = num_hvps // 3
        rest = num_hvps - 2 * sketch
        s = _rademacher((op.dim, sketch), op.dtype, generator).to(op.device)
        q, _ = torch.linalg.qr(torch.stack([op(s[:, j]) for j in range(sketch)], dim=1))
        exact = sum(float(torch.dot(q[:, j], op(q[:, j]))) for j in range(q.shape[1]))
        samples = []
        for _ in range(rest):
            g = _rademacher((op.dim,), op.dtype, generator).to(op.device)
            g = g - q @ (q.t() @ g)
            samples.append(float(torch.dot(g, op(g))))
        if len(samples) < 2:
            return TraceEstimate(exact + sum(samples), math.inf, op.num_products)
        return _mean_and_stderr(samples, exact, op.num_products)
    finally:
        op.release()


def _mean_and_stderr(samples: list[float], offset: float, num_hvps: int) -> TraceEstimate:
    t = torch.tensor(samples, dtype=torch.float64)
    return TraceEstimate(offset + float(t.mean()), float(t.std(correction=1)) / math.sqrt(len(samples)), num_hvps)


# ----------------------------------------------------------------------------------------------------- sharpness


def batch_sharpness(loss_fn: LossFn, params: Sequence[Tensor], hvp: HvpMethod = "double_backward") -> float:
    """``gᵀHg / ‖g‖²``: the curvature along the gradient (one product). For SGD this is what stabilises at 2/η."""
    op = HessianVectorProduct(loss_fn, params, hvp)
    try:
        g = op.gradient()
        norm_sq = float(torch.dot(g, g))
        if norm_sq == 0:
            return 0.0
        return float(torch.dot(g, op(g))) / norm_sq
    finally:
        op.release()


def sam_sharpness(loss_fn: LossFn, params: Sequence[Tensor], rho: float = 0.05, adaptive: bool = False) -> float:
    """``L(w + ε) − L(w)`` with SAM's ascent step ``ε = ρ g / ‖g‖`` (Foret et al. 2021).

    With ``adaptive=True`` the step is ASAM's (Kwon et al. 2021), ``ε = ρ T² g / ‖T g‖`` with ``T = |w|``, so it is
    invariant to rescaling the weights. The weights are restored bit-exactly.
    """
    params = list(params)
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, grads, strict=True)]
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
    """
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"Expected positive `scales`, but got {tuple(scales)}.")
    if num_directions < 1:
        raise ValueError(f"Expected `num_directions` >= 1, but got {num_directions}.")
    params = list(params)
    with torch.no_grad():
        base = float(loss_fn())
        directions = [_direction(params, filter_normalized, generator) for _ in range(num_directions)]
        increases = {}
        for scale in scales:
            total = 0.0
            for d in directions:
                with _perturbed(params, d, scale):
                    total += float(loss_fn()) - base
            increases[float(scale)] = total / num_directions
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


# ------------------------------------------------------------------------------------------- edge of stability

#: The optimizer families with a known stability threshold (see :func:`stability_threshold`).
StabilityKind = Literal["gd", "heavy_ball", "nesterov", "adam"]


def stability_threshold(
    kind: StabilityKind, lr: float, beta: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0
) -> float:
    """The largest curvature an optimizer is stable on, on a quadratic, for a fixed learning rate ``lr``.

    Along an eigendirection of curvature ``λ`` each of these updates is a linear recurrence that diverges once
    ``λ`` passes the threshold (the *edge of stability* of Cohen et al., ICLR 2021, where full-batch training hovers):

    * ``"gd"``: gradient descent, ``2/η``;
    * ``"heavy_ball"``: PyTorch SGD with momentum ``β`` and dampening ``d``, ``(2 + 2β)/(η(1 − d))`` (the recurrence
      ``b ← βb + (1 − d)g, w ← w − ηb`` is heavy ball with step ``η(1 − d)``);
    * ``"nesterov"``: PyTorch SGD with ``nesterov=True``, ``(2 + 2β)/((1 + 2β)η)`` (its characteristic polynomial has a
      root at −1 when ``ηλ = (2 + 2β)/(1 + 2β)``; ``dampening`` must be 0);
    * ``"adam"``: Adam/AdamW with ``β₁ = beta``, ``(2 + 2β₁)/((1 − β₁)η)`` (38/η for β₁ = 0.9). This bounds the
      *preconditioned* sharpness ``λ_max(P⁻¹H)`` (Cohen et al. 2022, "Adaptive gradient methods at the edge of
      stability"), see :func:`adam_preconditioner`.

    For the SGD kinds a coupled ``weight_decay`` adds ``weight_decay · I`` to the Hessian the update sees, so the
    threshold on the loss's own curvature is lowered by it. (For Adam the preconditioned threshold is returned as is.)

    Example::

        >>> stability_threshold("gd", 0.1), round(stability_threshold("heavy_ball", 0.1, beta=0.9), 6)
        (20.0, 38.0)
        >>> round(stability_threshold("nesterov", 0.1, beta=0.9), 4), round(stability_threshold("adam", 1e-3, 0.9))
        (13.5714, 38000)
    """
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"Expected `lr` to be a finite number > 0, but got {lr!r}.")
    if not 0 <= beta < 1:
        raise ValueError(f"Expected `beta` in [0, 1), but got {beta!r}.")
    if not 0 <= dampening < 1:
        raise ValueError(f"Expected `dampening` in [0, 1), but got {dampening!r}.")
    if kind == "gd":
        return 2 / lr - weight_decay
    if kind == "heavy_ball":
        return (2 + 2 * beta) / (lr * (1 - dampening)) - weight_decay
    if kind == "nesterov":
        return (2 + 2 * beta) / ((1 + 2 * beta) * lr) - weight_decay
    if kind == "adam":
        return (2 + 2 * beta) / ((1 - beta) * lr)
    raise ValueError(f"Expected `kind` to be one of 'gd', 'heavy_ball', 'nesterov', 'adam', but got {kind!r}.")


@dataclass(frozen=True)
class StabilityRule:
    """Which threshold an optimizer's sharpness is judged against (see :func:`stability_rule`).

    Attributes:
        kind: the optimizer family (``"gd"``, ``"heavy_ball"``, ``"nesterov"``, ``"adam"``), or ``"unknown"``.
        threshold: the threshold of :func:`stability_threshold`; NaN when ``kind`` is ``"unknown"``.
        preconditioned: whether the threshold applies to the preconditioned sharpness ``λ(P⁻¹H)`` (Adam).
        lr: the learning rate it was computed for (NaN when unknown).
        beta: the momentum (β₁ for Adam).
        reason: for ``"unknown"``, why no threshold is known.
        settled: ``False`` while the threshold does not apply yet: Adam before ``1/(1 − β₁)`` steps, when its
            first-moment average (the momentum the threshold is derived for) still warms up and ``P`` changes fast.
    """

    kind: str
    threshold: float
    preconditioned: bool = False
    lr: float = math.nan
    beta: float = 0.0
    reason: str = ""
    settled: bool = True

    @property
    def known(self) -> bool:
        """Whether there is a threshold."""
        return self.kind != "unknown"

    def ratio(self, measured: float) -> float:
        """``measured / threshold`` (NaN when unknown): above 1 the optimizer is past its edge of stability."""
        if not self.known or not self.threshold > 0:
            return math.nan
        return measured / self.threshold


def _scalar(value: object) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)  # type: ignore[arg-type]


def stability_rule(optimizer: torch.optim.Optimizer) -> StabilityRule:
    """The stability rule of an optimizer from its class and current hyperparameters.

    Known: :class:`torch.optim.SGD` (plain, momentum with dampening, Nesterov; coupled weight decay) and
    :class:`torch.optim.Adam` / :class:`torch.optim.AdamW` (``amsgrad`` too). All param groups that hold trainable
    parameters must share the learning rate and momentum (per-group learning rates would need a per-parameter
    threshold); otherwise, and for every other optimizer, the rule is ``"unknown"`` with the reason.

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> round(stability_rule(torch.optim.SGD([w], lr=0.1, momentum=0.9)).threshold, 6)
        38.0
        >>> rule = stability_rule(torch.optim.RMSprop([w]))
        >>> rule.kind, rule.ratio(3.0)
        ('unknown', nan)
    """
    name = type(optimizer).__name__
    groups = [g for g in optimizer.param_groups if any(p.requires_grad for p in g["params"])]
    if not groups:
        return StabilityRule("unknown", math.nan, reason=f"{name} has no trainable parameters")
    keys: tuple[str, ...]
    if isinstance(optimizer, torch.optim.SGD):
        keys = ("lr", "momentum", "dampening", "nesterov", "weight_decay")
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        keys = ("lr", "betas")
    else:
        return StabilityRule(
            "unknown", math.nan, reason=f"no stability threshold is known for {name} (known: SGD, Adam, AdamW)"
        )
    settings = [tuple(_scalar(g[k]) if k != "betas" else tuple(g[k]) for k in keys) for g in groups]
    if len(set(settings)) > 1:
        return StabilityRule(
            "unknown",
            math.nan,
            reason=f"the param groups of {name} differ in {'/'.join(keys)}: {sorted(set(settings))}",
        )
    group = groups[0]
    lr = _scalar(group["lr"])
    if not 0 < lr < math.inf:
        return StabilityRule("unknown", math.nan, reason=f"{name} has learning rate {lr}")
    if isinstance(optimizer, torch.optim.SGD):
        beta, dampening = float(group["momentum"]), float(group["dampening"])
        weight_decay = float(group["weight_decay"])
        if beta == 0:
            kind: StabilityKind = "gd"
        elif group["nesterov"]:
            kind = "nesterov"
        else:
            kind = "heavy_ball"
        if not (0 <= beta < 1 and 0 <= dampening < 1):
            return StabilityRule("unknown", math.nan, reason=f"SGD with momentum {beta}, dampening {dampening}")
        threshold = stability_threshold(kind, lr, beta, dampening if kind == "heavy_ball" else 0.0, weight_decay)
        return StabilityRule(kind, threshold, False, lr, beta)
    beta1 = float(group["betas"][0])
    steps = [_scalar(state["step"]) for state in optimizer.state.values() if "step" in state]
    settled = bool(steps) and max(steps) >= 1 / (1 - beta1)
    return StabilityRule("adam", stability_threshold("adam", lr, beta1), True, lr, beta1, settled=settled)


def adam_preconditioner(
    exp_avg_sq: Tensor, step: float, betas: tuple[float, float], eps: float, amsgrad_max: Tensor | None = None
) -> Tensor:
    """Adam's diagonal preconditioner ``P = (1 − β₁ᵗ)(√(v / (1 − β₂ᵗ)) + ε)`` at step ``t`` (Cohen et al. 2022).

    Adam's update is ``η m / ((1 − β₁ᵗ)(√v̂ + ε))`` with ``m`` an EMA of gradients, i.e. preconditioned heavy ball
    with preconditioner ``P``; with ``P`` frozen it is stable while ``λ_max(P⁻¹H) < (2 + 2β₁)/((1 − β₁)η)``.

    Args:
        exp_avg_sq: Adam's second-moment state ``v`` of one parameter.
        step: Adam's step count ``t`` (> 0).
        betas: ``(β₁, β₂)``.
        eps: Adam's ``ε``.
        amsgrad_max: with ``amsgrad=True``, the ``max_exp_avg_sq`` state (used instead of ``v``).
    """
    if step <= 0:
        raise ValueError(f"Expected `step` > 0 (Adam has taken a step), but got {step}.")
    beta1, beta2 = betas
    v = exp_avg_sq if amsgrad_max is None else amsgrad_max
    return (1 - beta1**step) * ((v.detach() / (1 - beta2**step)).sqrt() + eps)


def optimizer_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor]] | None:
    """The parameters Adam/AdamW has state for, and their :func:`adam_preconditioner` (``None`` before any step)."""
    kept, preconditioners = [], []
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for p in params:
        state = optimizer.state.get(p)
        group = groups.get(id(p))
        if not state or group is None or "exp_avg_sq" not in state:
            continue
        step = _scalar(state["step"])
        if step <= 0:
            continue
        amsgrad = state.get("max_exp_avg_sq") if group.get("amsgrad") else None
        betas = (float(group["betas"][0]), float(group["betas"][1]))
        kept.append(p)
        preconditioners.append(adam_preconditioner(state["exp_avg_sq"], step, betas, float(group["eps"]), amsgrad))
    return (kept, preconditioners) if kept else None


def preconditioned_sharpness(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    preconditioner: Sequence[Tensor],
    num_hvps: int = 20,
    *,
    hvp: HvpMethod = "double_backward",
    generator: torch.Generator | None = None,
    tol: float | None = None,
    reorthogonalize: bool = True,
) -> float:
    """``λ_max(P⁻¹H)``, as ``λ_max(P^{-1/2} H P^{-1/2})`` (same spectrum, symmetric) by Lanczos.

    Args:
        loss_fn: recomputes the loss.
        params: the parameters.
        preconditioner: a positive diagonal ``P`` per parameter (same shapes), e.g. :func:`adam_preconditioner`.
        num_hvps: Lanczos steps (one Hessian-vector product each).
        hvp: how products are computed.
        generator: random stream of the start vector.
        tol: stop early once the estimate changes by less than ``tol`` (relative) in one step.
        reorthogonalize: full reorthogonalisation of the Lanczos basis (see :func:`lanczos`).

    Example::

        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> loss = lambda: 3 * w[0] ** 2 + 0.5 * w[1] ** 2  # Hessian diag(6, 1)
        >>> p = torch.tensor([3.0, 0.25], dtype=torch.float64)  # P⁻¹H = diag(2, 4)
        >>> round(preconditioned_sharpness(loss, [w], [p]), 6)
        4.0
    """
    if num_hvps < 1:
        raise ValueError(f"Expected `num_hvps` >= 1, but got {num_hvps}.")
    op = HessianVectorProduct(loss_fn, params, hvp)
    scale = _flat([q.detach().to(op.dtype) for q in preconditioner]).rsqrt()
    try:
        ritz = lanczos(
            lambda v: scale * op(scale * v),
            op.dim,
            num_hvps,
            dtype=op.dtype,
            device=op.device,
            generator=generator,
            tol=tol,
            reorthogonalize=reorthogonalize,
        )
    finally:
        op.release()
    return float(ritz.max())


def preconditioned_batch_sharpness(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    preconditioner: Sequence[Tensor] | None = None,
    hvp: HvpMethod = "double_backward",
) -> float:
    """``uᵀHu / gᵀu`` with ``u = P⁻¹g``: the curvature along the optimizer's step, in the metric of ``P``.

    It is the Rayleigh quotient of ``P^{-1/2} H P^{-1/2}`` along ``P^{-1/2} g``, so it never exceeds
    :func:`preconditioned_sharpness`; without ``P`` it is :func:`batch_sharpness` (``gᵀHg / ‖g‖²``). One gradient and
    one Hessian-vector product. (The preconditioned form is this library's extension of batch sharpness to Adam.)
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
