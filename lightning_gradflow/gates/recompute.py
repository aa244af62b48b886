r"""Gate pre-activations recomputed from a captured call, for all time steps at once.

A gate's pre-activation needs ``x_t`` and ``h_{t−1}`` only (not the cell state), so for one layer and direction

    ``Z = X W_ihᵀ + H_prev W_hhᵀ + b_ih + b_hh``

is a few matrix products over *all* probe positions at once (one per gate and input; no loop over time), where
``H_prev`` is the layer's output sequence shifted by one step (forward direction: ``h_0, h_1, …, h_{T−2}``; reverse
direction: ``h_1, …, h_{T−1}, h_0``, and for packed sequences ``h_0`` at each sequence's own last position). With
``proj_size`` the output, and hence ``h``, is the projected state, which is what ``W_hh`` multiplies. A stacked
module returns only its last layer's outputs, so the layers below it are re-run one at a time on the probe
(``torch._VF.lstm``/``gru`` with that layer's weights, ``num_layers=1``, dropout off — the kernels ``nn.LSTM`` itself
calls); each layer's output is the next one's input. The last layer uses the captured output, except when
inter-layer dropout was active in that forward pass (then the captured output belongs to an input the probe cannot
reproduce, and the last layer is re-run too). Layers below the last are therefore measured as in evaluation mode.
After a surgery every layer is re-run from the captured input (cells: from the captured ``h``, i.e. the one-step
effect of the surgery). Cells (``nn.LSTMCell``/``nn.GRUCell``) take ``h`` from each call's input, so each captured
call is one time step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lightning_gradflow.gates.capture import GateCapture
from lightning_gradflow.gates.discovery import GatedModule, layer_parameters

_LOGIT_EPS = 1e-6


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
