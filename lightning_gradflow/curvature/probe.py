"""One curvature probe as a plain object: which quantities to measure, and measuring them on a loss closure.

:class:`ProbePlan` is what ``SharpnessCallback`` measures at a probe step, without Lightning: give it a loss
closure and the parameters (inside :func:`~lightning_gradflow.curvature.hvp.isolated`) and it returns the raw values by
name. Every plan returns the same keys whatever happens (:meth:`ProbePlan.keys`), so ranks can reduce them together.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_gradflow.checks import check_bool, check_float, check_int
from lightning_gradflow.curvature.hvp import HVP_METHODS, HvpMethod, LossFn, choose_method
from lightning_gradflow.curvature.sharpness import (
    DEFAULT_SCALES,
    batch_sharpness,
    random_sharpness,
    sam_sharpness,
)
from lightning_gradflow.curvature.spectrum import (
    WarmStart,
    hessian_eigenvalues,
    hessian_trace,
    preconditioned_sharpness,
)

#: The quantities a probe can measure.
METRICS: tuple[str, ...] = (
    "lambda_max",
    "lambda_min",
    "trace",
    "batch_sharpness",
    "sam",
    "random",
    "stability_ratio",
)

#: The most Hessian-vector products one estimate may spend (``num_hvps``, ``trace_hvps``) and the most random
#: directions of ``random`` sharpness: far beyond any useful value (each product costs about two training steps),
#: and small enough that a mistyped value fails at construction instead of hanging or exhausting memory in a hook.
MAX_HVPS = 10_000
MAX_DIRECTIONS = 10_000
#: The largest perturbation size (SAM's ρ, the relative scales of ``random``): a thousand times the weights is far
#: past any meaningful sharpness, and larger steps overflow float32 arithmetic inside the probe.
MAX_PERTURBATION = 1e3


@dataclass(frozen=True)
class ProbePlan:
    """What one probe measures, and how; every setting is checked on construction (the bounds above).

    Attributes:
        metrics: a selection of :data:`METRICS`.
        quantity: what the stability ratio compares: ``"lambda_max"`` or ``"batch_sharpness"``.
        preconditioned: the ratio is on Adam's preconditioned quantity (``preconditioned_<quantity>``).
        hvp: how Hessian-vector products are computed (``"auto"``: resolved at each :meth:`measure`; resolve it once
            with :meth:`resolve` and measure with the returned plan).
        num_hvps: the most Lanczos steps of a λ_max/λ_min estimate.
        lanczos_tol: the Lanczos early stop (``None``: always ``num_hvps``).
        trace_hvps: products of the trace estimate.
        sam_rho: SAM's radius.
        sam_adaptive: ASAM's perturbation.
        random_scales: relative perturbation sizes of ``random``.
        random_directions: random directions per scale.

    Example::

        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> loss = lambda: 3 * w[0] ** 2 + 0.5 * w[1] ** 2  # Hessian diag(6, 1)
        >>> plan = ProbePlan(("lambda_max", "lambda_min", "trace"))
        >>> plan.keys()
        ['lambda_max', 'lambda_min', 'trace', 'trace_stderr']
        >>> values = plan.measure(loss, [w], seed=0)
        >>> round(values["lambda_max"], 6), round(values["lambda_min"], 6), round(values["trace"], 6)
        (6.0, 1.0, 7.0)
    """

    metrics: tuple[str, ...]
    quantity: Literal["lambda_max", "batch_sharpness"] = "batch_sharpness"
    preconditioned: bool = False
    hvp: HvpMethod = "double_backward"
    num_hvps: int = 20
    lanczos_tol: float | None = 1e-3
    trace_hvps: int = 30
    sam_rho: float = 0.05
    sam_adaptive: bool = False
    random_scales: tuple[float, ...] = DEFAULT_SCALES
    random_directions: int = 4

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"Expected `metrics` to be a non-empty selection of {METRICS}, but got {self.metrics}.")
        if self.quantity not in ("lambda_max", "batch_sharpness"):
            raise ValueError(f"Expected `quantity` to be 'lambda_max' or 'batch_sharpness', but got {self.quantity!r}.")
        check_bool("preconditioned", self.preconditioned)
        if self.hvp not in HVP_METHODS:
            raise ValueError(
                f"Expected `hvp` to be 'auto', 'double_backward' or 'finite_difference', but got {self.hvp!r}."
            )
        check_int("num_hvps", self.num_hvps, 1, MAX_HVPS, "Hessian-vector products per Lanczos run")
        if self.lanczos_tol is not None:
            check_float("lanczos_tol", self.lanczos_tol, 0.0, math.inf)
        check_int("trace_hvps", self.trace_hvps, 3, MAX_HVPS, "products per trace estimate; Hutch++ needs three thirds")
        size = "a perturbation size; larger ones overflow the probe's float32 arithmetic"
        check_float("sam_rho", self.sam_rho, 0.0, MAX_PERTURBATION, closed_high=True, what=size)
        check_bool("sam_adaptive", self.sam_adaptive)
        if not self.random_scales:
            raise ValueError("Expected `random_scales` to be a non-empty tuple of floats, but got ().")
        for scale in self.random_scales:
            check_float("random_scales", scale, 0.0, MAX_PERTURBATION, closed_high=True, what=size)
        check_int("random_directions", self.random_directions, 1, MAX_DIRECTIONS, "random directions per scale")

    @property
    def _ratio(self) -> bool:
        return "stability_ratio" in self.metrics

    @property
    def needs_eigenvalues(self) -> bool:
        """Whether a Lanczos run is needed (λ_max/λ_min asked for, or the ratio's unpreconditioned λ_max)."""
        wanted = set(self.metrics)
        return bool(wanted & {"lambda_max", "lambda_min"}) or (
            self._ratio and self.quantity == "lambda_max" and not self.preconditioned
        )

    @property
    def needs_batch_sharpness(self) -> bool:
        """Whether the (unpreconditioned) batch sharpness is needed."""
        return "batch_sharpness" in self.metrics or (
            self._ratio and self.quantity == "batch_sharpness" and not self.preconditioned
        )

    @property
    def stability_key(self) -> str:
        """The key of the value the stability ratio is computed from."""
        return f"preconditioned_{self.quantity}" if self.preconditioned else self.quantity

    def keys(self) -> list[str]:
        """The keys :meth:`measure` returns, in order (the same on every rank)."""
        keys = []
        if self.needs_eigenvalues:
            keys.append("lambda_max")
            if "lambda_min" in self.metrics:
                keys.append("lambda_min")
        if self.needs_batch_sharpness:
            keys.append("batch_sharpness")
        if self._ratio and self.preconditioned:
            keys.append(self.stability_key)
        if "trace" in self.metrics:
            keys += ["trace", "trace_stderr"]
        if "sam" in self.metrics:
            keys.append("sam")
        if "random" in self.metrics:
            keys += [f"random/{scale:g}" for scale in self.random_scales] + ["random_score"]
        return keys

    def resolve(self, loss_fn: LossFn, params: Sequence[Tensor]) -> tuple[ProbePlan, Exception | None]:
        """This plan with ``hvp="auto"`` made concrete, and the error that ruled out the exact product.

        The choice is :func:`~lightning_gradflow.curvature.hvp.choose_method`'s; the error is ``None`` when the exact
        product works or the method was already set.

        Example::

            >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
            >>> plan, error = ProbePlan(("lambda_max",), hvp="auto").resolve(lambda: (w**3).sum(), [w])
            >>> plan.hvp, error
            ('double_backward', None)
        """
        if self.hvp != "auto":
            return self, None
        method, error = choose_method(loss_fn, params)
        return dataclasses.replace(self, hvp=method), error

    def nan(self) -> dict[str, float]:
        """Every key as NaN: what a probe that could not measure reports."""
        return dict.fromkeys(self.keys(), math.nan)

    def measure(
        self,
        loss_fn: LossFn,
        params: Sequence[Tensor],
        seed: int,
        preconditioner: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
        warm: WarmStart | None = None,
    ) -> dict[str, float]:
        """The raw values by :meth:`keys`.

        Args:
            loss_fn: recomputes the loss from the current parameters (wrap it in
                :func:`~lightning_gradflow.curvature.hvp.fixed_dropout` and run inside
                :func:`~lightning_gradflow.curvature.hvp.isolated`).
            params: the parameters.
            seed: seed of every random stream of this probe (start vectors, probe directions).
            preconditioner: for the preconditioned ratio, the parameters Adam has state for and its diagonal for each
                (:func:`~lightning_gradflow.curvature.stability.optimizer_preconditioner`); ``None``: NaN.
            warm: a :class:`~lightning_gradflow.curvature.spectrum.WarmStart` to start λ_max from and to update
                (``None``: every run starts cold).
        """
        if self.hvp == "auto":
            return self.resolve(loss_fn, params)[0].measure(loss_fn, params, seed, preconditioner, warm)
        out: dict[str, float] = {}

        def generator() -> torch.Generator:
            return torch.Generator().manual_seed(seed)

        if self.needs_eigenvalues:
            which: Literal["largest", "both"] = "both" if "lambda_min" in self.metrics else "largest"
            reorthogonalize = which == "both"  # λ_max alone needs no basis (see `lanczos`)
            if warm is None:  # no Lanczos vectors kept
                eig = hessian_eigenvalues(
                    loss_fn,
                    params,
                    1,
                    which,
                    num_hvps=self.num_hvps,
                    hvp=self.hvp,
                    generator=generator(),
                    tol=self.lanczos_tol,
                    reorthogonalize=reorthogonalize,
                )
            else:
                eig, vector = hessian_eigenvalues(
                    loss_fn,
                    params,
                    1,
                    which,
                    num_hvps=self.num_hvps,
                    hvp=self.hvp,
                    generator=generator(),
                    tol=self.lanczos_tol,
                    reorthogonalize=reorthogonalize,
                    v0=warm.start(params, which, generator()),
                    return_vector=True,
                )
                warm.keep(params, vector if math.isfinite(float(eig[0])) else None)
            out["lambda_max"] = float(eig[0])
            if which == "both":
                out["lambda_min"] = float(eig[-1])
        if self.needs_batch_sharpness:
            out["batch_sharpness"] = batch_sharpness(loss_fn, params, self.hvp)
        if self._ratio and self.preconditioned:
            out[self.stability_key] = self._preconditioned(loss_fn, preconditioner, generator)
        if "trace" in self.metrics:
            estimate = hessian_trace(loss_fn, params, self.trace_hvps, hvp=self.hvp, generator=generator())
            out["trace"], out["trace_stderr"] = estimate.value, estimate.stderr
        if "sam" in self.metrics:
            out["sam"] = sam_sharpness(loss_fn, params, self.sam_rho, adaptive=self.sam_adaptive)
        if "random" in self.metrics:
            found = random_sharpness(
                loss_fn,
                params,
                self.random_scales,
                self.random_directions,
                generator=generator(),
            )
            for scale, increase in found.increases.items():
                out[f"random/{scale:g}"] = increase
            out["random_score"] = found.score
        return out

    def _preconditioned(
        self,
        loss_fn: LossFn,
        preconditioner: tuple[Sequence[Tensor], Sequence[Tensor]] | None,
        generator: Callable[[], torch.Generator],
    ) -> float:
        if preconditioner is None:
            return math.nan
        kept, diagonal = preconditioner
        if self.quantity == "lambda_max":
            return preconditioned_sharpness(
                loss_fn,
                kept,
                diagonal,
                self.num_hvps,
                hvp=self.hvp,
                generator=generator(),
                tol=self.lanczos_tol,
                reorthogonalize=False,
            )
        return batch_sharpness(loss_fn, kept, self.hvp, diagonal)
