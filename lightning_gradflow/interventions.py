"""The record every callback keeps of what it changed in a run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Intervention:
    """One action a callback took (or, when monitoring only, would have taken) on a training run.

    Args:
        step: ``trainer.global_step`` when the action was taken.
        callback: name of the callback class that acted.
        kind: what was done, e.g. ``"clip"``, ``"skip_step"``, ``"gate_surgery"``, ``"lr_scale"``, ``"rollback"``.
        target: what it was done to: a layer path, ``"optimizer"``, ``"all"``...
        reason: why, in words a user can act on.
        before: the measured quantity before the action (e.g. the gradient norm).
        after: the same quantity after it (e.g. the clipped norm); NaN when it is unknown.
        applied: ``False`` when ``auto_intervene`` is off and this is what the callback *would* have done.

    Example::

        >>> i = Intervention(120, "GradientFlowCallback", "skip_step", "all", "3 non-finite gradients", 3.0, 0.0)
        >>> Intervention.from_dict(i.to_dict()) == i
        True
        >>> print(i)
        step 120: GradientFlowCallback skip_step on all (3 non-finite gradients): 3 -> 0
    """

    step: int
    callback: str
    kind: str
    target: str
    reason: str
    before: float
    after: float
    applied: bool = True

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for ``state_dict`` and loggers)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Intervention:
        """Rebuilds a record saved with :meth:`to_dict`."""
        return cls(**data)

    def __str__(self) -> str:
        verb = "" if self.applied else " (not applied: auto_intervene=False)"
        return (
            f"step {self.step}: {self.callback} {self.kind} on {self.target} ({self.reason}):"
            f" {_fmt(self.before)} -> {_fmt(self.after)}{verb}"
        )


def _fmt(value: float) -> str:
    return "?" if math.isnan(value) else f"{value:.4g}"


def interventions_markdown(records: list[Intervention]) -> str:
    """A Markdown table of interventions, for TensorBoard's text dashboard."""
    rows = ["| step | kind | target | reason | before | after | applied |", "|---|---|---|---|---|---|---|"]
    rows += [
        f"| {r.step} | {r.kind} | {r.target} | {r.reason} | {_fmt(r.before)} | {_fmt(r.after)} | {r.applied} |"
        for r in records
    ]
    return "\n".join(rows)
