"""Loss-landscape curvature from Hessian-vector products: eigenvalues, trace, sharpness, the edge of stability.

Pure functions over a loss closure and a list of parameters; no Lightning. ``loss_fn()`` must recompute the loss from
the current parameter values (it is called at perturbed weights). Use :func:`isolated` around any of these to leave
training undisturbed: it restores weights, ``.grad``, buffers (BatchNorm running statistics) and the RNG states, and
fixes the dropout masks within one estimate so every evaluation sees the same function of the weights.

Hessian-vector products (:class:`HessianVectorProduct`):

* ``"double_backward"`` (default): exact, builds the gradient graph once and differentiates it again per product,
  under :func:`exact_kernels` (the math attention kernel instead of the fused ones, cuDNN off: both have no double
  backward);
* ``"finite_difference"``: central differences of two gradients along ``v``, with a step scaled per parameter
  tensor (``ε_dtype^(1/3)`` times ``1 + RMS`` of the tensors ``v`` moves), shrunk where the forward and backward
  differences disagree (a kink of a ReLU network, see :class:`HessianVectorProduct`); runs the same kernels as
  training, keeps no graph, and works wherever ``loss.backward()`` does (reentrant checkpointing, through
  :func:`backward_gradients`);
* ``"auto"``: the exact product when the model has one, finite differences otherwise (:func:`choose_method`).

Where each concept lives:

* :mod:`~lightning_gradflow.curvature.hvp`: Hessian-vector products, :func:`isolated`, :func:`fixed_dropout`;
* :mod:`~lightning_gradflow.curvature.spectrum`: Lanczos, power iteration, λ_max/λ_min, the trace (Hutch++),
  Adam's preconditioned λ_max, warm starts;
* :mod:`~lightning_gradflow.curvature.sharpness`: batch sharpness (plain and preconditioned: one definition), SAM
  and random-perturbation sharpness;
* :mod:`~lightning_gradflow.curvature.stability`: stability thresholds and rules per optimizer, Adam's
  preconditioner, and :class:`StabilityController`, the learning-rate decisions of ``SharpnessCallback``;
* :mod:`~lightning_gradflow.curvature.probe`: :class:`ProbePlan`, what one probe measures and how.
"""

from lightning_gradflow.curvature.hvp import (
    HVP_METHODS,
    HessianVectorProduct,
    HvpMethod,
    LossFn,
    _dense,
    _flat,
    _unflat,
    backward_gradients,
    choose_method,
    exact_kernels,
    fixed_dropout,
    gradients,
    isolated,
)
from lightning_gradflow.curvature.probe import (
    MAX_DIRECTIONS,
    MAX_HVPS,
    MAX_PERTURBATION,
    METRICS,
    ProbePlan,
)
from lightning_gradflow.curvature.sharpness import (
    DEFAULT_SCALES,
    RandomSharpness,
    SharpnessClass,
    _direction,
    _perturbed,
    batch_sharpness,
    preconditioned_batch_sharpness,
    random_sharpness,
    sam_sharpness,
)
from lightning_gradflow.curvature.spectrum import (
    TraceEstimate,
    WarmStart,
    _mean_and_stderr,
    _rademacher,
    _random_unit,
    _ritz_values,
    _start_vector,
    _tridiagonal,
    hessian_eigenvalues,
    hessian_trace,
    lanczos,
    power_iteration,
    preconditioned_sharpness,
)
from lightning_gradflow.curvature.stability import (
    DEFAULT_INCREASE_BELOW,
    DEFAULT_LR_FACTOR,
    DEFAULT_MARGIN,
    DEFAULT_MIN_LR_FACTOR,
    DEFAULT_PATIENCE,
    StabilityController,
    StabilityDecision,
    StabilityKind,
    StabilityRule,
    _scalar,
    adam_preconditioner,
    optimizer_preconditioner,
    stability_rule,
    stability_threshold,
)

__all__ = [
    "DEFAULT_INCREASE_BELOW",
    "DEFAULT_LR_FACTOR",
    "DEFAULT_MARGIN",
    "DEFAULT_MIN_LR_FACTOR",
    "DEFAULT_PATIENCE",
    "DEFAULT_SCALES",
    "HVP_METHODS",
    "MAX_DIRECTIONS",
    "MAX_HVPS",
    "MAX_PERTURBATION",
    "METRICS",
    "HessianVectorProduct",
    "HvpMethod",
    "LossFn",
    "ProbePlan",
    "RandomSharpness",
    "SharpnessClass",
    "StabilityController",
    "StabilityDecision",
    "StabilityKind",
    "StabilityRule",
    "TraceEstimate",
    "WarmStart",
    "adam_preconditioner",
    "backward_gradients",
    "batch_sharpness",
    "choose_method",
    "exact_kernels",
    "fixed_dropout",
    "gradients",
    "hessian_eigenvalues",
    "hessian_trace",
    "isolated",
    "lanczos",
    "optimizer_preconditioner",
    "power_iteration",
    "preconditioned_batch_sharpness",
    "preconditioned_sharpness",
    "random_sharpness",
    "sam_sharpness",
    "stability_rule",
    "stability_threshold",
]

# private helpers that were importable from the single-file module: kept importable
_PRIVATE = (
    _dense,
    _direction,
    _flat,
    _mean_and_stderr,
    _perturbed,
    _rademacher,
    _random_unit,
    _ritz_values,
    _scalar,
    _start_vector,
    _tridiagonal,
    _unflat,
)
