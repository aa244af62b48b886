"""The intervention ladder: skip the step → cut the LR → roll back → stop, as a small pure state machine.

:class:`InterventionLadder` takes each step's :class:`~lightning_gradflow.collapse.monitor.StepVerdict` and returns
the :class:`Action` s to apply; the caller (a Lightning callback, a Fabric or plain loop) applies them. Alarms are
counted in consecutive alarm steps (*strikes*):

1. ``skip_nonfinite``: a step with a non-finite loss or gradient is skipped (its gradients dropped). A skipped
   isolated non-finite batch is no reason to cut the LR: the skip is the whole answer to it;
2. ``lr_cut_factor``: the first strike of a streak that is not a skipped non-finite batch (or the second one that is)
   cuts the LR by the factor — never below ``min_lr_factor`` of the original. After ``lr_recovery_steps`` calm steps
   in a row one cut is undone, up to the original LR (a skipped isolated bad batch or an fp16 overflow step neither
   counts towards the calm stretch nor breaks it);
3. ``rollback``: on strike ``rollback_patience`` the newest kept snapshot is restored, and the next ``skip_batches``
   batches are skipped. A second collapse before any new snapshot was kept drops the snapshot that led to it and
   goes one further back; the LR factor returns to the snapshot's;
4. ``stop_on_failure``: the run stops when a rollback is due after ``max_rollbacks`` rollbacks or without a
   snapshot, or, with ``rollback=False``, after ``stop_patience`` strikes. With ``stop_on_failure=False`` an exhausted
   ladder leaves the run alone. Once stopped, every further step is skipped (a trainer that keeps going for its
   ``min_steps`` gets no updates).

The ladder keeps the snapshot *bookkeeping* (the steps, the LR factor at each, and an opaque payload: the caller's
copy of the training state). It asks to keep one (:meth:`InterventionLadder.may_snapshot`) only after a calm step
that was not skipped — an open warning episode does not stop healthy steps from being kept.

**Dry run** (``dry_run=True``, monitoring only): the same decisions, applied to nothing, so the caller records exactly
what auto mode would do. After a would-be skip, rollback or stop, auto mode would be on another trajectory than the
run being watched (it would have skipped the bad batch, or returned to a snapshot), so the dry-run ladder decides
nothing more until the watched run is back to a step without alarm.

Example::

    >>> from lightning_gradflow.collapse.monitor import StepVerdict
    >>> ladder = InterventionLadder(LadderConfig(rollback_patience=2))
    >>> ladder.keep(10, payload="state at step 10")
    >>> [(a.kind, a.after) for a in ladder.decide(StepVerdict(11, 9.0, 50.0, alarm=True))]
    [('lr_scale', 0.5)]
    >>> [(a.kind, a.after, a.snapshot) for a in ladder.decide(StepVerdict(12, 9.0, 50.0, alarm=True))]
    [('rollback', 10, 'state at step 10')]
    >>> ladder.lr_scale, ladder.rollbacks  # the cut made after the snapshot is undone with it
    (1.0, 1)
    >>> nan = float("nan")
    >>> [a.kind for a in InterventionLadder().decide(StepVerdict(3, nan, 1.0, nonfinite=True, alarm=True))]
    ['skip_step']
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lightning_gradflow.checks import check_bool, check_count, check_finite
from lightning_gradflow.collapse.config import LadderConfig
from lightning_gradflow.collapse.monitor import StepVerdict

_DROPS = ("skip_step", "rollback", "stop")  # the actions that drop the step's gradients


class CollapseStopReason(Enum):
    """Why the ladder stopped a run (like Lightning's ``EarlyStoppingReason``)."""

    NOT_STOPPED = 0
    MAX_ROLLBACKS = 1  # rolled back ``max_rollbacks`` times and collapsed again
    NO_HEALTHY_SNAPSHOT = 2  # a rollback was due but no healthy snapshot was kept
    COLLAPSE_PERSISTS = 3  # rollback off: the alarm held for ``stop_patience`` steps


@dataclass(frozen=True)
class Action:
    """One thing to do at a step.

    Attributes:
        kind: ``"skip_step"`` (drop the step's gradients), ``"lr_scale"`` (multiply every LR by ``factor``),
            ``"rollback"`` (restore ``snapshot``, then the step is skipped) or ``"stop"`` (stop the run; the step
            is skipped).
        target: what it acts on (``"all"``, ``"optimizer"``, ``"trainer"``), for the record.
        reason: why, in words.
        before: the quantity before (the loss, the LR factor, the step).
        after: the same after (0 for a skip, the new LR factor, the snapshot's step).
        factor: the LR multiplier of ``"lr_scale"``.
        snapshot: the payload kept with :meth:`InterventionLadder.keep` (``"rollback"``).
        stop_reason: why the run stops (``"stop"``).
        recorded: False for the silent skips (batches after a rollback, steps after a stop): counted, not listed.
    """

    kind: str
    target: str
    reason: str
    before: float = math.nan
    after: float = math.nan
    factor: float = 1.0
    snapshot: Any = None
    stop_reason: CollapseStopReason = CollapseStopReason.NOT_STOPPED
    recorded: bool = True

    @property
    def drops_gradients(self) -> bool:
        """Whether the step's gradients must be dropped."""
        return self.kind in _DROPS


@dataclass(frozen=True)
class _Kept:
    step: int
    lr_scale: float
    payload: Any


class InterventionLadder:
    """Skip → cut LR → roll back → stop, given one verdict per step (see the module).

    Args:
        config: the rungs (defaults: :class:`~lightning_gradflow.collapse.config.LadderConfig`).
        dry_run: decide without anything being applied (monitoring only; see the module).
    """

    def __init__(self, config: LadderConfig | None = None, dry_run: bool = False) -> None:
        self.config = config or LadderConfig()
        self.dry_run = dry_run
        self.reset()

    def reset(self) -> None:
        """Forgets everything, snapshots included: a new run (or a new ``fit``) starts here."""
        self.strikes = 0  # consecutive alarm steps
        self.rollbacks = 0
        self.lr_scale = 1.0  # the cumulative LR factor the ladder applied
        self.skipped_steps = 0
        self.skip_remaining = 0  # batches still to skip after a rollback
        self.calm_steps = 0  # consecutive calm steps (towards an LR recovery)
        self.stopped_reason = CollapseStopReason.NOT_STOPPED
        self.stop_message = ""
        self._cut_in_streak = False
        self._off_trajectory = False  # dry run: auto mode would be elsewhere since a would-be skip/rollback/stop
        self._healthy = True  # the last decided step may be kept as a snapshot
        self._since_rollback = 0  # snapshots kept since the last rollback
        self._kept: deque[_Kept] = deque(maxlen=self.config.num_snapshots)

    def start_episode(self) -> None:
        """Clears a stop and the rollback budget (a resumed run that had stopped starts a new episode)."""
        self.stopped_reason = CollapseStopReason.NOT_STOPPED
        self.stop_message = ""
        self.strikes = self.rollbacks = self.skip_remaining = 0
        self._cut_in_streak = False

    # ----------------------------------------------------------------------------------------------- snapshots

    def may_snapshot(self) -> bool:
        """Whether the state after the last decided step may be kept (rollbacks on, the step calm and not skipped)."""
        return self.config.rollback and self._healthy and self.stopped_reason is CollapseStopReason.NOT_STOPPED

    def keep(self, step: int, payload: Any = None) -> None:
        """Keeps a snapshot of the state at global step ``step`` (the oldest goes when ``num_snapshots`` are kept)."""
        self._kept.append(_Kept(step, self.lr_scale, payload))
        self._since_rollback += 1

    def snapshot_steps(self) -> list[int]:
        """The steps of the snapshots kept, oldest first."""
        return [k.step for k in self._kept]

    def clear_snapshots(self) -> None:
        """Forgets the snapshots (their payloads belong to a run that ended)."""
        self._kept.clear()
        self._since_rollback = 0

    # -------------------------------------------------------------------------------------------------- a step

    def decide(self, v: StepVerdict) -> list[Action]:
        """The actions for one step's verdict, in order; updates strikes, counters and the LR factor."""
        if self.stopped_reason is not CollapseStopReason.NOT_STOPPED:
            self._healthy = False
            why = f"the run was stopped ({self.stopped_reason.name})"
            return [Action("skip_step", "all", why, v.loss, 0.0, recorded=False)]
        if self._off_trajectory:
            if v.alarm or v.overflow:
                self._healthy = False
                return []
            self._off_trajectory = False
            self.strikes, self.skip_remaining, self._cut_in_streak = 0, 0, False
        c = self.config
        actions: list[Action] = []
        if self.skip_remaining > 0:
            self.skip_remaining -= 1
            actions.append(Action("skip_step", "all", "a batch after a rollback", v.loss, 0.0, recorded=False))
        skipped_nonfinite = v.nonfinite and c.skip_nonfinite
        if skipped_nonfinite:
            actions.append(Action("skip_step", "all", "non-finite loss or gradients; the step was skipped", v.loss, 0))
        if actions:
            self.skipped_steps += 1
        if v.alarm:
            self.strikes += 1
            if not (skipped_nonfinite and self.strikes == 1):  # a skipped isolated bad batch does not break calm
                self.calm_steps = 0
            actions += self._escalate(v, skipped_nonfinite)
        else:
            self.strikes, self._cut_in_streak = 0, False
            actions += self._recover(v)
        self._healthy = v.calm and not any(a.drops_gradients for a in actions)
        if self.dry_run and any(a.drops_gradients and a.recorded for a in actions):
            self._off_trajectory = True
        return actions

    def _escalate(self, v: StepVerdict, skipped_nonfinite: bool) -> list[Action]:
        c = self.config
        why = ", ".join(v.reasons)
        if c.rollback and self.strikes >= c.rollback_patience:
            if self.rollbacks >= c.max_rollbacks:
                return self._stop(
                    v, CollapseStopReason.MAX_ROLLBACKS, f"collapsed again after {self.rollbacks} rollbacks"
                )
            if self._since_rollback == 0 and self.rollbacks > 0 and len(self._kept) > 1:
                self._kept.pop()  # restoring it led straight back here: go one further back
            if not self._kept:
                return self._stop(v, CollapseStopReason.NO_HEALTHY_SNAPSHOT, "no healthy snapshot to roll back to")
            kept = self._kept[-1]
            self.rollbacks += 1
            self.lr_scale = kept.lr_scale
            self.skip_remaining = c.skip_batches
            self._since_rollback = 0
            self.strikes, self._cut_in_streak = 0, False
            reason = f"{why} for {c.rollback_patience} step(s); restoring the snapshot of step {kept.step}"
            if c.skip_batches:
                reason += f" and skipping {c.skip_batches} batch(es)"
            return [Action("rollback", "all", reason, v.step, kept.step, snapshot=kept.payload)]
        if c.lr_cut_factor is not None and not self._cut_in_streak and (not skipped_nonfinite or self.strikes >= 2):
            self._cut_in_streak = True
            cut = self._cut(c.lr_cut_factor, f"{why}; learning rate cut")
            if cut:
                return cut
        if not c.rollback and self.strikes >= c.stop_patience:
            return self._stop(v, CollapseStopReason.COLLAPSE_PERSISTS, f"{why} for {self.strikes} steps")
        return []

    def _cut(self, nominal: float, reason: str) -> list[Action]:
        floor = self.config.min_lr_factor
        factor = max(nominal, floor / self.lr_scale)
        if factor >= 1.0:
            return []  # already at the floor
        before = self.lr_scale
        self.lr_scale = before * factor
        if factor > nominal:
            reason += f" to its floor `min_lr_factor={floor:g}`"
        return [Action("lr_scale", "optimizer", reason, before, self.lr_scale, factor=factor)]

    def _recover(self, v: StepVerdict) -> list[Action]:
        c = self.config
        if v.calm:
            self.calm_steps += 1
        elif not v.overflow:  # fp16 overflow steps are normal: they neither count nor break a calm stretch
            self.calm_steps = 0
        if c.lr_recovery_steps == 0 or self.lr_scale >= 1.0 or self.calm_steps < c.lr_recovery_steps:
            return []
        self.calm_steps = 0
        before = self.lr_scale
        self.lr_scale = min(before / (c.lr_cut_factor or 0.5), 1.0)
        reason = f"calm for {c.lr_recovery_steps} steps; learning rate raised back"
        return [Action("lr_scale", "optimizer", reason, before, self.lr_scale, factor=self.lr_scale / before)]

    def _stop(self, v: StepVerdict, reason: CollapseStopReason, why: str) -> list[Action]:
        if not self.config.stop_on_failure:
            return []
        if not self.dry_run:
            self.stopped_reason = reason
            self.stop_message = f"stopped the run at step {v.step} ({reason.name}): {why}."
        return [Action("stop", "trainer", f"{reason.name}: {why}", v.risk, math.nan, stop_reason=reason)]

    # ---------------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Strikes, counters, the LR factor and the stop, as plain data (the snapshots are not included)."""
        return {
            "dry_run": self.dry_run,
            "strikes": self.strikes,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "skipped_steps": self.skipped_steps,
            "skip_remaining": self.skip_remaining,
            "calm_steps": self.calm_steps,
            "cut_in_streak": self._cut_in_streak,
            "off_trajectory": self._off_trajectory,
            "stopped_reason": self.stopped_reason.name,
            "stop_message": self.stop_message,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; raises ``ValueError``/``TypeError``/``KeyError`` for a state it cannot use.

        A state saved by a dry-run ladder (monitoring only) loaded into an acting one, or the other way round, is
        checked and then dropped: what one counted was never applied by the other.
        """
        dry_run = check_bool("dry_run", state["dry_run"])
        lr_scale = check_finite("lr_scale", state["lr_scale"])
        if not 0.0 < lr_scale <= 1.0:
            raise ValueError(f"`lr_scale` must lie in (0, 1], got {lr_scale}")
        stop_message = state["stop_message"]
        if not isinstance(stop_message, str):
            raise TypeError(f"`stop_message` must be a str, got {type(stop_message).__name__}")
        loaded = {
            "strikes": check_count("strikes", state["strikes"]),
            "rollbacks": check_count("rollbacks", state["rollbacks"]),
            "skipped_steps": check_count("skipped_steps", state["skipped_steps"]),
            "skip_remaining": check_count("skip_remaining", state["skip_remaining"]),
            "calm_steps": check_count("calm_steps", state["calm_steps"]),
        }
        cut_in_streak = check_bool("cut_in_streak", state["cut_in_streak"])
        off_trajectory = check_bool("off_trajectory", state["off_trajectory"])
        stopped_reason = CollapseStopReason[state["stopped_reason"]]
        if dry_run != self.dry_run:
            self.reset()
            return
        for name, value in loaded.items():
            setattr(self, name, value)
        self.lr_scale, self._cut_in_streak, self._off_trajectory = lr_scale, cut_in_streak, off_trajectory
        self.stopped_reason, self.stop_message = stopped_reason, stop_message
