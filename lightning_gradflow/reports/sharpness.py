"""What SharpnessCallback reports: its metrics from a probe's values, and its warning and record texts.

Pure: dicts and strings from floats and the pure rules; nothing here measures, decides or imports Lightning. What a
probe measures is :class:`~lightning_gradflow.curvature.ProbePlan`'s, which threshold applies
:func:`~lightning_gradflow.curvature.stability_rule`'s, when the learning rate changes
:class:`~lightning_gradflow.curvature.StabilityController`'s.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from lightning_gradflow.curvature import ProbePlan, SharpnessClass, StabilityRule

FAMILY = "sharpness"

#: ``sharpness/class`` as a number: 0 flat, 1 moderate, 2 sharp, 3 very sharp.
CLASS_INDEX = {label: float(i) for i, label in enumerate(SharpnessClass)}


def sharpness_metrics(
    values: Mapping[str, float], requested: Collection[str], rule: StabilityRule, plan: ProbePlan
) -> dict[str, float]:
    """The metrics of one probe from its (reduced) values, by key (see :class:`~lightning_gradflow.SharpnessCallback`).

    Args:
        values: the probe's values by :meth:`ProbePlan.keys` name.
        requested: the callback's ``metrics``: a quantity measured only for the stability ratio is logged through it
            (as ``sharpness/<quantity>`` unless preconditioned), not on its own.
        rule: the optimizer's stability rule.
        plan: what the probe measured (its stability quantity).

    Example::

        >>> from lightning_gradflow.curvature import ProbePlan, StabilityRule
        >>> rule = StabilityRule("gd", threshold=20.0, lr=0.1)
        >>> plan = ProbePlan(("batch_sharpness", "stability_ratio"), quantity="batch_sharpness")
        >>> sharpness_metrics({"batch_sharpness": 25.0}, plan.metrics, rule, plan)
        {'sharpness/batch_sharpness': 25.0, 'sharpness/stability_ratio': 1.25, 'sharpness/threshold': 20.0}
    """
    metrics: dict[str, float] = {}
    for name, value in values.items():
        if name == "random_score":
            metrics[f"{FAMILY}/class"] = CLASS_INDEX[SharpnessClass.of(value)] if math.isfinite(value) else value
        elif name in ("lambda_max", "lambda_min", "batch_sharpness") and name not in requested:
            continue  # measured only for the stability ratio: logged through it
        else:
            metrics[f"{FAMILY}/{name}"] = value
    if "stability_ratio" in requested:
        measured = values.get(plan.stability_key, math.nan)
        metrics[f"{FAMILY}/stability_ratio"] = rule.ratio(measured)
        metrics[f"{FAMILY}/threshold"] = rule.threshold
        if plan.quantity not in requested and not rule.preconditioned:
            metrics[f"{FAMILY}/{plan.quantity}"] = measured
    return metrics


def stability_detail(values: Mapping[str, float], rule: StabilityRule, plan: ProbePlan) -> str:
    """What the stability ratio compared, for the controller's reasons: ``"<quantity> <value> vs threshold ..."``.

    Example::

        >>> from lightning_gradflow.curvature import ProbePlan, StabilityRule
        >>> plan = ProbePlan(("batch_sharpness", "stability_ratio"), quantity="batch_sharpness")
        >>> stability_detail({"batch_sharpness": 25.0}, StabilityRule("gd", threshold=20.0, lr=0.1), plan)
        'batch_sharpness 25 vs threshold 20 (gd, lr 0.1)'
    """
    measured = values.get(plan.stability_key, math.nan)
    what = f"{'preconditioned ' if rule.preconditioned else ''}{plan.quantity} {measured:.4g}"
    return f"{what} vs threshold {rule.threshold:.4g} ({rule.kind}, lr {rule.lr:.4g})"


def unknown_rule_message(reason: str) -> str:
    """The warning when the optimizer has no known stability threshold."""
    return (
        f"{reason}, so `sharpness/stability_ratio` is logged as NaN and the learning rate is never changed. The other"
        " sharpness metrics are still measured."
    )


def probe_failed_message(step: int, error: BaseException, hvp: str) -> str:
    """The warning of a probe that raised, with what to try for the given ``hvp`` mode."""
    if hvp == "double_backward":
        advice = (
            "With `hvp='double_backward'`, try `hvp='finite_difference'` (no double backward: it works with"
            " kernels and compiled code that cannot be differentiated twice), or override `loss_fn` to run the"
            " model eagerly"
        )
    else:
        advice = (
            "The products already avoid double backward (`hvp='finite_difference'`), so the model fails at the"
            " probe's batch or perturbed weights: override `loss_fn`, or measure fewer `metrics`"
        )
    return f"the probe at step {step} failed ({type(error).__name__}: {error}); logging NaN. {advice}."


NO_PARAMETERS_MESSAGE = (
    "the module has no trainable parameters, so there is no curvature to measure; nothing is logged."
    " Unfreeze parameters, or remove the callback."
)

NO_GRAPH_MESSAGE = (
    "the probe loss does not depend on the trainable parameters (it has no grad_fn: `training_step`"
    " detached it or computed it under `torch.no_grad()`), so there is no curvature to measure; logging"
    " NaN. Return the loss with its graph, or override `loss_fn(pl_module, batch)`."
)


def not_a_loss_message(callback: str, returned: object) -> str:
    """The error for a ``training_step`` that returned something other than a scalar loss."""
    return (
        f"{callback}: `training_step` returned {type(returned).__name__}, not a scalar loss tensor (or a dict with"
        " one under 'loss'). Override `SharpnessCallback.loss_fn(pl_module, batch)` to return the loss."
    )


def manual_optimization_message(callback: str) -> str:
    """The error for manual optimization without an own ``loss_fn``."""
    return (
        f"{callback} calls `training_step` to get the loss, which under manual optimization would step the"
        " optimizer. Subclass it and override `loss_fn(pl_module, batch)` to return the loss without"
        " stepping, or use automatic optimization."
    )


def half_precision_message(dtype: object, hvp: str) -> str:
    """The warning of a probe in float16/bfloat16 parameters, with what to do for the given ``hvp`` mode."""
    if hvp == "finite_difference":
        advice = "where finite differences are coarse: use `hvp='double_backward'` (exact products), or"
    else:
        advice = "which keeps only 2-3 significant digits: for accurate curvature"
    return (
        f"the parameters are {dtype}, so the probe's Hessian-vector products are computed in {dtype}, {advice}"
        " train with mixed precision (float32 weights: `precision='16-mixed'` or `'bf16-mixed'`)."
    )


def at_floor_message(step: int, reason: str, min_lr_factor: float) -> str:
    """The warning of a decrease the ``min_lr_factor`` floor does not allow."""
    return (
        f"step {step}: {reason}, but the learning rate is already at `min_lr_factor={min_lr_factor:g}` of its original"
        " value; lower `min_lr_factor`, or look for the cause."
    )


def would_scale_message(step: int, reason: str, callback: str, factor: float) -> str:
    """The warning of a monitoring-only run past its edge of stability."""
    return (
        f"step {step}: {reason}. Training is past its edge of stability (expect oscillating or diverging loss). With"
        f" `auto_intervene=True` {callback} would multiply the learning rate by {factor:g}; or lower it yourself."
    )


def scaled_message(step: int, reason: str, factor: float, cumulative: float) -> str:
    """The warning of the first learning-rate decrease."""
    return (
        f"step {step}: {reason}. Learning rate multiplied by {factor:g} (cumulative {cumulative:g}); further changes"
        " are only listed in `interventions` and logged."
    )
