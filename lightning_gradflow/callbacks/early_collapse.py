"""EarlyCollapseCallback: loss/gradient spikes, divergence, dead units, rank collapse; skip, cut LR, roll back, stop."""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gradflow import tensorboard as tb
from lightning_gradflow.callbacks._base import HealthCallback, is_log_step, is_probe_step, to_host
from lightning_gradflow.callbacks._common import (
    check_positive_int,
    global_norm_or_nan,
    log_interval,
    refuse_sharded_strategy,
    unscaled_for_optimizer,
    write_interventions,
    write_layout,
)
from lightning_gradflow.channel import Event
from lightning_gradflow.checks import check_bool, check_choice
from lightning_gradflow.collapse import (
    MAX_RANK_SAMPLE_SIZE,
    CollapseMonitor,
    CollapseStopReason,
    FeatureBuffer,
    InterventionLadder,
    LadderConfig,
    MonitorConfig,
    Snapshot,
    StepVerdict,
    copy_tree,
    dead_fraction,
    effective_rank,
    feature_std,
    restore_snapshot,
    take_snapshot,
    unit_abs_sums,
)
from lightning_gradflow.interventions import scale_learning_rate
from lightning_gradflow.reports.collapse import (
    FAMILY,
    collapse_metrics,
    episode_message,
    representation_metrics,
    resumed_after_stop_message,
    sharded_rollback_message,
    snapshot_device_message,
    unknown_module_message,
)
from lightning_gradflow.schedule import ProbeSchedule
from lightning_gradflow.stats import Backend, tensor_stats

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["CollapseStopReason", "EarlyCollapseCallback", "StepVerdict"]

_NAME = "EarlyCollapseCallback"
_RELU_FAMILY = (nn.ReLU, nn.ReLU6)
_M, _L = MonitorConfig, LadderConfig  # every default below is declared once, in lightning_gradflow.collapse.config
_DENSE_EVERY, _DENSE_STEPS = 5, 50  # representation probes: every 5 steps for the first 50 and after a finding


class _Pending(NamedTuple):
    """One optimizer step waiting for the host: its loss and gradient norm stay on the device until then."""

    step: int
    values: Tensor  # (loss, grad norm)
    scaler_active: bool
    has_loss: bool


class EarlyCollapseCallback(HealthCallback):
    r"""Detects a training collapse early and, with ``auto_intervene=True``, recovers from it.

    A thin Lightning shell: :class:`~lightning_gradflow.collapse.CollapseMonitor` holds the risk model and
    :class:`~lightning_gradflow.collapse.InterventionLadder` the skip → cut LR → roll back → stop ladder (their
    modules explain every rule); this class reads the step's numbers, asks them, applies what they decide and logs.

    **Signals**, once per optimizer step (in ``on_before_optimizer_step``): the step's loss (from
    ``on_before_backward``: the mean over its accumulated micro-batches, however many the step had) and the global
    gradient norm after AMP unscaling — read from the trainer's channel when another callback published it this
    step, else computed here in one fused :func:`~lightning_gradflow.stats.tensor_stats` pass and published, so the
    order of the callbacks never matters. Under DDP both are averaged across ranks first, so every rank decides the
    same. On probe steps (:meth:`should_compute`, see *Schedule*): the dead fraction of each
    ReLU-family module (or ``dead_unit_layers``), and RankMe and feature std of the input of
    ``representation_layers`` (default: the last module with parameters) over the last ``rank_sample_size`` rows.
    Sparse gradients (``nn.Embedding(sparse=True)``) and complex parameters are judged exactly (the statistics read
    sparse values and ``|z|``), and snapshots copy them as they are.

    **Schedule** (:attr:`schedule`, a :class:`~lightning_gradflow.schedule.ProbeSchedule`): representation probes
    run every 5 steps during the first 50 optimizer steps (dead units are most often there from initialisation) and
    for 50 steps after each finding or intervention; in between the interval doubles after each probe up to
    ``every_n_steps``. ``adaptive_schedule=False`` (or ``every_n_steps`` ≤ 5) gives the fixed schedule
    ``step % every_n_steps == 0``. A layer's effective rank is judged only once its features have spread (some
    probe measured at least ``2 · min_effective_rank``): the near-constant outputs of a random initialisation are no
    collapse.

    **Warnings**: once per episode (listed in :attr:`warnings`), and once per representation finding per layer.

    **Interventions** (``auto_intervene=True``): the ladder's actions are applied — gradients dropped for a skipped
    step, the LR scaled scheduler-safely (:func:`~lightning_gradflow.interventions.scale_learning_rate`), and a
    rollback restored in ``on_train_batch_end`` (after Lightning stepped the scheduler and the GradScaler, so
    training after it is bitwise what a run resumed from the snapshot would do on the same batches): parameters,
    buffers, optimizer, scheduler and GradScaler states, the RNG states (``restore_rng``), the monitor's detectors,
    and every channel participant's own state (a SharpnessCallback's LR factor, a GateSurgeryCallback's repairs), each
    told of the rollback. Snapshots of the state at global step ``g`` are kept when ``g`` is a multiple of
    ``snapshot_every_n_steps`` and the step before was calm — also while a warning episode is open — and when
    training starts (the last ``num_snapshots``, on ``snapshot_device``); the data does not rewind and
    ``trainer.global_step`` keeps counting forward. A stop sets ``trainer.should_stop`` and :attr:`stopped_reason`.

    Without ``auto_intervene`` the callback only observes (the run is bitwise unchanged; it reads the device only on
    logging and probe steps) and records, with ``applied=False``, exactly the actions the ladder would take on this
    run — up to a would-be skip, rollback or stop, after which auto mode would be on another trajectory.

    **Per fit, and resume**: a new ``fit()`` starts afresh (detectors, ladder, snapshots); a resumed fit continues
    from the checkpoint (detectors, strikes, counters, the LR factor, warnings, interventions; not the snapshots: the
    ring starts with the resumed state). A checkpoint saved after the callback had stopped the run resumes
    *training*: it warns with the original reason, and the ladder starts a new episode (strikes and rollback budget
    reset) — if the cause was not fixed, the ladder will stop the run again.

    **Logged metrics**: ``collapse/risk``, ``collapse/loss_zscore``, ``collapse/grad_norm_zscore``,
    ``collapse/divergence``, ``collapse/overflow_steps``, ``collapse/skipped_steps``, ``collapse/rollbacks``,
    ``collapse/lr_scale``, ``collapse/interventions``; on probe steps ``collapse/dead_fraction/<layer>``,
    ``collapse/effective_rank/<layer>``, ``collapse/feature_std/<layer>``. TensorBoard (rank zero): a custom-scalars
    layout and the interventions as text.

    **Strategies**: single device and DDP; sharded strategies are refused at setup.

    Args:
        auto_intervene: run the intervention ladder; otherwise only observe and warn.
        log_every_n_steps: optimizer steps between logs; default: the Trainer's ``log_every_n_steps``.
        every_n_steps: the longest interval between representation probes (see *Schedule*); 0 disables them.
        adaptive_schedule: probe densely at the start and after a finding or an intervention, sparsely otherwise;
            False for a probe every ``every_n_steps`` steps.
        spike_detector: ``"mad"`` (median/MAD over a window) or ``"ema"`` (EMA mean and variance).
        window: healthy steps in the median/MAD window (at most ``MAX_WINDOW`` = 10 000).
        min_history: healthy steps observed before spikes and divergence are scored (at most ``window``).
        loss_z_threshold: loss z-score that scores 1.
        grad_z_threshold: gradient-norm z-score that scores 1.
        min_scale: floor on the noise scale of the z-scores (on the log scale: 0.1 ≈ 10%).
        ema_alpha: the EMA decay of ``spike_detector="ema"``.
        log_scale: score ``log(loss)`` and ``log(grad norm)`` (ratios); falls back to the raw loss when it is <= 0.
        scale_floor: on the log scale, values are offset by ``scale_floor`` × the run's first value, so the large
            ratios of tiny values near convergence are neither spikes nor divergence; 0 scores pure ratios.
        divergence_ratio: growth of the smoothed loss over its best that scores 1.
        divergence_smoothing: steps of the running median divergence is judged on (at most 10 000).
        warn_threshold: step risk at which an episode warns (at most ``risk_threshold``).
        risk_threshold: risk at which a step is an alarm.
        representation_layers: module paths whose *input* is sampled for RankMe and feature std; default: the last
            module with parameters. An empty list disables them.
        dead_unit_layers: module paths whose *output* is checked for dead units; default: every ``nn.ReLU`` /
            ``nn.ReLU6``.
        dormant_threshold: τ of τ-dormant units (0: dead units, zero on the whole probe batch).
        max_dead_fraction: dead fraction that scores the representation signal fully.
        rank_sample_size: feature rows kept per representation layer (at most ``MAX_RANK_SAMPLE_SIZE`` = 65 536).
        min_effective_rank: RankMe at or below which the representation signal scores fully (0 at twice it).
        skip_nonfinite: rung 1: skip steps with a non-finite loss or gradient.
        lr_cut_factor: rung 2: the LR multiplier of a cut; None disables cuts.
        min_lr_factor: the cumulative LR factor is never cut below this, in (0, 1].
        lr_recovery_steps: calm steps in a row after which one cut is undone (up to the original LR); 0: never.
        rollback: rung 3.
        rollback_patience: consecutive alarm steps before a rollback.
        snapshot_every_n_steps: global steps between snapshots.
        num_snapshots: snapshots kept (at most ``MAX_SNAPSHOTS`` = 100).
        snapshot_device: where snapshots live (``"cpu"``, or e.g. ``"cuda"`` for speed; checked in ``setup``).
        restore_rng: snapshot and restore the RNG states too (needed for a bitwise-reproducible rollback).
        skip_batches: batches whose gradients are dropped after a rollback.
        max_rollbacks: rollbacks before the run stops.
        stop_on_failure: rung 4.
        stop_patience: with ``rollback=False``, consecutive alarm steps before the run stops.
        overflow_patience: consecutive fp16 overflow steps tolerated before they count as non-finite.
        backend: statistics backend for the gradient norm.

    Raises:
        TypeError: for an argument of the wrong type.
        ValueError: for an out-of-range argument.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_gradflow.callbacks.early_collapse import EarlyCollapseCallback
        >>> callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=100, max_rollbacks=2)
        >>> trainer = Trainer(callbacks=[callback], logger=False, max_steps=1)

    In YAML (LightningCLI)::

        trainer:
          callbacks:
            - class_path: lightning_gradflow.EarlyCollapseCallback
              init_args: {auto_intervene: true, lr_cut_factor: 0.5, num_snapshots: 3}
    """

    family = FAMILY

    def __init__(
        self,
        auto_intervene: bool = False,
        log_every_n_steps: int | None = None,
        every_n_steps: int = 50,
        adaptive_schedule: bool = True,
        spike_detector: Literal["mad", "ema"] = _M.spike_detector,
        window: int = _M.window,
        min_history: int = _M.min_history,
        loss_z_threshold: float = _M.loss_z_threshold,
        grad_z_threshold: float = _M.grad_z_threshold,
        min_scale: float = _M.min_scale,
        ema_alpha: float = _M.ema_alpha,
        log_scale: bool = _M.log_scale,
        scale_floor: float = _M.scale_floor,
        divergence_ratio: float = _M.divergence_ratio,
        divergence_smoothing: int = _M.divergence_smoothing,
        warn_threshold: float = _M.warn_threshold,
        risk_threshold: float = _M.risk_threshold,
        representation_layers: list[str] | None = None,
        dead_unit_layers: list[str] | None = None,
        dormant_threshold: float = _M.dormant_threshold,
        max_dead_fraction: float = _M.max_dead_fraction,
        rank_sample_size: int = 1024,
        min_effective_rank: float = _M.min_effective_rank,
        skip_nonfinite: bool = _L.skip_nonfinite,
        lr_cut_factor: float | None = _L.lr_cut_factor,
        min_lr_factor: float = _L.min_lr_factor,
        lr_recovery_steps: int = _L.lr_recovery_steps,
        rollback: bool = _L.rollback,
        rollback_patience: int = _L.rollback_patience,
        snapshot_every_n_steps: int = _L.snapshot_every_n_steps,
        num_snapshots: int = _L.num_snapshots,
        snapshot_device: str = "cpu",
        restore_rng: bool = True,
        skip_batches: int = _L.skip_batches,
        max_rollbacks: int = _L.max_rollbacks,
        stop_on_failure: bool = _L.stop_on_failure,
        stop_patience: int = _L.stop_patience,
        overflow_patience: int = _M.overflow_patience,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        _validate(args)
        self.auto_intervene = auto_intervene
        self.log_every_n_steps = log_every_n_steps
        self.every_n_steps = every_n_steps
        self.adaptive_schedule = adaptive_schedule
        adaptive = adaptive_schedule and every_n_steps > _DENSE_EVERY
        self.schedule = ProbeSchedule(every_n_steps, _DENSE_EVERY, _DENSE_STEPS, adaptive=adaptive)
        self.representation_layers = representation_layers
        self.dead_unit_layers = dead_unit_layers
        self.rank_sample_size = rank_sample_size
        self.snapshot_device = snapshot_device
        self.restore_rng = restore_rng
        self.backend: Backend = backend
        monitor_config = MonitorConfig(**{name: args[name] for name in MonitorConfig.__dataclass_fields__})
        ladder_config = LadderConfig(**{name: args[name] for name in LadderConfig.__dataclass_fields__})
        for name in (*MonitorConfig.__dataclass_fields__, *LadderConfig.__dataclass_fields__):
            setattr(self, name, args[name])  # readable as attributes too, as Lightning's callbacks keep theirs
        self.monitor = CollapseMonitor(monitor_config)
        self.ladder = InterventionLadder(ladder_config, dry_run=not auto_intervene)
        self.warnings: list[tuple[int, str]] = []  # (step, message) of every warning, on every rank
        self._dead_modules: dict[str, nn.Module] = {}
        self._repr_modules: dict[str, nn.Module] = {}
        self._buffers: dict[str, FeatureBuffer] = {}
        self._reset_fit_state()

    @override
    def _reset_fit_state(self) -> None:
        self.schedule.reset()
        self._due_step = -1
        self.monitor.reset()
        self.ladder.reset()
        self.last_verdict: StepVerdict | None = None
        self.representation: dict[str, float] = {}  # the latest probe's metrics
        self._pending: list[_Pending] = []
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._processed_step = -1
        self._probe_step = -1
        self._stepped = False
        self._dead_sums: dict[str, tuple[Tensor, int]] = {}
        self._rollback_to: tuple[int, Snapshot] | None = None

    # --------------------------------------------------------------------------------------------- read-outs

    @property
    def rollback_enabled(self) -> bool:
        """Whether rollbacks can happen (``auto_intervene`` and ``rollback``)."""
        return self.auto_intervene and self.ladder.config.rollback

    @property
    def stopped_reason(self) -> CollapseStopReason:
        """Why the callback stopped this fit (``NOT_STOPPED`` if it did not)."""
        return self.ladder.stopped_reason

    @property
    def stop_message(self) -> str:
        """The stop's message ("" if the callback did not stop the run)."""
        return f"{_NAME} {self.ladder.stop_message}" if self.ladder.stop_message else ""

    @property
    def rollbacks(self) -> int:
        """Rollbacks done in this fit."""
        return self.ladder.rollbacks if self.auto_intervene else 0

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps whose gradients were dropped in this fit."""
        return self.ladder.skipped_steps if self.auto_intervene else 0

    @property
    def lr_scale(self) -> float:
        """The cumulative LR factor applied by this callback."""
        return self.ladder.lr_scale if self.auto_intervene else 1.0

    @property
    def overflow_steps(self) -> int:
        """fp16 GradScaler overflow steps seen in this fit."""
        return self.monitor.overflow_steps

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            representation_layers=self.representation_layers, dead_unit_layers=self.dead_unit_layers
        )

    def should_compute(self, step: int) -> bool:
        """Whether optimizer step ``step`` runs a representation probe (the same on all ranks; idempotent per step)."""
        if step == self._due_step:
            return True
        if self.schedule.due(step):
            self._due_step = step
            return True
        return False

    # ----------------------------------------------------------------------------------------------- lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        try:
            refuse_sharded_strategy(trainer, _NAME, reads="whole gradients and whole layer activations")
        except MisconfigurationException as err:
            if not self.rollback_enabled:
                raise
            name = type(trainer.strategy).__name__
            raise MisconfigurationException(sharded_rollback_message(_NAME, name)) from err
        device = torch.device(self.snapshot_device)
        problem = "the meta device holds no data: a rollback would restore nothing" if device.type == "meta" else ""
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError, ValueError) as err:
            problem = f"this machine has no such device ({type(err).__name__}: {err})"
        if problem:
            raise MisconfigurationException(snapshot_device_message(_NAME, self.snapshot_device, problem))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        modules = dict(pl_module.named_modules())
        if self.dead_unit_layers is None:
            self._dead_modules = {n: m for n, m in modules.items() if isinstance(m, _RELU_FAMILY)}
        else:
            self._dead_modules = {n: _module(modules, n, "dead_unit_layers") for n in self.dead_unit_layers}
        if self.representation_layers is None:
            leaves = [
                n
                for n, m in modules.items()
                if n and not list(m.children()) and next(m.parameters(recurse=False), None) is not None
            ]
            self._repr_modules = {leaves[-1]: modules[leaves[-1]]} if leaves else {}
        else:
            self._repr_modules = {n: _module(modules, n, "representation_layers") for n in self.representation_layers}
        self._buffers = {n: FeatureBuffer(self.rank_sample_size) for n in self._repr_modules}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ladder.config.rollback:  # the first snapshot: the state training starts (or resumes) from
            step = trainer.global_step
            self.ladder.keep(step, self._take_snapshot(trainer, pl_module, step) if self.auto_intervene else None)
        write_layout(self, trainer, tb.COLLAPSE_CHARTS, trainer.global_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending:  # monitoring only: judge what the last logging interval left
            step = self._pending[-1].step
            for verdict in self._flush(trainer, step, []):
                self._decide(trainer, verdict, [])
            self._report(trainer, step, log=True, probed=False)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._pending.clear()
        self._rollback_to = None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handles:  # a probe left open (its training step was skipped): validation batches must not enter it
            self._remove_hooks()
            self._dead_sums = {}

    # -------------------------------------------------------------------------------------------------- probes

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._handles or step == self._probe_step or not self.should_compute(step):
            return
        if not self._dead_modules and not self._repr_modules:
            return
        self._probe_step = step
        self._dead_sums = {}
        for name, module in self._dead_modules.items():
            self._add_hook(module.register_forward_hook(partial(self._capture_dead, name)))
        for name, module in self._repr_modules.items():
            self._add_hook(module.register_forward_hook(partial(self._capture_features, name)))

    def _capture_dead(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, Tensor) or output.dim() < 1:
            return
        sums, count = unit_abs_sums(output)
        previous = self._dead_sums.get(name)
        if previous is None:
            self._dead_sums[name] = (sums, count)
        elif previous[0].shape == sums.shape:  # a module used twice with the same width: one sample
            self._dead_sums[name] = (previous[0] + sums, previous[1] + count)

    def _capture_features(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() >= 1 and args[0].is_floating_point():
            self._buffers[name].add(args[0])

    def _measure_representations(self, trainer: pl.Trainer, device: torch.device) -> list[tuple[str, str, Tensor]]:
        """Per-layer dead fraction, RankMe and feature std of this probe, reduced across ranks (device tensors)."""
        self._remove_hooks()
        dead_names = [n for n in self._dead_modules if n in self._dead_sums]
        repr_names = [n for n in self._repr_modules if len(self._buffers[n]) > 1]
        if not dead_names and not repr_names:
            return []
        parts = [self._dead_sums[n][0].to(device) for n in dead_names]
        values = []
        for n in repr_names:
            feats = self._buffers[n].features()
            values += [effective_rank(feats).float().to(device), feature_std(feats).float().to(device)]
        flat = torch.cat([*parts, torch.stack(values) if values else torch.zeros(0, device=device)])
        world = trainer.world_size
        if world > 1:  # per-unit sums add across ranks; rank and std are averaged
            flat = trainer.strategy.reduce(flat, reduce_op="sum")
        pieces = flat.split([p.numel() for p in parts] + [2] * len(repr_names))
        threshold = self.monitor.config.dormant_threshold
        dead, ranks = pieces[: len(dead_names)], pieces[len(dead_names) :]
        out = [
            ("dead_fraction", n, dead_fraction(sums, 1, threshold)) for n, sums in zip(dead_names, dead, strict=True)
        ]
        for n, (rank, std) in zip(repr_names, ranks, strict=True):
            out += [("effective_rank", n, rank / world), ("feature_std", n, std / world)]
        self._dead_sums = {}
        return out

    # ---------------------------------------------------------------------------------------------- the step

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        value = loss.detach().float().reshape(-1).sum()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # fp16 AMP: Lightning hands this hook the loss multiplied by the GradScaler's scale
            scale = scaler._get_scale_async()
            if scale is not None:
                value = value / scale.to(value.device).float()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def _step_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """The mean loss of the step's micro-batches (Lightning divides each by ``accumulate_grad_batches``)."""
        if self._loss_sum is None:
            return None
        scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        loss = self._loss_sum * (scale / self._loss_count)
        self._loss_sum, self._loss_count = None, 0
        return loss

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        if step == self._processed_step:  # a second optimizer in the same step: judged once
            return
        self._processed_step = step
        self._stepped = True
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = params[0].device if params else pl_module.device
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        norm = self._grad_norm(trainer, step, optimizer, params, scaler, device)
        loss = self._step_loss(trainer, pl_module)
        has_loss = loss is not None  # False when the loss never passed through `on_before_backward`
        values = torch.stack([loss.to(device) if loss is not None else torch.ones((), device=device), norm.float()])
        self._pending.append(_Pending(step, values, scaler is not None, has_loss))

        measured = self._measure_representations(trainer, device) if self._handles else []
        log = is_log_step(step, log_interval(trainer, self.log_every_n_steps))
        if self.auto_intervene or log or measured:
            for verdict in self._flush(trainer, step, measured):
                self._decide(trainer, verdict, params)
            if log or measured:
                self._report(trainer, step, log, probed=bool(measured))

    def _grad_norm(
        self, trainer: pl.Trainer, step: int, optimizer: Optimizer, params: list[Tensor], scaler: Any, device: Any
    ) -> Tensor:
        """The step's global gradient norm (NaN if non-finite): from the channel, else computed and published."""
        channel = self.channel(trainer)
        shared = channel.read(step, "grad_norm")
        if shared is not None:
            return torch.as_tensor(shared, dtype=torch.float32, device=device)
        if not params:
            return torch.zeros((), device=device)
        grads = [p.grad for p in params]
        # only the norm is needed: no zero counts (one read of each large CPU gradient instead of two)
        stats = tensor_stats(grads, backend=self.backend, full=False, count_zeros=[False] * len(grads))  # type: ignore[arg-type]
        norm = global_norm_or_nan(unscaled_for_optimizer(stats, scaler, optimizer))
        channel.publish(step, "grad_norm", norm)
        return norm

    def _flush(self, trainer: pl.Trainer, step: int, measured: list[tuple[str, str, Tensor]]) -> list[StepVerdict]:
        """Brings the pending steps (and the probe) to the host in one transfer and runs the monitor over them."""
        pending, self._pending = self._pending, []
        parts: dict[str, Tensor] = {}
        if pending:
            values = torch.stack([p.values for p in pending])
            if trainer.world_size > 1:  # the same numbers on every rank: average the local losses and norms
                values = trainer.strategy.reduce(values, reduce_op="sum") / trainer.world_size
            parts["steps"] = values
        if measured:
            parts["probe"] = torch.stack([m[2].reshape(()).float() for m in measured])
        host = {name: t.tolist() for name, t in to_host(parts).items()}
        if measured:
            probe = {(kind, layer): v for (kind, layer, _), v in zip(measured, host["probe"], strict=True)}
            for message in self.monitor.score_representations(step, probe):
                self._warn(step, message)
                self.schedule.found(step)
            self.representation = representation_metrics(probe)
        verdicts = [
            self.monitor.observe(p.step, loss if p.has_loss else math.nan, norm, p.scaler_active, p.has_loss)
            for p, (loss, norm) in zip(pending, host.get("steps", []), strict=True)
        ]
        if verdicts:
            self.last_verdict = verdicts[-1]
        return verdicts

    def _decide(self, trainer: pl.Trainer, v: StepVerdict, params: list[Tensor]) -> None:
        """Asks the ladder about one verdict, records its actions, and applies them (``auto_intervene``)."""
        actions = self.ladder.decide(v)
        if v.opens_episode:
            self._warn(v.step, episode_message(v, actions, self.auto_intervene, self.monitor.config.risk_threshold))
        for a in actions:
            if a.recorded:
                self._log.add(v.step, a.kind, a.target, a.reason, a.before, a.after, applied=self.auto_intervene)
                self.schedule.found(v.step)
        if not self.auto_intervene:  # a dry run: keep the snapshot bookkeeping auto mode would keep
            if self.ladder.may_snapshot() and is_probe_step(v.step + 1, self.ladder.config.snapshot_every_n_steps):
                self.ladder.keep(v.step + 1)
            return
        if any(a.drops_gradients for a in actions):
            for p in params:
                p.grad = None  # parameters without a gradient are left alone by the optimizer (moments included)
        for a in actions:
            if a.kind == "lr_scale":
                scale_learning_rate(trainer.optimizers, trainer.lr_scheduler_configs, a.factor)
            elif a.kind == "rollback":
                self._rollback_to = (v.step, a.snapshot)  # restored at the end of the batch
            elif a.kind == "stop":
                trainer.should_stop = True
                self._warn(v.step, self.ladder.stop_message)

    def _warn(self, step: int, message: str) -> None:
        self.warnings.append((step, message))
        rank_zero_warn(f"{_NAME}: {message}", category=RuntimeWarning)

    # ------------------------------------------------------------------------------------- snapshots, rollback

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped:  # accumulating: no optimizer step in this batch
            return
        self._stepped = False
        if self._rollback_to is not None:
            (step, snapshot), self._rollback_to = self._rollback_to, None
            self._restore(trainer, pl_module, snapshot, step)
            write_interventions(self, trainer, trainer.global_step)
            return
        step = trainer.global_step  # the state after the step: that of the start of step `step`
        every = self.ladder.config.snapshot_every_n_steps
        if self.auto_intervene and self.ladder.may_snapshot() and is_probe_step(step, every):
            self.ladder.keep(step, self._take_snapshot(trainer, pl_module, step))

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Snapshot:
        return take_snapshot(
            step,
            pl_module,
            trainer.optimizers,
            [c.scheduler for c in trainer.lr_scheduler_configs],
            getattr(trainer.precision_plugin, "scaler", None),
            rng=_collect_rng_states() if self.restore_rng else None,
            extra={
                "monitor": self.monitor.state_dict(),
                "participants": self.channel(trainer).participant_states(exclude=self.state_key),
            },
            device=self.snapshot_device,
        )

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: Snapshot, step: int) -> None:
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        restore_snapshot(snapshot, pl_module, trainer.optimizers, schedulers, scaler)
        if snapshot.rng is not None:
            _set_rng_states(snapshot.rng)
        self.monitor.rewind(snapshot.extra["monitor"])
        event = Event("rollback", step, self.name, {"to_step": snapshot.step})
        states = copy_tree(snapshot.extra["participants"])  # a later rollback to the same snapshot needs them intact
        self.channel(trainer).restore_participants(states, event, exclude=self.state_key)
        self._pending.clear()

    # ------------------------------------------------------------------------------------------------ reporting

    def _report(self, trainer: pl.Trainer, step: int, log: bool, probed: bool) -> None:
        metrics: dict[str, float] = {}
        v = self.last_verdict
        if log and v is not None:
            counts = (self.overflow_steps, self.skipped_steps, self.rollbacks, self.lr_scale, len(self._log))
            metrics.update(collapse_metrics(v, *counts))
        if probed:
            metrics.update(self.representation)
        self._log_metrics(trainer, metrics, step)
        write_interventions(self, trainer, step)

    # ----------------------------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "interventions": self._log.state_dict(),
            "monitor": self.monitor.state_dict(),
            "ladder": self.ladder.state_dict(),
            "snapshot_steps": self.ladder.snapshot_steps(),  # the snapshots themselves are not saved
            "warnings": [list(w) for w in self.warnings],
            "schedule": self.schedule.state_dict(),
        }

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state["monitor"])
        self.ladder.load_state_dict(state["ladder"])
        warnings = [(int(s), str(m)) for s, m in state["warnings"]]
        if "schedule" in state:  # absent from checkpoints of older versions: the schedule starts afresh
            self.schedule.load_state_dict(state["schedule"])
        self._log.load_state_dict(state["interventions"])
        self.warnings = warnings
        if self.ladder.stopped_reason is not CollapseStopReason.NOT_STOPPED:
            message = self.ladder.stop_message
            self.ladder.start_episode()
            self._warn_once(f"resumed after stop: {message}", resumed_after_stop_message(message))


def _module(modules: dict[str, nn.Module], name: str, argument: str) -> nn.Module:
    if name not in modules:
        raise MisconfigurationException(unknown_module_message(_NAME, name, argument, list(modules)))
    return modules[name]


def _validate(a: dict[str, Any]) -> None:
    """Refuses bad arguments of the shell (the configs check their own) naming the argument and the fix."""
    for name in ("auto_intervene", "restore_rng", "adaptive_schedule"):
        check_bool(name, a[name])
    check_positive_int("log_every_n_steps", a["log_every_n_steps"], allow_none=True)
    check_positive_int("every_n_steps", a["every_n_steps"], allow_zero=True)
    check_positive_int("rank_sample_size", a["rank_sample_size"])
    if a["rank_sample_size"] > MAX_RANK_SAMPLE_SIZE:
        raise ValueError(
            f"Expected `rank_sample_size` <= {MAX_RANK_SAMPLE_SIZE} (feature rows kept per layer and decomposed on"
            f" each probe), but got {a['rank_sample_size']}."
        )
    check_choice("backend", a["backend"], get_args(Backend))
    for name in ("representation_layers", "dead_unit_layers"):
        names = a[name]
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise TypeError(f"Expected `{name}` to be a list of module paths (str), but got {names!r}.")
    device = a["snapshot_device"]
    if not isinstance(device, str):
        raise TypeError(f"Expected `snapshot_device` to be a str, but got {type(device).__name__}: {device!r}.")
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"Expected `snapshot_device` to be a torch device such as 'cpu' or 'cuda', but got {device!r} ({err})."
        ) from err
