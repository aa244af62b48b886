"""What GateSurgeryCallback reports: its metrics from a probe's statistics, and its warning and record texts.

Pure: dicts and strings from host statistics, observations and floats; nothing here reads the device, decides anything
or imports Lightning. When a gate is diagnosed and what may be done to it is
:class:`~lightning_gradflow.gates.GateDiagnosis`'s; the surgery itself is :mod:`lightning_gradflow.gates.surgery`'s.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_gradflow.gates import (
    GateDecision,
    GatedModule,
    GateObservation,
    GateStats,
    GateVerdict,
    gate_scalars,
    healthy_bias,
    row_scales,
)

FAMILY = "gates"


def no_gates_message(model: str, excluded: bool) -> str:
    """The warning for a model without a gated module (outside ``exclude`` when ``excluded``)."""
    return (
        f"found no gated module (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell) in {model}"
        f"{' outside `exclude`' if excluded else ''}, so it does nothing. Name other sigmoid-gated modules"
        " with `extra_gates={'path.to.module': 'sigmoid'}`, or remove the callback."
    )


def unreadable_message(module: str) -> str:
    """The warning for a gated module whose output is not a floating-point tensor."""
    return (
        f"the output of '{module}' is not a floating-point tensor (nor a tuple starting with one), so its"
        " gates cannot be read; it is skipped. Check its entry in `extra_gates`."
    )


def unit_mismatch_message(module: str, units: int, known: int) -> str:
    """The warning for an ``extra_gates`` module whose calls return different unit counts."""
    return (
        f"'{module}' returned {units} units in one call and {known} in another; calls with other than"
        f" {known} units are skipped (its last dimension must hold the gate's units)."
    )


def gate_metrics(
    gated_modules: Iterable[GatedModule],
    stats: Mapping[str, GateStats],
    unit_threshold: float,
    surgeries: int,
    family: str = FAMILY,
) -> dict[str, float]:
    """The metrics of one probe, by key: ``gates/surgeries`` and ``gates/<metric>/<gate key>`` per probed gate.

    Args:
        gated_modules: the gated modules, in order.
        stats: the probe's reduced statistics (host) by module name; modules without an entry are left out.
        unit_threshold: the fraction of positions that makes a unit saturated.
        surgeries: surgeries in effect.
        family: the tag prefix.
    """
    metrics: dict[str, float] = {f"{family}/surgeries": float(surgeries)}
    for gated in gated_modules:
        if gated.name in stats:
            scalars = gate_scalars(gated, stats[gated.name], unit_threshold)
            metrics.update({f"{family}/{tag}": value for tag, value in scalars.items()})
    return metrics


@dataclass(frozen=True)
class GateReport:
    """The texts of GateSurgeryCallback's warnings and records, from its settings.

    Args:
        unit_threshold: the fraction of positions that makes a unit saturated.
        patience: consecutive flagged probes before a gate is diagnosed.
        target_std: the largest spread of a repaired unit's pre-activation about its new bias.
        forget_bias: the total bias of repaired LSTM forget / GRU update gate units.
        max_surgeries: the most gate surgeries in effect.

    Example::

        >>> from torch import nn
        >>> from lightning_gradflow.gates import GatedModule, GateObservation
        >>> lstm = GatedModule("rnn", nn.LSTM(4, 8), "lstm", units=8)
        >>> obs = GateObservation("rnn/l0/input", "input", saturation=0.9, units=(0, 3), weight_rms=(4.0, 2.0))
        >>> report = GateReport(unit_threshold=0.95, patience=3, target_std=1.0, forget_bias=1.0, max_surgeries=16)
        >>> report.finding(obs, lstm, step=7).split(":")[0]
        "gate 'rnn/l0/input' is saturated at step 7"
        >>> report.plan(obs, lstm).split(", ")[1]
        'scale their W_ih/W_hh rows by 0.25-0.5 (weight RMS ≤ 1) and reset their optimizer state'
    """

    unit_threshold: float
    patience: int
    target_std: float
    forget_bias: float
    max_surgeries: int

    def finding(self, obs: GateObservation, gated: GatedModule, step: int) -> str:
        """What the probe found of one diagnosed gate (the first sentence of each of its warnings)."""
        return (
            f"gate '{obs.key}' is saturated at step {step}: {obs.saturation:.1%} of its activations, and"
            f" {len(obs.units)} of {gated.units} units on ≥{self.unit_threshold:.0%} of the probe"
            f" positions, for {self.patience} probe(s) in a row."
        )

    def plan(self, obs: GateObservation, gated: GatedModule) -> str:
        """What a surgery would do to the gate's saturated units."""
        bias = healthy_bias(obs.gate, self.forget_bias)
        which = "bias" if gated.family == "sigmoid" else "bias (b_ih + b_hh)"
        return (
            f"set the {which} of {len(obs.units)} unit(s) to {bias:g}, {self.scaling(obs, gated)} and reset their"
            " optimizer state"
        )

    def scaling(self, obs: GateObservation, gated: GatedModule, done: bool = False) -> str:
        """How the units' weight rows are (``done``) or would be scaled."""
        rows = "weight" if gated.family == "sigmoid" else "W_ih/W_hh"
        scales = row_scales(torch.tensor(obs.weight_rms), self.target_std)
        low, high = float(scales.min()), float(scales.max())
        if low == 1.0:
            return f"{'kept' if done else 'keep their'} {rows} rows (weight RMS already ≤ {self.target_std:g})"
        factor = f"{low:.3g}" if math.isclose(low, high, rel_tol=1e-3) else f"{low:.3g}-{high:.3g}"
        verb = f"{rows} rows scaled" if done else f"scale their {rows} rows"
        return f"{verb} by {factor} (weight RMS ≤ {self.target_std:g})"

    def done(self, obs: GateObservation, gated: GatedModule, optimizer_entries: Collection[str]) -> str:
        """What a surgery did: the new bias, the row scaling and the optimizer state it reset."""
        reset = (
            f"optimizer state reset: {', '.join(sorted(optimizer_entries))}"
            if optimizer_entries
            else "no optimizer state yet"
        )
        return (
            f"bias set to {healthy_bias(obs.gate, self.forget_bias):g}, {self.scaling(obs, gated, done=True)}, {reset}"
        )

    def reason(self, obs: GateObservation, gated: GatedModule, how: str) -> str:
        """The ``reason`` of a ``gate_surgery`` record: the evidence, then what was (or would be) done."""
        return (
            f"{len(obs.units)}/{gated.units} units saturated on ≥{self.unit_threshold:.0%} of probe positions for"
            f" {self.patience} probe(s); {how}"
        )

    def repaired(self, obs: GateObservation, gated: GatedModule, step: int, how: str, after: float) -> str:
        """The warning of an applied surgery, with the saturation before and after on the same probe."""
        return (
            self.finding(obs, gated, step) + f" Surgery on those units ({how}): saturation"
            f" {obs.saturation:.1%} → {after:.1%} on the probe."
        )

    def warning(
        self, decision: GateDecision, gated: GatedModule, step: int, undone: Mapping[str, int]
    ) -> tuple[str, str] | None:
        """``(warn-once key, message)`` of a verdict that only reports, or None (repair, flagged, cooldown...).

        Args:
            decision: the diagnosis's decision on one gate.
            gated: the gate's module.
            step: the probe's step.
            undone: how often rollbacks undid each gate's surgeries (read for ``GIVEN_UP``).
        """
        obs, verdict = decision.observation, decision.verdict
        if verdict is GateVerdict.REPORT_ONLY:
            why = "its module has no rows to repair" if not obs.repairable else "its gate is not in `repair_gates`"
            return f"found:{obs.key}", self.finding(obs, gated, step) + f" It is only reported: {why}."
        if verdict is GateVerdict.MONITOR:
            plan = self.plan(obs, gated)
            return f"found:{obs.key}", self.finding(obs, gated, step) + f" With `auto_intervene=True` it would {plan}."
        if verdict is GateVerdict.BUDGET:
            return "max_surgeries", self.finding(obs, gated, step) + (
                f" `max_surgeries={self.max_surgeries}` surgeries are in effect, so it now only reports; raise"
                " `max_surgeries`, or look for the cause (learning rate, initialisation)."
            )
        if verdict is GateVerdict.GIVEN_UP:
            return f"given_up:{obs.key}", self.finding(obs, gated, step) + (
                f" Rollbacks undid its surgery {undone[obs.key]} times, so the surgery may be what destabilises the"
                " run: it is only reported from now on. Exclude the gate with `repair_gates`, or lower the learning"
                " rate."
            )
        return None


def undone_reason(surgery_step: int, source: str, kind: str, to_step: object) -> str:
    """The ``reason`` of a ``gate_surgery_undone`` record.

    Example::

        >>> undone_reason(4, "EarlyCollapseCallback", "rollback", 2).split(";")[0]
        "the surgery of step 4 was undone by EarlyCollapseCallback's rollback to step 2"
    """
    return (
        f"the surgery of step {surgery_step} was undone by {source}'s {kind} to step {to_step}; the gate is"
        " repaired again if it is diagnosed again"
    )


def undone_message(source: str, kind: str, step: int, to_step: object, keys: Sequence[str]) -> str:
    """The warning of a rollback that undid the surgeries of the gates ``keys``."""
    return (
        f"{source}'s {kind} at step {step} (to step {to_step}) undid {len(keys)} gate"
        f" surger{'y' if len(keys) == 1 else 'ies'} ({', '.join(keys)}); `gates/surgeries`"
        " counts it no more, and a gate is repaired again when it is diagnosed again (twice undone: only"
        " reported)."
    )
