r"""Gates of recurrent networks: find them, recompute their activations on a probe, measure saturation, repair them.

Pure functions over modules and tensors (no Lightning imports); :class:`~lightning_gradflow.GateSurgeryCallback` is
the stateful shell around them.

**Which modules.** :func:`find_gated_modules` finds every ``nn.LSTM`` (any ``num_layers``, ``bidirectional``,
``batch_first``, ``proj_size``), ``nn.GRU``, ``nn.LSTMCell`` and ``nn.GRUCell``. Other modules join by name:

* ``"sigmoid"``: the module's output (or the first element of a tuple output) is the gate's *pre-activation* ``z``
  and the model applies ``σ(z)`` to it. Its last dimension holds the units, every other dimension is a position.
  If the module is an ``nn.Linear``, its rows can be repaired (``z = W x + b``); otherwise it is monitored only.
* ``"sigmoid_output"``: the module's output already is ``σ(z)`` (values in ``[0, 1]``); ``z`` is recovered as
  ``logit`` (clamped to ``[1e-6, 1 − 1e-6]``, i.e. ``|z| ≤ 13.8``). Monitored only.

**Gate order.** PyTorch packs the gates row-wise: LSTM ``W_ih = [W_ii; W_if; W_ig; W_io]`` (input, forget, cell,
output), GRU ``[W_ir; W_iz; W_in]`` (reset, update, new), each block ``hidden_size`` rows; the same for ``W_hh``,
``b_ih`` and ``b_hh``. The cell gate ``g`` and the GRU's new gate ``n`` use tanh, the others the sigmoid. The GRU's
new gate is ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``: its recurrent term, bias included, is scaled by the
reset gate.

**Recomputation.** cuDNN and PyTorch's fused kernels do not expose gate activations, so they are recomputed from
what a forward hook captures on the first ``probe_size`` sequences of a batch: the module's input, its initial
state (or zeros) and its output sequence. A gate's pre-activation needs ``x_t`` and ``h_{t−1}`` only (not the cell
state), so for one layer and direction

    ``Z = X W_ihᵀ + H_prev W_hhᵀ + b_ih + b_hh``

is a few matrix products over *all* probe positions at once (one per gate and input; no loop over time), where
``H_prev`` is the layer's output sequence shifted
by one step (forward direction: ``h_0, h_1, …, h_{T−2}``; reverse direction: ``h_1, …, h_{T−1}, h_0``, and for
packed sequences ``h_0`` at each sequence's own last position). With ``proj_size`` the output, and hence ``h``, is
the projected state, which is what ``W_hh`` multiplies. A stacked module returns only its last layer's outputs, so
the layers below it are re-run one at a time on the probe (``torch._VF.lstm``/``gru`` with that layer's weights,
``num_layers=1``, dropout off — the kernels ``nn.LSTM`` itself calls); each layer's output is the next one's input.
The last layer uses the captured output, except when inter-layer dropout was active in that forward pass (then the
captured output belongs to an input the probe cannot reproduce, and the last layer is re-run too). Layers below the
last are therefore measured as in evaluation mode. After a surgery every layer is re-run from the captured input
(cells: from the captured ``h``, i.e. the one-step effect of the surgery). Cells (``nn.LSTMCell``/``nn.GRUCell``)
take ``h`` from each call's input, so each captured call is one time step.

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
2-18 % of its input/output gate activations beyond it.

**Surgery** (:func:`repair_gate_units_`), for the units of one gate that were saturated on ≥ ``unit_threshold`` of
the probe positions, in one layer and direction: their biases are set to a healthy value with ``b_ih`` and ``b_hh``
counted together (``b_ih = value``, ``b_hh = 0``): 0 for the input, cell and output gates (σ = 0.5), ``forget_bias``
(+1, Jozefowicz et al. 2015) for the LSTM forget gate. GRU equivalents: the update gate ``z`` carries the old state
(``h' = (1 − z) ⊙ n + z ⊙ h``), the role of the forget gate, so it gets ``forget_bias``; reset and new gates get 0
(``b_in = b_hn = 0``). Then their rows of ``W_ih`` and ``W_hh`` are multiplied by
``min(1, target_std / rms)``, where ``rms`` is the root mean square over the probe positions of the unit's weight
part of ``z`` — its spread about the new bias. The RMS rather than the standard deviation, because a unit can be
pushed into saturation by a constant offset of its inputs (``W x`` with a large mean and a small spread), which a
bias reset does not undo; with ``rms ≤ target_std`` both the offset and the spread are bounded, so ``z`` stays
within a few ``target_std`` of the healthy bias on the probe. A unit saturated only by its bias keeps its weights
(scaling up a near-constant unit would amplify whatever noise its rows hold). Modules without biases get only the
rescaling. Nothing else changes: the other rows, ``W_hr`` of a projected LSTM and the other layers are left bitwise
untouched.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lightning_gradflow.stats import HistogramSpec, tensor_histograms

GateFamily = Literal["lstm", "gru", "sigmoid"]
EXTRA_GATE_KINDS: tuple[str, ...] = ("sigmoid", "sigmoid_output")

LSTM_GATES: tuple[str, ...] = ("input", "forget", "cell", "output")
GRU_GATES: tuple[str, ...] = ("reset", "update", "new")
SIGMOID_GATES: tuple[str, ...] = ("gate",)
ALL_GATES: tuple[str, ...] = LSTM_GATES + GRU_GATES + SIGMOID_GATES
TANH_GATES = frozenset({"cell", "new"})
#: Gates whose healthy bias is ``forget_bias`` rather than 0: they decide how much of the old state is kept.
MEMORY_GATES = frozenset({"forget", "update"})
_LOGIT_EPS = 1e-6


class GateStat(IntEnum):
    """Columns of a :class:`GateStats` table: additive per-unit sums over the probe positions."""

    POSITIONS = 0
    SATURATED = 1
    ACTIVATION = 2
    DERIVATIVE = 3
    WEIGHT_SUMSQ = 4


NUM_GATE_STATS = len(GateStat)


# ------------------------------------------------------------------------------------------------- finding gates


@dataclass(frozen=True)
class GatedModule:
    """A module with gates and how to read them.

    Attributes:
        name: the module's dotted path in the model (``""`` for the model itself).
        module: the module.
        family: ``"lstm"``, ``"gru"`` or ``"sigmoid"`` (a gate named in ``extra_gates``).
        cell: whether it is an ``nn.LSTMCell``/``nn.GRUCell`` (one time step per call).
        output_is_activation: for ``"sigmoid"`` modules, whether the output is ``σ(z)`` rather than ``z``.
        units: units per gate (``hidden_size``; ``out_features`` of an ``nn.Linear``; ``None`` until the first
            output of another module has been seen).
    """

    name: str
    module: nn.Module
    family: GateFamily
    cell: bool = False
    output_is_activation: bool = False
    units: int | None = None

    @property
    def gates(self) -> tuple[str, ...]:
        """Gate names in PyTorch's row order."""
        return {"lstm": LSTM_GATES, "gru": GRU_GATES, "sigmoid": SIGMOID_GATES}[self.family]

    @property
    def num_directions(self) -> int:
        """2 for a bidirectional ``nn.LSTM``/``nn.GRU``, else 1."""
        return 2 if getattr(self.module, "bidirectional", False) and not self.cell else 1

    @property
    def num_layers(self) -> int:
        """Stacked layers (1 for cells and ``extra_gates``)."""
        return int(getattr(self.module, "num_layers", 1)) if self.family != "sigmoid" else 1

    @property
    def num_rows(self) -> int:
        """Layer/direction rows of the statistics: ``num_layers · num_directions``."""
        return self.num_layers * self.num_directions

    def row_names(self) -> list[str]:
        """``l0``, ``l0_reverse``, ``l1``, … as in PyTorch's parameter names."""
        suffixes = ["", "_reverse"][: self.num_directions]
        return [f"l{k}{s}" for k in range(self.num_layers) for s in suffixes]

    @property
    def tanh_mask(self) -> list[bool]:
        """Per gate, whether it uses tanh (the LSTM cell gate, the GRU new gate)."""
        return [g in TANH_GATES for g in self.gates]

    @property
    def repairable(self) -> bool:
        """Whether :func:`repair_gate_units_` can change its rows."""
        return self.family != "sigmoid" or (isinstance(self.module, nn.Linear) and not self.output_is_activation)

    def with_units(self, units: int) -> GatedModule:
        """A copy with the unit count filled in."""
        return GatedModule(self.name, self.module, self.family, self.cell, self.output_is_activation, units)


def find_gated_modules(
    model: nn.Module, extra_gates: Mapping[str, str] | None = None, exclude: Sequence[str] | None = None
) -> list[GatedModule]:
    """Every gated module in ``model``, in registration order.

    Args:
        model: the model to search.
        extra_gates: dotted module path → ``"sigmoid"`` or ``"sigmoid_output"`` (see the module docstring).
        exclude: dotted module paths to leave out; excluding a module excludes everything inside it.

    Raises:
        ValueError: for a path in ``extra_gates`` or ``exclude`` that is not a module of ``model``, or an unknown
            kind in ``extra_gates``.
    """
    extra_gates = dict(extra_gates or {})
    exclude = list(exclude or [])
    modules = dict(model.named_modules())
    for arg, names in (("extra_gates", list(extra_gates)), ("exclude", exclude)):
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(
                f"`{arg}` names {missing}, which {'is' if len(missing) == 1 else 'are'} not a module of"
                f" {type(model).__name__}. Use dotted paths from `model.named_modules()`, e.g."
                f" {[n for n in modules if n][:5]}."
            )
    for name, kind in extra_gates.items():
        if kind not in EXTRA_GATE_KINDS:
            raise ValueError(f"Expected `extra_gates[{name!r}]` to be one of {EXTRA_GATE_KINDS}, but got {kind!r}.")

    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") or e == "" for e in exclude)

    found = []
    for name, module in modules.items():
        if excluded(name):
            continue
        gated = _builtin_gates(name, module)
        if name in extra_gates:
            gated = _extra_gate(name, module, extra_gates[name])
        if gated is not None:
            found.append(gated)
    return found


def _builtin_gates(name: str, module: nn.Module) -> GatedModule | None:
    if isinstance(module, nn.LSTM):
        return GatedModule(name, module, "lstm", units=module.hidden_size)
    if isinstance(module, nn.GRU):
        return GatedModule(name, module, "gru", units=module.hidden_size)
    if isinstance(module, nn.LSTMCell):
        return GatedModule(name, module, "lstm", cell=True, units=module.hidden_size)
    if isinstance(module, nn.GRUCell):
        return GatedModule(name, module, "gru", cell=True, units=module.hidden_size)
    return None


def _extra_gate(name: str, module: nn.Module, kind: str) -> GatedModule:
    units = module.out_features if isinstance(module, nn.Linear) else None
    return GatedModule(name, module, "sigmoid", output_is_activation=kind == "sigmoid_output", units=units)


# ------------------------------------------------------------------------------------------------------ capture


@dataclass(frozen=True)
class GateCapture:
    """What the probe keeps of one forward call of a gated module (detached copies of the first probe rows).

    Attributes:
        input: recurrent modules: the input, batch first, ``(n, T, input_size)`` (padded for packed sequences);
            cells: ``(n, input_size)``; ``extra_gates``: the module's input (``nn.Linear`` only, else ``None``).
        output: recurrent modules: the last layer's output sequence ``(n, T, D · H_out)``; cells: unused
            (``None``); ``extra_gates``: the output as ``(positions, units)``.
        h0: the initial hidden state ``(L · D, n, H_out)`` (recurrent), or the cell's ``h`` ``(n, H_out)``;
            ``None`` means zeros.
        c0: an LSTM's initial cell state ``(L · D, n, hidden_size)``, needed to re-run stacked layers.
        lengths: sequence lengths ``(n,)`` (CPU int64) for packed input, else ``None``.
        exact_output: whether ``output`` came from inputs the probe can reproduce (no active inter-layer dropout).
    """

    input: Tensor | None
    output: Tensor | None
    h0: Tensor | None = None
    c0: Tensor | None = None
    lengths: Tensor | None = None
    exact_output: bool = True


def capture_call(
    gated: GatedModule, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, probe_size: int
) -> GateCapture | None:
    """The probe's copy of one forward call, from a forward hook's ``args``, ``kwargs`` and ``output``.

    Returns ``None`` when the call cannot be read (an ``extra_gates`` module whose output is not a tensor).
    """
    with torch.no_grad():
        if gated.family == "sigmoid":
            return _capture_extra(gated, args, kwargs, output, probe_size)
        if gated.cell:
            return _capture_cell(gated, args, kwargs, probe_size)
        return _capture_recurrent(gated, args, kwargs, output, probe_size)


def _call_arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _keep(t: Tensor | None, n: int, dim: int = 0) -> Tensor | None:
    return None if t is None else t.detach().narrow(dim, 0, min(n, t.shape[dim])).clone()


def _capture_recurrent(
    gated: GatedModule, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, probe_size: int
) -> GateCapture:
    module = gated.module
    inp = _call_arg(args, kwargs, 0, "input")
    hx = _call_arg(args, kwargs, 1, "hx")
    out = output[0]
    lengths = None
    if isinstance(inp, PackedSequence):
        x, lengths = pad_packed_sequence(inp, batch_first=True)
        y, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    elif inp.dim() == 2:  # unbatched (T, input_size)
        x, y = inp.unsqueeze(0), out.unsqueeze(0)
        hx = None if hx is None else _map_state(hx, lambda h: h.unsqueeze(1))
    else:
        x, y = (inp, out) if module.batch_first else (inp.transpose(0, 1), out.transpose(0, 1))
    h0, c0 = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (None, None)
    n = probe_size
    dropout_active = module.training and float(getattr(module, "dropout", 0.0)) > 0 and gated.num_layers > 1
    return GateCapture(
        input=_keep(x, n),
        output=_keep(y, n),
        h0=_keep(h0, n, dim=1),
        c0=_keep(c0, n, dim=1),
        lengths=None if lengths is None else lengths[:n].clone(),
        exact_output=not dropout_active,
    )


def _map_state(hx: Any, fn: Any) -> Any:
    return tuple(fn(h) for h in hx) if isinstance(hx, tuple) else fn(hx)


def _capture_cell(gated: GatedModule, args: tuple[Any, ...], kwargs: dict[str, Any], probe_size: int) -> GateCapture:
    inp = _call_arg(args, kwargs, 0, "input")
    hx = _call_arg(args, kwargs, 1, "hx")
    h = hx[0] if isinstance(hx, tuple) else hx
    if inp.dim() == 1:  # unbatched
        inp = inp.unsqueeze(0)
        h = None if h is None else h.unsqueeze(0)
    return GateCapture(input=_keep(inp, probe_size), output=None, h0=_keep(h, probe_size))


def _capture_extra(
    gated: GatedModule, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, probe_size: int
) -> GateCapture | None:
    out = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(out, Tensor) or out.dim() == 0 or not out.is_floating_point():
        return None
    if out.dim() == 1:
        out = out.unsqueeze(0)
    inp = _call_arg(args, kwargs, 0, "input") if isinstance(gated.module, nn.Linear) else None
    kept_out = _keep(out, probe_size)
    assert kept_out is not None
    return GateCapture(
        input=_keep(inp, probe_size) if isinstance(inp, Tensor) else None,
        output=kept_out.reshape(-1, out.shape[-1]),
    )


# ------------------------------------------------------------------------------------------------ recomputation


@dataclass(frozen=True)
class LayerGates:
    """Gate pre-activations of one layer and direction at the probe's valid positions.

    Attributes:
        row: the layer/direction row (``layer · num_directions + direction``).
        preact: ``(gates, positions, units)`` pre-activations ``z``.
        weight_part: the same shape: the part of ``z`` that scaling the unit's weight rows scales (``z`` minus the
            bias terms; for the GRU new gate ``W_in x + r ⊙ W_hn h``).
    """

    row: int
    preact: Tensor
    weight_part: Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Probe arithmetic runs in float32, or float64 for float64 models (half types are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def recompute_gates(gated: GatedModule, capture: GateCapture, use_captured_output: bool = True) -> list[LayerGates]:
    """Gate pre-activations of every layer and direction for one captured call, from batched matrix products.

    Args:
        gated: the module.
        capture: one call, from :func:`capture_call`.
        use_captured_output: take the last layer's hidden states from the captured output (exact gates of the
            forward pass); ``False`` re-runs every layer with the module's current weights (after a surgery).
    """
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=False):
        if gated.family == "sigmoid":
            return [_extra_gates(gated, capture, use_captured_output)]
        if gated.cell:
            assert capture.input is not None
            x = capture.input
            dtype = compute_dtype(x.dtype)
            h = capture.h0 if capture.h0 is not None else x.new_zeros(x.shape[0], _hidden_out(gated))
            return [_layer_gates(gated, 0, x.to(dtype), h.to(dtype))]
        return _recurrent_gates(gated, capture, use_captured_output)


def _hidden_out(gated: GatedModule) -> int:
    """The size of ``h``: ``proj_size`` for a projected LSTM, else ``hidden_size``."""
    proj = int(getattr(gated.module, "proj_size", 0) or 0)
    return proj if proj > 0 else _hidden_size(gated)


def _hidden_size(gated: GatedModule) -> int:
    return int(getattr(gated.module, "hidden_size", 0))


def _recurrent_gates(gated: GatedModule, capture: GateCapture, use_captured_output: bool) -> list[LayerGates]:
    assert capture.input is not None and capture.output is not None
    dtype = compute_dtype(capture.input.dtype)
    x = capture.input.to(dtype)
    n, steps = x.shape[:2]
    num_dirs, h_out = gated.num_directions, _hidden_out(gated)
    rows = gated.num_rows
    h0 = capture.h0.to(dtype) if capture.h0 is not None else x.new_zeros(rows, n, h_out)
    c0 = None
    if gated.family == "lstm":
        c0 = capture.c0.to(dtype) if capture.c0 is not None else x.new_zeros(rows, n, _hidden_size(gated))
    valid = _valid_positions(capture.lengths, n, steps, x.device)
    result = []
    for k in range(gated.num_layers):
        layer_rows = slice(k * num_dirs, (k + 1) * num_dirs)
        if k == gated.num_layers - 1 and use_captured_output and capture.exact_output:
            out = capture.output.to(dtype)
        else:
            out = _run_layer(gated, k, x, h0[layer_rows], None if c0 is None else c0[layer_rows], capture.lengths)
        flat_x = x.reshape(n * steps, -1) if valid is None else x[valid]
        for d in range(num_dirs):
            h_seq = out[..., d * h_out : (d + 1) * h_out]
            prev = _previous_hidden(h_seq, h0[k * num_dirs + d], reverse=d == 1, lengths=capture.lengths)
            flat_prev = prev.reshape(n * steps, -1) if valid is None else prev[valid]
            result.append(_layer_gates(gated, k * num_dirs + d, flat_x, flat_prev))
        x = out
    return result


def _valid_positions(lengths: Tensor | None, n: int, steps: int, device: torch.device) -> Tensor | None:
    if lengths is None:
        return None
    return torch.arange(steps, device=device).unsqueeze(0) < lengths.to(device).unsqueeze(1)


def _previous_hidden(h_seq: Tensor, h0: Tensor, reverse: bool, lengths: Tensor | None) -> Tensor:
    """``h_{t−1}`` for every position ``t`` (batch first); the reverse direction's previous step is ``t + 1``."""
    if not reverse:
        return torch.cat([h0.unsqueeze(1), h_seq[:, :-1]], dim=1)
    shifted = torch.cat([h_seq[:, 1:], h0.unsqueeze(1)], dim=1)
    if lengths is None:
        return shifted
    steps = h_seq.shape[1]
    last = torch.arange(steps, device=h_seq.device).unsqueeze(0) == (lengths.to(h_seq.device) - 1).unsqueeze(1)
    return torch.where(last.unsqueeze(-1), h0.unsqueeze(1), shifted)


def layer_parameters(gated: GatedModule, layer: int, direction: int) -> dict[str, Tensor]:
    """The parameters of one layer and direction, under their names without the ``_l{k}[_reverse]`` suffix.

    ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``, ``weight_hr`` (the present ones); for an ``extra_gates``
    ``nn.Linear``: ``weight``, ``bias``.
    """
    module = gated.module
    if gated.family == "sigmoid":
        return {k: v for k, v in (("weight", module.weight), ("bias", module.bias)) if isinstance(v, Tensor)}
    suffix = "" if gated.cell else f"_l{layer}{'_reverse' if direction else ''}"
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    params = {name: getattr(module, name + suffix, None) for name in names}
    return {name: p for name, p in params.items() if isinstance(p, Tensor)}


def _flat_layer_weights(gated: GatedModule, layer: int, dtype: torch.dtype) -> list[Tensor]:
    """One layer's weights in the order ``torch._VF.lstm``/``gru`` take: w_ih, w_hh, b_ih, b_hh, w_hr per direction."""
    weights = []
    for d in range(gated.num_directions):
        params = layer_parameters(gated, layer, d)
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        weights += [params[name].detach().to(dtype) for name in names if name in params]
    return weights


def _run_layer(
    gated: GatedModule, layer: int, x: Tensor, h0: Tensor, c0: Tensor | None, lengths: Tensor | None
) -> Tensor:
    """One layer of a stacked module on the probe: its output sequence ``(n, T, D · H_out)``, batch first."""
    module = gated.module
    weights = _flat_layer_weights(gated, layer, x.dtype)
    has_bias, bidirectional = bool(module.bias), gated.num_directions == 2
    if lengths is None:
        if gated.family == "lstm":
            assert c0 is not None
            return torch._VF.lstm(x, (h0, c0), weights, has_bias, 1, 0.0, False, bidirectional, True)[0]
        return torch._VF.gru(x, h0, weights, has_bias, 1, 0.0, False, bidirectional, True)[0]
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    order = packed.sorted_indices
    assert order is not None
    if gated.family == "lstm":
        assert c0 is not None
        hx = (h0.index_select(1, order), c0.index_select(1, order))
        data = torch._VF.lstm(packed.data, packed.batch_sizes, hx, weights, has_bias, 1, 0.0, False, bidirectional)[0]
    else:
        h = h0.index_select(1, order)
        data = torch._VF.gru(packed.data, packed.batch_sizes, h, weights, has_bias, 1, 0.0, False, bidirectional)[0]
    out = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


def _layer_gates(gated: GatedModule, row: int, x: Tensor, h_prev: Tensor) -> LayerGates:
    """Pre-activations of all gates of one layer and direction from ``x`` ``(N, I)`` and ``h_{t−1}`` ``(N, H_out)``.

    One matrix product per gate and input, written straight into a contiguous ``(gates, N, units)`` buffer.
    """
    params = layer_parameters(gated, row // gated.num_directions, row % gated.num_directions)
    num_gates, units = len(gated.gates), _hidden_size(gated)
    w_ih, w_hh = params["weight_ih"].detach().to(x.dtype), params["weight_hh"].detach().to(x.dtype)
    bias = _gate_bias(params.get("bias_ih"), num_gates, units, x) + _gate_bias(
        params.get("bias_hh"), num_gates, units, x
    )
    gi = x.new_empty(num_gates, x.shape[0], units)
    for g in range(num_gates):
        torch.mm(x, w_ih[g * units : (g + 1) * units].T, out=gi[g])
    if gated.family == "lstm":
        for g in range(num_gates):
            gi[g].addmm_(h_prev, w_hh[g * units : (g + 1) * units].T)
        return LayerGates(row, gi + bias, gi)
    # GRU: the new gate's recurrent term, bias included, is scaled by the reset gate.
    gh = torch.stack([h_prev @ w_hh[g * units : (g + 1) * units].T for g in range(num_gates)])
    b_hn = _gate_bias(params.get("bias_hh"), num_gates, units, x)[2]
    weight_part = gi.clone()
    weight_part[:2] += gh[:2]
    preact = weight_part + bias
    reset = torch.sigmoid(preact[0])
    weight_part[2].addcmul_(reset, gh[2])
    preact[2] = weight_part[2] + (bias[2] - b_hn) + reset * b_hn
    return LayerGates(row, preact, weight_part)


def _gate_bias(bias: Tensor | None, num_gates: int, units: int, like: Tensor) -> Tensor:
    if bias is None:
        return like.new_zeros((num_gates, 1, units))
    return bias.detach().to(like.dtype).view(num_gates, 1, units)


def _extra_gates(gated: GatedModule, capture: GateCapture, use_captured_output: bool) -> LayerGates:
    assert capture.output is not None
    module = gated.module
    dtype = compute_dtype(capture.output.dtype)
    if gated.output_is_activation:
        z = torch.logit(capture.output.to(dtype), eps=_LOGIT_EPS)
        return LayerGates(0, z.unsqueeze(0), z.unsqueeze(0))
    if isinstance(module, nn.Linear) and capture.input is not None:
        x = capture.input.to(dtype).reshape(-1, module.in_features)
        weight_part = x @ module.weight.detach().to(dtype).T
        bias = module.bias.detach().to(dtype) if module.bias is not None else x.new_zeros(())
        z = capture.output.to(dtype) if use_captured_output else weight_part + bias
        return LayerGates(0, z.unsqueeze(0), (z - bias).unsqueeze(0))
    z = capture.output.to(dtype)
    return LayerGates(0, z.unsqueeze(0), z.unsqueeze(0))


# --------------------------------------------------------------------------------------------------- statistics


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


def activation_histograms(act: Tensor, tanh_mask: Sequence[bool], bins: int) -> Tensor:
    """Counts of each gate's activations over ``bins`` equal buckets of ``[0, 1]`` (tanh gates: ``[−1, 1]``).

    ``act`` is ``(gates, positions, units)``; returns ``(gates, bins)`` int64. Buckets are ``[left, right)``, the
    last one closed. Counted with ``torch.bincount``, or, where that is not deterministic (CUDA with
    ``torch.use_deterministic_algorithms(True)``), with a sort and a binary search.
    """
    if act.is_cuda and torch.are_deterministic_algorithms_enabled():
        return _sorted_histograms(act, tanh_mask, bins)
    num_gates = act.shape[0]
    low = torch.tensor([-1.0 if t else 0.0 for t in tanh_mask], dtype=act.dtype, device=act.device).view(-1, 1, 1)
    bucket = ((act - low) / (1 - low) * bins).long().clamp_(0, bins - 1)
    bucket += torch.arange(num_gates, device=act.device).view(-1, 1, 1) * bins
    return torch.bincount(bucket.reshape(-1), minlength=num_gates * bins).view(num_gates, bins)


def _sorted_histograms(act: Tensor, tanh_mask: Sequence[bool], bins: int) -> Tensor:
    num_gates = act.shape[0]
    low = torch.tensor([-1.0 if t else 0.0 for t in tanh_mask], dtype=act.dtype, device=act.device)
    fractions = torch.arange(1, bins, dtype=act.dtype, device=act.device) / bins
    edges = low.unsqueeze(1) + (1 - low).unsqueeze(1) * fractions.unsqueeze(0)  # inner edges, (gates, bins - 1)
    values = act.reshape(num_gates, -1).sort(dim=1).values
    below = torch.searchsorted(values, edges.contiguous(), right=False)
    bounds = torch.cat([torch.zeros_like(below[:, :1]), below, torch.full_like(below[:, :1], values.shape[1])], dim=1)
    return bounds.diff(dim=1)


def histogram_raw(counts: Sequence[int], low: float, high: float) -> dict[str, Any]:
    """Arguments for ``SummaryWriter.add_histogram_raw`` from equal-width bucket counts over ``[low, high]``.

    ``sum`` and ``sum_squares`` are estimated from bucket midpoints. Returns an empty dict when all counts are 0.
    """
    bins = len(counts)
    width = (high - low) / bins
    limits = [low + width * (i + 1) for i in range(bins)]
    mids = [low + width * (i + 0.5) for i in range(bins)]
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return {}
    first, last = nonzero[0], nonzero[-1]
    kept = range(first, last + 1)
    return {
        "min": low + width * first,
        "max": limits[last],
        "num": int(sum(counts)),
        "sum": float(sum(counts[i] * mids[i] for i in kept)),
        "sum_squares": float(sum(counts[i] * mids[i] * mids[i] for i in kept)),
        "bucket_limits": [limits[i] for i in kept],
        "bucket_counts": [int(counts[i]) for i in kept],
    }


# ------------------------------------------------------------------------------------------------------ surgery


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
        ValueError: for a module that cannot be repaired, an unknown gate, or ``units``/``weight_rms`` of
            different lengths.
    """
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
