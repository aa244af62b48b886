"""The zoo (tests/helpers/zoo.py): third-party models with all four callbacks at their defaults.

Healthy runs: no warning from our callbacks, no intervention beyond clipping, final loss within 2 % of a run without
callbacks, monitoring-only bitwise identical. Broken twins: the matching callback finds the problem, and with
``auto_intervene=True`` the run ends at ≤ 0.8× the unrepaired loss (where a callback can repair it).
"""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")

import torch

from tests.helpers import zoo

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 60  # the default run: tiny configs, 60 optimizer steps (< 1 s per run on one core)
#: Hessian-vector-product notices: the HVP fallback is issue 17 item 3, tested on its own below
SHARPNESS_HVP = ("SharpnessCallback: the probe at step", "SharpnessCallback: the model has no double backward")
#: the callback meant to find each broken twin's fault, and what its warning says
DETECTS = {
    "saturated": ("GateSurgeryCallback", "is saturated"),
    "spike": ("EarlyCollapseCallback", "loss z-score"),
    "nan": ("EarlyCollapseCallback", "non-finite"),
    "deep": ("GradientFlowCallback", "vanishing gradients"),
}
REPAIRABLE = ("saturated", "spike", "nan")  # no callback repairs a deep plain stack by itself: it is diagnosed


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bitwise equal, NaN where NaN (a broken run's weights may be NaN)."""
    return a.keys() == b.keys() and all(torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)


def _findings(result: zoo.ZooResult) -> list[str]:
    return [w for w in result.warnings if not w.startswith(SHARPNESS_HVP)]


@pytest.mark.parametrize("name", zoo.MODELS)
def test_healthy_run_no_alarm_and_monitoring_is_bitwise_identical(name: str) -> None:
    runs = {mode: zoo.run(name, mode=mode, steps=STEPS) for mode in ("none", "monitor", "auto")}
    assert _findings(runs["monitor"]) == [] and _findings(runs["auto"]) == []
    assert runs["monitor"].interventions == []
    assert runs["auto"].kinds <= {"clip"}  # nothing beyond harmless clipping
    assert same_tensors(runs["none"].state, runs["monitor"].state)
    assert runs["auto"].loss == pytest.approx(runs["none"].loss, rel=0.02)


@pytest.mark.xfail(reason="Hessian-vector products through fused CPU attention: issue 17 item 3", strict=False)
@pytest.mark.parametrize("name", zoo.MODELS)
def test_healthy_sharpness_probes_work_without_a_notice(name: str) -> None:
    assert not [w for w in zoo.run(name, mode="monitor", steps=20).warnings if w.startswith(SHARPNESS_HVP)]


@pytest.mark.parametrize("name", zoo.MODELS)
def test_broken_twin_is_found_and_repaired(name: str) -> None:
    fault = zoo.BROKEN[name]
    steps = 100 if fault == "spike" else STEPS  # AdamW needs time to show what the spike did to its moments
    plain = zoo.run(name, broken=True, mode="none", steps=steps)
    watched = zoo.run(name, broken=True, mode="monitor", steps=steps)
    callback, says = DETECTS[fault]
    assert any(w.startswith(callback) and says in w for w in watched.warnings), watched.warnings
    assert same_tensors(plain.state, watched.state)  # monitoring only changes nothing, even on a broken run
    if fault in REPAIRABLE:
        repaired = zoo.run(name, broken=True, mode="auto", steps=steps)
        assert repaired.loss <= 0.8 * plain.loss, (repaired.loss, plain.loss, repaired.interventions)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", zoo.MODELS)
def test_zoo_longer_runs_and_other_seeds(name: str, seed: int) -> None:
    """The heavy part: 200 steps, more seeds, healthy and broken."""
    none = zoo.run(name, mode="none", steps=200, seed=seed)
    auto = zoo.run(name, mode="auto", steps=200, seed=seed)
    assert _findings(auto) == [] and auto.kinds <= {"clip"}
    assert auto.loss == pytest.approx(none.loss, rel=0.02)
    fault = zoo.BROKEN[name]
    if fault in REPAIRABLE:
        plain = zoo.run(name, broken=True, mode="none", steps=200, seed=seed)
        repaired = zoo.run(name, broken=True, mode="auto", steps=200, seed=seed)
        assert repaired.loss <= 0.8 * plain.loss
