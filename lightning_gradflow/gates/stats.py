r"""Per-unit gate statistics of a probe: saturation, mean activation, σ′ health, weight spread.

**Statistics** (per module, layer/direction row, gate and unit; all additive, so ranks and calls add up exactly):
positions, saturated activations, sum of activations, sum of derivatives, and the sum of squares of the part of
``z`` that scaling the unit's weight rows scales (``z`` minus its bias terms). See :class:`GateStats`.

**Saturation.** A sigmoid gate is saturated when ``σ(z) < ε`` or ``σ(z) > 1 − ε``; the tanh gates when
``|tanh(z)| > 1 − ε`` (tested as ``|z| > logit(1 − ε)`` and ``|z| > atanh(1 − ε)``). The default ``ε = 0.01`` means
``|z| > 4.6`` for the sigmoid, where ``σ′ < 0.0099``: the gate's pre-activation receives less than 4 % of the
gradient it gets at its steepest point (``σ′(0) = 1/4``), so its weights barely learn, and a gate shut near 0 also
blocks what it gates, forwards and backwards; for tanh ``|z| > 2.65``, ``tanh′ < 0.02`` (2 % of ``tanh′(0) = 1``).
The common alternative, 0.1/0.9 (Karpathy et al. 2015), flags working gates: a forget gate with the recommended
bias of 1 passes 0.9 as soon as its weights add 1.2 to ``z``, and forget gates legitimately sit there to integrate
over long spans. ``ε = 0.01`` flags gates that have stopped learning, such as the documented dead LSTM whose input
and output gates sat at ≈0.005, while a healthy character LSTM (``examples/saturated_lstm.py`` after surgery) has
2-18 % of its input/output gate activations beyond it. ``ε`` lies in ``[EPSILON_MIN, 0.5)``: below
:data:`EPSILON_MIN` (``1e-6``: ``|z| > 13.8``, ``σ′ < 1e-6``) ``1 − ε`` stops being a number apart from 1 soon after,
and the tanh margin ``atanh(1 − ε)`` becomes infinite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from lightning_gradflow.gates.capture import GateCapture
from lightning_gradflow.gates.discovery import GatedModule, gate_key
from lightning_gradflow.gates.histograms import activation_histograms
from lightning_gradflow.gates.recompute import LayerGates, recompute_gates
from lightning_gradflow.stats import HistogramSpec, tensor_histograms

#: The smallest saturation margin ε (see the module docstring).
EPSILON_MIN = 1e-6


class GateStat(IntEnum):
    """Columns of a :class:`GateStats` table: additive per-unit sums over the probe positions."""

    POSITIONS = 0
    SATURATED = 1
    ACTIVATION = 2
    DERIVATIVE = 3
    WEIGHT_SUMSQ = 4


NUM_GATE_STATS = len(GateStat)


def gate_activations(preact: Tensor, tanh_mask: Sequence[bool]) -> Tensor:
    """``σ(z)``, or ``tanh(z)`` for the gates flagged in ``tanh_mask``; ``preact`` is ``(gates, positions, units)``."""
    act = torch.empty_like(preact)
    for g, is_tanh in enumerate(tanh_mask):
        (torch.tanh if is_tanh else torch.sigmoid)(preact[g], out=act[g])
    return act


def saturation_margins(tanh_mask: Sequence[bool], epsilon: float) -> list[float]:
    """Per gate, the ``|z|`` beyond which it is saturated: ``logit(1 − ε)`` (sigmoid) or ``atanh(1 − ε)`` (tanh).

    ``σ(z) < ε or σ(z) > 1 − ε`` is ``|z| > logit(1 − ε)``, and ``|tanh(z)| > 1 − ε`` is ``|z| > atanh(1 − ε)``:
    one comparison on the pre-activation instead of two on the activation.
    """
    return [math.atanh(1 - epsilon) if t else math.log((1 - epsilon) / epsilon) for t in tanh_mask]


def gate_counts(layer: LayerGates, tanh_mask: Sequence[bool], epsilon: float, act: Tensor | None = None) -> Tensor:
    """The additive per-unit sums of one layer and direction: ``(gates, NUM_GATE_STATS, units)`` float64.

    Saturated: ``σ < ε`` or ``σ > 1 − ε`` (sigmoid gates), ``|tanh| > 1 − ε`` (tanh gates), tested on ``z`` (see
    :func:`saturation_margins`). Derivative: ``σ(1 − σ)`` or ``1 − tanh²``. ``act`` may pass in
    :func:`gate_activations` of ``layer.preact`` if already computed. Sums over positions accumulate in the probe's
    dtype (counts exactly, as integers) and are returned in float64.
    """
    act = gate_activations(layer.preact, tanh_mask) if act is None else act
    positions = torch.full(act.shape[2:], float(act.shape[1]), dtype=torch.float64, device=act.device)
    per_gate = []
    for g, margin in enumerate(saturation_margins(tanh_mask, epsilon)):
        a, w = act[g], layer.weight_part[g]
        saturated = layer.preact[g].abs() > margin
        derivative = 1 - a * a if tanh_mask[g] else a * (1 - a)
        sums = [saturated.sum(0), a.sum(0), derivative.sum(0), (w * w).sum(0)]
        per_gate.append(torch.stack([positions, *(t.double() for t in sums)]))
    return torch.stack(per_gate)


@dataclass(frozen=True)
class GateStats:
    """Per-unit gate statistics of one module: a ``(rows, gates, NUM_GATE_STATS, units)`` float64 table.

    Rows are layer/direction pairs (``layer · num_directions + direction``), gates in PyTorch's row order. Every
    column is a sum over probe positions, so tables of several calls, batches or ranks add up exactly; everything
    below is derived from the sums.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_gradflow.gates import find_gated_modules, measure_gates, capture_call
        >>> lstm = nn.LSTM(3, 4, batch_first=True)
        >>> (gated,) = find_gated_modules(nn.ModuleDict({"rnn": lstm}))
        >>> x = torch.randn(2, 5, 3)
        >>> capture = capture_call(gated, (x,), {}, lstm(x), probe_size=2)
        >>> stats = measure_gates(gated, [capture]).stats
        >>> stats.saturation.shape, int(stats.positions[0])  # (rows, gates); 2 sequences x 5 steps
        (torch.Size([1, 4]), 10)
    """

    table: Tensor

    def __post_init__(self) -> None:
        if self.table.ndim != 4 or self.table.shape[2] != NUM_GATE_STATS:
            raise ValueError(
                f"Expected a (rows, gates, {NUM_GATE_STATS}, units) table, but got shape {tuple(self.table.shape)}."
            )

    def column(self, stat: GateStat) -> Tensor:
        """One column, ``(rows, gates, units)``."""
        return self.table[:, :, stat]

    @property
    def positions(self) -> Tensor:
        """Probe positions per row, ``(rows,)``."""
        return self.table[:, 0, GateStat.POSITIONS, 0]

    def _per_gate(self, stat: GateStat) -> Tensor:
        total = self.column(GateStat.POSITIONS).sum(-1)
        return self.column(stat).sum(-1) / total.clamp(min=1)

    @property
    def saturation(self) -> Tensor:
        """Fraction of the gate's activations that are saturated, ``(rows, gates)``."""
        return self._per_gate(GateStat.SATURATED)

    @property
    def mean(self) -> Tensor:
        """Mean activation, ``(rows, gates)``."""
        return self._per_gate(GateStat.ACTIVATION)

    @property
    def sigma_prime(self) -> Tensor:
        """Mean derivative of the activation, ``σ′`` (or ``tanh′``), ``(rows, gates)``: gradient health."""
        return self._per_gate(GateStat.DERIVATIVE)

    @property
    def unit_saturation(self) -> Tensor:
        """Per unit, the fraction of probe positions on which it is saturated, ``(rows, gates, units)``."""
        return self.column(GateStat.SATURATED) / self.column(GateStat.POSITIONS).clamp(min=1)

    def saturated_units(self, unit_threshold: float) -> Tensor:
        """Per unit, whether it is saturated on at least ``unit_threshold`` of the positions (bool)."""
        return (self.unit_saturation >= unit_threshold) & (self.column(GateStat.POSITIONS) > 0)

    def saturated_unit_fraction(self, unit_threshold: float) -> Tensor:
        """Fraction of the gate's units that are saturated units, ``(rows, gates)``."""
        return self.saturated_units(unit_threshold).double().mean(-1)

    @property
    def weight_rms(self) -> Tensor:
        """Per unit, the root mean square over positions of the weight part of ``z``, ``(rows, gates, units)``."""
        return (self.column(GateStat.WEIGHT_SUMSQ) / self.column(GateStat.POSITIONS).clamp(min=1)).sqrt()


def empty_stats(gated: GatedModule, device: torch.device | None = None) -> GateStats:
    """A table of zeros with the module's shape (what a rank that did not call the module contributes)."""
    if gated.units is None:
        raise ValueError(f"The unit count of '{gated.name}' is not known yet: it is read from its first output.")
    shape = (gated.num_rows, len(gated.gates), NUM_GATE_STATS, gated.units)
    return GateStats(torch.zeros(shape, dtype=torch.float64, device=device))


@dataclass(frozen=True)
class GateMeasurement:
    """What one probe measured of one module: its :class:`GateStats` and, optionally, histograms.

    Attributes:
        stats: the per-unit statistics.
        activation_counts: ``(rows, gates, bins)`` counts of the activations over equal buckets (see
            :func:`activation_histograms`), or ``None``.
        preact_counts: ``(rows · gates, spec.num_bins)`` counts of the pre-activations over the statistics
            engine's log-spaced buckets (row ``row · num_gates + gate``), or ``None``.
    """

    stats: GateStats
    activation_counts: Tensor | None = None
    preact_counts: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        """The tables that are present, in a fixed order (for packing into one buffer)."""
        return [t for t in (self.stats.table, self.activation_counts, self.preact_counts) if t is not None]


def measure_gates(
    gated: GatedModule,
    captures: Iterable[GateCapture],
    epsilon: float = 0.01,
    use_captured_output: bool = True,
    device: torch.device | None = None,
    activation_bins: int = 0,
    preact_spec: HistogramSpec | None = None,
) -> GateMeasurement:
    """Per-unit statistics (and histograms) of all gates of a module over every captured call.

    With no captures everything is zero, with the module's shapes (what a rank that did not call it contributes).

    Args:
        gated: the module (with ``units`` known).
        captures: its captured calls.
        epsilon: the saturation margin ε.
        use_captured_output: see :func:`recompute_gates`.
        device: where the tables live (default: the device of the module's parameters).
        activation_bins: buckets of the activation histograms (0: none).
        preact_spec: bucket layout of the pre-activation histograms (``None``: none).
    """
    if device is None:
        device = next((p.device for p in gated.module.parameters()), torch.device("cpu"))
    stats = empty_stats(gated, device)
    rows, num_gates = stats.table.shape[:2]
    activation = torch.zeros((rows, num_gates, activation_bins), dtype=torch.long, device=device)
    preacts: list[Tensor] = []
    groups: list[int] = []
    for capture in captures:
        for layer in recompute_gates(gated, capture, use_captured_output):
            act = gate_activations(layer.preact, gated.tanh_mask)
            stats.table[layer.row] += gate_counts(layer, gated.tanh_mask, epsilon, act).to(device)
            if activation_bins:
                activation[layer.row] += activation_histograms(act, gated.tanh_mask, activation_bins).to(device)
            if preact_spec is not None:
                preacts += list(layer.preact)
                groups += [layer.row * num_gates + g for g in range(num_gates)]
    preact_counts = None
    if preact_spec is not None:
        preact_counts = torch.zeros((rows * num_gates, preact_spec.num_bins), dtype=torch.long, device=device)
        if preacts:
            hist = tensor_histograms(preacts, spec=preact_spec)
            index = torch.tensor(groups, device=hist.counts.device)
            preact_counts += hist.reduce_rows(index, rows * num_gates).counts.to(device)
    return GateMeasurement(stats, activation if activation_bins else None, preact_counts)


def gate_scalars(gated: GatedModule, stats: GateStats, unit_threshold: float) -> dict[str, float]:
    """The probe's scalars of one module: ``"<metric>/<gate key>"`` → value, for every row the probe saw.

    Metrics: ``saturation``, ``mean``, ``saturated_units`` (the fraction of units saturated on at least
    ``unit_threshold`` of the positions) and ``sigma_prime``; keys are :func:`~lightning_gradflow.gates.gate_key`.
    """
    columns = {
        "saturation": stats.saturation,
        "mean": stats.mean,
        "saturated_units": stats.saturated_unit_fraction(unit_threshold),
        "sigma_prime": stats.sigma_prime,
    }
    has_positions = stats.positions > 0
    scalars = {}
    for row, row_name in enumerate(gated.row_names()):
        if not bool(has_positions[row]):
            continue
        for g, gate in enumerate(gated.gates):
            key = gate_key(gated.name, row_name, gate)
            for metric, values in columns.items():
                scalars[f"{metric}/{key}"] = float(values[row, g])
    return scalars
