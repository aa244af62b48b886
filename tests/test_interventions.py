"""Interventions (``lightning_gradflow.interventions``): the ``Intervention`` record and its Markdown table, the
bounded ``InterventionLog``, and scheduler-safe learning-rate scaling (after a scale at step k, every later LR is
factor x the unscaled schedule)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as sched

from lightning_gradflow.interventions import Intervention, InterventionLog, interventions_markdown, scale_learning_rate

# ------------------------------------------------------------------------------------------------------ records


def test_intervention_record() -> None:
    i = Intervention(5, "X", "clip", "all", "spike", 12.0, math.nan, applied=False)
    assert Intervention.from_dict(i.to_dict()) == Intervention(5, "X", "clip", "all", "spike", 12.0, math.nan, False)
    assert "not applied" in str(i) and "12 -> ?" in str(i)
    table = interventions_markdown([i])
    assert table.splitlines()[2].startswith("| 5 | clip | all | spike | 12 | ? | False |")


# -------------------------------------------------------------------------------------------- learning-rate scaling

Factory = Callable[[torch.optim.Optimizer], Any]

SCHEDULERS: dict[str, Factory] = {
    "lambda": lambda o: sched.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "step": lambda o: sched.StepLR(o, step_size=3, gamma=0.5),
    "cosine": lambda o: sched.CosineAnnealingLR(o, T_max=20, eta_min=1e-3),
    "warm_restarts": lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=5, eta_min=1e-3),
    "onecycle": lambda o: sched.OneCycleLR(o, max_lr=0.5, total_steps=30),
    "cyclic": lambda o: sched.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=4),
    "linear_warmup": lambda o: sched.LinearLR(o, start_factor=0.1, total_iters=5),
    "exponential": lambda o: sched.ExponentialLR(o, gamma=0.9),
    "polynomial": lambda o: sched.PolynomialLR(o, total_iters=20, power=2.0),
    "sequential": lambda o: sched.SequentialLR(
        o,
        [sched.LinearLR(o, start_factor=0.1, total_iters=4), sched.CosineAnnealingLR(o, T_max=20, eta_min=1e-3)],
        milestones=[4],
    ),
}


def _trajectory(make: Factory, scale_at: int | None, factor: float, steps: int = 25) -> list[float]:
    w = torch.nn.Parameter(torch.zeros(2))
    momentum = 0.9 if make is SCHEDULERS["cyclic"] or make is SCHEDULERS["onecycle"] else 0.0
    opt = torch.optim.SGD([w], lr=0.1, momentum=momentum)
    scheduler = make(opt)
    lrs = []
    for step in range(steps):
        if step == scale_at:
            scale_learning_rate(opt, [scheduler], factor)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scaled_schedule_continues_from_the_scaled_values(name: str) -> None:
    plain = _trajectory(SCHEDULERS[name], None, 1.0)
    scaled = _trajectory(SCHEDULERS[name], 7, 0.25)
    assert scaled[:7] == plain[:7]
    assert scaled[7:] == pytest.approx([0.25 * lr for lr in plain[7:]], rel=1e-9, abs=1e-15)


def test_reduce_on_plateau_keeps_the_scale_and_its_floor() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    plateau = sched.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=0.01)
    scale_learning_rate(opt, [plateau], 0.5)
    for _ in range(10):
        plateau.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)  # the floor was scaled too


def test_lightning_scheduler_configs_and_several_optimizers() -> None:
    from lightning.pytorch.utilities.types import LRSchedulerConfig

    w = torch.nn.Parameter(torch.zeros(2))
    v = torch.nn.Parameter(torch.zeros(2))
    opt_a = torch.optim.Adam([w], lr=1e-3)
    opt_b = torch.optim.SGD([{"params": [v], "lr": 0.2}])
    config = LRSchedulerConfig(sched.LambdaLR(opt_a, lambda e: 1.0))
    scale_learning_rate([opt_a, opt_b], [config], 0.1)
    opt_a.step()
    config.scheduler.step()
    assert opt_a.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert opt_b.param_groups[0]["lr"] == pytest.approx(0.02)


def test_scaled_values_survive_state_dict_round_trip() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    scheduler = sched.LambdaLR(opt, lambda e: 1.0)
    scale_learning_rate(opt, scheduler, 0.5)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler2 = sched.LambdaLR(opt2, lambda e: 1.0)
    opt2.load_state_dict(opt.state_dict())
    scheduler2.load_state_dict(scheduler.state_dict())
    opt2.step()
    scheduler2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("factor", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_factor_is_refused(factor: float) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="factor"):
        scale_learning_rate(opt, None, factor)


def test_intervention_log_reports_each_record_once() -> None:
    log = InterventionLog("X")
    log.add(1, "lr_scale", "optimizer", "r", 1.0, 0.5)
    assert len(log.unreported()) == 1
    log.add(2, "rollback", "all", "r", 1.0, 0.0, applied=False)
    new = log.unreported()
    assert [r.step for r in new] == [2] and not new[0].applied and log.unreported() == []
