"""The pure monitors of lightning_gradflow driving any training loop: no Trainer, no callbacks.

:class:`LoopHealth` is what the four callbacks do, written out for a loop you own (a plain PyTorch loop, or Lightning
Fabric): after ``backward`` and before ``optimizer.step()`` call :meth:`LoopHealth.before_step`, which

1. measures every parameter's gradient in one fused pass (:func:`lightning_gradflow.stats.tensor_stats`),
2. advances the vanishing/exploding rule (:class:`lightning_gradflow.flow.FlowMonitor`),
3. clips the global norm with ZClip (:class:`lightning_gradflow.clipping.ZScoreClipper`),
4. asks the collapse risk model (:class:`lightning_gradflow.collapse.CollapseMonitor`) for a verdict and the
   intervention ladder (:class:`lightning_gradflow.collapse.InterventionLadder`) for actions — skip the step, cut the
   learning rate (scheduler-safe), roll back to a snapshot, stop — and applies them;

and returns whether the optimizer should step. :meth:`LoopHealth.after_step` keeps snapshots on calm steps. Every
object has ``state_dict``/``load_state_dict`` for your own checkpoints. Used by ``plain_torch_loop.py`` and
``fabric_loop.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_gradflow.clipping import ZScoreClipper, clip_coefficient, scale_grads_
from lightning_gradflow.collapse import (
    CollapseMonitor,
    InterventionLadder,
    LadderConfig,
    MonitorConfig,
    restore_snapshot,
    take_snapshot,
)
from lightning_gradflow.flow import FlowMonitor, FlowRule
from lightning_gradflow.interventions import InterventionLog, scale_learning_rate
from lightning_gradflow.stats import tensor_stats


@dataclass
class StepReport:
    """What :meth:`LoopHealth.before_step` saw and did at one step."""

    step: int
    grad_norm: float
    risk: float
    clipped: bool
    actions: list[str] = field(default_factory=list)
    step_optimizer: bool = True


class LoopHealth:
    """Gradient statistics, flow diagnosis, ZClip clipping and the collapse ladder for a hand-written loop.

    Args:
        model: the module being trained.
        optimizer: its optimizer.
        scheduler: an LR scheduler, or None.
        snapshot_every: optimizer steps between snapshots (taken on calm steps only).
        flow_rule: the vanishing/exploding thresholds.
        monitor: the collapse risk model's settings.
        ladder: the intervention ladder's settings.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        snapshot_every: int = 10,
        flow_rule: FlowRule | None = None,
        monitor: MonitorConfig | None = None,
        ladder: LadderConfig | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.schedulers = [scheduler] if scheduler is not None else []
        self.snapshot_every = snapshot_every
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.flow = FlowMonitor(flow_rule or FlowRule(patience=5))
        self.clipper = ZScoreClipper()
        self.monitor = CollapseMonitor(monitor)
        self.ladder = InterventionLadder(ladder)
        self.log = InterventionLog("LoopHealth")
        self.stopped = False
        self.reports: list[StepReport] = []

    def before_step(self, step: int, loss: float) -> bool:
        """Measures, clips and judges this step's gradients; returns whether ``optimizer.step()`` should run."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return False
        stats = tensor_stats(grads)
        self.flow.update(stats)
        norm = torch.where(stats.nonfinite.sum() > 0, torch.full((), math.nan), stats.total_norm())
        coef = clip_coefficient(norm, self.clipper(norm))
        scale_grads_(grads, coef)
        verdict = self.monitor.observe(step, loss=loss, grad_norm=float(norm))
        report = StepReport(step, float(norm), verdict.risk, bool(coef < 1))
        for action in self.ladder.decide(verdict):
            report.actions.append(action.kind)
            if action.recorded:
                self.log.add(step, action.kind, action.target, action.reason, action.before, action.after)
            if action.kind == "lr_scale":
                scale_learning_rate(self.optimizer, self.schedulers, action.factor)
            elif action.kind == "rollback":
                restore_snapshot(action.snapshot, self.model, [self.optimizer], self.schedulers)
            elif action.kind == "stop":
                self.stopped = True
            if action.drops_gradients:
                report.step_optimizer = False
        if not report.step_optimizer:
            for p in self.params:
                p.grad = None
        self.reports.append(report)
        return report.step_optimizer

    def after_step(self, step: int) -> None:
        """Keeps a snapshot of the state after ``step`` when the step was calm and one is due."""
        if step % self.snapshot_every == 0 and self.ladder.may_snapshot():
            self.ladder.keep(step, take_snapshot(step, self.model, [self.optimizer], self.schedulers))

    def diagnosis(self) -> dict[str, list[str]]:
        """The parameters whose gradients vanish or explode (held for the rule's patience)."""
        if self.flow.streaks is None:
            return {"vanishing": [], "exploding": []}
        vanishing, exploding = self.flow.diagnosed(self.flow.streaks, present=list(range(len(self.params))))
        return {"vanishing": [self.names[i] for i in vanishing], "exploding": [self.names[i] for i in exploding]}
