"""The pure gate functions: recomputed gates against a step-by-step reference cell, statistics, surgery, optimizer.

The reference runs every LSTM/GRU the textbook way — one sequence, one direction, one time step at a time, in float64
— and is itself checked against ``nn.LSTM``/``nn.GRU``'s outputs, so a wrong gate order or shift shows up twice.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_gradflow.gates import (
    GateCapture,
    GateDiagnosis,
    GatedModule,
    GateObservation,
    GateStats,
    LayerGates,
    _sorted_histograms,
    activation_histograms,
    capture_call,
    find_gated_modules,
    gate_counts,
    gate_observations,
    healthy_bias,
    histogram_raw,
    measure_gates,
    recompute_gates,
    repair_gate_units_,
    reset_optimizer_rows_,
    row_scales,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # PyTorch's own LSTM warns when it falls back from oneDNN for projected LSTMs; not ours.
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
]


# ------------------------------------------------------------------------------------------------ the reference


def _params(module: nn.Module, layer: int, direction: int) -> dict[str, Tensor | None]:
    suffix = f"_l{layer}{'_reverse' if direction else ''}"
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    return {name: getattr(module, name + suffix, None) for name in names}


def reference_cell(
    kind: str, p: dict[str, Tensor | None], x: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One time step of one sequence: (pre-activations (gates, units), next h, next c), written out per gate."""
    w_ih, w_hh = p["weight_ih"], p["weight_hh"]
    assert w_ih is not None and w_hh is not None
    b_ih = p["bias_ih"] if p["bias_ih"] is not None else torch.zeros(w_ih.shape[0], dtype=x.dtype)
    b_hh = p["bias_hh"] if p["bias_hh"] is not None else torch.zeros(w_ih.shape[0], dtype=x.dtype)
    if kind == "lstm":
        z_i, z_f, z_g, z_o = (w_ih @ x + b_ih + w_hh @ h + b_hh).chunk(4)
        i, f, g, o = torch.sigmoid(z_i), torch.sigmoid(z_f), torch.tanh(z_g), torch.sigmoid(z_o)
        assert c is not None
        c_next = f * c + i * g
        h_next = o * torch.tanh(c_next)
        if p["weight_hr"] is not None:
            h_next = p["weight_hr"] @ h_next
        return torch.stack([z_i, z_f, z_g, z_o]), h_next, c_next
    xi_r, xi_z, xi_n = (w_ih @ x + b_ih).chunk(3)
    hh_r, hh_z, hh_n = (w_hh @ h + b_hh).chunk(3)
    r = torch.sigmoid(xi_r + hh_r)
    z = torch.sigmoid(xi_z + hh_z)
    z_n = xi_n + r * hh_n
    n = torch.tanh(z_n)
    return torch.stack([xi_r + hh_r, xi_z + hh_z, z_n]), (1 - z) * n + z * h, None


def reference_rnn(
    module: nn.Module, x: Tensor, lengths: list[int], h0: Tensor, c0: Tensor | None
) -> tuple[dict[int, Tensor], Tensor]:
    """Pre-activations per row ``(gates, positions, units)`` (positions: sequence-major, valid steps only) and the
    last layer's output ``(n, T, D * H_out)``, with a loop over sequences, directions and time steps.
    """
    kind = "lstm" if isinstance(module, nn.LSTM) else "gru"
    dirs = 2 if module.bidirectional else 1
    n, steps = x.shape[:2]
    preacts: dict[int, Tensor] = {}
    layer_input = x
    for k in range(module.num_layers):
        out_dim = (module.proj_size or module.hidden_size) * dirs
        out = torch.zeros(n, steps, out_dim, dtype=x.dtype)
        for d in range(dirs):
            row = k * dirs + d
            p = _params(module, k, d)
            per_sequence = []
            for b in range(n):
                h = h0[row, b]
                c = None if c0 is None else c0[row, b]
                times = range(lengths[b]) if d == 0 else reversed(range(lengths[b]))
                z_of: dict[int, Tensor] = {}
                for t in times:
                    z_of[t], h, c = reference_cell(kind, p, layer_input[b, t], h, c)
                    width = h.shape[0]
                    out[b, t, d * width : (d + 1) * width] = h
                per_sequence += [z_of[t] for t in range(lengths[b])]
            preacts[row] = torch.stack(per_sequence, dim=1)
        layer_input = out
    return preacts, layer_input


def _inputs(
    module: nn.Module, n: int, steps: int, with_state: bool, seed: int = 0
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    dirs = 2 if module.bidirectional else 1
    rows = module.num_layers * dirs
    x = torch.randn(n, steps, module.input_size, generator=gen, dtype=torch.float64)
    if not with_state:
        return x, None, None
    h_out = getattr(module, "proj_size", 0) or module.hidden_size
    h0 = torch.randn(rows, n, h_out, generator=gen, dtype=torch.float64)
    c0 = (
        torch.randn(rows, n, module.hidden_size, generator=gen, dtype=torch.float64)
        if isinstance(module, nn.LSTM)
        else None
    )
    return x, h0, c0


def _probe(module: nn.Module, x: Tensor, h0: Tensor | None, c0: Tensor | None, lengths: list[int] | None) -> Any:
    """Calls the module the way a user would, with a forward hook capturing the call; returns the capture."""
    (gated,) = find_gated_modules(nn.ModuleDict({"rnn": module}))
    captured: list[GateCapture | None] = []

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        captured.append(capture_call(gated, args, kwargs, output, probe_size=64))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    inp: Any = x if module.batch_first else x.transpose(0, 1)
    if lengths is not None:
        inp = pack_padded_sequence(inp, torch.tensor(lengths), batch_first=module.batch_first, enforce_sorted=False)
    hx: Any = None
    if h0 is not None:
        hx = (h0, c0) if isinstance(module, nn.LSTM) else h0
    with torch.no_grad():
        output = module(inp, hx) if hx is not None else module(inp)
    handle.remove()
    return gated, captured[0], output


def _assert_gates_match(
    module: nn.Module, x: Tensor, h0: Tensor | None, c0: Tensor | None, lengths: list[int] | None
) -> None:
    gated, capture, _ = _probe(module, x, h0, c0, lengths)
    n, steps = x.shape[:2]
    full = lengths or [steps] * n
    rows = gated.num_rows
    h_out = getattr(module, "proj_size", 0) or module.hidden_size
    ref_h0 = h0 if h0 is not None else torch.zeros(rows, n, h_out, dtype=x.dtype)
    ref_c0 = (
        c0
        if c0 is not None
        else (torch.zeros(rows, n, module.hidden_size, dtype=x.dtype) if isinstance(module, nn.LSTM) else None)
    )
    with torch.no_grad():
        expected, ref_out = reference_rnn(module, x, full, ref_h0, ref_c0)
    # the reference itself agrees with the module's own output
    torch.testing.assert_close(capture.output, ref_out, rtol=1e-10, atol=1e-10)
    for use_captured_output in (True, False):
        layers = recompute_gates(gated, capture, use_captured_output=use_captured_output)
        assert sorted(layer.row for layer in layers) == list(range(rows))
        for layer in layers:
            assert layer.preact.shape == (len(gated.gates), sum(full), module.hidden_size)
            torch.testing.assert_close(layer.preact, expected[layer.row], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------- recomputed gates


@pytest.mark.parametrize(
    ("num_layers", "bidirectional", "batch_first", "proj_size"),
    list(itertools.product([1, 2], [False, True], [False, True], [0, 3])),
)
def test_lstm_gates_equal_the_reference_cell(
    num_layers: int, bidirectional: bool, batch_first: bool, proj_size: int
) -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(
        4, 5, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, proj_size=proj_size
    )
    lstm = lstm.double()
    x, h0, c0 = _inputs(lstm, n=3, steps=6, with_state=True)
    _assert_gates_match(lstm, x, h0, c0, None)


@pytest.mark.parametrize(
    ("num_layers", "bidirectional", "batch_first"), list(itertools.product([1, 2], [False, True], [False, True]))
)
def test_gru_gates_equal_the_reference_cell(num_layers: int, bidirectional: bool, batch_first: bool) -> None:
    torch.manual_seed(1)
    gru = nn.GRU(4, 5, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first).double()
    x, h0, _ = _inputs(gru, n=3, steps=6, with_state=True)
    _assert_gates_match(gru, x, h0, None, None)


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru"])
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_sequences_use_each_sequences_own_length(kind: str, with_state: bool) -> None:
    torch.manual_seed(2)
    if kind == "gru":
        module: nn.Module = nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    else:
        module = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2 if kind == "lstm_proj" else 0).double()
    x, h0, c0 = _inputs(module, n=4, steps=7, with_state=with_state)
    _assert_gates_match(module, x, h0, c0, lengths=[5, 7, 2, 4])


def test_lstm_without_bias_and_without_initial_state() -> None:
    torch.manual_seed(3)
    lstm = nn.LSTM(3, 4, num_layers=2, bias=False, bidirectional=True).double()
    x, _, _ = _inputs(lstm, n=2, steps=5, with_state=False)
    _assert_gates_match(lstm, x, None, None, None)


def test_unbatched_input_and_keyword_state() -> None:
    torch.manual_seed(4)
    lstm = nn.LSTM(3, 4, num_layers=2).double()
    (gated,) = find_gated_modules(nn.ModuleDict({"rnn": lstm}))
    x = torch.randn(6, 3, dtype=torch.float64)
    hx = (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    capture = capture_call(gated, (x,), {"hx": hx}, lstm(x, hx), probe_size=8)
    assert capture is not None and capture.input is not None and capture.h0 is not None
    assert capture.input.shape == (1, 6, 3) and capture.h0.shape == (2, 1, 4)
    expected, _ = reference_rnn(lstm, x.unsqueeze(0), [6], hx[0].unsqueeze(1), hx[1].unsqueeze(1))
    for layer in recompute_gates(gated, capture):
        torch.testing.assert_close(layer.preact, expected[layer.row], rtol=1e-10, atol=1e-10)


def test_probe_keeps_only_the_first_probe_size_sequences() -> None:
    lstm = nn.LSTM(3, 4, batch_first=True).double()
    (gated,) = find_gated_modules(nn.ModuleDict({"rnn": lstm}))
    x = torch.randn(10, 5, 3, dtype=torch.float64)
    capture = capture_call(gated, (x,), {}, lstm(x), probe_size=4)
    assert capture is not None and capture.input is not None
    assert torch.equal(capture.input, x[:4])
    (layer,) = recompute_gates(gated, capture)
    assert layer.preact.shape == (4, 4 * 5, 4)


def test_inter_layer_dropout_in_training_recomputes_the_last_layer_too() -> None:
    torch.manual_seed(5)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True).double().train()
    (gated,) = find_gated_modules(nn.ModuleDict({"rnn": lstm}))
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    capture = capture_call(gated, (x,), {}, lstm(x), probe_size=8)
    assert capture is not None and not capture.exact_output
    expected, _ = reference_rnn(
        lstm, x, [5, 5], torch.zeros(2, 2, 4, dtype=torch.float64), torch.zeros(2, 2, 4, dtype=torch.float64)
    )
    for layer in recompute_gates(gated, capture):  # as in eval mode: dropout off for every layer
        torch.testing.assert_close(layer.preact, expected[layer.row], rtol=1e-10, atol=1e-10)


def test_float32_module_matches_the_float64_reference() -> None:
    torch.manual_seed(6)
    lstm = nn.LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True)
    (gated,) = find_gated_modules(nn.ModuleDict({"rnn": lstm}))
    x = torch.randn(3, 9, 4)
    capture = capture_call(gated, (x,), {}, lstm(x), probe_size=8)
    assert capture is not None
    with torch.no_grad():
        ref_module = nn.LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True).double()
        ref_module.load_state_dict({k: v.double() for k, v in lstm.state_dict().items()})
        expected, _ = reference_rnn(
            ref_module,
            x.double(),
            [9] * 3,
            torch.zeros(4, 3, 8, dtype=torch.float64),
            torch.zeros(4, 3, 8, dtype=torch.float64),
        )
    for layer in recompute_gates(gated, capture):
        assert layer.preact.dtype == torch.float32
        torch.testing.assert_close(layer.preact.double(), expected[layer.row], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell_type", [nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("with_state", [False, True])
def test_cells_called_in_a_loop_capture_every_step(cell_type: type[nn.Module], with_state: bool) -> None:
    torch.manual_seed(7)
    cell = cell_type(3, 5).double()
    kind = "lstm" if cell_type is nn.LSTMCell else "gru"
    (gated,) = find_gated_modules(nn.ModuleDict({"cell": cell}))
    assert gated.cell and gated.num_rows == 1
    captures: list[GateCapture | None] = []

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        captures.append(capture_call(gated, args, kwargs, output, probe_size=8))

    handle = cell.register_forward_hook(hook, with_kwargs=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, generator=gen, dtype=torch.float64) if with_state else torch.zeros(2, 5, dtype=torch.float64)
    c = torch.randn(2, 5, generator=gen, dtype=torch.float64) if with_state else torch.zeros(2, 5, dtype=torch.float64)
    p: dict[str, Tensor | None] = {
        name: getattr(cell, name) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    }
    p["weight_hr"] = None
    expected = []
    with torch.no_grad():
        for t in range(4):
            rows = [reference_cell(kind, p, x[t, b], h[b], c[b]) for b in range(2)]
            expected.append(torch.stack([z for z, _, _ in rows], dim=1))
            state = (h, c) if kind == "lstm" else h
            out = cell(x[t]) if t == 0 and not with_state else cell(x[t], state)  # first call: the module's zeros
            h, c = out if kind == "lstm" else (out, c)
    handle.remove()
    assert len(captures) == 4
    for capture, ref in zip(captures, expected, strict=True):
        assert capture is not None
        (layer,) = recompute_gates(gated, capture)
        torch.testing.assert_close(layer.preact, ref, rtol=1e-10, atol=1e-10)


def test_extra_gates_linear_pre_activation_and_sigmoid_output() -> None:
    torch.manual_seed(8)
    model = nn.ModuleDict({"proj": nn.Linear(3, 4), "block": nn.Sequential(nn.Linear(3, 2), nn.Sigmoid())}).double()
    gated = find_gated_modules(model, extra_gates={"proj": "sigmoid", "block": "sigmoid_output"})
    by_name = {g.name: g for g in gated}
    assert by_name["proj"].repairable and by_name["proj"].units == 4
    assert not by_name["block"].repairable and by_name["block"].units is None
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    z = model["proj"](x)
    capture = capture_call(by_name["proj"], (x,), {}, z, probe_size=2)
    assert capture is not None
    for use_captured_output in (True, False):
        (layer,) = recompute_gates(by_name["proj"], capture, use_captured_output)
        torch.testing.assert_close(layer.preact[0], z[:2].reshape(-1, 4))
        torch.testing.assert_close(layer.weight_part[0], (x[:2] @ model["proj"].weight.T).reshape(-1, 4))
    s = model["block"](x)
    block = by_name["block"].with_units(2)
    capture = capture_call(block, (x,), {}, s, probe_size=5)
    assert capture is not None
    (layer,) = recompute_gates(block, capture)
    torch.testing.assert_close(torch.sigmoid(layer.preact[0]), s.reshape(-1, 2), rtol=0, atol=1e-6)


def test_extra_gate_with_a_non_tensor_output_is_not_captured() -> None:
    (gated,) = find_gated_modules(nn.ModuleDict({"m": nn.Identity()}), extra_gates={"m": "sigmoid"})
    assert capture_call(gated, ("text",), {}, "text", probe_size=2) is None


# --------------------------------------------------------------------------------------------------- discovery


def test_find_gated_modules_everywhere_with_exclude() -> None:
    model = nn.ModuleDict(
        {
            "enc": nn.ModuleDict({"lstm": nn.LSTM(2, 3, num_layers=2, bidirectional=True), "cell": nn.GRUCell(2, 3)}),
            "dec": nn.GRU(2, 3),
            "head": nn.Linear(3, 2),
            "cell": nn.LSTMCell(2, 3),
        }
    )
    found = find_gated_modules(model)
    assert [(g.name, g.family, g.cell) for g in found] == [
        ("enc.lstm", "lstm", False),
        ("enc.cell", "gru", True),
        ("dec", "gru", False),
        ("cell", "lstm", True),
    ]
    assert found[0].row_names() == ["l0", "l0_reverse", "l1", "l1_reverse"]
    assert found[0].gates == ("input", "forget", "cell", "output") and found[2].gates == ("reset", "update", "new")
    assert [g.name for g in find_gated_modules(model, exclude=["enc"])] == ["dec", "cell"]
    assert [g.name for g in find_gated_modules(model, exclude=["enc.lstm", "cell"])] == ["enc.cell", "dec"]
    assert [g.name for g in find_gated_modules(model, extra_gates={"head": "sigmoid"})][-2:] == ["head", "cell"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"extra_gates": {"decoder.gate": "sigmoid"}}, r"`extra_gates` names \['decoder.gate'\]"),
        ({"exclude": ["lstmm"]}, r"`exclude` names \['lstmm'\]"),
        ({"extra_gates": {"head": "relu"}}, r"`extra_gates\['head'\]` to be one of"),
    ],
)
def test_find_gated_modules_rejects_unknown_names(kwargs: dict[str, Any], match: str) -> None:
    model = nn.ModuleDict({"lstm": nn.LSTM(2, 3), "head": nn.Linear(3, 1)})
    with pytest.raises(ValueError, match=match):
        find_gated_modules(model, **kwargs)


# -------------------------------------------------------------------------------------------------- statistics


def test_gate_counts_against_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(9)
    preact = torch.randn(4, 50, 6, generator=gen, dtype=torch.float64) * 6
    weight_part = torch.randn(4, 50, 6, generator=gen, dtype=torch.float64)
    mask = [False, False, True, False]
    eps = 0.01
    table = gate_counts(LayerGates(0, preact, weight_part), mask, eps)
    assert table.shape == (4, 5, 6)
    for g in range(4):
        act = torch.tanh(preact[g]) if mask[g] else torch.sigmoid(preact[g])
        for u in range(6):
            a = act[:, u].tolist()
            sat = sum(abs(v) > 1 - eps for v in a) if mask[g] else sum(v < eps or v > 1 - eps for v in a)
            deriv = sum(1 - v * v for v in a) if mask[g] else sum(v * (1 - v) for v in a)
            w = weight_part[g, :, u].tolist()
            expected = [50, sat, sum(a), deriv, sum(v * v for v in w)]
            assert table[g, :, u].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_gate_stats_derived_quantities() -> None:
    # one row, one gate, two units; unit 0 saturated on 9 of 10 positions, unit 1 on 10 of 10
    table = torch.zeros(1, 1, 5, 2, dtype=torch.float64)
    table[0, 0, 0] = 10
    table[0, 0, 1] = torch.tensor([9.0, 10.0])
    table[0, 0, 2] = torch.tensor([1.0, 9.9])
    table[0, 0, 3] = torch.tensor([0.5, 0.1])
    table[0, 0, 4] = torch.tensor([10.0, 40.0])  # E[w²] = 1 and 4
    stats = GateStats(table)
    assert float(stats.saturation[0, 0]) == pytest.approx(19 / 20)
    assert float(stats.mean[0, 0]) == pytest.approx(10.9 / 20)
    assert float(stats.sigma_prime[0, 0]) == pytest.approx(0.6 / 20)
    assert stats.saturated_units(0.95).tolist() == [[[False, True]]]
    assert stats.saturated_units(0.9).tolist() == [[[True, True]]]
    assert float(stats.saturated_unit_fraction(0.95)[0, 0]) == 0.5
    assert stats.weight_rms[0, 0].tolist() == pytest.approx([1.0, 2.0])
    with pytest.raises(ValueError, match="rows, gates, 5, units"):
        GateStats(torch.zeros(2, 3))


def test_measure_gates_adds_calls_and_is_zero_without_captures() -> None:
    torch.manual_seed(10)
    lstm = nn.LSTM(3, 4, batch_first=True)
    (gated,) = find_gated_modules(nn.ModuleDict({"rnn": lstm}))
    empty = measure_gates(gated, [], activation_bins=5)
    assert empty.stats.table.shape == (1, 4, 5, 4) and not empty.stats.table.any()
    xs = [torch.randn(2, 5, 3), torch.randn(3, 4, 3)]
    captures = [capture_call(gated, (x,), {}, lstm(x), probe_size=8) for x in xs]
    both = measure_gates(gated, captures, activation_bins=5)  # type: ignore[arg-type]
    parts = [measure_gates(gated, [c], activation_bins=5) for c in captures]  # type: ignore[list-item]
    torch.testing.assert_close(both.stats.table, parts[0].stats.table + parts[1].stats.table)
    assert int(both.stats.positions[0]) == 2 * 5 + 3 * 4
    assert both.activation_counts is not None
    assert both.activation_counts.sum(-1).unique().tolist() == [(2 * 5 + 3 * 4) * 4]


def test_activation_histograms_and_raw_arguments() -> None:
    act = torch.tensor([[[0.0, 0.1], [0.26, 0.99], [1.0, 0.5]], [[-1.0, -0.2], [0.0, 0.3], [0.999, 1.0]]])
    counts = activation_histograms(act, [False, True], bins=4)
    assert counts.tolist() == [[2, 1, 1, 2], [1, 1, 2, 2]]
    assert _sorted_histograms(act, [False, True], bins=4).tolist() == counts.tolist()  # the deterministic path
    many = torch.rand(3, 200, 7, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = [False, True, False]
    many[0] = many[0].abs()
    many[2] = many[2].abs()
    assert torch.equal(activation_histograms(many, mask, 20), _sorted_histograms(many, mask, 20))
    raw = histogram_raw([0, 2, 0, 1], low=0.0, high=1.0)
    assert raw["bucket_limits"] == [0.5, 0.75, 1.0]
    assert raw["bucket_counts"] == [2, 0, 1]
    assert raw["num"] == 3 and raw["min"] == 0.25 and raw["max"] == 1.0
    assert raw["sum"] == pytest.approx(2 * 0.375 + 0.875)
    assert histogram_raw([0, 0], 0.0, 1.0) == {}


# ------------------------------------------------------------------------------------------------------ surgery


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _changed_rows(before: dict[str, Tensor], module: nn.Module) -> dict[str, list[int]]:
    changed = {}
    for name, p in module.named_parameters():
        diff = (p.detach() != before[name]).reshape(p.shape[0], -1).any(dim=1)
        if diff.any():
            changed[name] = diff.nonzero().flatten().tolist()
    return changed


def _saturated_lstm(bidirectional: bool = True, proj_size: int = 0, bias: bool = True) -> nn.LSTM:
    torch.manual_seed(11)
    lstm = nn.LSTM(3, 6, num_layers=2, bidirectional=bidirectional, proj_size=proj_size, bias=bias, batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l1_reverse[18:24] *= 200  # output gate of layer 1, reverse: huge weights
        if bias:
            lstm.bias_ih_l1_reverse[18:24] += 3
    return lstm


@pytest.mark.parametrize(("bias", "proj_size"), [(True, 0), (True, 2), (False, 0)])
def test_surgery_changes_only_the_named_units_and_brings_the_spread_to_target(bias: bool, proj_size: int) -> None:
    lstm = _saturated_lstm(proj_size=proj_size, bias=bias)
    model = nn.ModuleDict({"rnn": lstm})
    (gated,) = find_gated_modules(model)
    x = torch.randn(8, 12, 3, generator=torch.Generator().manual_seed(0))
    capture = capture_call(gated, (x,), {}, lstm(x), probe_size=8)
    assert capture is not None
    stats = measure_gates(gated, [capture]).stats
    row, gate = 3, gated.gates.index("output")
    units = torch.tensor([0, 2, 5])
    rms = stats.weight_rms[row, gate, units]
    assert bool((rms > 1.0).all())
    before = _snapshot(model)
    touched = repair_gate_units_(gated, row, "output", units, rms, target_std=1.0, forget_bias=1.0)
    rows = [18, 20, 23]
    expected = {"rnn.weight_ih_l1_reverse": rows, "rnn.weight_hh_l1_reverse": rows}
    if bias:
        expected |= {"rnn.bias_ih_l1_reverse": rows, "rnn.bias_hh_l1_reverse": rows}
    assert _changed_rows(before, model) == expected
    assert {t.name for t in touched} == {k.removeprefix("rnn.") for k in expected}
    if bias:
        total = lstm.bias_ih_l1_reverse[rows] + lstm.bias_hh_l1_reverse[rows]
        assert total.tolist() == [0.0, 0.0, 0.0]
    # the same hidden states (captured output) with the new rows: the weight RMS is exactly the target
    after = measure_gates(gated, [capture]).stats
    torch.testing.assert_close(
        after.weight_rms[row, gate, units], torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(
    ("family", "gate", "value"),
    [
        ("lstm", "forget", 1.5),
        ("lstm", "input", 0.0),
        ("gru", "update", 1.5),
        ("gru", "new", 0.0),
        ("gru", "reset", 0.0),
    ],
)
def test_surgery_bias_values_count_b_ih_and_b_hh_together(family: str, gate: str, value: float) -> None:
    torch.manual_seed(12)
    module: nn.Module = nn.LSTM(2, 4) if family == "lstm" else nn.GRU(2, 4)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(5.0)
    (gated,) = find_gated_modules(nn.ModuleDict({"m": module}))
    g = gated.gates.index(gate)
    repair_gate_units_(gated, 0, gate, torch.tensor([1]), torch.tensor([0.5]), forget_bias=1.5)
    assert float((module.bias_ih_l0[g * 4 + 1] + module.bias_hh_l0[g * 4 + 1]).detach()) == value
    assert float(module.bias_hh_l0[g * 4 + 1].detach()) == 0.0
    assert healthy_bias(gate, 1.5) == value
    assert float(module.weight_ih_l0[g * 4 + 1, 0].detach()) == 5.0  # RMS 0.5 < target 1: rows are not scaled up


def test_surgery_on_cells_and_extra_linear_gates() -> None:
    torch.manual_seed(13)
    model = nn.ModuleDict({"cell": nn.GRUCell(2, 3), "gate": nn.Linear(2, 4)})
    found = {g.name: g for g in find_gated_modules(model, extra_gates={"gate": "sigmoid"})}
    before = _snapshot(model)
    repair_gate_units_(found["cell"], 0, "update", torch.tensor([2]), torch.tensor([4.0]), target_std=2.0)
    repair_gate_units_(found["gate"], 0, "gate", torch.tensor([0, 3]), torch.tensor([8.0, 0.0]), target_std=2.0)
    assert _changed_rows(before, model) == {
        "cell.weight_ih": [5],
        "cell.weight_hh": [5],
        "cell.bias_ih": [5],
        "cell.bias_hh": [5],
        "gate.weight": [0],  # unit 3 has RMS 0: its row is kept
        "gate.bias": [0, 3],
    }
    torch.testing.assert_close(model["gate"].weight[0], before["gate.weight"][0] / 4)
    torch.testing.assert_close(model["cell"].weight_ih[5], before["cell.weight_ih"][5] / 2)


def test_surgery_refuses_what_it_cannot_repair() -> None:
    model = nn.ModuleDict({"lstm": nn.LSTM(2, 3), "act": nn.Sigmoid()})
    found = {g.name: g for g in find_gated_modules(model, extra_gates={"act": "sigmoid_output"})}
    with pytest.raises(ValueError, match="has no gate rows"):
        repair_gate_units_(found["act"].with_units(3), 0, "gate", torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="`gate` to be one of"):
        repair_gate_units_(found["lstm"], 0, "update", torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="`units` has 2 entries but `weight_rms` has 1"):
        repair_gate_units_(found["lstm"], 0, "input", torch.tensor([0, 1]), torch.tensor([1.0]))


def test_row_scales_only_shrink() -> None:
    assert row_scales(torch.tensor([4.0, 0.5, 0.0, 1.0]), 2.0).tolist() == [0.5, 1.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------- optimizer state


def _trained(optimizer_factory: Any) -> tuple[nn.LSTM, torch.optim.Optimizer]:
    torch.manual_seed(14)
    lstm = nn.LSTM(3, 4, batch_first=True)
    optimizer = optimizer_factory(lstm.parameters())
    for _ in range(3):
        optimizer.zero_grad()
        out, _ = lstm(torch.randn(2, 5, 3))
        out.pow(2).sum().backward()
        optimizer.step()
    return lstm, optimizer


@pytest.mark.parametrize(
    ("factory", "entries", "initial"),
    [
        (lambda p: torch.optim.Adam(p, lr=0.01), ["exp_avg", "exp_avg_sq"], {}),
        (lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], {}),
        (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), ["momentum_buffer"], {}),
        (lambda p: torch.optim.Adagrad(p, lr=0.01, initial_accumulator_value=0.25), ["sum"], {"sum": 0.25}),
        (lambda p: torch.optim.Rprop(p, lr=0.02), ["prev", "step_size"], {"step_size": 0.02}),
    ],
)
def test_optimizer_rows_reset_and_the_rest_untouched(
    factory: Any, entries: list[str], initial: dict[str, float]
) -> None:
    lstm, optimizer = _trained(factory)
    (gated,) = find_gated_modules(nn.ModuleDict({"rnn": lstm}))
    before = {
        id(p): {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()} for p, s in optimizer.state.items()
    }
    touched = repair_gate_units_(gated, 0, "forget", torch.tensor([1, 3]), torch.tensor([9.0, 9.0]))
    assert reset_optimizer_rows_([optimizer], touched) == entries
    rows = [5, 7]
    others = [r for r in range(16) if r not in rows]
    for p, state in optimizer.state.items():
        for key, value in state.items():
            old = before[id(p)][key]
            if not isinstance(value, Tensor) or value.shape != p.shape:
                assert torch.equal(value, old) if isinstance(value, Tensor) else value == old, key  # e.g. "step"
                continue
            assert torch.equal(value[others], old[others]), key
            assert bool((value[rows] == initial.get(key, 0.0)).all()), key


def test_optimizer_without_state_or_without_the_parameter_is_left_alone() -> None:
    lstm = nn.LSTM(3, 4)
    (gated,) = find_gated_modules(nn.ModuleDict({"rnn": lstm}))
    fresh = torch.optim.Adam(lstm.parameters())
    unrelated = torch.optim.SGD([nn.Parameter(torch.zeros(16, 3))], lr=0.1, momentum=0.9)
    touched = repair_gate_units_(gated, 0, "input", torch.tensor([0]), torch.tensor([1.0]))
    assert reset_optimizer_rows_([fresh, unrelated], touched) == []


def test_epsilon_boundary_values() -> None:
    # σ(z) < 0.01  <=>  z < -log(99) = -4.595...; tanh saturated beyond atanh(0.99) = 2.6467...
    z = torch.tensor([-4.6, -4.59, 4.6, 4.59, 2.65, -2.64], dtype=torch.float64).view(1, -1, 1)
    sig = gate_counts(LayerGates(0, z, z), [False], 0.01)
    tanh = gate_counts(LayerGates(0, z, z), [True], 0.01)
    assert float(sig[0, 1, 0]) == 2  # -4.6 and 4.6
    assert float(tanh[0, 1, 0]) == 5  # |z| > 2.6467: ±4.6, ±4.59, 2.65
    assert math.isclose(-math.log(99), -4.59511985, rel_tol=1e-8)


def test_gated_module_properties() -> None:
    gm = GatedModule("x", nn.LSTM(2, 3, num_layers=3, bidirectional=True), "lstm", units=3)
    assert gm.num_rows == 6 and gm.tanh_mask == [False, False, True, False]


# ------------------------------------------------------------------------------------------ surgery refusals


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"forget_bias": 1e300}, r"`forget_bias` to be a finite float in \[-10, 10\]"),
        ({"forget_bias": math.nan}, "`forget_bias`"),
        ({"target_std": math.inf}, "`target_std` to be a finite number > 0"),
        ({"target_std": 0.0}, "`target_std`"),
    ],
)
def test_repair_refuses_values_that_would_break_the_weights(kwargs: dict[str, Any], match: str) -> None:
    lstm = nn.LSTM(3, 4)
    (gated,) = find_gated_modules(nn.ModuleDict({"rnn": lstm}))
    before = {k: v.clone() for k, v in lstm.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        repair_gate_units_(gated, 0, "forget", torch.tensor([0]), torch.tensor([2.0]), **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in lstm.state_dict().items())


# ------------------------------------------------------------------------------------------------ diagnosis


def _obs(key: str = "rnn/l0/input", saturation: float = 0.9, units: tuple[int, ...] = (1,), **kw: Any) -> Any:
    return GateObservation(key, key.rsplit("/", 1)[-1], saturation, units, (0.5,) * len(units), **kw)


def _verdicts(diagnosis: GateDiagnosis, step: int, *observations: Any) -> list[str]:
    return [d.verdict.value for d in diagnosis.update(step, observations)]


def test_diagnosis_patience_and_a_healthy_probe_resets_the_streak() -> None:
    diagnosis = GateDiagnosis(patience=3, auto_intervene=True)
    assert _verdicts(diagnosis, 0, _obs()) == ["flagged"]
    assert _verdicts(diagnosis, 1, _obs()) == ["flagged"]
    assert _verdicts(diagnosis, 2, _obs(saturation=0.1)) == ["healthy"]  # below saturation_threshold
    assert _verdicts(diagnosis, 3, _obs(units=())) == ["healthy"]  # no saturated unit
    assert [_verdicts(diagnosis, s, _obs()) for s in (4, 5, 6)] == [["flagged"], ["flagged"], ["repair"]]
    assert diagnosis.streaks == {"rnn/l0/input": 3}


def test_diagnosis_verdict_order_report_monitor_cooldown_budget() -> None:
    only_output = GateDiagnosis(patience=1, auto_intervene=True, repair_gates=["output"])
    assert _verdicts(only_output, 0, _obs(), _obs("rnn/l0/output", repairable=False)) == ["report_only"] * 2
    assert _verdicts(GateDiagnosis(patience=1, auto_intervene=False), 0, _obs()) == ["monitor"]
    diagnosis = GateDiagnosis(patience=1, cooldown=5, max_surgeries=3, auto_intervene=True)
    gates = [_obs(f"rnn/l0/{g}") for g in ("input", "forget", "output", "cell")]
    assert _verdicts(diagnosis, 0, *gates) == ["repair", "repair", "repair", "budget"]  # decided ones count
    for key in ("rnn/l0/input", "rnn/l0/forget"):
        diagnosis.repaired(0, key)
    assert _verdicts(diagnosis, 4, *gates) == ["cooldown", "cooldown", "repair", "budget"]
    diagnosis.repaired(4, "rnn/l0/output")
    assert _verdicts(diagnosis, 5, *gates) == ["budget", "budget", "cooldown", "budget"]
    assert diagnosis.surgeries == 3 and diagnosis.last_surgery == {
        "rnn/l0/input": 0,
        "rnn/l0/forget": 0,
        "rnn/l0/output": 4,
    }


def test_diagnosis_rollback_undoes_surgeries_redoes_once_then_gives_up() -> None:
    diagnosis = GateDiagnosis(patience=1, cooldown=100, auto_intervene=True)
    start = diagnosis.rollback_state()
    for round_, step in enumerate((0, 10)):
        assert _verdicts(diagnosis, step, _obs()) == ["repair"]  # the cooldown of an undone surgery is gone
        diagnosis.repaired(step, "rnn/l0/input")
        assert diagnosis.surgeries == 1
        assert diagnosis.restore(start) == [(step, "rnn/l0/input")]
        assert diagnosis.surgeries == 0 and diagnosis.undone == {"rnn/l0/input": round_ + 1}
    assert _verdicts(diagnosis, 20, _obs()) == ["given_up"]
    assert diagnosis.restore(diagnosis.rollback_state()) == []  # a rollback after the last surgery undoes nothing


def test_diagnosis_state_dict_round_trip_and_validation() -> None:
    diagnosis = GateDiagnosis(patience=1, auto_intervene=True)
    diagnosis.update(0, [_obs(), _obs("rnn/l0/output")])
    diagnosis.repaired(0, "rnn/l0/input")
    diagnosis.restore({"streaks": {}, "last_surgery": {}, "applied": []})
    diagnosis.update(3, [_obs()])
    diagnosis.repaired(3, "rnn/l0/input")
    state = diagnosis.state_dict()
    restored = GateDiagnosis(patience=1, auto_intervene=True)
    restored.load_state_dict(state)
    assert restored.state_dict() == state and restored.undone == {"rnn/l0/input": 1} and restored.surgeries == 1
    for bad in ({"streaks": {"k": True}}, {"applied": [[-1, "k"]]}, {"surgeries": 7}, {"undone": []}):
        with pytest.raises((TypeError, ValueError)):
            GateDiagnosis().load_state_dict({**state, **bad})


def test_gate_observations_read_every_gate_of_every_row() -> None:
    lstm = nn.LSTM(3, 4, bidirectional=True, batch_first=True)
    with torch.no_grad():
        lstm.bias_ih_l0[:4] = -30.0  # forward direction: input gate shut
    (gated,) = find_gated_modules(nn.ModuleDict({"rnn": lstm}))
    x = torch.randn(2, 5, 3)
    stats = measure_gates(gated, [capture_call(gated, (x,), {}, lstm(x), probe_size=2)]).stats
    observations = gate_observations([gated], {"rnn": stats}, unit_threshold=0.95)
    assert [o.key for o in observations][:5] == [f"rnn/l0/{g}" for g in ("input", "forget", "cell", "output")] + [
        "rnn/l0_reverse/input"
    ]
    shut = observations[0]
    assert shut.saturation == 1.0 and shut.units == (0, 1, 2, 3) and len(shut.weight_rms) == 4 and shut.row == 0
    assert observations[4].row == 1 and observations[4].units == ()
