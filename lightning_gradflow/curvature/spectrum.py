"""Eigenvalues and trace of a Hessian from its products: Lanczos, power iteration, Hutch++, and warm starts.

Every estimator here takes a loss closure and parameters (or a matrix-vector product) and spends Hessian-vector
products (:class:`~lightning_gradflow.curvature.hvp.HessianVectorProduct`), the unit of cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor

from lightning_gradflow.curvature.hvp import (
    HessianVectorProduct,
    HvpMethod,
    LossFn,
    _flat,
)


def _random_unit(
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    v = torch.randn(dim, dtype=dtype, device="cpu", generator=generator).to(device)
    return v / torch.linalg.vector_norm(v)


def _start_vector(
    v0: Tensor | None,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
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
            value = power_iteration(
                op,
                op.dim,
                num_hvps,
                dtype=op.dtype,
                device=op.device,
                generator=generator,
            )
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


class WarmStart:
    """The top Ritz vector of the last λ_max estimate, to start the next Lanczos run from (a warm start).

    The top Hessian eigenvector changes slowly between probes, so a run started from the previous top Ritz vector
    converges in a few products. The vector is kept flat and detached on the parameters' device, and dropped when the
    parameters' shapes, dtype or device change or an estimate is not finite.

    Example::

        >>> w = torch.zeros(3, requires_grad=True)
        >>> warm = WarmStart()
        >>> warm.start([w], "largest", torch.Generator()) is None  # nothing kept yet: a cold start
        True
        >>> warm.keep([w], torch.tensor([1.0, 0.0, 0.0]))
        >>> warm.start([w], "largest", torch.Generator()).tolist()
        [1.0, 0.0, 0.0]
        >>> warm.start([torch.zeros(2)], "largest", torch.Generator()) is None  # other shapes: dropped
        True
    """

    def __init__(self) -> None:
        self.vector: Tensor | None = None
        self._key: tuple[Any, ...] | None = None

    @staticmethod
    def _params_key(params: Sequence[Tensor]) -> tuple[Any, ...]:
        return (tuple(tuple(p.shape) for p in params), params[0].dtype, params[0].device) if params else ()

    def start(self, params: Sequence[Tensor], which: str, generator: torch.Generator) -> Tensor | None:
        """The start vector of the next run (``None``: cold).

        For ``which="both"`` it is the kept vector plus an equal-norm random one: a start close to the top eigenvector
        has almost no weight on the bottom ones, and λ_min could then look converged before it is.
        """
        vector = self.vector
        if vector is None or self._key != self._params_key(params):
            self.clear()
            return None
        if which == "largest":
            return vector
        noise = torch.randn(vector.numel(), generator=generator, dtype=vector.dtype).to(vector.device)
        return vector / torch.linalg.vector_norm(vector) + noise / torch.linalg.vector_norm(noise)

    def keep(self, params: Sequence[Tensor], vector: Tensor | None) -> None:
        """Keeps ``vector`` (the last run's top Ritz vector) for the next run; a missing or non-finite one clears."""
        if vector is None or not bool(torch.isfinite(vector).all()):
            self.clear()
            return
        self.vector = vector.detach()
        self._key = self._params_key(params)

    def clear(self) -> None:
        """Forgets the kept vector: the next run starts cold."""
        self.vector = self._key = None


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
    return TraceEstimate(
        offset + float(t.mean()),
        float(t.std(correction=1)) / math.sqrt(len(samples)),
        num_hvps,
    )


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
