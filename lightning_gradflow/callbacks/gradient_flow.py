"""GradientFlowCallback: per-layer gradient flow in TensorBoard, vanishing/exploding diagnosis, adaptive clipping."""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gradflow import tensorboard as tb
from lightning_gradflow.callbacks._base import HealthCallback, is_log_step, to_host
from lightning_gradflow.callbacks._common import (
    check_positive_float,
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
from lightning_gradflow.clipping import (
    CLIP_MODES,
    AutoClipConfig,
    ClipMode,
    PercentileClipper,
    TrendClipConfig,
    TrendClipper,
    ZClipConfig,
    ZScoreClipper,
    agc_clip_,
    clip_coefficient,
    max_norm_threshold,
    scale_grads_,
)
from lightning_gradflow.flow import (
    FlowMonitor,
    FlowRule,
    LogWindow,
    active_rms,
    depth_order,
    end_to_end_ratio,
    flow_ratios,
    parameter_layers,
)
from lightning_gradflow.reports.flow import (
    FAMILY,
    NO_LOGGER_MESSAGE,
    FlowStep,
    clip_record,
    flow_findings,
    flow_layer_metrics,
    flow_step_metrics,
    nonfinite_message,
    present_layers,
    would_clip_reason,
)
from lightning_gradflow.stats import (
    HistogramSpec,
    Stat,
    TensorStats,
    UpdateStats,
    l1_norms,
    make_snapshot,
    tensor_histograms,
    tensor_stats,
    update_stats,
)
from lightning_gradflow.stats._common import BACKENDS, Backend

if TYPE_CHECKING:
    import lightning.pytorch as pl


class GradientFlowCallback(HealthCallback):
    r"""Watches how gradients flow through every layer, diagnoses vanishing/exploding gradients, and clips.

    Gradients are read in ``on_before_optimizer_step``: once per optimizer step, with accumulated (and, under DDP,
    all-reduced) gradients, after AMP unscaling and before Lightning's own clipping. All statistics of all parameters
    come from one fused pass (:func:`~lightning_gradflow.stats.tensor_stats`) and stay on the device; on logging
    steps they reach the host in one transfer. The step's global gradient norm (NaN when a gradient value was not
    finite) is published on the trainer's channel as ``"grad_norm"``, for other callbacks to share.

    Sparse gradients (``nn.Embedding(sparse=True)``) are measured exactly as their dense equivalent and clipped in
    every mode; complex parameters are measured by ``|z|`` (see :class:`~lightning_gradflow.stats.Stat`).

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
    * adaptive clipping of the global norm: ``"trend"`` (the default: isolated spikes against a level-plus-slope
      forecast of the log-norm, which leaves the healthy rise of norms in early training alone, see
      :class:`~lightning_gradflow.clipping.TrendClipper`), ``"zscore"`` (ZClip's exact rule, which also clips
      that healthy rise), ``"percentile"`` (AutoClip), ``"norm"`` (fixed ``clip_value``), or unit-wise ``"agc"``
      (NFNets; the output layer is left unclipped as Brock et al. advise).
      Clipping runs on the device without synchronising and coexists with ``Trainer(gradient_clip_val=...)``, which
      clips afterwards: the tighter threshold wins. Clips are recorded as one :class:`Intervention` per logging
      interval (how many steps were clipped, the largest norm and what it was clipped to).

    When another callback rolls the run back to an in-memory snapshot (EarlyCollapseCallback), the clip statistics
    and the diagnosis streaks return to the snapshot's too (:meth:`rollback_state`).

    **Per fit**: a second ``fit()`` of the same instance starts afresh (layers, clip statistics, streaks, counters);
    a fit resumed from a checkpoint continues them. The intervention records are kept across fits.

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
    A logger that fails is warned about once and training goes on.

    Args:
        log_every_n_steps: optimizer steps between logs; default: the Trainer's ``log_every_n_steps``.
        histogram_every_n_steps: steps between gradient histograms (0 disables); default 10 × the log interval.
        figure_every_n_steps: steps between gradient-flow figures (0 disables); default 10 × the log interval.
        group_by: ``"module"`` or ``"parameter"``.
        track_update_ratio: measure ‖Δw‖/‖w‖ on logging steps (keeps one copy of the parameters).
        vanishing_ratio: see :class:`~lightning_gradflow.flow.FlowRule`, in (0, 1).
        exploding_ratio: see :class:`~lightning_gradflow.flow.FlowRule`, finite, > 1.
        min_grad_rms: see :class:`~lightning_gradflow.flow.FlowRule`.
        max_grad_rms: see :class:`~lightning_gradflow.flow.FlowRule`.
        patience: optimizer steps a condition must hold before it is diagnosed, at most 2**24
            (:data:`~lightning_gradflow.flow.MAX_PATIENCE`).
        auto_intervene: clip gradients and skip non-finite steps; otherwise only observe and warn.
        clip_mode: ``"trend"`` (default), ``"zscore"``, ``"percentile"``, ``"agc"`` or ``"norm"``.
        clip_value: the fixed threshold for ``"norm"``; an optional hard cap on the threshold for ``"trend"``,
            ``"zscore"`` and ``"percentile"`` (worth setting when a run may diverge in its very first steps: those modes
            judge each norm against the run's own history); not used by ``"agc"``. Any finite value > 0.
        trend_threshold: the trend rule's threshold, in mean absolute forecast errors of the log-norm (see
            :class:`~lightning_gradflow.clipping.TrendClipConfig`); any finite value > 0.
        trend_min_ratio: the trend rule never clips a norm below this multiple of its forecast; finite, > 1.
        z_threshold: ZClip's z-score threshold (see :class:`~lightning_gradflow.clipping.ZClipConfig`).
        ema_alpha: ZClip's EMA decay, in (0, 1).
        warmup_steps: ZClip's warm-up (steps observed before clipping starts), at most 100 000
            (:data:`~lightning_gradflow.clipping.MAX_WARMUP_STEPS`).
        percentile: AutoClip's percentile of past norms, in (0, 100].
        percentile_window: how many past norms AutoClip keeps, at most 1 000 000
            (:data:`~lightning_gradflow.clipping.MAX_PERCENTILE_WINDOW`).
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

    family = FAMILY

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        group_by: Literal["module", "parameter"] = "module",
        track_update_ratio: bool = True,
        vanishing_ratio: float = FlowRule.vanishing_ratio,
        exploding_ratio: float = FlowRule.exploding_ratio,
        min_grad_rms: float = FlowRule.min_grad_rms,
        max_grad_rms: float = FlowRule.max_grad_rms,
        patience: int = FlowRule.patience,
        auto_intervene: bool = False,
        clip_mode: ClipMode = "trend",
        clip_value: float | None = None,
        trend_threshold: float = TrendClipConfig.trend_threshold,
        trend_min_ratio: float = TrendClipConfig.trend_min_ratio,
        z_threshold: float = ZClipConfig.z_threshold,
        ema_alpha: float = ZClipConfig.ema_alpha,
        warmup_steps: int = ZClipConfig.warmup_steps,
        percentile: float = AutoClipConfig.percentile,
        percentile_window: int = AutoClipConfig.percentile_window,
        agc_clip_factor: float = 0.01,
        agc_eps: float = 1e-3,
        skip_nonfinite: bool = True,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        check_positive_int("histogram_every_n_steps", histogram_every_n_steps, allow_none=True, allow_zero=True)
        check_positive_int("figure_every_n_steps", figure_every_n_steps, allow_none=True, allow_zero=True)
        check_choice("group_by", group_by, ("module", "parameter"))
        check_choice("clip_mode", clip_mode, CLIP_MODES)
        check_choice("backend", backend, BACKENDS)
        for name, flag in [
            ("track_update_ratio", track_update_ratio),
            ("auto_intervene", auto_intervene),
            ("skip_nonfinite", skip_nonfinite),
        ]:
            check_bool(name, flag)
        # each of these is declared and validated once, in the pure layer
        self.rule = FlowRule(vanishing_ratio, exploding_ratio, min_grad_rms, max_grad_rms, patience)
        self.trendclip = TrendClipConfig(trend_threshold, trend_min_ratio)
        self.zclip = ZClipConfig(z_threshold, ema_alpha, warmup_steps)
        self.autoclip = AutoClipConfig(percentile, percentile_window)
        self.clip_value = max_norm_threshold(clip_value, "clip_value")
        check_positive_float("agc_clip_factor", agc_clip_factor)
        check_positive_float("agc_eps", agc_eps)
        if clip_mode == "norm" and clip_value is None:
            raise ValueError("`clip_mode='norm'` clips to a fixed threshold: pass it as `clip_value=...`.")
        if clip_mode == "agc" and clip_value is not None:
            raise ValueError(
                f"`clip_value={clip_value}` has no meaning for `clip_mode='agc'`, which clips each unit relative to"
                " its weights: set `agc_clip_factor` instead, or remove `clip_value`."
            )
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.figure_every_n_steps = figure_every_n_steps
        self.group_by = group_by
        self.track_update_ratio = track_update_ratio
        self.auto_intervene = auto_intervene
        self.clip_mode = clip_mode
        self.agc_clip_factor = float(agc_clip_factor)
        self.agc_eps = float(agc_eps)
        self.skip_nonfinite = skip_nonfinite
        self.backend: Backend = backend
        self.monitor = FlowMonitor(self.rule)
        self._writes_tensorboard = True
        self._reset_fit_state()

    def _new_clipper(self) -> TrendClipper | ZScoreClipper | PercentileClipper | None:
        if self.clip_mode == "trend":
            t = self.trendclip
            return TrendClipper(t.trend_threshold, t.trend_min_ratio, max_norm=self.clip_value)
        if self.clip_mode == "zscore":
            z = self.zclip
            return ZScoreClipper(z.z_threshold, z.ema_alpha, z.warmup_steps, max_norm=self.clip_value)
        if self.clip_mode == "percentile":
            return PercentileClipper(self.autoclip.percentile, self.autoclip.percentile_window, self.clip_value)
        return None

    @override
    def _reset_fit_state(self) -> None:
        # Made afresh per fit, never shared: under ddp_spawn, tensors created in __init__ would be pickled into
        # memory shared by every rank; a reused instance must not carry one model's statistics into the next.
        self.clipper = self._new_clipper()
        self.monitor.reset()
        self.window = LogWindow()
        self.layers: list[str] = []  # depth order, input side first
        self.skipped_steps = 0
        self._warned.clear()
        self._has_zeros: dict[int, bool] = {}  # per gradient (by id): held exact zeros at the last report
        self._layer_of: dict[int, str] = {}  # id(param) -> layer
        self._ready: list[str] = []
        self._row_cache: dict[tuple[int, ...], Tensor] = {}
        self._last: FlowStep | None = None  # the latest step, for the report of an unfinished window at the end
        self._measured: tuple[int, Tensor] | None = None  # (step, global norm, NaN if non-finite)
        self._pending: list[FlowStep] = []
        self._snapshots: dict[int, Tensor] = {}

    # ----------------------------------------------------------------------------------------------- lifecycle

    def measured_grad_norm(self, step: int) -> Tensor | None:
        """The global gradient norm this callback measured at optimizer step ``step``, for other callbacks to share.

        A 0-dim tensor on the gradients' device (no host sync), after AMP unscaling and before any clipping; NaN
        when a gradient held a non-finite value. ``None`` when this callback measured nothing at ``step``. The same
        value is published on the trainer's channel: ``self.channel(trainer).read(step, "grad_norm")``.

        Args:
            step: ``trainer.global_step`` in ``on_before_optimizer_step``.
        """
        if self._measured is None or self._measured[0] != step:
            return None
        return self._measured[1]

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(group_by=self.group_by, clip_mode=self.clip_mode)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        refuse_sharded_strategy(trainer, self.name)
        if stage == "fit" and not trainer.loggers:
            self._warn_once("no_logger", NO_LOGGER_MESSAGE)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        names = parameter_layers(pl_module, self.group_by)
        self._layer_of = {id(p): names[n] for n, p in pl_module.named_parameters() if n in names}
        if not self._layer_of:
            self._warn_once("no_parameters", "the model has no trainable parameters; there is nothing to watch.")
            return
        if not self.layers:  # not restored from a checkpoint: learn the depth order from the first backward
            for p in pl_module.parameters():
                if id(p) in self._layer_of:
                    self._add_hook(p.register_post_accumulate_grad_hook(self._record_ready))
        self._row_cache.clear()

    def _record_ready(self, param: Tensor) -> None:
        self._ready.append(self._layer_of[id(param)])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # histograms and figures only go to TensorBoard (on rank zero): without one, they are not computed
        self._writes_tensorboard = bool(tb.tensorboard_loggers(trainer))
        write_layout(self, trainer, tb.GRADFLOW_CHARTS, trainer.global_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last, self._last = self._last, None
        if last is not None and self.window.steps > 0:  # report the unfinished window: nothing found is lost
            last.log, last.histogram, last.figure = True, False, False
            self._report(trainer, last)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._pending.clear()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._pending.clear()

    # ------------------------------------------------------------------------------------------ the step itself

    def _every(self, value: int | None, trainer: pl.Trainer) -> int:
        return 10 * log_interval(trainer, self.log_every_n_steps) if value is None else value

    def _rows(self, params: list[Tensor], device: torch.device) -> Tensor:
        key = tuple(id(p) for p in params)
        rows = self._row_cache.get(key)
        if rows is None or rows.device != device:
            new = [layer for layer in dict.fromkeys(self._layer_of[id(p)] for p in params) if layer not in self.layers]
            if new:  # e.g. a checkpoint from a model with fewer layers: append, keep the known order
                self.layers.extend(new)
                self.monitor.reset()
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
        if not self.layers or self._handles:
            self._finish_depth_order()
        grads = [p.grad for p in params]
        device = params[0].device
        step = trainer.global_step
        log_every = log_interval(trainer, self.log_every_n_steps)
        hist_every = self._every(self.histogram_every_n_steps, trainer) if self._writes_tensorboard else 0
        fig_every = self._every(self.figure_every_n_steps, trainer) if self._writes_tensorboard else 0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        log, histogram, figure = (is_log_step(step, every) for every in (log_every, hist_every, fig_every))
        report = log or histogram or figure
        # Between reports only the norms, counts and diagnosis are needed: the CPU skips max |g| and the sum, and the
        # zero count of gradients that had no exact zeros at the last report (dense layers): their active RMS is then
        # their RMS. Reports count every zero; a layer that turned sparse since is under-rated for one log interval
        # at most, by sqrt(1 - zero fraction) — negligible against the rule's 1e-3/1e3 ratios.
        count_zeros = None if report else [self._has_zeros.get(id(p), True) for p in params]
        stats = tensor_stats(grads, backend=self.backend, full=report, count_zeros=count_zeros)
        if count_zeros is not None and not all(count_zeros):
            stats.table[:, Stat.ZEROS].nan_to_num_(0.0)
        stats = unscaled_for_optimizer(stats, scaler, optimizer)
        self._measured = (step, global_norm_or_nan(stats))
        self.channel(trainer).publish(step, "grad_norm", self._measured[1])  # before any clipping
        rows = self._rows(params, device)
        pending = FlowStep(
            step=step,
            log=log,
            histogram=histogram,
            figure=figure,
            params=params,
            layer_stats=stats.reduce_rows(rows, len(self.layers)),
            total_norm=stats.total_norm(),
            tensor_zeros=stats.zeros if report else None,
        )
        nonfinite = stats.nonfinite.sum()
        self._move_state(device)
        overflow = (nonfinite > 0) if scaler is not None else torch.zeros((), dtype=torch.bool, device=device)
        self.window.observe(step, nonfinite, overflow)
        self.monitor.update(pending.layer_stats, count_nonfinite=scaler is None, frozen=overflow)

        if pending.histogram:
            pending.histograms = tensor_histograms(grads, backend=self.backend).reduce_rows(rows, len(self.layers))
        if pending.figure:
            pending.abs_sums = torch.zeros(len(self.layers), device=device).index_add_(0, rows, l1_norms(grads))
        if self.auto_intervene:
            self._intervene(pending, grads, nonfinite, scaler is not None)
        if report and self.track_update_ratio and not pending.skipped:
            pending.snapshotted = self._snapshot(params)
        if pending.log:  # closed here, not at the batch's end: several optimizers step within one batch
            pending.window = self.window.close()
        self._pending.append(pending)
        self._last = pending

    def _move_state(self, device: torch.device) -> None:
        if self.window.counts.device != device:
            self.window.to(device)
            self.monitor.to(device)
            if self.clipper is not None:
                self.clipper.to(device)

    def _intervene(self, pending: FlowStep, grads: list[Tensor], nonfinite: Tensor, scaler_skips: bool) -> None:
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
        norm = pending.total_norm
        if self.clip_mode == "agc":
            output = {id(p) for p in pending.params if self._layer_of[id(p)] == self.layers[-1]}
            keep = [(p, g) for p, g in zip(pending.params, grads, strict=True) if id(p) not in output]
            fraction = agc_clip_([p for p, _ in keep], [g for _, g in keep], self.agc_clip_factor, self.agc_eps)
            pending.coef = 1 - fraction.to(norm.device)
            self.window.units_clipped(pending.coef < 1)
            return
        if self.clipper is not None:
            # a step with non-finite values (a GradScaler overflow) must not enter the clip statistics
            threshold = self.clipper(torch.where(nonfinite > 0, torch.full_like(norm, math.inf), norm))
        else:
            assert self.clip_value is not None
            threshold = torch.full((), self.clip_value, device=norm.device)
        coef = clip_coefficient(norm, threshold)
        scale_grads_(grads, coef)
        pending.threshold, pending.coef = threshold, coef
        self.window.clipped(norm, threshold, coef)

    def _snapshot(self, params: list[Tensor]) -> bool:
        """Copies the weights before the step, for the update ratio; False when a parameter is not dense."""
        if any(p.layout != torch.strided for p in params):
            return False
        missing = [p for p in params if id(p) not in self._snapshots]
        for p, s in zip(missing, make_snapshot(missing), strict=True):
            self._snapshots[id(p)] = s
        torch._foreach_copy_([self._snapshots[id(p)] for p in params], [p.detach() for p in params])
        return True

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

    # ------------------------------------------------------------------------------------------------ rollback

    def rollback_state(self) -> dict[str, Any]:
        """What a rollback to a snapshot taken now must restore: clip statistics and diagnosis streaks.

        Device copies, no host sync (the channel asks for it whenever a snapshot is taken).
        """
        return {
            "clipper": None if self.clipper is None else self.clipper.rollback_state(),
            "streaks": self.monitor.rollback_state(),
        }

    def restore_rollback_state(self, state: dict[str, Any] | None, event: Event) -> None:
        """Returns the clip statistics and streaks to those kept with the snapshot the run was rolled back to."""
        for item in self._pending:  # the weights changed under the update-ratio snapshots of this step
            item.snapshotted = False
        if state is None:  # the snapshot predates this callback's first step: nothing of ours to restore
            return
        if self.clipper is not None and state["clipper"] is not None:
            self.clipper.restore_rollback_state(state["clipper"])
        self.monitor.restore_rollback_state(state["streaks"])

    # ------------------------------------------------------------------------------------------------ reporting

    def _report(self, trainer: pl.Trainer, item: FlowStep) -> None:
        window = item.window
        if item.log and window is None:  # the unfinished window reported at the end of training
            window = self.window.close()
        host = to_host(self._device_parts(item, window))  # the one device-to-host transfer of this logging step
        if "tensor_zeros" in host:
            self._has_zeros = {
                id(p): bool(z > 0) for p, z in zip(item.params, host["tensor_zeros"].tolist(), strict=True)
            }
        grads = TensorStats(host["layers"])
        present = present_layers(grads)
        vanishing, exploding = self.monitor.diagnosed(host.get("streaks", torch.zeros(2, len(grads))), present)
        for finding in flow_findings(self.layers, grads, vanishing, exploding, item.step, self.rule.patience):
            new = self._warn_once(finding.key, finding.message)
            if new and finding.kind == "exploding" and not self.auto_intervene:
                reason = would_clip_reason(self.clip_mode)
                self._log.add(item.step, "clip", finding.layer, reason, finding.rms, math.nan, applied=False)
        if item.log and window is not None:  # histogram- or figure-only steps leave the logging window open
            counts = host["window"].tolist()
            self._record_window(item.step, counts, int(host["first_nonfinite"]), window[2])
            metrics = self._metrics(host, grads, present, counts, (len(vanishing), len(exploding)))
            self._log_metrics(trainer, metrics, item.step)
        self._write_tensorboard(trainer, item, host, grads, present, set(vanishing), set(exploding))

    def _device_parts(self, item: FlowStep, window: tuple[Tensor, Tensor, int] | None) -> dict[str, Tensor]:
        """What the report of ``item`` reads, still on the device, by name (for one :func:`to_host`)."""
        rows = self._rows(item.params, item.total_norm.device)
        if item.snapshotted:
            updates = update_stats(item.params, [self._snapshots[id(p)] for p in item.params], backend=self.backend)
            weights = ("updates", updates.reduce_rows(rows, len(self.layers)).table)
        else:
            stats = tensor_stats([p.detach() for p in item.params], backend=self.backend)
            weights = ("weights", stats.reduce_rows(rows, len(self.layers)).table)
        return item.device_parts(weights, self.monitor.streaks, window)

    def _metrics(
        self,
        host: dict[str, Tensor],
        grads: TensorStats,
        present: list[int],
        window: list[float],
        found: tuple[int, int],
    ) -> dict[str, float]:
        clip_mode = self.clip_mode if self.auto_intervene else None
        counts = (*found, self.skipped_steps, len(self.interventions), clip_mode)
        metrics = flow_step_metrics(host["scalars"].tolist(), window, *counts)
        if "updates" in host:
            updates = UpdateStats(host["updates"])
            weight_norm, ratio = updates.param_norm, updates.ratio
        else:
            weight_norm, ratio = TensorStats(host["weights"]).norm, None
        rms_active = active_rms(grads)[present].double()
        flow = flow_ratios(rms_active) if present else torch.zeros(0)
        metrics.update(flow_layer_metrics(self.layers, grads, present, weight_norm, ratio, flow))
        if present:
            metrics[f"{FAMILY}/flow_ratio_end_to_end"] = float(end_to_end_ratio(rms_active))
        return metrics

    def _record_window(self, step: int, window: list[float], first_nonfinite: int, steps: int) -> None:
        nonfinite, overflow, clipped, worst_before, worst_after = window
        if clipped > 0:
            reason, before, after = clip_record(self.clip_mode, clipped, steps, worst_before, worst_after)
            self._log.add(step, "clip", "all", reason, before, after)
        if nonfinite > 0 and not self.auto_intervene and overflow == 0:
            at = first_nonfinite if first_nonfinite >= 0 else step
            if self._warn_once("nonfinite:all", nonfinite_message(nonfinite, at, step)):
                self._log.add(at, "skip_step", "all", "non-finite gradients", nonfinite, 0.0, applied=False)

    def _write_tensorboard(
        self,
        trainer: pl.Trainer,
        item: FlowStep,
        host: dict[str, Tensor],
        grads: TensorStats,
        present: list[int],
        vanishing: set[int],
        exploding: set[int],
    ) -> None:
        loggers = tb.tensorboard_loggers(trainer)
        if not loggers:
            return
        spec = item.histograms.spec if item.histograms is not None else HistogramSpec()
        histograms = (
            tb.layer_histograms(self.layers, present, host["histograms"], grads, spec) if "histograms" in host else {}
        )
        for logger in loggers:
            for tag, raw in histograms.items():
                write = partial(tb.add_histogram, logger, f"{FAMILY}/{tag}", raw, item.step)
                self._tensorboard(trainer, "add_histogram", write, item.step)
            if "abs_sums" in host and present:
                figure = tb.layer_flow_figure(
                    self.layers, present, host["abs_sums"], grads, vanishing, exploding, item.step
                )
                write = partial(tb.add_figure, logger, f"{FAMILY}/flow", figure, item.step)
                self._tensorboard(trainer, "add_figure", write, item.step)
        write_interventions(self, trainer, item.step)

    # ----------------------------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "interventions": self._log.state_dict(),
            "skipped_steps": self.skipped_steps,
            "warned": sorted(self._warned),
            "streaks": self.monitor.state_dict(),
            "clipper": None if self.clipper is None else self.clipper.state_dict(),
            "window": self.window.state_dict(),
        }

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        layers = state["layers"]
        if not isinstance(layers, list) or not all(isinstance(layer, str) for layer in layers):
            raise TypeError(f"`layers` must be a list of layer names, got {layers!r:.200}")
        skipped = state["skipped_steps"]
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"`skipped_steps` must be a count >= 0, got {skipped!r}")
        # warnings given, as "kind:layer" keys (older checkpoints saved [kind, layer] pairs)
        warned = {w if isinstance(w, str) else f"{w[0]}:{w[1]}" for w in state["warned"]}
        window = LogWindow()
        if state.get("window") is not None:
            window.load_state_dict(state["window"])
        clipper = self._new_clipper()
        if clipper is not None and state["clipper"] is not None:
            clipper.load_state_dict(state["clipper"])
        monitor = FlowMonitor(self.rule)
        monitor.load_state_dict(state["streaks"], len(layers))
        self._log.load_state_dict(state["interventions"])
        # everything checked: apply
        self.layers, self.skipped_steps, self.window, self.clipper, self.monitor = (
            list(layers),
            skipped,
            window,
            clipper,
            monitor,
        )
        self._warned |= warned
