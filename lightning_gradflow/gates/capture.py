"""What a probe keeps of one forward call of a gated module: detached copies of its first ``probe_size`` rows.

cuDNN and PyTorch's fused kernels do not expose gate activations, so :mod:`~lightning_gradflow.gates.recompute`
recomputes them from what a forward hook captures here: the module's input, its initial state (or zeros) and its
output sequence (see :class:`GateCapture`). Packed sequences are kept padded, with their lengths; unbatched inputs
get a batch dimension of 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from lightning_gradflow.gates.discovery import GatedModule


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
