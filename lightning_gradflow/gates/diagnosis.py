"""When a saturated gate is diagnosed and whether a surgery may touch it: a pure, state-dict-able state machine.

:class:`GateDiagnosis` turns each probe's per-gate observations (:func:`gate_observations`) into one
:class:`GateDecision` per gate (observe → verdict; the caller applies the action and reports it back with
:meth:`GateDiagnosis.repaired`). The rule, per gate (one gate of one layer/direction of one module, keyed
``"<module path>/<layer>/<gate>"``):

1. a probe **flags** the gate when more than ``saturation_threshold`` of its activations are saturated and at least
   one of its units is a saturated unit; its streak counts consecutive flagged probes (reset by a healthy probe);
2. at ``patience`` flags in a row the gate is **diagnosed** — if its streak began on the first probe of the fit
   (saturation present from initialisation, the common case, is repaired as soon as possible); a streak that began
   later must also span ``late_span`` steps (a gate that saturates during training, as the cell and input gates of a
   healthy character LSTM do for a while early on, is repaired only when it stays saturated) — and then, in this order:
   it is only reported when its module cannot be repaired or its gate is not in ``repair_gates`` (``REPORT_ONLY``); only
   recorded as what would be done when ``auto_intervene`` is off (``MONITOR``); left alone during ``cooldown`` steps
   after its last surgery (``COOLDOWN``), once its surgeries were undone by ``MAX_UNDONE`` rollbacks (``GIVEN_UP``), and
   once ``max_surgeries`` surgeries are in effect, counting those already decided on this probe (``BUDGET``); otherwise
   it is repaired (``REPAIR``). A surgery resets the gate's streak.
3. **one finding, one decision**: when a probe repairs any gate, every other gate flagged on the same probe — of any
   layer, direction or module, whatever its streak — is repaired with it (subject to the same ``REPORT_ONLY``,
   ``MONITOR``, ``COOLDOWN``, ``GIVEN_UP`` and ``BUDGET`` checks). Saturation present from initialisation is usually
   in every layer at once, and a deeper layer whose input is shut is saturated because of the same fault; repairing
   the first layer alone and waiting ``patience`` probes for the others lets them half-heal meanwhile, and the run
   ends worse than without surgery.

**Rollbacks.** A rollback (e.g. EarlyCollapseCallback's) restores weights from a snapshot, and with them undoes every
surgery made after it. :meth:`rollback_state` is what to keep with a snapshot; :meth:`restore` returns to it (streaks,
cooldowns and the surgeries in effect: :attr:`surgeries` counts each surgery once, those undone no more) and returns the
surgeries it undid. A surgery undone by a rollback **is redone** when the diagnosis, continuing from the restored
streaks, finds the gate saturated again: the restored weights are saturated again, and the surgery was a repair, not
the reason for the rollback (the rollback's trigger — a loss spike, a non-finite gradient — is judged by its own
detector). Unless the surgery *was* the reason: a gate whose surgeries were undone by ``MAX_UNDONE`` (2) rollbacks —
repaired, rolled back, repaired again, rolled back again — is no longer repaired in this fit (``GIVEN_UP``), so a
surgery and a rollback never chase each other. The undo counts are history, kept across rollbacks (and in
:meth:`state_dict`), not part of the rollback state.

Example::

    >>> diagnosis = GateDiagnosis(patience=2, cooldown=10, max_surgeries=4, auto_intervene=True)
    >>> saturated = GateObservation("rnn/l0/input", "input", saturation=0.9, units=(0, 3), weight_rms=(0.5, 0.7))
    >>> [d.verdict.value for d in diagnosis.update(0, [saturated])]
    ['flagged']
    >>> (decision,) = diagnosis.update(1, [saturated]); decision.verdict.value
    'repair'
    >>> snapshot = diagnosis.rollback_state()  # a snapshot taken before the surgery is applied
    >>> diagnosis.repaired(1, "rnn/l0/input"); diagnosis.surgeries
    1
    >>> [d.verdict.value for d in diagnosis.update(2, [saturated])]  # repaired one step ago
    ['flagged']
    >>> diagnosis.restore(snapshot), diagnosis.surgeries  # a rollback to the snapshot undid the surgery of step 1
    ([(1, 'rnn/l0/input')], 0)

    A gate flagged for the first time on the probe that repairs another is repaired with it::

        >>> fresh = GateDiagnosis(patience=2, auto_intervene=True)
        >>> deeper = GateObservation("rnn/l1/input", "input", saturation=0.8, units=(1,), weight_rms=(0.2,))
        >>> [d.verdict.value for d in fresh.update(0, [saturated])]
        ['flagged']
        >>> [d.verdict.value for d in fresh.update(1, [saturated, deeper])]
        ['repair', 'repair']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lightning_gradflow.gates.discovery import ALL_GATES, GatedModule, gate_key
from lightning_gradflow.gates.stats import GateStats

#: Rollbacks that may undo a gate's surgeries before the gate is no longer repaired (see the module docstring).
MAX_UNDONE = 2


@dataclass(frozen=True)
class GateObservation:
    """What one probe measured of one gate of one layer/direction, as the diagnosis needs it.

    Attributes:
        key: the gate's tag path (:func:`gate_key`).
        gate: the gate's name (``"input"``, ``"forget"``, ...).
        saturation: the fraction of its activations that are saturated.
        units: its saturated units (saturated on at least ``unit_threshold`` of the probe positions).
        weight_rms: the RMS of each of those units' weight part of ``z`` (same order as ``units``).
        repairable: whether its module has rows a surgery can change.
        module: index of its module in the caller's list of gated modules.
        row: its layer/direction row in that module.
    """

    key: str
    gate: str
    saturation: float
    units: tuple[int, ...] = ()
    weight_rms: tuple[float, ...] = ()
    repairable: bool = True
    module: int = 0
    row: int = 0


def gate_observations(
    gated_modules: Sequence[GatedModule], stats: Mapping[str, GateStats], unit_threshold: float
) -> list[GateObservation]:
    """One observation per gate of every layer/direction of every module that has statistics in ``stats``.

    Args:
        gated_modules: the modules, in a fixed order (:attr:`GateObservation.module` indexes it).
        stats: the probe's statistics by module name (summed across ranks).
        unit_threshold: a unit is saturated when it is saturated on at least this fraction of the probe positions.
    """
    observations = []
    for index, gated in enumerate(gated_modules):
        table = stats.get(gated.name)
        if table is None:
            continue
        saturation = table.saturation
        unit_mask = table.saturated_units(unit_threshold)
        weight_rms = table.weight_rms
        for row, row_name in enumerate(gated.row_names()):
            for g, gate in enumerate(gated.gates):
                units = unit_mask[row, g].nonzero().flatten().tolist()
                observations.append(
                    GateObservation(
                        key=gate_key(gated.name, row_name, gate),
                        gate=gate,
                        saturation=float(saturation[row, g]),
                        units=tuple(units),
                        weight_rms=tuple(weight_rms[row, g, units].tolist()),
                        repairable=gated.repairable,
                        module=index,
                        row=row,
                    )
                )
    return observations


class GateVerdict(str, Enum):
    """What the diagnosis says about one gate on one probe (see the module docstring for the order)."""

    HEALTHY = "healthy"
    FLAGGED = "flagged"
    REPORT_ONLY = "report_only"
    MONITOR = "monitor"
    COOLDOWN = "cooldown"
    GIVEN_UP = "given_up"
    BUDGET = "budget"
    REPAIR = "repair"

    @property
    def diagnosed(self) -> bool:
        """Whether the gate has been flagged ``patience`` probes in a row."""
        return self not in (GateVerdict.HEALTHY, GateVerdict.FLAGGED)


@dataclass(frozen=True)
class GateDecision:
    """The verdict on one gate and what it was decided on."""

    observation: GateObservation
    verdict: GateVerdict
    streak: int


class GateDiagnosis:
    """Patience, cooldown, the surgery budget and rollbacks for every gate (see the module docstring).

    Args:
        saturation_threshold: a gate is flagged when more than this fraction of its activations are saturated and it
            has a saturated unit.
        patience: consecutive flagged probes before a gate is diagnosed.
        cooldown: steps after a surgery during which the same gate is not repaired again.
        max_surgeries: the most surgeries in effect at once in a run (0: report only).
        auto_intervene: whether diagnosed gates are repaired (otherwise ``MONITOR``).
        repair_gates: the gate names surgery may touch (empty: all).
        late_span: steps a streak that began after the first probe must span before the gate is diagnosed.

    Raises:
        ValueError: for an argument out of range or an unknown gate name.
    """

    def __init__(
        self,
        saturation_threshold: float = 0.25,
        patience: int = 3,
        cooldown: int = 500,
        max_surgeries: int = 16,
        auto_intervene: bool = True,
        repair_gates: Iterable[str] = (),
        late_span: int = 0,
    ) -> None:
        if not 0.0 <= saturation_threshold < 1.0:
            raise ValueError(f"Expected `saturation_threshold` in [0, 1), but got {saturation_threshold}.")
        if late_span < 0:
            raise ValueError(f"Expected `late_span` >= 0, but got {late_span}.")
        if patience < 1 or cooldown < 0 or max_surgeries < 0:
            raise ValueError(
                f"Expected `patience` > 0, `cooldown` >= 0 and `max_surgeries` >= 0, but got {patience}, {cooldown}"
                f" and {max_surgeries}."
            )
        self.repair_gates = tuple(repair_gates)
        unknown = [g for g in self.repair_gates if g not in ALL_GATES]
        if unknown:
            raise ValueError(f"Expected `repair_gates` to hold gate names from {ALL_GATES}, but got {unknown}.")
        self.saturation_threshold = float(saturation_threshold)
        self.patience = patience
        self.cooldown = cooldown
        self.max_surgeries = max_surgeries
        self.auto_intervene = auto_intervene
        self.late_span = late_span
        self.reset()

    def reset(self) -> None:
        """Forgets everything (a new fit)."""
        self._streaks: dict[str, int] = {}
        self._last_surgery: dict[str, int] = {}
        self._applied: list[tuple[int, str]] = []
        self._undone: dict[str, int] = {}
        self._onset: dict[str, int] = {}  # the step each gate's current streak began
        self._first_step: int | None = None  # the fit's first probe

    # ---------------------------------------------------------------------------------------------- read-outs

    @property
    def surgeries(self) -> int:
        """Surgeries in effect: made and not undone by a rollback."""
        return len(self._applied)

    @property
    def streaks(self) -> dict[str, int]:
        """Consecutive flagged probes per gate."""
        return dict(self._streaks)

    @property
    def last_surgery(self) -> dict[str, int]:
        """The step of each gate's last surgery in effect."""
        return dict(self._last_surgery)

    @property
    def applied(self) -> list[tuple[int, str]]:
        """``(step, key)`` of each surgery in effect, oldest first."""
        return list(self._applied)

    @property
    def undone(self) -> dict[str, int]:
        """Per gate, how many of its surgeries rollbacks undid."""
        return dict(self._undone)

    # ------------------------------------------------------------------------------------------------ decide

    def update(self, step: int, observations: Iterable[GateObservation]) -> list[GateDecision]:
        """Updates every observed gate's streak and returns the verdict on each, in order."""
        decisions = []
        planned = 0
        if self._first_step is None:
            self._first_step = step
        for obs in observations:
            flagged = obs.saturation > self.saturation_threshold and bool(obs.units)
            streak = self._streaks[obs.key] = self._streaks.get(obs.key, 0) + 1 if flagged else 0
            if streak == 1:
                self._onset[obs.key] = step
            verdict = self._verdict(step, obs, streak, planned) if flagged else GateVerdict.HEALTHY
            planned += verdict is GateVerdict.REPAIR
            decisions.append(GateDecision(obs, verdict, streak))
        if planned:  # one finding, one decision: the gates flagged with it are repaired with it (rule 3)
            for i, decision in enumerate(decisions):
                if decision.verdict is GateVerdict.FLAGGED:
                    verdict = self._action(step, decision.observation, planned)
                    planned += verdict is GateVerdict.REPAIR
                    decisions[i] = GateDecision(decision.observation, verdict, decision.streak)
        return decisions

    def _verdict(self, step: int, obs: GateObservation, streak: int, planned: int) -> GateVerdict:
        if streak < self.patience:
            return GateVerdict.FLAGGED
        onset = self._onset.get(obs.key, step)
        if onset != self._first_step and step - onset < self.late_span:
            return GateVerdict.FLAGGED
        return self._action(step, obs, planned)

    def _action(self, step: int, obs: GateObservation, planned: int) -> GateVerdict:
        """The verdict on a diagnosed gate (rule 2 after the patience check)."""
        if not obs.repairable or (self.repair_gates and obs.gate not in self.repair_gates):
            return GateVerdict.REPORT_ONLY
        if not self.auto_intervene:
            return GateVerdict.MONITOR
        last = self._last_surgery.get(obs.key)
        if last is not None and step - last < self.cooldown:
            return GateVerdict.COOLDOWN
        if self._undone.get(obs.key, 0) >= MAX_UNDONE:
            return GateVerdict.GIVEN_UP
        if self.surgeries + planned >= self.max_surgeries:
            return GateVerdict.BUDGET
        return GateVerdict.REPAIR

    def repaired(self, step: int, key: str) -> None:
        """Records that the gate ``key`` was repaired at ``step`` (after a ``REPAIR`` verdict was applied)."""
        self._streaks[key] = 0
        self._last_surgery[key] = step
        self._applied.append((step, key))

    # --------------------------------------------------------------------------------------------- rollbacks

    def rollback_state(self) -> dict[str, Any]:
        """What to keep with a snapshot of the weights: streaks, cooldowns and the surgeries in effect."""
        return {
            "streaks": dict(self._streaks),
            "last_surgery": dict(self._last_surgery),
            "applied": [[step, key] for step, key in self._applied],
            "onset": dict(self._onset),
        }

    def restore(self, state: Mapping[str, Any]) -> list[tuple[int, str]]:
        """Returns to a :meth:`rollback_state`; returns the surgeries ``(step, key)`` this undid, oldest first."""
        streaks = _counts("streaks", state["streaks"])
        last_surgery = _counts("last_surgery", state["last_surgery"])
        kept = _applied(state["applied"])
        onset = _counts("onset", state.get("onset", {}))
        undone = [entry for entry in self._applied if entry not in kept]
        for _, key in undone:
            self._undone[key] = self._undone.get(key, 0) + 1
        self._streaks, self._last_surgery, self._applied, self._onset = streaks, last_surgery, kept, onset
        return undone

    # ------------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything, as plain values (``surgeries`` is derived, saved for readers of a checkpoint)."""
        return {
            **self.rollback_state(),
            "surgeries": self.surgeries,
            "undone": dict(self._undone),
            "first_probe": self._first_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict`; raises ``TypeError``/``ValueError`` naming the entry that is wrong."""
        if not isinstance(state, Mapping):
            raise TypeError(f"Expected the diagnosis state to be a dict, but got {type(state).__name__}.")
        streaks = _counts("streaks", state["streaks"])
        last_surgery = _counts("last_surgery", state["last_surgery"])
        applied = _applied(state["applied"])
        undone = _counts("undone", state.get("undone", {}))
        onset = _counts("onset", state.get("onset", {}))  # absent before `late_span`
        first = state.get("first_probe")
        if first is not None and (not isinstance(first, int) or isinstance(first, bool) or first < 0):
            raise ValueError(f"Expected `first_probe` to be a step >= 0 or None, but got {first!r}.")
        surgeries = state.get("surgeries", len(applied))
        if not isinstance(surgeries, int) or isinstance(surgeries, bool) or surgeries != len(applied):
            raise ValueError(
                f"`surgeries` is {surgeries!r} but `applied` lists {len(applied)} surgeries in effect: the state is"
                " inconsistent."
            )
        self._streaks, self._last_surgery, self._applied, self._undone = streaks, last_surgery, applied, undone
        self._onset, self._first_step = onset, first


def _counts(name: str, value: Any) -> dict[str, int]:
    """A ``{str: int >= 0}`` entry of a state, validated."""
    if not isinstance(value, Mapping):
        raise TypeError(f"Expected `{name}` to be a dict of gate key -> int, but got {type(value).__name__}.")
    out = {}
    for key, count in value.items():
        if not isinstance(key, str) or not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"Expected `{name}` to map gate keys to ints >= 0, but got {key!r}: {count!r}.")
        out[key] = count
    return out


def _applied(value: Any) -> list[tuple[int, str]]:
    """The ``[[step, key], ...]`` entry of a state, validated."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"Expected `applied` to be a list of [step, gate key], but got {type(value).__name__}.")
    out = []
    for entry in value:
        ok = isinstance(entry, (list, tuple)) and len(entry) == 2
        if not ok or not isinstance(entry[0], int) or isinstance(entry[0], bool) or entry[0] < 0:
            raise ValueError(f"Expected `applied` to hold [step >= 0, gate key] pairs, but got {entry!r}.")
        if not isinstance(entry[1], str):
            raise ValueError(f"Expected `applied` to hold [step >= 0, gate key] pairs, but got {entry!r}.")
        out.append((int(entry[0]), str(entry[1])))
    return out
