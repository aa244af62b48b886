"""The edge of stability: optimizer thresholds, Adam's preconditioner, and the controller that keeps a run below.

:class:`StabilityController` is the decision half of ``SharpnessCallback`` as a plain object (observe a stability
ratio → verdict → the factor to apply, with ``state_dict``): no Lightning, usable from a Fabric or plain PyTorch loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_gradflow.checks import check_bool, check_finite, check_float, check_int

# ------------------------------------------------------------------------------------------- edge of stability

#: The optimizer families with a known stability threshold (see :func:`stability_threshold`).
StabilityKind = Literal["gd", "heavy_ball", "nesterov", "adam"]


def stability_threshold(
    kind: StabilityKind,
    lr: float,
    beta: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
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
            "unknown",
            math.nan,
            reason=f"no stability threshold is known for {name} (known: SGD, Adam, AdamW)",
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
            return StabilityRule(
                "unknown",
                math.nan,
                reason=f"SGD with momentum {beta}, dampening {dampening}",
            )
        threshold = stability_threshold(kind, lr, beta, dampening if kind == "heavy_ball" else 0.0, weight_decay)
        return StabilityRule(kind, threshold, False, lr, beta)
    beta1 = float(group["betas"][0])
    steps = [_scalar(state["step"]) for state in optimizer.state.values() if "step" in state]
    settled = bool(steps) and max(steps) >= 1 / (1 - beta1)
    return StabilityRule("adam", stability_threshold("adam", lr, beta1), True, lr, beta1, settled=settled)


def adam_preconditioner(
    exp_avg_sq: Tensor,
    step: float,
    betas: tuple[float, float],
    eps: float,
    amsgrad_max: Tensor | None = None,
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


# ------------------------------------------------------------------------------------------------ the controller

#: Defaults of the controller, declared once (``SharpnessCallback`` uses the same).
DEFAULT_MARGIN = 1.1
DEFAULT_PATIENCE = 2
DEFAULT_LR_FACTOR = 0.5
DEFAULT_INCREASE_BELOW = 0.5
DEFAULT_MIN_LR_FACTOR = 1e-3

# a cumulative factor that went up by 1/lr_factor as often as it went down may exceed 1 by rounding
_FACTOR_SLACK = 1e-9


@dataclass(frozen=True)
class StabilityDecision:
    """What :meth:`StabilityController.observe` decided at one probe.

    Attributes:
        finding: ``"unstable"`` (the ratio stayed above ``margin``: cut) or ``"calm"`` (it stayed below
            ``increase_below``: raise back).
        factor: the multiplier for every learning rate; 1.0 when ``at_floor``.
        reason: why, in words a user can act on.
        at_floor: a cut was due but the cumulative factor is already at ``min_lr_factor``: nothing to apply.
    """

    finding: Literal["unstable", "calm"]
    factor: float
    reason: str
    at_floor: bool = False


class StabilityController:
    """Turns stability ratios (measured sharpness / threshold) into learning-rate factors.

    When the ratio exceeds ``margin`` on ``patience`` consecutive probes, the learning rate is to be multiplied by
    ``lr_factor`` — never taking the cumulative factor below ``min_lr_factor`` (at the floor it reports
    ``at_floor`` instead). With ``allow_increase`` it is to be raised by ``1/lr_factor`` when the ratio stays below
    ``increase_below`` for ``patience`` probes, never above the original (the cumulative factor stays ≤ 1). A NaN
    ratio (no threshold known) or an unsettled rule (Adam in its first ``1/(1 − β₁)`` steps) is not counted.

    The controller only decides: whoever applies a factor calls :meth:`applied`, so a monitoring-only run keeps the
    cumulative factor at 1. :meth:`state_dict` holds the cumulative factor and the streaks (checkpoints, rollbacks).

    Args:
        margin: the ratio above which a probe counts as unstable (> 0; 1 is the threshold itself).
        patience: consecutive unstable (or, for increases, calm) probes before acting (≥ 1).
        lr_factor: the multiplier of one decrease, in (0, 1).
        allow_increase: raise the learning rate again when the ratio stays below ``increase_below``.
        increase_below: the calm mark for ``allow_increase``, in (0, ``margin``).
        min_lr_factor: the cumulative factor is never taken below this, in (0, 1].

    Raises:
        TypeError: for an argument of the wrong type.
        ValueError: for an out-of-range argument.

    Example::

        >>> controller = StabilityController(patience=2, lr_factor=0.5)
        >>> controller.observe(1.4) is None  # the first unstable probe: wait
        True
        >>> decision = controller.observe(1.3)
        >>> decision.finding, decision.factor
        ('unstable', 0.5)
        >>> controller.applied(decision.factor)  # the learning rates were scaled
        >>> controller.cumulative_factor
        0.5
        >>> restored = StabilityController()
        >>> restored.load_state_dict(controller.state_dict())
        >>> restored.cumulative_factor
        0.5
    """

    def __init__(
        self,
        margin: float = DEFAULT_MARGIN,
        patience: int = DEFAULT_PATIENCE,
        lr_factor: float = DEFAULT_LR_FACTOR,
        allow_increase: bool = False,
        increase_below: float = DEFAULT_INCREASE_BELOW,
        min_lr_factor: float = DEFAULT_MIN_LR_FACTOR,
    ) -> None:
        self.margin = check_float("margin", margin, 0.0, math.inf)
        self.patience = check_int("patience", patience, 1)
        self.lr_factor = check_float("lr_factor", lr_factor, 0.0, 1.0)
        self.allow_increase = check_bool("allow_increase", allow_increase)
        self.increase_below = check_float("increase_below", increase_below, 0.0, self.margin, what="below `margin`")
        self.min_lr_factor = check_float("min_lr_factor", min_lr_factor, 0.0, 1.0, closed_high=True)
        self.cumulative_factor = 1.0
        self.high_streak = 0
        self.low_streak = 0

    def observe(self, ratio: float, settled: bool = True, detail: str = "") -> StabilityDecision | None:
        """Counts one probe's ratio; returns the decision when one is due, else ``None``.

        Args:
            ratio: measured / threshold (NaN: not known, not counted).
            settled: whether the threshold applies yet (:attr:`StabilityRule.settled`).
            detail: what was measured against what, appended to the reason.
        """
        if math.isnan(ratio) or not settled:
            return None
        self.high_streak = self.high_streak + 1 if ratio > self.margin else 0
        self.low_streak = self.low_streak + 1 if ratio < self.increase_below else 0
        suffix = f": {detail}" if detail else ""
        if self.high_streak >= self.patience:
            self.high_streak = 0
            factor = max(self.lr_factor, self.min_lr_factor / self.cumulative_factor)
            reason = f"stability ratio {ratio:.3g} > margin {self.margin:g} for {self.patience} probe(s){suffix}"
            if factor >= 1.0 - 1e-12:
                return StabilityDecision("unstable", 1.0, reason, at_floor=True)
            return StabilityDecision("unstable", factor, reason)
        if self.allow_increase and self.low_streak >= self.patience and self.cumulative_factor < 1.0:
            self.low_streak = 0
            factor = min(1.0 / self.lr_factor, 1.0 / self.cumulative_factor)
            reason = (
                f"stability ratio {ratio:.3g} < {self.increase_below:g} for {self.patience} probe(s){suffix};"
                " raising back toward the original learning rate"
            )
            return StabilityDecision("calm", factor, reason)
        return None

    def applied(self, factor: float) -> None:
        """Records that every learning rate was multiplied by ``factor``."""
        self.cumulative_factor *= factor

    def reset(self) -> None:
        """Back to the start: factor 1 (the learning rates as configured), no streaks."""
        self.cumulative_factor, self.high_streak, self.low_streak = 1.0, 0, 0

    def state_dict(self) -> dict[str, Any]:
        """The cumulative factor and the streaks, as plain numbers."""
        return {
            "cumulative_factor": self.cumulative_factor,
            "high_streak": self.high_streak,
            "low_streak": self.low_streak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; raises ``KeyError``/``TypeError``/``ValueError`` for a missing or bad value.

        The cumulative factor must be a finite number in ``(0, 1]`` (a NaN, negative or zero factor would corrupt
        every later decision); the streaks non-negative ints.
        """
        factor = check_finite("cumulative_factor", state["cumulative_factor"])
        if not 0 < factor <= 1 + _FACTOR_SLACK:
            raise ValueError(f"Expected `cumulative_factor` to be a finite number in (0, 1], but got {factor!r}.")
        high = check_int("high_streak", state["high_streak"], 0)
        low = check_int("low_streak", state["low_streak"], 0)
        self.cumulative_factor, self.high_streak, self.low_streak = factor, high, low
