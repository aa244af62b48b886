"""EarlyCollapseCallback: loss/gradient spikes, divergence, dead units, rank collapse; skip, cut LR, roll back, stop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gradflow import tensorboard as tb
from lightning_gradflow.callbacks._common import (
    check_bool,
    check_choice,
    check_float_in,
    check_positive_float,
    check_positive_int,
    global_norm_or_nan,
    log_interval,
    refuse_sharded_strategy,
    unscaled_for_optimizer,
)
from lightning_gradflow.callbacks.gradient_flow import GradientFlowCallback
from lightning_gradflow.collapse import (
    DivergenceDetector,
    EmaZScore,
    FeatureBuffer,
    RobustZScore,
    Snapshot,
    SnapshotRing,
    combine_risk,
    dead_fraction,
    effective_rank,
    feature_std,
    ramp,
    restore_snapshot,
    spike_score,
    take_snapshot,
    unit_abs_sums,
)
from lightning_gradflow.interventions import Intervention, InterventionLog, scale_learning_rate
from lightning_gradflow.stats import tensor_stats
from lightning_gradflow.stats._common import BACKENDS, Backend

if TYPE_CHECKING:
    import lightning.pytorch as pl

FAMILY = "collapse"
_NAME = "EarlyCollapseCallback"
_RELU_FAMILY = (nn.ReLU, nn.ReLU6)
_REPRESENTATION_WEIGHT = 0.5  # dead units / rank collapse alone raise the risk to 0.5: they warn, never alarm
_GRAD_WEIGHT = 0.5  # a gradient-norm spike alone warns (heavy-tailed near convergence); with a loss spike it alarms


class CollapseStopReason(Enum):
    """Why :class:`EarlyCollapseCallback` stopped a run (like Lightning's ``EarlyStoppingReason``)."""

    NOT_STOPPED = 0
    MAX_ROLLBACKS = 1  # rolled back ``max_rollbacks`` times and collapsed again
    NO_HEALTHY_SNAPSHOT = 2  # a rollback was due but no healthy snapshot was kept
    COLLAPSE_PERSISTS = 3  # rollback off: the alarm held for ``stop_patience`` steps


@dataclass
class StepVerdict:
    """What the detectors made of one optimizer step (host values, identical on every rank)."""

    step: int
    loss: float
    grad_norm: float
    loss_z: float = 0.0
    grad_z: float = 0.0
    divergence: float = 0.0
    risk: float = 0.0
    nonfinite: bool = False
    overflow: bool = False
    alarm: bool = False
    reasons: tuple[str, ...] = ()


class EarlyCollapseCallback(Callback):
    r"""Detects a training collapse early and, with ``auto_intervene=True``, recovers from it.

    **Signals**, once per optimizer step (read in ``on_before_optimizer_step``, before the optimizer consumes the
    step): the step's loss (from ``on_before_backward``, summed over accumulated micro-batches) and the global
    gradient norm (after AMP unscaling; taken from a :class:`GradientFlowCallback` listed *before* this one when it
    computed it this step, else one fused :func:`~lightning_gradflow.stats.tensor_stats` pass). Under DDP both are
    averaged across ranks first (one all-reduce of two numbers), so every rank decides the same. See
    :mod:`lightning_gradflow.collapse` for the maths:

    * ``loss_zscore`` / ``grad_norm_zscore``: robust z-scores (median/MAD over ``window`` healthy steps, or an EMA;
      noise scale at least ``min_scale``) of ``log(x + scale_floor · x₀)`` for the loss and the gradient norm (x₀:
      the run's first value); a loss spike scores ``ramp(z, z_threshold/2, z_threshold)``, a gradient-norm spike
      half that: gradient norms are heavy-tailed near convergence, so their spikes warn early but alarm only
      together with the loss (OLMo 2 reports that they come first);
    * divergence (``collapse/divergence``, log scale): a running median of the same offset log-loss over its best
      value, beyond 5 σ of its own noise, scored 1 at ``divergence_ratio`` × the best;
    * non-finite loss or gradients score 1 — except fp16 GradScaler overflow steps, which are normal (the scaler
      skips them): they are counted and leave every detector untouched; only ``overflow_patience`` consecutive
      overflow steps (the scale collapsing) count as non-finite;
    * on probe steps (every ``every_n_steps``, :meth:`should_compute`): the dead fraction of each ReLU-family module
      (``nn.ReLU``, ``nn.ReLU6``, or ``dead_unit_layers``: units zero on the whole probe batch, or τ-dormant with
      ``dormant_threshold``), and, on ``representation_layers`` (default: the input of the last layer), RankMe and
      the per-dimension std of L2-normalised features over a buffer of the last ``rank_sample_size`` rows. Each
      scores ``0.5 · ramp``: these slow signals warn, and raise the risk, but cannot trigger the ladder alone.

    ``risk = 1 - Π(1 - s_i)`` over the signals; a step is an **alarm** when ``risk >= risk_threshold`` or its loss or
    gradients are non-finite. The first step of an episode with ``risk >= warn_threshold`` warns once (listed in
    :attr:`warnings`). Alarm steps never enter the detector windows, so a spike cannot mask the next one.

    **Interventions** (``auto_intervene=True``; each rung can be switched off), counted in consecutive alarm steps
    (*strikes*):

    1. ``skip_nonfinite``: a step with a non-finite loss or gradient is skipped (gradients dropped, so Adam moments
       stay clean);
    2. ``lr_cut_factor``: on the first strike the learning rate is multiplied by the factor (scheduler-safe:
       :func:`~lightning_gradflow.interventions.scale_learning_rate`);
    3. ``rollback``: on strike ``rollback_patience`` the step is skipped and, at the end of the batch, the newest
       healthy snapshot is restored: parameters, buffers, optimizer, LR scheduler and GradScaler states, the RNG
       states (``restore_rng``) and this callback's detectors. Snapshots are taken every ``snapshot_every_n_steps``
       healthy steps into a ring of ``num_snapshots`` copies on ``snapshot_device`` (one more when training starts).
       The data does not rewind — the batches between the snapshot and the collapse are never replayed — and
       ``skip_batches`` more batches after the rollback have their gradients dropped (PaLM's "rewind and skip").
       A second collapse before any new snapshot was taken discards the snapshot that led to it and goes one
       further back. ``trainer.global_step`` keeps counting forward: only the training state rewinds; the LR factor
       returns to the snapshot's (a cut made after it is undone with it). The step that triggers the rollback is
       skipped and the restore happens in ``on_train_batch_end``, after Lightning stepped the LR scheduler and the
       GradScaler, so the restored state is exactly the snapshot's: training after a rollback is bitwise the
       training a run resumed from that snapshot would do on the same batches;
    4. ``stop_on_failure``: the run stops (``trainer.should_stop``, :attr:`stopped_reason`) when a rollback is due
       after ``max_rollbacks`` rollbacks or without a snapshot, or, with ``rollback=False``, after ``stop_patience``
       strikes.

    Every action is an :class:`~lightning_gradflow.Intervention` in :attr:`interventions`. Without
    ``auto_intervene`` the callback only observes (the run is bitwise unchanged) and records what it would do
    (``applied=False``) once per episode; it then reads the device only on logging and probe steps.

    **Logged metrics**: ``collapse/risk``, ``collapse/loss_zscore``, ``collapse/grad_norm_zscore``,
    ``collapse/divergence``, ``collapse/overflow_steps``, ``collapse/skipped_steps``, ``collapse/rollbacks``,
    ``collapse/lr_scale``, ``collapse/interventions``; on probe steps ``collapse/dead_fraction/<layer>``,
    ``collapse/effective_rank/<layer>`` and ``collapse/feature_std/<layer>``. TensorBoard (rank zero): a
    custom-scalars layout and the interventions as text.

    **State**: detector windows, strikes, counters, the LR factor, snapshot bookkeeping, warnings and interventions
    are saved in checkpoints; the snapshots themselves are not (a checkpoint is one): after a resume the ring starts
    with a snapshot of the resumed state.

    **Strategies**: single device and DDP. Sharded strategies (FSDP, DeepSpeed, ModelParallel) are refused at setup.

    Args:
        auto_intervene: run the intervention ladder; otherwise only observe and warn.
        log_every_n_steps: optimizer steps between logs; default: the Trainer's ``log_every_n_steps``.
        every_n_steps: optimizer steps between representation probes (dead units, rank); 0 disables them.
        spike_detector: ``"mad"`` (median/MAD over a window) or ``"ema"`` (EMA mean and variance).
        window: healthy steps in the median/MAD window.
        min_history: healthy steps observed before spikes and divergence are scored.
        loss_z_threshold: loss z-score that scores 1.
        grad_z_threshold: gradient-norm z-score that scores 1.
        min_scale: floor on the noise scale of the z-scores (on the log scale: 0.1 ≈ 10%).
        ema_alpha: the EMA decay of ``spike_detector="ema"``.
        log_scale: score ``log(loss)`` and ``log(grad norm)`` (ratios); falls back to the raw loss when it is <= 0.
        scale_floor: on the log scale, values are offset by ``scale_floor`` × the run's first loss (gradient norm):
            ``log(x + scale_floor · x₀)``, so the large *ratios* of tiny values near convergence (a loss going from
            1e-4 to 1e-2 after starting at 2) are neither spikes nor divergence; 0 scores pure ratios.
        divergence_ratio: growth of the smoothed loss over its best that scores 1.
        divergence_smoothing: steps of the running median of ``log(loss)`` that divergence is judged on.
        warn_threshold: risk at which an episode warns.
        risk_threshold: risk at which a step is an alarm.
        representation_layers: module paths whose *input* is sampled for RankMe and feature std; default: the last
            module with parameters. An empty list disables them.
        dead_unit_layers: module paths whose *output* is checked for dead units; default: every ``nn.ReLU`` /
            ``nn.ReLU6``.
        dormant_threshold: τ of τ-dormant units (0: dead units, zero on the whole probe batch).
        max_dead_fraction: dead fraction that scores the representation signal fully.
        rank_sample_size: feature rows kept per representation layer.
        min_effective_rank: RankMe at or below which the representation signal scores fully (0 at twice it).
        skip_nonfinite: rung 1.
        lr_cut_factor: rung 2, the LR multiplier on the first strike; None disables it.
        rollback: rung 3.
        rollback_patience: consecutive alarm steps before a rollback.
        snapshot_every_n_steps: optimizer steps between snapshots.
        num_snapshots: snapshots kept.
        snapshot_device: where snapshots live (``"cpu"``, or e.g. ``"cuda"`` for speed).
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

    def __init__(
        self,
        auto_intervene: bool = False,
        log_every_n_steps: int | None = None,
        every_n_steps: int = 50,
        spike_detector: Literal["mad", "ema"] = "mad",
        window: int = 100,
        min_history: int = 20,
        loss_z_threshold: float = 6.0,
        grad_z_threshold: float = 6.0,
        min_scale: float = 0.1,
        ema_alpha: float = 0.97,
        log_scale: bool = True,
        scale_floor: float = 0.05,
        divergence_ratio: float = 1.5,
        divergence_smoothing: int = 9,
        warn_threshold: float = 0.5,
        risk_threshold: float = 0.95,
        representation_layers: list[str] | None = None,
        dead_unit_layers: list[str] | None = None,
        dormant_threshold: float = 0.0,
        max_dead_fraction: float = 0.5,
        rank_sample_size: int = 1024,
        min_effective_rank: float = 1.5,
        skip_nonfinite: bool = True,
        lr_cut_factor: float | None = 0.5,
        rollback: bool = True,
        rollback_patience: int = 2,
        snapshot_every_n_steps: int = 50,
        num_snapshots: int = 2,
        snapshot_device: str = "cpu",
        restore_rng: bool = True,
        skip_batches: int = 0,
        max_rollbacks: int = 3,
        stop_on_failure: bool = True,
        stop_patience: int = 10,
        overflow_patience: int = 25,
        backend: Backend = "auto",
    ) -> None:
        for name, flag in [
            ("auto_intervene", auto_intervene),
            ("log_scale", log_scale),
            ("skip_nonfinite", skip_nonfinite),
            ("rollback", rollback),
            ("restore_rng", restore_rng),
            ("stop_on_failure", stop_on_failure),
        ]:
            check_bool(name, flag)
        check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        check_positive_int("every_n_steps", every_n_steps, allow_zero=True)
        check_choice("spike_detector", spike_detector, ("mad", "ema"))
        check_choice("backend", backend, BACKENDS)
        for name, value in [
            ("window", window),
            ("min_history", min_history),
            ("rank_sample_size", rank_sample_size),
            ("rollback_patience", rollback_patience),
            ("snapshot_every_n_steps", snapshot_every_n_steps),
            ("num_snapshots", num_snapshots),
            ("stop_patience", stop_patience),
            ("overflow_patience", overflow_patience),
            ("divergence_smoothing", divergence_smoothing),
        ]:
            check_positive_int(name, value)
        check_positive_int("skip_batches", skip_batches, allow_zero=True)
        check_positive_int("max_rollbacks", max_rollbacks, allow_zero=True)
        for name, fvalue in [
            ("loss_z_threshold", loss_z_threshold),
            ("grad_z_threshold", grad_z_threshold),
            ("min_scale", min_scale),
            ("min_effective_rank", min_effective_rank),
        ]:
            check_positive_float(name, fvalue)
        if not isinstance(scale_floor, (int, float)) or isinstance(scale_floor, bool):
            kind = type(scale_floor).__name__
            raise TypeError(f"Expected `scale_floor` to be a float, but got {kind}: {scale_floor!r}.")
        if not 0 <= scale_floor < math.inf:
            raise ValueError(f"Expected `scale_floor` to be a finite number >= 0, but got {scale_floor}.")
        check_float_in("ema_alpha", ema_alpha, 0.0, 1.0)
        check_float_in("warn_threshold", warn_threshold, 0.0, 1.0, closed_high=True)
        check_float_in("risk_threshold", risk_threshold, 0.0, 1.0, closed_high=True)
        check_float_in("max_dead_fraction", max_dead_fraction, 0.0, 1.0, closed_high=True)
        check_float_in("dormant_threshold", dormant_threshold, -1e-12, 1.0)
        check_positive_float("divergence_ratio", divergence_ratio)
        if divergence_ratio <= 1:
            raise ValueError(f"Expected `divergence_ratio` > 1 (a growth factor), but got {divergence_ratio}.")
        if lr_cut_factor is not None:
            check_float_in("lr_cut_factor", lr_cut_factor, 0.0, 1.0)
        for name, names in [("representation_layers", representation_layers), ("dead_unit_layers", dead_unit_layers)]:
            if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise TypeError(f"Expected `{name}` to be a list of module paths (str), but got {names!r}.")
        if not isinstance(snapshot_device, str):
            raise TypeError(f"Expected `snapshot_device` to be a str, but got {snapshot_device!r}.")
        torch.device(snapshot_device)  # raises for a malformed device string

        self.auto_intervene = auto_intervene
        self.log_every_n_steps = log_every_n_steps
        self.every_n_steps = every_n_steps
        self.spike_detector = spike_detector
        self.window = window
        self.min_history = min_history
        self.loss_z_threshold = loss_z_threshold
        self.grad_z_threshold = grad_z_threshold
        self.min_scale = min_scale
        self.ema_alpha = ema_alpha
        self.log_scale = log_scale
        self.scale_floor = scale_floor
        self.divergence_ratio = divergence_ratio
        self.divergence_smoothing = divergence_smoothing
        self.warn_threshold = warn_threshold
        self.risk_threshold = risk_threshold
        self.representation_layers = representation_layers
        self.dead_unit_layers = dead_unit_layers
        self.dormant_threshold = dormant_threshold
        self.max_dead_fraction = max_dead_fraction
        self.rank_sample_size = rank_sample_size
        self.min_effective_rank = min_effective_rank
        self.skip_nonfinite = skip_nonfinite
        self.lr_cut_factor = lr_cut_factor
        self.rollback = rollback
        self.rollback_patience = rollback_patience
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.num_snapshots = num_snapshots
        self.snapshot_device = snapshot_device
        self.restore_rng = restore_rng
        self.skip_batches = skip_batches
        self.max_rollbacks = max_rollbacks
        self.stop_on_failure = stop_on_failure
        self.stop_patience = stop_patience
        self.overflow_patience = overflow_patience
        self.backend: Backend = backend

        self._log = InterventionLog(_NAME)
        self.snapshots = SnapshotRing(num_snapshots)
        self.warnings: list[tuple[int, str]] = []  # (step, message) of every warning, on every rank
        self.last_verdict: StepVerdict | None = None
        self.last_metrics: dict[str, float] = {}
        self.representation: dict[str, float] = {}  # the latest probe's metrics
        self.stopped_reason = CollapseStopReason.NOT_STOPPED
        self.stop_message = ""
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.skipped_steps = 0
        self.overflow_steps = 0
        self._reset_detectors()
        self._strikes = 0
        self._overflow_streak = 0
        self._use_log_loss = log_scale
        self._first: list[float | None] = [None, None]  # the first finite positive loss and gradient norm
        self._skip_remaining = 0
        self._snapshots_since_rollback = 0
        self._episode = False  # a warning episode is open (risk stayed >= warn_threshold)
        self._repr_score = 0.0
        self._warned: set[tuple[str, str]] = set()
        # per-fit, not state
        self._loss_acc: Tensor | None = None
        self._pending: list[tuple[int, Tensor, bool, bool]] = []  # step, (loss, norm), scaler active, has loss
        self._processed_step = -1
        self._stepped = False
        self._step_alarm = False
        self._rollback_to: Snapshot | None = None
        self._hooks: list[Any] = []
        self._dead_modules: dict[str, nn.Module] = {}
        self._repr_modules: dict[str, nn.Module] = {}
        self._dead_sums: dict[str, tuple[Tensor, int]] = {}
        self._buffers: dict[str, FeatureBuffer] = {}
        self._probe_step = -1

    def _reset_detectors(self) -> None:
        self.loss_detector: RobustZScore | EmaZScore
        self.grad_detector: RobustZScore | EmaZScore
        if self.spike_detector == "mad":
            self.loss_detector = RobustZScore(self.window, self.min_history, self.min_scale)
            self.grad_detector = RobustZScore(self.window, self.min_history, self.min_scale)
        else:
            self.loss_detector = EmaZScore(self.ema_alpha, self.min_history, self.min_scale)
            self.grad_detector = EmaZScore(self.ema_alpha, self.min_history, self.min_scale)
        self.divergence = DivergenceDetector(
            self.divergence_smoothing, self.divergence_ratio, self.min_history, window=self.window
        )

    # ----------------------------------------------------------------------------------------------- lifecycle

    @property
    def interventions(self) -> list[Intervention]:
        """Every action taken (or, with ``auto_intervene=False``, that would have been taken), oldest first."""
        return self._log.records

    @property
    def rollback_enabled(self) -> bool:
        """Whether rollbacks can happen (``auto_intervene`` and ``rollback``)."""
        return self.auto_intervene and self.rollback

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            representation_layers=self.representation_layers, dead_unit_layers=self.dead_unit_layers
        )

    def should_compute(self, step: int) -> bool:
        """Whether optimizer step ``step`` runs a representation probe (must agree on all ranks)."""
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if self.rollback_enabled and name in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"):
            raise MisconfigurationException(
                f"{_NAME}(auto_intervene=True, rollback=True) cannot roll back under `strategy={name}`: its snapshots"
                " would hold only this rank's shards of the parameters and optimizer state. Use a single device or"
                " `strategy='ddp'`, or pass `rollback=False`."
            )
        refuse_sharded_strategy(trainer, _NAME, reads="whole gradients and whole layer activations")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules = dict(pl_module.named_modules())
        if self.dead_unit_layers is None:
            self._dead_modules = {n: m for n, m in modules.items() if isinstance(m, _RELU_FAMILY)}
        else:
            self._dead_modules = {n: _module(modules, n, "dead_unit_layers") for n in self.dead_unit_layers}
        if self.representation_layers is None:
            leaves = [
                n
                for n, m in modules.items()
                if n and not list(m.children()) and any(True for _ in m.parameters(recurse=False))
            ]
            self._repr_modules = {leaves[-1]: modules[leaves[-1]]} if leaves else {}
        else:
            self._repr_modules = {n: _module(modules, n, "representation_layers") for n in self.representation_layers}
        self._buffers = {n: FeatureBuffer(self.rank_sample_size) for n in self._repr_modules}
        self.snapshots.clear()  # never restore the states of another fit
        self._pending.clear()
        self._loss_acc = None
        self._rollback_to = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rollback_enabled:
            self._take_snapshot(trainer, pl_module)
        for logger in tb.tensorboard_loggers(trainer):
            tb.add_layout_category(
                logger,
                FAMILY,
                {
                    "collapse risk": [f"{FAMILY}/risk"],
                    "spike z-scores": [f"{FAMILY}/loss_zscore", f"{FAMILY}/grad_norm_zscore"],
                    "divergence (log of smoothed loss over its best)": [f"{FAMILY}/divergence"],
                    "dead units (fraction)": [f"{FAMILY}/dead_fraction/"],
                    "effective rank (RankMe)": [f"{FAMILY}/effective_rank/"],
                    "feature std (L2-normalised)": [f"{FAMILY}/feature_std/"],
                    "interventions": [f"{FAMILY}/rollbacks", f"{FAMILY}/lr_scale", f"{FAMILY}/skipped_steps"],
                },
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending:  # monitoring only: process what the last logging interval left
            step = self._pending[-1][0]
            self._flush(trainer, step)
            self._log_metrics(trainer, step, True, False)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._pending.clear()
        self._rollback_to = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hooks:  # a probe left open (its training step was skipped): validation batches must not enter it
            self._remove_hooks()
            self._dead_sums = {}

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -------------------------------------------------------------------------------------------------- probes

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._hooks or step == self._probe_step or not self.should_compute(step):
            return
        if not self._dead_modules and not self._repr_modules:
            return
        self._probe_step = step
        self._dead_sums = {}
        for name, module in self._dead_modules.items():
            self._hooks.append(module.register_forward_hook(partial(self._capture_dead, name)))
        for name, module in self._repr_modules.items():
            self._hooks.append(module.register_forward_hook(partial(self._capture_features, name)))

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
        out: list[tuple[str, str, Tensor]] = []
        offset = 0
        for n, part in zip(dead_names, parts, strict=True):
            sums = flat[offset : offset + part.numel()]
            offset += part.numel()
            out.append(("dead_fraction", n, dead_fraction(sums, 1, self.dormant_threshold)))
        for n in repr_names:
            out.append(("effective_rank", n, flat[offset] / world))
            out.append(("feature_std", n, flat[offset + 1] / world))
            offset += 2
        self._dead_sums = {}
        return out

    def _score_representations(self, step: int, measured: dict[tuple[str, str], float]) -> None:
        scores = [0.0]
        for (kind, layer), value in measured.items():
            if kind == "dead_fraction":
                s = ramp(value, self.max_dead_fraction / 2, self.max_dead_fraction)
                what = f"{value:.0%} of the units of '{layer}' are {'dormant' if self.dormant_threshold else 'dead'}"
                fix = "lower the learning rate, use LeakyReLU/GELU, or re-initialise the dead units (ReDo)"
            elif kind == "effective_rank":
                s = ramp(-value, -2 * self.min_effective_rank, -self.min_effective_rank)
                what = f"the features entering '{layer}' collapsed to an effective rank of {value:.3g}"
                fix = "check for representation collapse: lower the learning rate, add normalisation or weight decay"
            else:
                continue
            scores.append(s)
            if s >= 1.0 and (kind, layer) not in self._warned:
                self._warned.add((kind, layer))
                self._warn(step, f"{what} at step {step}. Suggested fix: {fix}.")
        self._repr_score = _REPRESENTATION_WEIGHT * max(scores)

    # ---------------------------------------------------------------------------------------------- the step

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        value = loss.detach().float().reshape(-1).sum()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # fp16 AMP: Lightning hands this hook the loss multiplied by the GradScaler's scale
            scale = scaler._get_scale_async()
            if scale is not None:
                value = value / scale.to(value.device).float()
        self._loss_acc = value if self._loss_acc is None else self._loss_acc + value

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        if step == self._processed_step:  # a second optimizer in the same step: judged once
            return
        self._processed_step = step
        self._stepped = True
        self._step_alarm = False
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = params[0].device if params else pl_module.device
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        norm = self._grad_norm(trainer, optimizer, params, scaler, device)
        has_loss = self._loss_acc is not None  # False when the loss never passed through `on_before_backward`
        loss = self._loss_acc if self._loss_acc is not None else torch.ones((), device=device)
        self._loss_acc = None
        values = torch.stack([loss.to(device), norm.to(device).float()])
        self._pending.append((step, values, scaler is not None, has_loss))

        measured: list[tuple[str, str, Tensor]] = []
        if self._hooks:  # a probe registered in this step's (or, after a skipped step, an earlier) batch
            measured = self._measure_representations(trainer, device)
        log = self._due(step, self._interval(trainer))
        if self.auto_intervene or log or measured:
            verdicts, probed = self._flush(trainer, step, measured=measured)
            if self.auto_intervene and verdicts:
                self._intervene(trainer, verdicts[-1], params)
            if log or probed:
                self._log_metrics(trainer, step, log, probed)

    def _grad_norm(
        self, trainer: pl.Trainer, optimizer: Optimizer, params: list[Tensor], scaler: Any, device: torch.device
    ) -> Tensor:
        """The global gradient norm (NaN when any gradient is non-finite), shared with GradientFlowCallback."""
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if not isinstance(callback, GradientFlowCallback):
                continue
            shared = callback.measured_grad_norm(trainer.global_step)
            if shared is not None:
                return shared
        if not params:
            return torch.zeros((), device=device)
        grads = [p.grad for p in params]
        # only the norm is needed: no zero counts (one read of each large CPU gradient instead of two)
        stats = tensor_stats(grads, backend=self.backend, full=False, count_zeros=[False] * len(grads))  # type: ignore[arg-type]
        return global_norm_or_nan(unscaled_for_optimizer(stats, scaler, optimizer))

    def _flush(
        self, trainer: pl.Trainer, step: int, measured: list[tuple[str, str, Tensor]] | None = None
    ) -> tuple[list[StepVerdict], bool]:
        """Reads the pending steps (and probe) to the host in one transfer and runs the detectors over them."""
        pending, self._pending = self._pending, []
        measured = measured or []
        if not pending and not measured:
            return [], False
        device = pending[0][1].device if pending else measured[0][2].device
        values = torch.stack([p[1] for p in pending]) if pending else torch.zeros(0, 2, device=device)
        if trainer.world_size > 1:  # the same numbers on every rank: average the local losses
            values = trainer.strategy.reduce(values, reduce_op="sum") / trainer.world_size
        flat = torch.cat([values.reshape(-1).double(), *(m[2].reshape(1).double().to(device) for m in measured)])
        host = flat.cpu().tolist()  # the one device-to-host transfer
        rows = [host[2 * i : 2 * i + 2] for i in range(len(pending))]
        probe = {(kind, layer): v for (kind, layer, _), v in zip(measured, host[2 * len(pending) :], strict=True)}
        if probe:
            self._score_representations(step, probe)
            self.representation = {
                f"{FAMILY}/{kind}/{layer.replace('.', '/')}": v for (kind, layer), v in probe.items()
            }
        verdicts = [
            self._observe(s, row[0] if has_loss else math.nan, row[1], scaler, has_loss)
            for (s, _, scaler, has_loss), row in zip(pending, rows, strict=True)
        ]
        if verdicts:
            self.last_verdict = verdicts[-1]
        return verdicts, bool(probe)

    def _observe(
        self, step: int, loss: float, grad_norm: float, scaler_active: bool, has_loss: bool = True
    ) -> StepVerdict:
        """Runs the detectors on one step (host floats) and opens a warning episode when the risk is high.

        Without a loss (manual optimization calling ``loss.backward()`` directly) only the gradient norm is judged.
        """
        v = StepVerdict(step, loss, grad_norm)
        v.nonfinite = not ((math.isfinite(loss) or not has_loss) and math.isfinite(grad_norm))
        if v.nonfinite and scaler_active:
            self._overflow_streak += 1
            if self._overflow_streak <= self.overflow_patience:
                v.overflow = True
                v.nonfinite = False
                self.overflow_steps += 1
                v.risk = combine_risk([self._repr_score])
                return v
        elif not v.nonfinite:
            self._overflow_streak = 0
        if self._use_log_loss and math.isfinite(loss) and loss <= 0:  # log-scale impossible: start again, raw
            self._use_log_loss = False
            self.loss_detector = type(self.loss_detector)(*_detector_args(self.loss_detector))
        x_loss = self._offset_log(0, loss) if self._use_log_loss and math.isfinite(loss) else loss
        x_grad = grad_norm
        if self.log_scale and math.isfinite(grad_norm):
            x_grad = self._offset_log(1, grad_norm)
        v.loss_z = self.loss_detector.score(x_loss) if math.isfinite(loss) else (math.nan if has_loss else 0.0)
        v.grad_z = self.grad_detector.score(x_grad) if math.isfinite(x_grad) else 0.0
        if not math.isfinite(grad_norm):
            v.grad_z = math.nan
        self.divergence.update(math.exp(x_loss) if self._use_log_loss and math.isfinite(x_loss) else loss)
        v.divergence = self.divergence.excess()
        scores = {
            "non-finite loss or gradients": 1.0 if v.nonfinite else 0.0,
            f"loss z-score {v.loss_z:.3g}": spike_score(v.loss_z, self.loss_z_threshold) if not v.nonfinite else 0,
            f"gradient-norm z-score {v.grad_z:.3g}": _GRAD_WEIGHT * spike_score(v.grad_z, self.grad_z_threshold)
            if not v.nonfinite
            else 0,
            f"smoothed loss {math.exp(v.divergence):.3g}× its best": self.divergence.score(),
            "collapsed representations": self._repr_score,
        }
        v.risk = combine_risk(list(scores.values()))
        v.alarm = v.nonfinite or v.risk >= self.risk_threshold
        v.reasons = tuple(k for k, s in scores.items() if s > 0)
        if not v.alarm:
            self.loss_detector.update(x_loss)
            if math.isfinite(x_grad):
                self.grad_detector.update(x_grad)
        dynamic = combine_risk([s for k, s in scores.items() if k != "collapsed representations"])
        if (v.risk >= self.warn_threshold and dynamic > 0) or v.nonfinite:  # representations warn per layer
            if not self._episode:
                self._episode = True
                action = (
                    "auto_intervene is on: the ladder skip → cut LR → roll back → stop applies"
                    if self.auto_intervene
                    else "with `auto_intervene=True` the callback would skip the step, cut the LR, roll back to a"
                    " healthy snapshot, and stop as a last resort"
                )
                self._warn(
                    step,
                    f"collapse risk {v.risk:.2f} at step {step} ({', '.join(v.reasons)}, loss {loss:.4g}); {action}.",
                )
                if not self.auto_intervene:
                    kind = "skip_step" if v.nonfinite else ("lr_scale" if self.lr_cut_factor else "rollback")
                    self._log.add(
                        step,
                        kind,
                        "all",
                        f"collapse risk {v.risk:.2f}: {', '.join(v.reasons)}",
                        v.risk,
                        math.nan,
                        applied=False,
                    )
        elif v.risk < self.warn_threshold / 2:
            self._episode = False
        return v

    def _offset_log(self, which: int, x: float) -> float:
        """``log(x + scale_floor · x₀)`` (x₀: the first positive value seen); NaN when that is not positive."""
        if self._first[which] is None and x > 0:
            self._first[which] = x
        offset = self.scale_floor * (self._first[which] or 0.0)
        return math.log(x + offset) if x + offset > 0 else math.nan

    def _warn(self, step: int, message: str) -> None:
        self.warnings.append((step, message))
        rank_zero_warn(f"{_NAME}: {message}", category=RuntimeWarning)

    # ------------------------------------------------------------------------------------------ interventions

    def _intervene(self, trainer: pl.Trainer, v: StepVerdict, params: list[Tensor]) -> None:
        self._step_alarm = v.alarm or v.overflow
        if self.stopped_reason is not CollapseStopReason.NOT_STOPPED:
            _drop_grads(params)
            return
        if self._skip_remaining > 0:
            self._skip_remaining -= 1
            _drop_grads(params)
            self.skipped_steps += 1
            self._step_alarm = True
        if v.nonfinite and self.skip_nonfinite:
            _drop_grads(params)
            self.skipped_steps += 1
            self._log.add(v.step, "skip_step", "all", "non-finite loss or gradients; the step was skipped", v.loss, 0)
        if not v.alarm:
            self._strikes = 0
            return
        self._strikes += 1
        why = ", ".join(v.reasons)
        if self.rollback and self._strikes >= self.rollback_patience:
            _drop_grads(params)
            if self.rollbacks >= self.max_rollbacks:
                self._stop(
                    trainer, v, CollapseStopReason.MAX_ROLLBACKS, f"collapsed again after {self.rollbacks} rollbacks"
                )
                return
            if self._snapshots_since_rollback == 0 and self.rollbacks > 0 and len(self.snapshots) > 1:
                self.snapshots.pop_latest()  # restoring it led straight back here: go one further back
            snapshot = self.snapshots.latest()
            if snapshot is None:
                self._stop(trainer, v, CollapseStopReason.NO_HEALTHY_SNAPSHOT, "no healthy snapshot to roll back to")
                return
            self._rollback_to = snapshot
            self._strikes = 0
            self._log.add(
                v.step,
                "rollback",
                "all",
                f"{why} for {self.rollback_patience} step(s); restoring the snapshot of step {snapshot.step}"
                + (f" and skipping {self.skip_batches} batch(es)" if self.skip_batches else ""),
                v.step,
                snapshot.step,
            )
        elif self._strikes == 1 and self.lr_cut_factor is not None:
            before = self.lr_scale
            scale_learning_rate(trainer.optimizers, trainer.lr_scheduler_configs, self.lr_cut_factor)
            self.lr_scale *= self.lr_cut_factor
            self._log.add(v.step, "lr_scale", "optimizer", f"{why}; learning rate cut", before, self.lr_scale)
        elif not self.rollback and self._strikes >= self.stop_patience:
            _drop_grads(params)
            self._stop(trainer, v, CollapseStopReason.COLLAPSE_PERSISTS, f"{why} for {self._strikes} steps")

    def _stop(self, trainer: pl.Trainer, v: StepVerdict, reason: CollapseStopReason, why: str) -> None:
        if not self.stop_on_failure:
            return
        self.stopped_reason = reason
        self.stop_message = f"{_NAME} stopped the run at step {v.step} ({reason.name}): {why}."
        trainer.should_stop = True
        self._log.add(v.step, "stop", "trainer", f"{reason.name}: {why}", v.risk, math.nan)
        self._warn(v.step, self.stop_message)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped:  # accumulating: no optimizer step in this batch
            return
        self._stepped = False
        if self._rollback_to is not None:
            snapshot, self._rollback_to = self._rollback_to, None
            self._restore(trainer, pl_module, snapshot)
            self._write_text(trainer)
            return
        if (
            self.rollback_enabled
            and not self._step_alarm
            and not self._episode
            and self._strikes == 0
            and trainer.global_step % self.snapshot_every_n_steps == 0
        ):
            self._take_snapshot(trainer, pl_module)

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.snapshots.push(
            take_snapshot(
                trainer.global_step,
                pl_module,
                trainer.optimizers,
                [c.scheduler for c in trainer.lr_scheduler_configs],
                scaler,
                rng=_collect_rng_states() if self.restore_rng else None,
                extra={"detectors": self._detector_state(), "lr_scale": self.lr_scale},
                device=self.snapshot_device,
            )
        )
        self._snapshots_since_rollback += 1

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: Snapshot) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        restore_snapshot(
            snapshot, pl_module, trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs], scaler
        )
        if snapshot.rng is not None:
            _set_rng_states(snapshot.rng)
        self._load_detector_state(snapshot.extra["detectors"])
        self.lr_scale = float(snapshot.extra["lr_scale"])
        self.rollbacks += 1
        self._skip_remaining = self.skip_batches
        self._snapshots_since_rollback = 0
        self._strikes = 0
        self._episode = False
        self._overflow_streak = 0
        self._pending.clear()

    # ------------------------------------------------------------------------------------------------ reporting

    def _interval(self, trainer: pl.Trainer) -> int:
        return log_interval(trainer, self.log_every_n_steps)

    @staticmethod
    def _due(step: int, every: int) -> bool:
        return (step + 1) % every == 0

    def _log_metrics(self, trainer: pl.Trainer, step: int, log: bool, probe: bool) -> None:
        metrics: dict[str, float] = {}
        v = self.last_verdict
        if log and v is not None:
            metrics.update(
                {
                    f"{FAMILY}/risk": v.risk,
                    f"{FAMILY}/loss_zscore": v.loss_z,
                    f"{FAMILY}/grad_norm_zscore": v.grad_z,
                    f"{FAMILY}/divergence": v.divergence,
                    f"{FAMILY}/overflow_steps": float(self.overflow_steps),
                    f"{FAMILY}/skipped_steps": float(self.skipped_steps),
                    f"{FAMILY}/rollbacks": float(self.rollbacks),
                    f"{FAMILY}/lr_scale": self.lr_scale,
                    f"{FAMILY}/interventions": float(len(self._log)),
                }
            )
        if probe:
            metrics.update(self.representation)
        if not metrics:
            return
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self._write_text(trainer, step)

    def _write_text(self, trainer: pl.Trainer, step: int | None = None) -> None:
        loggers = tb.tensorboard_loggers(trainer)
        if not loggers:
            return
        new = self._log.unreported()
        if new:
            for logger in loggers:
                tb.add_interventions(logger, FAMILY, new, step or trainer.global_step)

    # ----------------------------------------------------------------------------------------------------- state

    def _detector_state(self) -> dict[str, Any]:
        return {
            "loss": self.loss_detector.state_dict(),
            "grad": self.grad_detector.state_dict(),
            "divergence": self.divergence.state_dict(),
            "use_log_loss": self._use_log_loss,
            "first": list(self._first),
        }

    def _load_detector_state(self, state: dict[str, Any]) -> None:
        self.loss_detector.load_state_dict(state["loss"])
        self.grad_detector.load_state_dict(state["grad"])
        self.divergence.load_state_dict(state["divergence"])
        self._use_log_loss = bool(state["use_log_loss"])
        self._first = list(state["first"])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "interventions": self._log.state_dict(),
            "detectors": self._detector_state(),
            "strikes": self._strikes,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "skipped_steps": self.skipped_steps,
            "overflow_steps": self.overflow_steps,
            "overflow_streak": self._overflow_streak,
            "skip_remaining": self._skip_remaining,
            "snapshot_steps": self.snapshots.steps(),  # the snapshots themselves are not saved
            "snapshots_since_rollback": self._snapshots_since_rollback,
            "episode": self._episode,
            "repr_score": self._repr_score,
            "warned": sorted(self._warned),
            "warnings": [list(w) for w in self.warnings],
            "stopped_reason": self.stopped_reason.name,
            "stop_message": self.stop_message,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._log.load_state_dict(state_dict["interventions"])
        self._load_detector_state(state_dict["detectors"])
        self._strikes = int(state_dict["strikes"])
        self.rollbacks = int(state_dict["rollbacks"])
        self.lr_scale = float(state_dict["lr_scale"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.overflow_steps = int(state_dict["overflow_steps"])
        self._overflow_streak = int(state_dict["overflow_streak"])
        self._skip_remaining = int(state_dict["skip_remaining"])
        self._snapshots_since_rollback = int(state_dict["snapshots_since_rollback"])
        self._episode = bool(state_dict["episode"])
        self._repr_score = float(state_dict["repr_score"])
        self._warned = {(str(a), str(b)) for a, b in state_dict["warned"]}
        self.warnings = [(int(s), str(m)) for s, m in state_dict["warnings"]]
        self.stopped_reason = CollapseStopReason[state_dict["stopped_reason"]]
        self.stop_message = str(state_dict["stop_message"])


def _drop_grads(params: list[Tensor]) -> None:
    """Skips the optimizer step: parameters without a gradient are left alone (Adam moments included)."""
    for p in params:
        p.grad = None


def _module(modules: dict[str, nn.Module], name: str, argument: str) -> nn.Module:
    if name not in modules:
        raise MisconfigurationException(
            f"{_NAME}(`{argument}`) names the module '{name}', which the model does not have. Known modules:"
            f" {[n for n in modules if n][:20]}."
        )
    return modules[name]


def _detector_args(detector: RobustZScore | EmaZScore) -> tuple[Any, ...]:
    if isinstance(detector, RobustZScore):
        return (detector.window, detector.min_history, detector.min_scale)
    return (detector.alpha, detector.min_history, detector.min_scale)
