"""The record every callback keeps of what it changed in a run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch


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


class InterventionLog:
    """The interventions one callback made in a run: the records, which of them were already written, and state.

    Memory stays bounded in runs of any length: the newest ``max_records`` records are kept (older ones were already
    written to the loggers), while :attr:`total` and ``len(log)`` count every record ever added.

    Args:
        callback: the callback's class name, stamped on every record.
        max_records: records kept in memory and in checkpoints, > 0.

    Example::

        >>> log = InterventionLog("SharpnessCallback")
        >>> _ = log.add(10, "lr_scale", "optimizer", "stability ratio 1.4 > 1.1", 0.1, 0.05)
        >>> [r.kind for r in log.unreported()], log.unreported()
        (['lr_scale'], [])
        >>> restored = InterventionLog("SharpnessCallback")
        >>> restored.load_state_dict(log.state_dict())
        >>> restored.records == log.records, restored.unreported()
        (True, [])
        >>> small = InterventionLog("GradientFlowCallback", max_records=2)
        >>> for step in range(5):
        ...     _ = small.add(step, "clip", "all", "spike", 2.0, 1.0)
        >>> [r.step for r in small.records], len(small)
        ([3, 4], 5)
    """

    def __init__(self, callback: str, max_records: int = 10_000) -> None:
        if not isinstance(max_records, int) or isinstance(max_records, bool) or max_records <= 0:
            raise ValueError(f"Expected `max_records` to be an int > 0, but got {max_records!r}.")
        self.callback = callback
        self.max_records = max_records
        self.records: list[Intervention] = []
        self.total = 0
        self._reported = 0

    def add(
        self, step: int, kind: str, target: str, reason: str, before: float, after: float, applied: bool = True
    ) -> Intervention:
        """Appends one record and returns it (dropping the oldest beyond ``max_records``)."""
        record = Intervention(step, self.callback, kind, target, reason, float(before), float(after), applied)
        self.records.append(record)
        self.total += 1
        excess = len(self.records) - self.max_records
        if excess > 0:
            del self.records[:excess]
            self._reported = max(0, self._reported - excess)
        return record

    def unreported(self) -> list[Intervention]:
        """The records added since the last call (to write each one to TensorBoard once)."""
        new = self.records[self._reported :]
        self._reported = len(self.records)
        return new

    def __len__(self) -> int:
        return self.total

    def state_dict(self) -> dict[str, Any]:
        """The kept records as plain dicts, and the total count."""
        return {"records": [r.to_dict() for r in self.records], "total": self.total}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Restores the records (also the plain list older versions saved); they count as already reported."""
        records = state if isinstance(state, list) else state["records"]
        total = len(records) if isinstance(state, list) else int(state["total"])
        if not isinstance(records, list) or total < len(records):
            raise ValueError(f"intervention records: expected a list and a total >= its length, got {state!r:.200}")
        self.records = [Intervention.from_dict(d) for d in records][-self.max_records :]
        self.total = total
        self._reported = len(self.records)


# Learning-rate values a scheduler or optimizer keeps besides ``group["lr"]``: scaled together so that a scheduler
# recomputing ``lr`` from its base values (LambdaLR, OneCycleLR, CyclicLR...) keeps the scaled learning rate.
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
_SCHEDULER_LR_LISTS = ("base_lrs", "max_lrs", "min_lrs", "_last_lr")
_SCHEDULER_LR_SCALARS = ("eta_min",)


def scale_learning_rate(optimizers: Any, schedulers: Any, factor: float) -> None:
    """Multiplies every learning rate of ``optimizers`` by ``factor``, scheduler-safe.

    Scales each param group's ``lr`` and the base values schedulers recompute it from (``initial_lr``,
    ``max_lr``, ``min_lr`` in the groups; ``base_lrs``, ``max_lrs``, ``min_lrs``, ``eta_min`` and the last
    learning rates on the schedulers, recursing into ``SequentialLR``/``ChainedScheduler``), so LambdaLR,
    OneCycleLR, CyclicLR, cosine and plateau schedules continue from the scaled values instead of overwriting
    them. The optimizer's and schedulers' ``state_dict`` carry the scaled values, so a resumed run keeps them.

    Args:
        optimizers: an optimizer or a list of them.
        schedulers: a scheduler, a list of them, or Lightning's ``trainer.lr_scheduler_configs``.
        factor: the multiplier, > 0.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (epoch + 1))
        >>> scale_learning_rate(opt, [sched], 0.5)
        >>> opt.step(); sched.step()
        >>> round(opt.param_groups[0]["lr"], 6)  # 0.1 * 0.5 / 2: the schedule continues from the scaled base
        0.025
    """
    if not (isinstance(factor, (int, float)) and 0 < factor < float("inf")):
        raise ValueError(f"Expected `factor` to be a finite number > 0, but got {factor!r}.")
    for optimizer in _as_list(optimizers):
        for group in optimizer.param_groups:
            for key in _GROUP_LR_KEYS:
                if isinstance(group.get(key), (int, float)):
                    group[key] = group[key] * factor
                elif isinstance(group.get(key), torch.Tensor):  # tensor learning rates (capturable optimizers)
                    group[key].mul_(factor)
    for scheduler in _as_list(schedulers):
        _scale_scheduler(getattr(scheduler, "scheduler", scheduler), factor)


def _scale_scheduler(scheduler: Any, factor: float) -> None:
    for inner in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _scale_scheduler(inner, factor)
    for name in _SCHEDULER_LR_LISTS:
        values = getattr(scheduler, name, None)
        if isinstance(values, (list, tuple)):
            setattr(scheduler, name, type(values)(_scaled(v, factor) for v in values))
    for name in _SCHEDULER_LR_SCALARS:
        value = getattr(scheduler, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(scheduler, name, value * factor)


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value * factor
    return value * factor if isinstance(value, (int, float)) else value


def _as_list(items: Any) -> list[Any]:
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]
