r"""Surgery on saturated gate units, and the reset of their optimizer state.

**Surgery** (:func:`repair_gate_units_`), for the units of one gate that were saturated on ≥ ``unit_threshold`` of
the probe positions, in one layer and direction: their biases are set to a healthy value with ``b_ih`` and ``b_hh``
counted together (``b_ih = value``, ``b_hh = 0``): 0 for the input, cell and output gates (σ = 0.5), ``forget_bias``
(+1, Jozefowicz et al. 2015) for the LSTM forget gate. GRU equivalents: the update gate ``z`` carries the old state
(``h' = (1 − z) ⊙ n + z ⊙ h``), the role of the forget gate, so it gets ``forget_bias``; reset and new gates get 0
(``b_in = b_hn = 0``). ``|forget_bias|`` is at most :data:`FORGET_BIAS_LIMIT` (10: σ(10) = 1 − 4.5e-5, a gate
saturated by its bias alone — the opposite of a repair — and far beyond what an initialisation uses; larger values
also overflow half-precision weights). Then their rows of ``W_ih`` and ``W_hh`` are multiplied by
``min(1, target_std / rms)``, where ``rms`` is the root mean square over the probe positions of the unit's weight
part of ``z`` — its spread about the new bias. The RMS rather than the standard deviation, because a unit can be
pushed into saturation by a constant offset of its inputs (``W x`` with a large mean and a small spread), which a
bias reset does not undo; with ``rms ≤ target_std`` both the offset and the spread are bounded, so ``z`` stays
within a few ``target_std`` of the healthy bias on the probe. A unit saturated only by its bias keeps its weights
(scaling up a near-constant unit would amplify whatever noise its rows hold). The factor is at most 1, so no
``target_std`` can make a weight larger or non-finite. Modules without biases get only the rescaling. Nothing else
changes: the other rows, ``W_hr`` of a projected LSTM and the other layers are left bitwise untouched.

**Optimizer state** (:func:`reset_optimizer_rows_`): stale moments would undo a surgery (Adam's ``exp_avg`` keeps
pushing the bias back), so for every touched parameter each state entry of the parameter's shape gets the touched
rows reset to its initial value: 0 for ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``,
``square_avg``, … ; Adagrad's ``sum`` to the group's ``initial_accumulator_value``; Rprop's ``step_size`` to the
group's ``lr``. Entries of another shape (the scalar ``step``, factored second moments) are left alone: Adam's bias
correction then uses the tensor's old step count, so the touched rows' first updates are up to
``(1 − β1)/√(1 − β2)`` ≈ 3.2 × lr, as in ReDo (Sokar et al. 2023), which resets moments the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gradflow.gates.discovery import ALL_GATES, MEMORY_GATES, GatedModule, layer_parameters

#: The largest ``|forget_bias|`` a surgery writes (see the module docstring).
FORGET_BIAS_LIMIT = 10.0


@dataclass(frozen=True)
class TouchedRows:
    """Rows of one parameter that a surgery changed.

    Attributes:
        name: the parameter's short name in its module (``weight_ih_l0``, ``bias_hh_l1_reverse``, ``weight``...).
        param: the parameter.
        rows: the changed row indices (dimension 0), int64 on the parameter's device.
    """

    name: str
    param: Tensor
    rows: Tensor


def healthy_bias(gate: str, forget_bias: float = 1.0) -> float:
    """The total bias (``b_ih + b_hh``) a repaired unit gets.

    ``forget_bias`` for the LSTM forget and GRU update gates, 0 for the others (σ = 0.5, tanh = 0).
    """
    if gate not in ALL_GATES:
        raise ValueError(f"Expected a gate name from {ALL_GATES}, but got {gate!r}.")
    return forget_bias if gate in MEMORY_GATES else 0.0


def row_scales(weight_rms: Tensor, target_std: float) -> Tensor:
    """``min(1, target_std / rms)`` per unit (1 where the RMS is 0): the factor for each unit's weight rows."""
    safe = weight_rms.double().clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(weight_rms > 0, (target_std / safe).clamp(max=1.0), torch.ones_like(safe))


def repair_gate_units_(
    gated: GatedModule,
    row: int,
    gate: str,
    units: Tensor,
    weight_rms: Tensor,
    *,
    target_std: float = 1.0,
    forget_bias: float = 1.0,
) -> list[TouchedRows]:
    """Resets the biases of ``units`` of one gate in one layer/direction and rescales their weight rows, in place.

    Args:
        gated: the module (:attr:`GatedModule.repairable`).
        row: the layer/direction row.
        gate: the gate's name.
        units: indices of the units to repair (int64, any device).
        weight_rms: the RMS of each of those units' weight part of ``z`` (same length as ``units``), e.g.
            ``GateStats.weight_rms[row, gate_index, units]``.
        target_std: the RMS the weight rows are scaled down to (never up).
        forget_bias: the healthy total bias of the LSTM forget / GRU update gate.

    Returns:
        The rows changed, per parameter (biases first, then weights).

    Raises:
        ValueError: for a module that cannot be repaired, an unknown gate, ``units``/``weight_rms`` of different
            lengths, a ``target_std`` that is not a finite number > 0, or ``|forget_bias| >`` :data:`FORGET_BIAS_LIMIT`
            (or NaN): nothing that would write a non-finite or self-saturating value into the weights.
    """
    if not 0 < target_std < math.inf:
        raise ValueError(f"Expected `target_std` to be a finite number > 0, but got {target_std!r}.")
    if not abs(forget_bias) <= FORGET_BIAS_LIMIT:
        raise ValueError(
            f"Expected `forget_bias` to be a finite float in [-{FORGET_BIAS_LIMIT:g}, {FORGET_BIAS_LIMIT:g}], but got"
            f" {forget_bias!r}."
        )
    if not gated.repairable:
        raise ValueError(f"'{gated.name}' ({type(gated.module).__name__}) has no gate rows that can be repaired.")
    if gate not in gated.gates:
        raise ValueError(f"Expected `gate` to be one of {gated.gates} for '{gated.name}', but got {gate!r}.")
    if units.numel() != weight_rms.numel():
        raise ValueError(f"`units` has {units.numel()} entries but `weight_rms` has {weight_rms.numel()}.")
    params = layer_parameters(gated, row // gated.num_directions, row % gated.num_directions)
    suffix = "" if gated.cell or gated.family == "sigmoid" else _row_suffix(gated, row)
    size = gated.units
    assert size is not None
    touched = []
    with torch.no_grad():
        for name, value in _bias_values(params, gate, forget_bias):
            p = params[name]
            rows = (gated.gates.index(gate) * size + units).to(p.device)
            p[rows] = torch.tensor(value, dtype=p.dtype, device=p.device)
            touched.append(TouchedRows(name + suffix, p, rows))
        scales = row_scales(weight_rms.to(units.device), target_std)
        for name in ("weight_ih", "weight_hh", "weight"):
            if name not in params:
                continue
            p = params[name]
            rows = (gated.gates.index(gate) * size + units).to(p.device)
            p[rows] = (p[rows].double() * scales.to(p.device).unsqueeze(1)).to(p.dtype)
            touched.append(TouchedRows(name + suffix, p, rows))
    return touched


def _row_suffix(gated: GatedModule, row: int) -> str:
    layer, direction = divmod(row, gated.num_directions)
    return f"_l{layer}{'_reverse' if direction else ''}"


def _bias_values(params: dict[str, Tensor], gate: str, forget_bias: float) -> list[tuple[str, float]]:
    """Which bias gets which value: the total goes to ``b_ih`` (or the Linear's bias), ``b_hh`` gets 0."""
    total = healthy_bias(gate, forget_bias)
    if "bias" in params:
        return [("bias", total)]
    return [(name, value) for name, value in (("bias_ih", total), ("bias_hh", 0.0)) if name in params]


#: Optimizer state entries that do not start at 0: ``(optimizer state key, param_group key holding the initial value)``.
_NONZERO_INITIAL_STATE = {"sum": "initial_accumulator_value", "step_size": "lr"}


def reset_optimizer_rows_(optimizers: Iterable[torch.optim.Optimizer], touched: Iterable[TouchedRows]) -> list[str]:
    """Resets the optimizer state of the touched rows to its initial value, in place (see the module docstring).

    Args:
        optimizers: the optimizers to search for the touched parameters.
        touched: what :func:`repair_gate_units_` changed.

    Returns:
        The sorted names of the state entries that were reset (e.g. ``["exp_avg", "exp_avg_sq"]``).
    """
    touched = list(touched)
    reset: set[str] = set()
    for optimizer in optimizers:
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for item in touched:
            state = optimizer.state.get(item.param)
            if not state or id(item.param) not in group_of:
                continue
            group = group_of[id(item.param)]
            for key, value in state.items():
                if not isinstance(value, Tensor) or value.shape != item.param.shape:
                    continue
                initial = float(group.get(_NONZERO_INITIAL_STATE[key], 0.0)) if key in _NONZERO_INITIAL_STATE else 0.0
                with torch.no_grad():
                    value[item.rows.to(value.device)] = initial
                reset.add(key)
    return sorted(reset)
