"""GradientFlowCallback: per-layer gradient flow in TensorBoard, vanishing/exploding diagnosis, adaptive clipping."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
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
from lightning_gradflow.clipping import (
    CLIP_MODES,
    ClipMode,
    PercentileClipper,
    ZScoreClipper,
    agc_clip_,
    clip_coefficient,
)
from lightning_gradflow.flow import FlowRule, active_rms, depth_order, flow_ratios, parameter_layers, update_streaks
from lightning_gradflow.interventions import Intervention, InterventionLog
from lightning_gradflow.stats import (
    HistogramSpec,
    Stat,
    TensorHistograms,
    TensorStats,
    UpdateStats,
    make_snapshot,
    tensor_histograms,
    tensor_stats,
    tensorboard_histogram,
    update_stats,
)
from lightning_gradflow.stats._common import BACKENDS, Backend

if TYPE_CHECKING:
    import lightning.pytorch as pl

FAMILY = "gradflow"
_NAME = "GradientFlowCallback"
_VANISHING_FIX = (
    "residual connections, normalisation layers (LayerNorm/BatchNorm), ReLU-family activations instead of"
    " sigmoid/tanh, or a variance-preserving initialisation (Kaiming/orthogonal)"
)
_EXPLODING_FIX = (
    "gradient clipping (GradientFlowCallback(auto_intervene=True) clips adaptively), a lower learning rate,"
    " normalisation layers, or smaller recurrent/initial weights"
)


@dataclass
class _Step:
    """What one optimizer step left on the device for the logging step (no host copies yet)."""

    step: int
    log: bool
    histogram: bool
    figure: bool
    params: list[Tensor]
    layer_stats: TensorStats
    total_norm: Tensor
    threshold: Tensor | None = None
    coef: Tensor | None = None
    histograms: TensorHistograms | None = None
    abs_sums: Tensor | None = None
    skipped: bool = False
    snapshotted: bool = False
    tensor_zeros: Tensor | None = None  # per-gradient zero counts of a reporting step
    # the logging window closed at this step: [non-finite, overflow, clipped, worst norm, its clipped value] and steps
    window: Tensor | None = None
    window_steps: int = 0


class GradientFlowCallback(Callback):
    r"""Watches how gradients flow through every layer, diagnoses vanishing/exploding gradients, and clips.

    Gradients are read in ``on_before_optimizer_step``: once per optimizer step, with accumulated (and, under DDP,
    all-reduced) gradients, after AMP unscaling and before Lightning's own clipping. All statistics of all parameters
    come from one fused pass (:func:`~lightning_gradflow.stats.tensor_stats`) and stay on the device; on logging
    steps they reach the host in one transfer.

    **Layers** are the modules that own parameters (``group_by="module"``) or single parameters
    (``group_by="parameter"``), ordered by *depth* — the reverse of the order in which their gradients became ready
    in the first backward pass — so residual, shared and re-used modules are ordered as the gradient flows, not as
    they were registered.

    **Diagnosis**: see :mod:`lightning_gradflow.flow` for the rule (active gradient RMS of each layer against the
    output layer's, absolute floor/ceiling, ``patience`` consecutive steps). Each new diagnosis warns once, naming the
    layer and the fix. Under fp16 AMP with a GradScaler, non-finite gradients are *overflow* steps that the scaler
    skips: they are counted as ``gradflow/overflow_steps``, never as explosions.

    **Interventions** (``auto_intervene=True``):

    * a step whose gradients hold NaN/Inf never reaches the weights: the gradients are dropped (``grad = None``) so
      the optimizer skips every parameter and Adam-type moments stay clean — unless a GradScaler already skips it.
      This reads one number back to the host per step;
    * adaptive clipping of the global norm: ``"zscore"`` (ZClip), ``"percentile"`` (AutoClip), ``"norm"`` (fixed
      ``clip_value``), or unit-wise ``"agc"`` (NFNets; the output layer is left unclipped as Brock et al. advise).
      Clipping runs on the device without synchronising and coexists with ``Trainer(gradient_clip_val=...)``, which
      clips afterwards: the tighter threshold wins. Clips are recorded as one :class:`Intervention` per logging
      interval (how many steps were clipped, the largest norm and what it was clipped to).

    **Logged metrics** (every attached logger; ``<layer>`` is the module path with ``/``):
    ``gradflow/grad_norm_total``, ``gradflow/grad_norm/<layer>``, ``gradflow/grad_rms/<layer>``,
    ``gradflow/grad_absmax/<layer>``, ``gradflow/zero_fraction/<layer>``, ``gradflow/weight_norm/<layer>``,
    ``gradflow/update_ratio/<layer>`` (‖Δw‖/‖w‖ over the step), ``gradflow/flow_ratio/<layer>`` (this layer's
    gradient RMS over the next layer's, in depth order), ``gradflow/flow_ratio_end_to_end``,
    ``gradflow/vanishing_layers``, ``gradflow/exploding_layers``, ``gradflow/nonfinite_grads`` (non-finite values
    since the last log), ``gradflow/overflow_steps``, ``gradflow/skipped_steps``, ``gradflow/interventions``; with
    ``auto_intervene=True`` also ``gradflow/clip_threshold`` and ``gradflow/clip_coef``.
    TensorBoard (rank zero): a custom-scalars layout, per-layer gradient histograms binned on the device
    (``gradflow/grad_hist/<layer>``), the gradient-flow figure (``gradflow/flow``), interventions as text.

    Args:
        log_every_n_steps: optimizer steps between logs; default: the Trainer's ``log_every_n_steps``.
        histogram_every_n_steps: steps between gradient histograms (0 disables); default 10 × the log interval.
        figure_every_n_steps: steps between gradient-flow figures (0 disables); default 10 × the log interval.
        group_by: ``"module"`` or ``"parameter"``.
        track_update_ratio: measure ‖Δw‖/‖w‖ on logging steps (keeps one copy of the parameters).
        vanishing_ratio: see :class:`~lightning_gradflow.flow.FlowRule`.
        exploding_ratio: see :class:`~lightning_gradflow.flow.FlowRule`.
        min_grad_rms: see :class:`~lightning_gradflow.flow.FlowRule`.
        max_grad_rms: see :class:`~lightning_gradflow.flow.FlowRule`.
        patience: optimizer steps a condition must hold before it is diagnosed.
        auto_intervene: clip gradients and skip non-finite steps; otherwise only observe and warn.
        clip_mode: ``"zscore"``, ``"percentile"``, ``"agc"`` or ``"norm"``.
        clip_value: the fixed threshold for ``"norm"``; an optional hard cap on the threshold for ``"zscore"``
            and ``"percentile"`` (worth setting when a run may diverge in its very first steps: those modes
            judge each norm against the run's own history); not used by ``"agc"``.
        z_threshold: ZClip's z-score threshold.
        ema_alpha: ZClip's EMA decay.
        warmup_steps: ZClip's warm-up (steps observed before clipping starts).
        percentile: AutoClip's percentile of past norms.
        percentile_window: how many past norms AutoClip keeps.
        agc_clip_factor: AGC's λ (unit gradient norm / unit weight norm).
        agc_eps: AGC's floor on unit weight norms.
        skip_nonfinite: with ``auto_intervene``, skip steps with non-finite gradients.
        backend: statistics backend (see :func:`~lightning_gradflow.stats.tensor_stats`).

    Raises:
        TypeError: for an argument of the wrong type.
        ValueError: for an out-of-range argument, or ``clip_mode="norm"`` without ``clip_value``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> from lightning_gradflow import GradientFlowCallback
        >>> trainer = Trainer(callbacks=[GradientFlowCallback(auto_intervene=True)], logger=False, max_steps=1)
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        group_by: Literal["module", "parameter"] = "module",
        track_update_ratio: bool = True,
        vanishing_ratio: float = 1e-3,
        exploding_ratio: float = 1e3,
        min_grad_rms: float = 1e-10,
        max_grad_rms: float = 1e2,
        patience: int = 20,
        auto_intervene: bool = False,
        clip_mode: ClipMode = "zscore",
        clip_value: float | None = None,
        z_threshold: float = 2.5,
        ema_alpha: float = 0.97,
        warmup_steps: int = 25,
        percentile: float = 10.0,
        percentile_window: int = 10_000,
        agc_clip_factor: float = 0.01,
        agc_eps: float = 1e-3,
        skip_nonfinite: bool = True,
        backend: Backend = "auto",
    ) -> None:
        check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        check_positive_int("histogram_every_n_steps", histogram_every_n_steps, allow_none=True, allow_zero=True)
        check_positive_int("figure_every_n_steps", figure_every_n_steps, allow_none=True, allow_zero=True)
        check_choice("group_by", group_by, ("module", "parameter"))
        check_choice("clip_mode", clip_mode, CLIP_MODES)
        check_choice("backend", backend, BACKENDS)
        for name, value in [("z_threshold", z_threshold), ("agc_clip_factor", agc_clip_factor), ("agc_eps", agc_eps)]:
            check_positive_float(name, value)
        check_positive_float("clip_value", clip_value, allow_none=True)
        for name, value in [("min_grad_rms", min_grad_rms), ("max_grad_rms", max_grad_rms)]:
            check_positive_float(name, value)
        check_float_in("vanishing_ratio", vanishing_ratio, 0.0, 1.0)
        check_positive_float("exploding_ratio", exploding_ratio)
        check_float_in("ema_alpha", ema_alpha, 0.0, 1.0)
        check_float_in("percentile", percentile, 0.0, 100.0, closed_high=True)
        check_positive_int("patience", patience)
        check_positive_int("warmup_steps", warmup_steps)
        check_positive_int("percentile_window", percentile_window)
        for name, flag in [
            ("track_update_ratio", track_update_ratio),
            ("auto_intervene", auto_intervene),
            ("skip_nonfinite", skip_nonfinite),
        ]:
            check_bool(name, flag)
        if clip_mode == "norm" and clip_value is None:
            raise ValueError("`clip_mode='norm'` clips to a fixed threshold: pass it as `clip_value=...`.")
        if clip_mode == "agc" and clip_value is not None:
            raise ValueError(
                f"`clip_value={clip_value}` has no meaning for `clip_mode='agc'`, which clips each unit relative to"
                " its weights: set `agc_clip_factor` instead, or remove `clip_value`."
            )
        self.rule = FlowRule(vanishing_ratio, exploding_ratio, min_grad_rms, max_grad_rms, patience)
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.figure_every_n_steps = figure_every_n_steps
        self.group_by = group_by
        self.track_update_ratio = track_update_ratio
        self.auto_intervene = auto_intervene
        self.clip_mode = clip_mode
        self.clip_value = clip_value
        self.agc_clip_factor = agc_clip_factor
        self.agc_eps = agc_eps
        self.skip_nonfinite = skip_nonfinite
        self.backend: Backend = backend
        self.clipper: ZScoreClipper | PercentileClipper | None = None
        if clip_mode == "zscore":
            self.clipper = ZScoreClipper(z_threshold, ema_alpha, warmup_steps, max_norm=clip_value)
        elif clip_mode == "percentile":
            self.clipper = PercentileClipper(percentile, percentile_window, max_norm=clip_value)
        self._log = InterventionLog(_NAME)
        self._writes_tensorboard = True
        self._has_zeros: dict[int, bool] = {}  # per gradient (by id): held exact zeros at the last report
        self.layers: list[str] = []  # depth order, input side first
        self.last_metrics: dict[str, float] = {}  # the most recent logged metrics
        self.skipped_steps = 0
        self._layer_of: dict[int, str] = {}  # id(param) -> layer
        self._ready: list[str] = []
        self._hooks: list[Any] = []
        self._row_cache: dict[tuple[int, ...], Tensor] = {}
        self._streaks: Tensor | None = None  # (2, num_layers): vanishing, exploding
        self._reset_window()
        self._last: _Step | None = None  # the latest step, for the report of an unfinished window at the end
        self._measured: tuple[int, Tensor] | None = None  # (step, global norm, NaN if non-finite): shared
        self._warned: set[tuple[str, str]] = set()
        self._pending: list[_Step] = []
        self._snapshots: dict[int, Tensor] = {}
        self._window_state: dict[str, Any] | None = None

    def _reset_window(self, device: torch.device | str = "cpu") -> None:
        # Made afresh per fit, never shared: under ddp_spawn, tensors created in __init__ would be pickled into
        # memory shared by every rank.
        self._nonfinite = torch.zeros((), device=device)  # non-finite gradient values since the last log
        self._overflow = torch.zeros((), device=device)  # GradScaler overflow steps since the last log
        self._clipped = torch.zeros((), device=device)  # steps clipped since the last log
        self._worst = torch.zeros(2, device=device)  # largest pre-clip norm since the last log, and its clipped value
        self._steps_since_log = 0

    # ----------------------------------------------------------------------------------------------- lifecycle

    def measured_grad_norm(self, step: int) -> Tensor | None:
        """The global gradient norm this callback measured at optimizer step ``step``, for other callbacks to share.

        A 0-dim tensor on the gradients' device (no host sync), after AMP unscaling and before any clipping; NaN
        when a gradient held a non-finite value. ``None`` when this callback measured nothing at ``step``.

        Args:
            step: ``trainer.global_step`` in ``on_before_optimizer_step``.
        """
        if self._measured is None or self._measured[0] != step:
            return None
        return self._measured[1]

    @property
    def interventions(self) -> list[Intervention]:
        """Every action taken (or, with ``auto_intervene=False``, that would have been taken), oldest first."""
        return self._log.records

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(group_by=self.group_by, clip_mode=self.clip_mode)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, _NAME)
        if stage == "fit" and not trainer.loggers:
            rank_zero_warn(
                f"{_NAME} has no logger to write to: diagnoses, warnings and interventions still work, but attach a"
                " logger (e.g. `Trainer(logger=TensorBoardLogger('runs'))`) to see the per-layer statistics.",
                category=RuntimeWarning,
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        window = self._window_state
        self._reset_window()
        if window is not None:  # restored from a checkpoint
            self._load_window(window)
            self._window_state = None
        names = parameter_layers(pl_module, self.group_by)
        self._layer_of = {id(p): names[n] for n, p in pl_module.named_parameters() if n in names}
        if not self._layer_of:
            rank_zero_warn(f"{_NAME}: the model has no trainable parameters; there is nothing to watch.")
            return
        if not self.layers:  # not restored from a checkpoint: learn the depth order from the first backward
            for p in pl_module.parameters():
                if id(p) in self._layer_of:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._record_ready))
        self._row_cache.clear()

    def _record_ready(self, param: Tensor) -> None:
        self._ready.append(self._layer_of[id(param)])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # histograms and figures only go to TensorBoard (on rank zero): without one, they are not computed
        self._writes_tensorboard = bool(tb.tensorboard_loggers(trainer))
        for logger in tb.tensorboard_loggers(trainer):
            tb.add_layout_category(
                logger,
                FAMILY,
                {
                    "gradient norm per layer": [f"{FAMILY}/grad_norm/"],
                    "gradient RMS per layer": [f"{FAMILY}/grad_rms/"],
                    "update/weight ratio per layer": [f"{FAMILY}/update_ratio/"],
                    "flow ratio per layer (RMS here / RMS of the next layer)": [f"{FAMILY}/flow_ratio/"],
                    "global gradient norm and clipping": [f"{FAMILY}/grad_norm_total", f"{FAMILY}/clip_threshold"],
                    "diagnosis": [
                        f"{FAMILY}/vanishing_layers",
                        f"{FAMILY}/exploding_layers",
                        f"{FAMILY}/nonfinite_grads",
                        f"{FAMILY}/overflow_steps",
                    ],
                },
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last, self._last = self._last, None
        if last is not None and self._steps_since_log > 0:  # report the unfinished window: nothing found is lost
            last.log, last.histogram, last.figure = True, False, False
            self._report(trainer, last)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._pending.clear()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------------------------------ the step itself

    def _interval(self, trainer: pl.Trainer) -> int:
        return log_interval(trainer, self.log_every_n_steps)

    def _every(self, value: int | None, trainer: pl.Trainer) -> int:
        return 10 * self._interval(trainer) if value is None else value

    @staticmethod
    def _due(step: int, every: int) -> bool:
        return every > 0 and (step + 1) % every == 0

    def _rows(self, params: list[Tensor], device: torch.device) -> Tensor:
        key = tuple(id(p) for p in params)
        rows = self._row_cache.get(key)
        if rows is None or rows.device != device:
            new = [layer for layer in dict.fromkeys(self._layer_of[id(p)] for p in params) if layer not in self.layers]
            if new:  # e.g. a checkpoint from a model with fewer layers: append, keep the known order
                self.layers.extend(new)
                self._streaks = None
                self._row_cache.clear()
            index = {layer: i for i, layer in enumerate(self.layers)}
            rows = torch.tensor([index[self._layer_of[id(p)]] for p in params], device=device)
            self._row_cache[key] = rows
        return rows

    def _finish_depth_order(self) -> None:
        if not self.layers:
            self.layers = depth_order(self._ready, dict.fromkeys(self._layer_of.values()))
        self._remove_hooks()
        self._ready.clear()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        params = [
            p
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and id(p) in self._layer_of
        ]
        if not params:
            return
        if not self.layers or self._hooks:
            self._finish_depth_order()
        grads = [p.grad for p in params]
        device = params[0].device
        step = trainer.global_step
        interval = self._interval(trainer)
        hist_every = self._every(self.histogram_every_n_steps, trainer) if self._writes_tensorboard else 0
        fig_every = self._every(self.figure_every_n_steps, trainer) if self._writes_tensorboard else 0
        scaler = getattr(trainer.precision_plugin, "scaler", None)

        report = self._due(step, interval) or self._due(step, hist_every) or self._due(step, fig_every)
        # Between reports only the norms, counts and diagnosis are needed: the CPU skips max |g| and the sum, and the
        # zero count of gradients that had no exact zeros at the last report (dense layers): their active RMS is then
        # their RMS. Reports count every zero; a layer that turned sparse since is under-rated for one log interval
        # at most, by sqrt(1 - zero fraction) — negligible against the rule's 1e-3/1e3 ratios.
        count_zeros = None if report else [self._has_zeros.get(id(p), True) for p in params]
        stats = tensor_stats(grads, backend=self.backend, full=report, count_zeros=count_zeros)
        if count_zeros is not None and not all(count_zeros):
            stats.table[:, Stat.ZEROS].nan_to_num_(0.0)
        stats = unscaled_for_optimizer(stats, scaler, optimizer)
        layer_stats = stats.reduce_rows(self._rows(params, device), len(self.layers))
        total_norm = stats.total_norm()
        nonfinite = stats.nonfinite.sum()
        self._move_state(device)
        self._nonfinite += nonfinite
        overflow = (nonfinite > 0) if scaler is not None else torch.zeros((), dtype=torch.bool, device=device)
        self._overflow += overflow.float()
        self._update_diagnosis(layer_stats, count_nonfinite=scaler is None, frozen=overflow)

        pending = _Step(
            step=step,
            log=self._due(step, interval),
            histogram=self._due(step, hist_every),
            figure=self._due(step, fig_every),
            params=params,
            layer_stats=layer_stats,
            total_norm=total_norm,
            tensor_zeros=stats.zeros if report else None,
        )
        if pending.histogram:
            pending.histograms = tensor_histograms(grads, backend=self.backend).reduce_rows(
                self._rows(params, device), len(self.layers)
            )
        if pending.figure:
            sums = torch.stack([n.float().to(device) for n in torch._foreach_norm(grads, 1)])
            pending.abs_sums = torch.zeros(len(self.layers), device=device).index_add_(
                0, self._rows(params, device), sums
            )
        if self.auto_intervene:
            self._intervene(trainer, pending, grads, nonfinite, scaler is not None)
        if (pending.log or pending.histogram or pending.figure) and self.track_update_ratio and not pending.skipped:
            self._snapshot(params)
            pending.snapshotted = True
        self._steps_since_log += 1
        if pending.log:  # closed here, not at the batch's end: several optimizers step within one batch
            pending.window = self._open_window()
            pending.window_steps = self._steps_since_log
            self._reset_window(device)
        self._pending.append(pending)
        self._last = pending
        self._measured = (step, global_norm_or_nan(stats))

    def _move_state(self, device: torch.device) -> None:
        if self._nonfinite.device != device:
            self._nonfinite = self._nonfinite.to(device)
            self._overflow = self._overflow.to(device)
            self._clipped = self._clipped.to(device)
            self._worst = self._worst.to(device)
            if self._streaks is not None:
                self._streaks = self._streaks.to(device)
            if self.clipper is not None:
                self.clipper.to(device)

    def _update_diagnosis(self, layer_stats: TensorStats, count_nonfinite: bool, frozen: Tensor) -> None:
        """Advances the per-layer streaks, except on ``frozen`` (GradScaler overflow) steps, which say nothing."""
        vanishing, exploding = self.rule.conditions(layer_stats, count_nonfinite=count_nonfinite)
        if self._streaks is None or self._streaks.shape[1] != len(self.layers):
            self._streaks = torch.zeros((2, len(self.layers)), device=layer_stats.table.device)
        advanced = update_streaks(self._streaks, torch.stack([vanishing, exploding]))
        self._streaks = torch.where(frozen, self._streaks, advanced)

    def _intervene(
        self, trainer: pl.Trainer, pending: _Step, grads: list[Tensor], nonfinite: Tensor, scaler_skips: bool
    ) -> None:
        if self.skip_nonfinite and not scaler_skips:
            bad = int(nonfinite.item())  # the one host read per step that skipping needs
            if bad:
                for p in pending.params:
                    p.grad = None
                pending.skipped = True
                self.skipped_steps += 1
                self._log.add(
                    pending.step, "skip_step", "all", f"{bad} non-finite gradient values; the step was skipped", bad, 0
                )
                return
        if self.clip_mode == "agc":
            output = {id(p) for p in pending.params if self._layer_of[id(p)] == self.layers[-1]}
            keep = [(p, g) for p, g in zip(pending.params, grads, strict=True) if id(p) not in output]
            pending.coef = 1 - agc_clip_(
                [p for p, _ in keep], [g for _, g in keep], self.agc_clip_factor, self.agc_eps
            ).to(pending.total_norm.device)
            self._clipped += (pending.coef < 1).float()
            return
        if self.clipper is not None:
            # a step with non-finite values (a GradScaler overflow) must not enter the clip statistics
            threshold = self.clipper(
                torch.where(nonfinite > 0, torch.full_like(pending.total_norm, math.inf), pending.total_norm)
            )
        else:
            assert self.clip_value is not None
            threshold = torch.full((), self.clip_value, device=pending.total_norm.device)
        coef = clip_coefficient(pending.total_norm, threshold)
        torch._foreach_mul_(grads, coef)
        pending.threshold, pending.coef = threshold, coef
        clipped = torch.isfinite(pending.total_norm) & (pending.total_norm > threshold)
        self._clipped += clipped.float()
        worse = clipped & (pending.total_norm > self._worst[0])
        self._worst = torch.where(worse, torch.stack([pending.total_norm, pending.total_norm * coef]), self._worst)

    def _snapshot(self, params: list[Tensor]) -> None:
        missing = [p for p in params if id(p) not in self._snapshots]
        for p, s in zip(missing, make_snapshot(missing), strict=True):
            self._snapshots[id(p)] = s
        torch._foreach_copy_([self._snapshots[id(p)] for p in params], [p.detach() for p in params])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending, self._pending = self._pending, []
        for item in pending:
            if item.log or item.histogram or item.figure:
                self._report(trainer, item)
                if item.log and self._last is item:
                    self._last = None

    # ------------------------------------------------------------------------------------------------ reporting

    def _report(self, trainer: pl.Trainer, item: _Step) -> None:
        device = item.total_norm.device
        num_layers = len(self.layers)
        updates: UpdateStats | None = None
        if item.snapshotted:
            updates = update_stats(item.params, [self._snapshots[id(p)] for p in item.params], backend=self.backend)
            updates = updates.reduce_rows(self._rows(item.params, device), num_layers)
        weights = None
        if updates is None:
            weights = tensor_stats([p.detach() for p in item.params], backend=self.backend)
            weights = weights.reduce_rows(self._rows(item.params, device), num_layers)
        assert self._streaks is not None
        parts: dict[str, Tensor] = {
            "layers": item.layer_stats.table,
            "streaks": self._streaks,
            "scalars": torch.cat(
                [
                    item.total_norm.float().reshape(1),
                    item.window if item.window is not None else self._open_window(),
                    torch.zeros(1, device=device) if item.threshold is None else item.threshold.float().reshape(1),
                    torch.ones(1, device=device) if item.coef is None else item.coef.float().reshape(1),
                ]
            ),
        }
        if updates is not None:
            parts["updates"] = updates.table
        if weights is not None:
            parts["weights"] = weights.table
        if item.histograms is not None:
            parts["histograms"] = item.histograms.counts
        if item.tensor_zeros is not None:
            parts["tensor_zeros"] = item.tensor_zeros
        if item.abs_sums is not None:
            parts["abs_sums"] = item.abs_sums
        host = _to_host(parts)  # the one device-to-host transfer of this logging step
        if "tensor_zeros" in host:
            self._has_zeros = {
                id(p): bool(z > 0) for p, z in zip(item.params, host["tensor_zeros"].tolist(), strict=True)
            }
        steps_in_window = item.window_steps
        if item.log and item.window is None:  # the unfinished window reported at the end of training
            steps_in_window = self._steps_since_log
            self._reset_window(device)

        layer_stats = TensorStats(host["layers"])
        present = [i for i in range(num_layers) if float(layer_stats.numel[i]) > 0]
        scalars = host["scalars"].tolist()
        streaks = host["streaks"]
        vanishing = [i for i in present if streaks[0, i] >= self.rule.patience]
        exploding = [i for i in present if streaks[1, i] >= self.rule.patience]
        self._warn_new(item.step, vanishing, exploding, layer_stats)
        if item.log:  # histogram- or figure-only steps leave the logging window open
            self._record_window(item.step, scalars, steps_in_window)
            metrics = self._metrics(item, host, layer_stats, present, scalars, len(vanishing), len(exploding))
            self.last_metrics = metrics
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=item.step)
        self._write_tensorboard(trainer, item, host, layer_stats, present, set(vanishing), set(exploding))

    def _open_window(self) -> Tensor:
        return torch.cat([torch.stack([self._nonfinite, self._overflow, self._clipped]), self._worst])

    def _metrics(
        self,
        item: _Step,
        host: dict[str, Tensor],
        layer_stats: TensorStats,
        present: list[int],
        scalars: list[float],
        num_vanishing: int,
        num_exploding: int,
    ) -> dict[str, float]:
        total_norm, nonfinite, overflow, *_, threshold, coef = scalars
        metrics = {
            f"{FAMILY}/grad_norm_total": total_norm,
            f"{FAMILY}/vanishing_layers": float(num_vanishing),
            f"{FAMILY}/exploding_layers": float(num_exploding),
            f"{FAMILY}/nonfinite_grads": nonfinite,
            f"{FAMILY}/overflow_steps": overflow,
            f"{FAMILY}/skipped_steps": float(self.skipped_steps),
            f"{FAMILY}/interventions": float(len(self.interventions)),
        }
        if self.auto_intervene and self.clip_mode != "agc":
            metrics[f"{FAMILY}/clip_threshold"] = threshold
            metrics[f"{FAMILY}/clip_coef"] = coef
        elif self.auto_intervene:
            metrics[f"{FAMILY}/clip_coef"] = coef  # the fraction of units left unclipped
        norm, rms, absmax = layer_stats.norm, layer_stats.rms, layer_stats.absmax
        zero_fraction = layer_stats.zero_fraction
        if "updates" in host:
            updates = UpdateStats(host["updates"])
            weight_norm, ratio = updates.param_norm, updates.ratio
        else:
            weight_norm, ratio = TensorStats(host["weights"]).norm, None
        flow = flow_ratios(active_rms(layer_stats)[present].double()) if present else torch.zeros(0)
        for k, i in enumerate(present):
            layer = self.layers[i]
            metrics[f"{FAMILY}/grad_norm/{layer}"] = float(norm[i])
            metrics[f"{FAMILY}/grad_rms/{layer}"] = float(rms[i])
            if math.isfinite(float(absmax[i])):  # a final partial window may come from a norms-only step
                metrics[f"{FAMILY}/grad_absmax/{layer}"] = float(absmax[i])
            metrics[f"{FAMILY}/zero_fraction/{layer}"] = float(zero_fraction[i])
            metrics[f"{FAMILY}/weight_norm/{layer}"] = float(weight_norm[i])
            metrics[f"{FAMILY}/flow_ratio/{layer}"] = float(flow[k])
            if ratio is not None:
                metrics[f"{FAMILY}/update_ratio/{layer}"] = float(ratio[i])
        if present:
            rms_active = active_rms(layer_stats)
            first, last = float(rms_active[present[0]]), float(rms_active[present[-1]])
            metrics[f"{FAMILY}/flow_ratio_end_to_end"] = first / last if last > 0 else 0.0
        return metrics

    def _warn_new(self, step: int, vanishing: list[int], exploding: list[int], layer_stats: TensorStats) -> None:
        if not vanishing and not exploding:
            return
        rms = active_rms(layer_stats)
        output = float(rms[[i for i in range(len(self.layers)) if float(layer_stats.numel[i]) > 0][-1]])
        for kind, found, fix in [("vanishing", vanishing, _VANISHING_FIX), ("exploding", exploding, _EXPLODING_FIX)]:
            for i in found:
                layer = self.layers[i]
                if (kind, layer) in self._warned:
                    continue
                self._warned.add((kind, layer))
                value = float(rms[i])
                bad = int(layer_stats.nonfinite[i])
                if bad:
                    measured = f"{bad} non-finite gradient values"
                else:
                    is_output = i == max(j for j in range(len(self.layers)) if float(layer_stats.numel[j]) > 0)
                    relative = f", {value / output:.2g}× the output layer's" if output > 0 and not is_output else ""
                    measured = f"active gradient RMS {value:.3g}{relative}"
                rank_zero_warn(
                    f"{_NAME}: {kind} gradients in layer '{layer}' at step {step}: {measured}, for"
                    f" {self.rule.patience}+ consecutive steps. Suggested fix: {fix}.",
                    category=RuntimeWarning,
                )
                if kind == "exploding" and not self.auto_intervene:
                    self._log.add(
                        step,
                        "clip",
                        layer,
                        f"exploding gradients; would clip with clip_mode={self.clip_mode!r}",
                        value,
                        math.nan,
                        applied=False,
                    )

    def _record_window(self, step: int, scalars: list[float], steps_in_window: int) -> None:
        _, nonfinite, overflow, clipped, worst_before, worst_after, _, _ = scalars
        if clipped > 0:
            if self.clip_mode == "agc":
                reason = f"AGC clipped units on {int(clipped)} of the last {steps_in_window} steps"
                before, after = math.nan, math.nan
            else:
                reason = (
                    f"{int(clipped)} of the last {steps_in_window} steps had a global gradient norm above the"
                    f" {self.clip_mode} threshold; the largest is shown"
                )
                before, after = worst_before, worst_after
            self._log.add(step, "clip", "all", reason, before, after)
        if nonfinite > 0 and not self.auto_intervene and overflow == 0 and ("nonfinite", "all") not in self._warned:
            self._warned.add(("nonfinite", "all"))
            rank_zero_warn(
                f"{_NAME}: {int(nonfinite)} non-finite gradient values before step {step}. With"
                " `auto_intervene=True` such steps are skipped before they reach the weights.",
                category=RuntimeWarning,
            )
            self._log.add(step, "skip_step", "all", "non-finite gradients", nonfinite, 0.0, applied=False)

    def _write_tensorboard(
        self,
        trainer: pl.Trainer,
        item: _Step,
        host: dict[str, Tensor],
        layer_stats: TensorStats,
        present: list[int],
        vanishing: set[int],
        exploding: set[int],
    ) -> None:
        loggers = tb.tensorboard_loggers(trainer)
        if not loggers:
            return
        new = self._log.unreported()
        spec = item.histograms.spec if item.histograms is not None else HistogramSpec()
        for logger in loggers:
            if "histograms" in host:
                for i in present:
                    raw = tensorboard_histogram(host["histograms"][i], spec, TensorStats(host["layers"][i : i + 1]))
                    tb.add_histogram(logger, f"{FAMILY}/grad_hist/{self.layers[i]}", raw, item.step)
            if "abs_sums" in host and present:
                numel = layer_stats.numel
                figure = tb.gradient_flow_figure(
                    [self.layers[i] for i in present],
                    [float(host["abs_sums"][i] / max(float(numel[i]), 1.0)) for i in present],
                    [float(layer_stats.absmax[i]) for i in present],
                    [i in vanishing for i in present],
                    [i in exploding for i in present],
                    title=f"gradient flow at step {item.step}",
                )
                tb.add_figure(logger, f"{FAMILY}/flow", figure, item.step)
            if new:
                tb.add_interventions(logger, FAMILY, new, item.step)

    # ----------------------------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "interventions": self._log.state_dict(),
            "skipped_steps": self.skipped_steps,
            "warned": sorted(self._warned),
            "streaks": None if self._streaks is None else self._streaks.cpu().tolist(),
            "clipper": None if self.clipper is None else self.clipper.state_dict(),
            "window": {
                "nonfinite": float(self._nonfinite),
                "overflow": float(self._overflow),
                "clipped": float(self._clipped),
                "worst": self._worst.cpu().tolist(),
                "steps": self._steps_since_log,
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.layers = list(state_dict["layers"])
        self._log.load_state_dict(state_dict["interventions"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self._warned = {(str(w[0]), str(w[1])) for w in state_dict["warned"]}
        streaks = state_dict["streaks"]
        self._streaks = None if streaks is None else torch.tensor(streaks)
        if self.clipper is not None and state_dict["clipper"] is not None:
            self.clipper.load_state_dict(state_dict["clipper"])
        self._window_state = state_dict.get("window")
        if self._window_state is not None:
            self._load_window(self._window_state)

    def _load_window(self, window: dict[str, Any]) -> None:
        self._nonfinite.fill_(window["nonfinite"])
        self._overflow.fill_(window["overflow"])
        self._clipped.fill_(window["clipped"])
        self._worst = torch.tensor(window["worst"], dtype=torch.float32)
        self._steps_since_log = int(window["steps"])


def _to_host(parts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies every tensor to the host in one transfer (packed into one float64 buffer, then split)."""
    flat = torch.cat([t.reshape(-1).double() for t in parts.values()])
    host = flat.cpu()
    out, offset = {}, 0
    for name, t in parts.items():
        n = t.numel()
        out[name] = host[offset : offset + n].view(t.shape).to(torch.float32 if t.is_floating_point() else torch.long)
        offset += n
    return out
