"""GateSurgeryCallback with default arguments (issue 17): saturation from initialisation is repaired early, all at once.

The defaults probe on an adaptive schedule (every 5 steps for the first 50, sparse later, dense again after a finding)
and repair every gate flagged on the probe that diagnoses one. The fast tests use the tiny regressors of
``tests/helpers/gate_models.py``; the corpus runs of ``benchmarks/gate_defaults.py`` are ``slow``.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_gradflow.callbacks.gate_surgery import GateSurgeryCallback
from lightning_gradflow.gates import GateDiagnosis, GateObservation
from tests.helpers.gate_models import RecurrentRegressor, saturate_, sequences
from tests.helpers.training import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "gate_defaults.py"


def _fit(model: RecurrentRegressor, callback: GateSurgeryCallback | None, steps: int) -> None:
    trainer = quiet_trainer(max_steps=steps, callbacks=[callback] if callback is not None else [])
    trainer.fit(model, sequences(n=8 * steps, steps=8))


def _surgeries(callback: GateSurgeryCallback) -> list[tuple[int, str]]:
    return [(r.step, r.target) for r in callback.interventions if r.kind == "gate_surgery" and r.applied]


def _model(kind: str = "lstm", layers: int = 2, gates: dict[int, float] | None = None, seed: int = 0) -> Any:
    seed_everything(seed, verbose=False)
    model = RecurrentRegressor(kind=kind, hidden=8, num_layers=layers)
    if gates:
        saturate_(model.rnn, gates)
    return model


# ------------------------------------------------------------------------------------------------ the schedule


def test_default_schedule_is_dense_at_the_start_and_sparse_later() -> None:
    callback = GateSurgeryCallback()
    probes = [s for s in range(400) if callback.should_compute(s)]
    assert probes[:11] == list(range(0, 55, 5))  # every 5 steps for the first 50
    assert max(b - a for a, b in itertools.pairwise(probes)) == 100  # every_n_steps is the cap
    assert len(probes) < 20


def test_adaptive_schedule_false_is_the_fixed_schedule() -> None:
    callback = GateSurgeryCallback(every_n_steps=100, adaptive_schedule=False)
    assert [s for s in range(400) if callback.should_compute(s)] == [0, 100, 200, 300]
    with pytest.raises(TypeError, match="`adaptive_schedule`"):
        GateSurgeryCallback(adaptive_schedule="yes")  # type: ignore[arg-type]


def test_schedule_state_is_checkpointed() -> None:
    callback = GateSurgeryCallback()
    for step in range(120):
        callback.should_compute(step)
    state = callback.state_dict()
    restored = GateSurgeryCallback()
    restored.load_state_dict(state)
    assert restored.schedule.state_dict() == callback.schedule.state_dict()
    assert [s for s in range(120, 500) if restored.should_compute(s)] == [
        s for s in range(120, 500) if callback.should_compute(s)
    ]
    old = {k: v for k, v in state.items() if k != "schedule"}  # a checkpoint from before the adaptive schedule
    GateSurgeryCallback().load_state_dict(old)
    bad = {**state, "schedule": {**state["schedule"], "next_step": -3}}
    with pytest.raises(ValueError, match="next_step"):
        GateSurgeryCallback().load_state_dict(bad)


# ---------------------------------------------------------------------------------------- one finding, one decision


def test_gates_flagged_with_a_diagnosed_gate_are_repaired_in_the_same_decision() -> None:
    diagnosis = GateDiagnosis(patience=3, auto_intervene=True)
    first = GateObservation("rnn/l0/input", "input", 0.9, units=(0, 1), weight_rms=(0.1, 0.1))
    deeper = GateObservation("rnn/l1/input", "input", 0.6, units=(2,), weight_rms=(0.1,), row=1)
    healthy = GateObservation("rnn/l1/forget", "forget", 0.1, units=(), row=1)
    for step in (0, 5):
        diagnosis.update(step, [first, healthy])
    verdicts = [d.verdict.value for d in diagnosis.update(10, [first, deeper, healthy])]
    assert verdicts == ["repair", "repair", "healthy"]
    # ...within the same limits: a gate outside `repair_gates`, or past the budget, is not repaired along
    only_input = GateDiagnosis(patience=2, auto_intervene=True, repair_gates=["input"], max_surgeries=1)
    output = GateObservation("rnn/l0/output", "output", 0.9, units=(0,), weight_rms=(0.1,))
    only_input.update(0, [first])
    assert [d.verdict.value for d in only_input.update(5, [first, deeper, output])] == [
        "repair",
        "budget",
        "report_only",
    ]


def test_saturation_from_the_first_probe_is_diagnosed_fast_and_later_saturation_must_persist() -> None:
    diagnosis = GateDiagnosis(patience=3, auto_intervene=True, late_span=200)
    at_init = GateObservation("rnn/l0/input", "input", 0.9, units=(0,), weight_rms=(0.1,))
    later = GateObservation("rnn/l0/cell", "cell", 0.5, units=(1,), weight_rms=(0.1,))
    calm = GateObservation("rnn/l0/cell", "cell", 0.0)
    verdicts = {}
    for step in (0, 5, 10, 15, 20, 25):
        for d in diagnosis.update(step, [calm if step < 15 else later]):
            verdicts[step] = d.verdict.value
    assert verdicts[25] == "flagged"  # 3 flags in a row, but only 10 steps: a transient of early training
    assert [d.verdict.value for d in diagnosis.update(215, [later])] == ["repair"]  # still saturated 200 steps on
    fresh = GateDiagnosis(patience=3, auto_intervene=True, late_span=200)
    assert [[d.verdict.value for d in fresh.update(s, [at_init])] for s in (0, 5, 10)][-1] == ["repair"]
    restored = GateDiagnosis(patience=3, auto_intervene=True, late_span=200)
    restored.load_state_dict(diagnosis.state_dict())
    assert restored.state_dict() == diagnosis.state_dict()
    with pytest.raises(ValueError, match="late_span"):
        GateDiagnosis(late_span=-1)


# ------------------------------------------------------------------------------------- end to end, tiny models


@pytest.mark.parametrize(
    ("kind", "gates", "names"),
    [
        ("lstm", {0: -8.0, 3: -8.0}, ("input", "output")),
        ("gru", {1: 8.0}, ("update",)),
    ],
)
def test_defaults_repair_every_saturated_gate_of_every_layer_early_and_at_once(
    kind: str, gates: dict[int, float], names: tuple[str, ...]
) -> None:
    callback = GateSurgeryCallback(auto_intervene=True)
    _fit(_model(kind, layers=2, gates=gates), callback, steps=30)
    surgeries = _surgeries(callback)
    assert {key for _, key in surgeries} == {f"rnn/l{k}/{g}" for k in range(2) for g in names}
    assert {step for step, _ in surgeries} == {10}  # patience 3 on probes 0, 5, 10: one decision


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_defaults_leave_healthy_twins_untouched(kind: str) -> None:
    auto = GateSurgeryCallback(auto_intervene=True)
    _fit(_model(kind), auto, steps=60)
    assert _surgeries(auto) == [] and auto.interventions == []
    plain, watched = _model(kind), _model(kind)
    _fit(plain, None, steps=60)
    _fit(watched, GateSurgeryCallback(), steps=60)
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ corpus runs (the benchmark)


def _benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gate_defaults_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lstm-io_shut-h64-l2-shakespeare", "gru-update_open-h64-l2-stdlib"])
def test_benchmark_saturated_corpus_runs_are_repaired(name: str) -> None:
    bench = _benchmark()
    case = bench.Case.parse(name)
    try:
        row = bench.evaluate(case, steps=300)
    except FileNotFoundError:
        pytest.skip(f"corpus missing: {bench.SHAKESPEARE}")
    assert row["all_repaired_early"], row
    assert row["ratio"] <= bench.MAX_RATIO, row


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lstm-healthy-h64-l2-shakespeare", "gru-healthy-h64-l2-stdlib"])
def test_benchmark_healthy_corpus_twins_are_untouched(name: str) -> None:
    bench = _benchmark()
    try:
        row = bench.evaluate(bench.Case.parse(name), steps=150)
    except FileNotFoundError:
        pytest.skip(f"corpus missing: {bench.SHAKESPEARE}")
    assert row["surgeries"] == [] and row["monitor_identical"], row
