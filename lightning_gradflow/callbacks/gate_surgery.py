"""GateSurgeryCallback: gate saturation of LSTMs and GRUs in TensorBoard, and surgery on the saturated units."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gradflow import tensorboard as tb
from lightning_gradflow.callbacks._base import HealthCallback, to_host
from lightning_gradflow.callbacks._common import (
    check_positive_float,
    check_positive_int,
    refuse_sharded_strategy,
    write_layout,
)
from lightning_gradflow.checks import check_bool
from lightning_gradflow.gates import (
    EPSILON_MIN,
    EXTRA_GATE_KINDS,
    FORGET_BIAS_LIMIT,
    GateCapture,
    GateDecision,
    GateDiagnosis,
    GatedModule,
    GateMeasurement,
    GateObservation,
    GateStats,
    GateVerdict,
    capture_call,
    find_gated_modules,
    gate_observations,
    measure_gates,
    repair_gate_units_,
    reset_optimizer_rows_,
)
from lightning_gradflow.interventions import InterventionLog
from lightning_gradflow.reports.gates import (
    GateReport,
    gate_metrics,
    no_gates_message,
    undone_message,
    undone_reason,
    unit_mismatch_message,
    unreadable_message,
)
from lightning_gradflow.schedule import ProbeSchedule
from lightning_gradflow.stats import HistogramSpec

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gradflow.channel import Event
    from lightning_gradflow.interventions import Intervention

_ACTIVATION_BINS = 20
#: The adaptive schedule's dense windows: a probe every 5 steps for the first 50 steps and the 50 after a finding or
#: a surgery, so that saturation present from initialisation is diagnosed at step 10 with the default patience of 3.
_DENSE_EVERY, _DENSE_STEPS = 5, 50
#: Pre-activation histograms: |z| from 2**-10 to 2**7 (a saturated sigmoid needs |z| > 4.6), two buckets per octave.
_PREACT_SPEC = HistogramSpec(min_exp=-10, max_exp=7, bins_per_octave=2)


@dataclass
class _Probe:
    """The host copy of one probe's reduced statistics and the gates it decided to repair."""

    step: int
    stats: dict[str, GateStats]
    activation_counts: dict[str, Tensor] = field(default_factory=dict)
    preact_counts: dict[str, Tensor] = field(default_factory=dict)
    repairs: list[GateObservation] = field(default_factory=list)


class GateSurgeryCallback(HealthCallback):
    r"""Watches the gates of every LSTM and GRU for saturation and, with ``auto_intervene=True``, repairs them.

    A saturated gate (σ pinned near 0 or 1) has a derivative near 0: neither information nor gradient passes it,
    and training stalls without an error. On each probe step (see **Schedule**) the callback captures, with forward
    hooks that exist only during that step, the first ``probe_size`` sequences of each gated module's input, initial
    state and output in the real training batch, recomputes every gate's pre-activations for all time steps from them
    with batched matrix products, and measures per module, layer,
    direction and gate (definitions, the choice of ε and the recomputation: :mod:`lightning_gradflow.gates`):

    * ``gates/saturation/<module>/<layer>/<gate>``: the fraction of activations with σ < ε or σ > 1 − ε
      (tanh gates: \|tanh\| > 1 − ε);
    * ``gates/mean/...``: the mean activation;
    * ``gates/saturated_units/...``: the fraction of units saturated on at least ``unit_threshold`` of the probe
      positions;
    * ``gates/sigma_prime/...``: the mean σ′ (tanh′ for the cell/new gates), the gradient the gate lets through;
    * ``gates/surgeries``: surgeries in effect (made, and not undone by a rollback).

    **Schedule** (:attr:`schedule`, a :class:`~lightning_gradflow.schedule.ProbeSchedule`): saturation is most often
    there from initialisation, so the callback probes every 5 steps during the first 50 optimizer steps and during
    the 50 steps after a finding (a gate flagged) or a surgery, and otherwise at intervals that double after each
    probe up to ``every_n_steps``. With the default patience of 3 a gate saturated from step 0 is diagnosed, and
    repaired, at step 10. ``adaptive_schedule=False`` (or ``every_n_steps`` ≤ 5) gives the fixed schedule
    ``step % every_n_steps == 0``.

    ``<layer>`` is ``l0``, ``l0_reverse``, ``l1``, … as in PyTorch's parameter names; gates are ``input``,
    ``forget``, ``cell``, ``output`` (LSTM), ``reset``, ``update``, ``new`` (GRU) and ``gate`` (``extra_gates``).
    TensorBoard (rank zero): a custom-scalars category ``gates``, histograms of the activations
    (``gates/activation_hist/...``, equal buckets over [0, 1] or [−1, 1]) and pre-activations
    (``gates/preact_hist/...``, log-spaced \|z\| buckets of the statistics engine), interventions as text.
    Steps without a probe cost nothing: no hooks are registered then. A probe step makes one all-reduce and one
    host transfer (two of each on a step with a surgery); on CPU it costs about one training step of the example's
    character LSTM with histograms, half of that without (``benchmarks/gates.py``), so about 1 % at
    ``every_n_steps=100`` (the first 50 steps probe every 5).
    A logger or TensorBoard writer that raises is warned about once and training goes on.

    **Surgery** (``auto_intervene=True``): when a gate's saturation stays above ``saturation_threshold`` with at
    least one saturated unit for ``patience`` consecutive probes, it is repaired together with every other gate
    flagged on the same probe, of any layer and module (one finding, one decision: a deeper layer saturated because
    its input is shut is part of the same fault). A gate healthy on the fit's first probe that saturates later must
    moreover stay flagged over ``(patience - 1) * every_n_steps`` steps, the time ``patience`` probes take on the
    sparse schedule: the cell and input gates of healthy character LSTMs saturate for a while early in training. Their
    saturated units get their biases reset (``b_ih + b_hh``: 0, or ``forget_bias`` for the LSTM forget and GRU update
    gates), their rows of ``W_ih`` and ``W_hh`` scaled down so their pre-activations spread at most ``target_std`` (RMS)
    about the new bias, and the optimizer state of those rows reset (Adam's moments, momentum buffers), in
    ``on_train_batch_end`` after the optimizer step. The probe then runs again on the same captured input, and each
    repaired gate becomes an :class:`Intervention` with its saturation before and after. A repaired gate is not touched
    again for ``cooldown`` steps, and with ``max_surgeries`` surgeries in effect the callback only reports. Without
    ``auto_intervene`` it warns once per finding and records what it would do (``applied=False``); the run is left
    bitwise unchanged. The decision rule is :class:`~lightning_gradflow.gates.GateDiagnosis`.

    **Rollbacks**: the callback joins the trainer's channel, so a rollback (EarlyCollapseCallback's) that restores
    weights from before a surgery also restores this callback's streaks, cooldowns and surgery count to the
    snapshot's. Each surgery it undid gets a ``gate_surgery_undone`` record (the ``gate_surgery`` record stays: it
    happened); ``gates/surgeries`` counts it no more. The gate is repaired again when the diagnosis finds it
    saturated again (the restored weights are), unless rollbacks have undone its surgeries twice: then the surgery
    may be what destabilises the run, and the gate is only reported (see :mod:`lightning_gradflow.gates.diagnosis`).

    **Distributed**: the per-unit counts are summed across ranks (one all-reduce per probe) before anything is
    decided, so every DDP rank repairs the same rows at the same step with the same factors. Sharded strategies
    (FSDP, DeepSpeed) are refused. Packed sequences, ``batch_first`` both ways, bidirectional, stacked and projected
    LSTMs and unbatched inputs are supported. With ``torch.compile`` the hooks of probe steps cause recompilation;
    compile the model's inner modules rather than the gated ones, or raise ``every_n_steps``.

    **State**: streaks, cooldowns, surgeries in effect, undo counts, warnings and interventions are saved in
    checkpoints and validated on restore. A new ``fit()`` of the same instance starts a new diagnosis (the
    interventions of earlier fits stay in :attr:`interventions`).

    Args:
        every_n_steps: the longest interval between probes, in optimizer steps (step 0 is probed); with
            ``adaptive_schedule=False`` the fixed interval.
        probe_size: sequences (batch rows) of each gated module's input used by a probe.
        epsilon: saturation margin ε, in [1e-6, 0.5) (below 1e-6 the tanh margin ``atanh(1 − ε)`` is no longer a
            usable number).
        unit_threshold: a unit is saturated when it is saturated on at least this fraction of probe positions.
        saturation_threshold: a gate is flagged when more than this fraction of its activations are saturated and
            it has a saturated unit. The default 0.25 leaves healthy gates alone: the input and output gates of a
            character LSTM trained on Python source (``examples/saturated_lstm.py``) sit at 2-18 %.
        patience: consecutive flagged probes before a gate is diagnosed.
        cooldown: optimizer steps after a surgery during which the same gate is not repaired again.
        max_surgeries: the most gate surgeries in effect in a run (0: report only).
        target_std: the largest spread of a repaired unit's pre-activation about its new bias: the root mean square
            over probe positions of its weight contribution (its standard deviation when that has zero mean); rows
            above it are scaled down to it, never up.
        forget_bias: the total bias of repaired LSTM forget / GRU update gate units (Jozefowicz et al. 2015: 1), in
            [-10, 10]: σ(10) = 1 − 4.5e-5 is a gate saturated by its bias alone, not a repair.
        auto_intervene: repair saturated gates; otherwise only observe, warn and record what would be done.
        extra_gates: other gated modules by dotted path: ``"sigmoid"`` when the module's output is a gate's
            pre-activation (``nn.Linear`` modules can be repaired), ``"sigmoid_output"`` when it is σ already.
        exclude: dotted module paths to leave alone (with everything inside them).
        repair_gates: the gate names surgery may touch (default: all); e.g. leave out ``"forget"`` for tasks whose
            forget gates should stay saturated open to remember over long spans.
        histograms: write TensorBoard histograms of gate activations and pre-activations on probe steps.
        adaptive_schedule: probe densely at the start and after a finding or a surgery, sparsely otherwise (see
            above); False for a probe every ``every_n_steps`` steps.

    Raises:
        TypeError: for an argument of the wrong type.
        ValueError: for an out-of-range argument or an unknown kind or gate name.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_gradflow.callbacks.gate_surgery import GateSurgeryCallback
        >>> callback = GateSurgeryCallback(every_n_steps=50, auto_intervene=True, exclude=["encoder.lstm"])
        >>> trainer = Trainer(callbacks=[callback], logger=False, max_steps=1)

    In a LightningCLI YAML::

        trainer:
          callbacks:
            - class_path: lightning_gradflow.callbacks.gate_surgery.GateSurgeryCallback
              init_args: {every_n_steps: 100, auto_intervene: true, extra_gates: {decoder.gate_proj: sigmoid}}
    """

    family: ClassVar[str] = "gates"

    def __init__(
        self,
        every_n_steps: int = 100,
        probe_size: int = 16,
        epsilon: float = 0.01,
        unit_threshold: float = 0.95,
        saturation_threshold: float = 0.25,
        patience: int = 3,
        cooldown: int = 500,
        max_surgeries: int = 16,
        target_std: float = 1.0,
        forget_bias: float = 1.0,
        auto_intervene: bool = False,
        extra_gates: dict[str, str] | None = None,
        exclude: list[str] | None = None,
        repair_gates: list[str] | None = None,
        histograms: bool = True,
        adaptive_schedule: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("every_n_steps", every_n_steps)
        check_positive_int("probe_size", probe_size)
        check_positive_int("patience", patience)
        check_positive_int("cooldown", cooldown, allow_zero=True)
        check_positive_int("max_surgeries", max_surgeries, allow_zero=True)
        check_positive_float("target_std", target_std)
        check_bool("auto_intervene", auto_intervene)
        check_bool("histograms", histograms)
        check_bool("adaptive_schedule", adaptive_schedule)
        _check_fraction("epsilon", epsilon, low=EPSILON_MIN, high=0.5, closed_high=False, closed_low=True)
        _check_fraction("unit_threshold", unit_threshold, low=0.0, high=1.0, closed_high=True)
        _check_fraction(
            "saturation_threshold", saturation_threshold, low=0.0, high=1.0, closed_high=False, closed_low=True
        )
        if not isinstance(forget_bias, (int, float)) or isinstance(forget_bias, bool):
            raise TypeError(
                f"Expected `forget_bias` to be a float, but got {type(forget_bias).__name__}: {forget_bias!r}."
            )
        if not abs(forget_bias) <= FORGET_BIAS_LIMIT:  # also refuses NaN
            raise ValueError(
                f"Expected `forget_bias` to be a finite float in [-{FORGET_BIAS_LIMIT:g}, {FORGET_BIAS_LIMIT:g}], but"
                f" got {forget_bias!r}: a larger bias saturates the repaired gate by itself. Use e.g. 1.0 (Jozefowicz"
                " et al. 2015)."
            )
        self.extra_gates = _check_extra_gates(extra_gates)
        self.exclude = _check_names("exclude", exclude)
        self.repair_gates = _check_names("repair_gates", repair_gates)
        if not self.repair_gates and repair_gates is not None:
            raise ValueError("`repair_gates=[]` would allow no surgery at all: use `auto_intervene=False` instead.")
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.epsilon = float(epsilon)
        self.unit_threshold = float(unit_threshold)
        self.saturation_threshold = float(saturation_threshold)
        self.patience = patience
        self.cooldown = cooldown
        self.max_surgeries = max_surgeries
        self.target_std = float(target_std)
        self.forget_bias = float(forget_bias)
        self.auto_intervene = auto_intervene
        self.histograms = histograms
        self.adaptive_schedule = adaptive_schedule
        self.schedule = self._new_schedule()
        self.diagnosis = GateDiagnosis(
            self.saturation_threshold,
            patience,
            cooldown,
            max_surgeries,
            auto_intervene,
            self.repair_gates,
            late_span=(patience - 1) * every_n_steps,
        )
        self.last_stats: dict[str, GateStats] = {}  # the most recent probe's reduced statistics (host), per module
        self._gated: list[GatedModule] = []
        self._fit_start_state: dict[str, Any] | None = None
        self._reset_probe()

    def _new_schedule(self) -> ProbeSchedule:
        adaptive = self.adaptive_schedule and self.every_n_steps > _DENSE_EVERY
        return ProbeSchedule(self.every_n_steps, _DENSE_EVERY, _DENSE_STEPS, adaptive=adaptive)

    def _reset_probe(self) -> None:
        self._captures: dict[str, list[GateCapture]] = {}
        self._seen_units: dict[str, int] = {}
        self._capture_step: int | None = None
        self._processed_step: int | None = None
        self._pending: _Probe | None = None

    @property
    def surgeries(self) -> int:
        """Gate surgeries in effect: made, and not undone by a rollback (what ``gates/surgeries`` logs)."""
        return self.diagnosis.surgeries

    @property
    def _texts(self) -> GateReport:
        """The texts of this callback's warnings and records, from its current settings."""
        return GateReport(self.unit_threshold, self.patience, self.target_std, self.forget_bias, self.max_surgeries)

    # ----------------------------------------------------------------------------------------------- lifecycle

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(extra_gates=sorted(self.extra_gates.items()), exclude=sorted(self.exclude))

    def should_compute(self, step: int) -> bool:
        """Whether optimizer step ``step`` runs a probe (:attr:`schedule`); advances the adaptive schedule.

        Override for another schedule (it must agree on all ranks).
        """
        return self.schedule.due(step)

    @override
    def _reset_fit_state(self) -> None:
        self.diagnosis.reset()
        self.schedule.reset()
        self._warned.clear()
        self._reset_probe()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        refuse_sharded_strategy(trainer, self.name, reads="whole weight rows and layer activations")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._fit_start_state = self.rollback_state()  # what a rollback to a snapshot older than this fit restores
        # After `configure_model`, so modules created there are found too.
        self._gated = find_gated_modules(pl_module, self.extra_gates, self.exclude)
        if not self._gated:
            self._warn_once("no_gates", no_gates_message(type(pl_module).__name__, bool(self.exclude)))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._gated:
            write_layout(self, trainer, tb.GATES_CHARTS, trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._captures.clear()
        self._pending = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._captures.clear()
        self._pending = None

    # ------------------------------------------------------------------------------------------------- capture

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._gated or self._handles or step == self._processed_step or not self.should_compute(step):
            return
        if step != self._capture_step:  # a new probe step: drop what an unprocessed earlier one left
            self._captures = {g.name: [] for g in self._gated}
            self._capture_step = step
        for index, gated in enumerate(self._gated):
            self._add_hook(gated.module.register_forward_hook(partial(self._capture, index), with_kwargs=True))

    def _capture(
        self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        gated = self._gated[index]
        capture = capture_call(gated, args, kwargs, output, self.probe_size)
        if capture is None:
            self._warn_once(f"unreadable:{gated.name}", unreadable_message(gated.name))
            return
        if gated.family == "sigmoid":
            units = capture.output.shape[-1] if capture.output is not None else 0
            known = gated.units or self._seen_units.get(gated.name)
            if known is not None and units != known:
                self._warn_once(f"units:{gated.name}", unit_mismatch_message(gated.name, units, known))
                return
            self._seen_units.setdefault(gated.name, units)
        self._captures.setdefault(gated.name, []).append(capture)

    # --------------------------------------------------------------------------------------------------- probe

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # The weights here are those of the forward pass that was captured: the recomputed gates are exact.
        if self._capture_step is None or self._capture_step == self._processed_step:
            return
        self._remove_hooks()
        self._processed_step = step = self._capture_step
        self._resolve_units(trainer)
        measured = self._measure(trainer, pl_module.device, use_captured_output=True, histograms=self.histograms)
        probe = _Probe(step, *measured)
        decisions = self.diagnosis.update(step, gate_observations(self._gated, probe.stats, self.unit_threshold))
        probe.repairs = [d.observation for d in decisions if self._act_on(d, step)]
        if probe.repairs or any(d.verdict is GateVerdict.FLAGGED for d in decisions):
            self.schedule.found(step)  # a finding on its way to a diagnosis, or a surgery: probe densely again
        self._pending = probe

    def _resolve_units(self, trainer: pl.Trainer) -> None:
        """Unit counts of ``extra_gates`` modules other than ``nn.Linear``, from their first outputs on any rank."""
        unknown = [i for i, g in enumerate(self._gated) if g.units is None]
        if not unknown:
            return
        device = trainer.strategy.root_device
        local = torch.tensor([float(self._seen_units.get(self._gated[i].name, 0)) for i in unknown], device=device)
        seen = trainer.strategy.reduce(local, reduce_op="max").tolist()
        for i, units in zip(unknown, seen, strict=True):
            if units > 0:
                self._gated[i] = self._gated[i].with_units(int(units))

    def _measure(
        self, trainer: pl.Trainer, device: torch.device, use_captured_output: bool, histograms: bool
    ) -> tuple[dict[str, GateStats], dict[str, Tensor], dict[str, Tensor]]:
        """Statistics of every gated module, summed across ranks, on the host (one all-reduce, one transfer)."""
        measured: dict[str, GateMeasurement] = {}
        for gated in self._gated:
            if gated.units is None:  # an extra gate no rank has called yet
                continue
            measured[gated.name] = measure_gates(
                gated,
                self._captures.get(gated.name, []),
                self.epsilon,
                use_captured_output=use_captured_output,
                device=device,
                activation_bins=_ACTIVATION_BINS if histograms else 0,
                preact_spec=_PREACT_SPEC if histograms else None,
            )
        parts = {f"{i}:{name}": t.double() for name, m in measured.items() for i, t in enumerate(m.tensors())}
        host = to_host(parts, reduce=partial(trainer.strategy.reduce, reduce_op="sum"))  # one all-reduce, one copy
        stats = {name: GateStats(host[f"0:{name}"]) for name in measured}
        activation = {name: host[f"1:{name}"] for name in measured if f"1:{name}" in host}
        preact = {name: host[f"2:{name}"] for name in measured if f"2:{name}" in host}
        return stats, activation, preact

    def _act_on(self, decision: GateDecision, step: int) -> bool:
        """Warns (once per finding) and records what the verdict says; returns whether to repair the gate."""
        obs, gated = decision.observation, self._gated[decision.observation.module]
        warning = self._texts.warning(decision, gated, step, self.diagnosis.undone)
        if warning is not None and self._warn_once(*warning) and decision.verdict is GateVerdict.MONITOR:
            self._record(step, obs, math.nan, self._texts.plan(obs, gated), applied=False)
        return decision.verdict is GateVerdict.REPAIR

    # ------------------------------------------------------------------------------------------------- surgery

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the optimizer step: surgery here is not followed by an update from gradients of the old weights.
        self._remove_hooks()
        probe, self._pending = self._pending, None
        if probe is None:
            return
        if probe.repairs:
            self._operate(trainer, pl_module, probe)
        self._captures = {g.name: [] for g in self._gated}
        self._report(trainer, probe)

    def _operate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: _Probe) -> None:
        entries: set[str] = set()
        for obs in probe.repairs:
            touched = repair_gate_units_(
                self._gated[obs.module],
                obs.row,
                obs.gate,
                torch.tensor(obs.units, dtype=torch.long),
                torch.tensor(obs.weight_rms, dtype=torch.float64),
                target_std=self.target_std,
                forget_bias=self.forget_bias,
            )
            entries.update(reset_optimizer_rows_(trainer.optimizers, touched))
        after, _, _ = self._measure(trainer, pl_module.device, use_captured_output=False, histograms=False)
        texts = self._texts
        for obs in probe.repairs:
            gated = self._gated[obs.module]
            saturation_after = float(after[gated.name].saturation[obs.row, gated.gates.index(obs.gate)])
            how = texts.done(obs, gated, entries)
            self._record(probe.step, obs, saturation_after, how, applied=True)
            self._warn_once(f"found:{obs.key}", texts.repaired(obs, gated, probe.step, how, saturation_after))
            self.diagnosis.repaired(probe.step, obs.key)

    def _record(self, step: int, obs: GateObservation, after: float, how: str, applied: bool) -> None:
        reason = self._texts.reason(obs, self._gated[obs.module], how)
        self._log.add(step, "gate_surgery", obs.key, reason, obs.saturation, after, applied=applied)

    # ----------------------------------------------------------------------------------------------- rollbacks

    def rollback_state(self) -> dict[str, Any]:
        """What a snapshot keeps of this callback: the diagnosis's view of the weights (streaks, cooldowns...)."""
        return {"diagnosis": self.diagnosis.rollback_state()}

    def restore_rollback_state(self, state: Any, event: Event) -> None:
        """Returns to a snapshot's view after a rollback and records each surgery the rollback undid."""
        if state is None:  # the snapshot is older than this callback's fit: return to its start
            state = self._fit_start_state or {"diagnosis": GateDiagnosis().rollback_state()}
        if self._pending is not None:  # decided on weights the rollback threw away: report it, repair nothing
            self._pending.repairs = []
        undone = self.diagnosis.restore(state["diagnosis"])
        to_step = event.data.get("to_step", "?")
        for step, key in undone:
            surgery = self._surgery_record(step, key)
            reason = undone_reason(step, event.source, event.kind, to_step)
            before = surgery.after if surgery is not None else math.nan
            self._log.add(event.step, "gate_surgery_undone", key, reason, before, math.nan)
        self.schedule.found(event.step)  # the restored weights may be saturated again: probe densely
        if undone:
            message = undone_message(event.source, event.kind, event.step, to_step, [k for _, k in undone])
            self._warn_once("undone", message)

    def _surgery_record(self, step: int, key: str) -> Intervention | None:
        for record in reversed(self.interventions):
            if record.kind == "gate_surgery" and record.applied and record.step == step and record.target == key:
                return record
        return None

    # ------------------------------------------------------------------------------------------------ reporting

    def _report(self, trainer: pl.Trainer, probe: _Probe) -> None:
        metrics = gate_metrics(self._gated, probe.stats, self.unit_threshold, self.surgeries, self.family)
        self.last_stats = probe.stats
        self._log_metrics(trainer, metrics, probe.step)
        loggers = tb.tensorboard_loggers(trainer)
        new = self._log.unreported() if loggers else []
        for logger in loggers:
            write = partial(self._write_tensorboard, logger, probe, new)
            self._tensorboard(trainer, "add_histogram_raw", write, probe.step)

    def _write_tensorboard(self, logger: TensorBoardLogger, probe: _Probe, new: list[Intervention]) -> None:
        for gated in self._gated:
            if gated.name in probe.activation_counts:
                activation, preact = probe.activation_counts[gated.name], probe.preact_counts[gated.name]
                for tag, raw in tb.gate_histograms(gated, activation, preact, _PREACT_SPEC).items():
                    tb.add_histogram(logger, f"{self.family}/{tag}", raw, probe.step)
        if new:
            tb.add_interventions(logger, self.family, new, probe.step)

    # ----------------------------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.diagnosis.state_dict(),
            "interventions": self._log.state_dict(),
            "warned": sorted(self._warned),
            "schedule": self.schedule.state_dict(),
        }

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        log = InterventionLog(self.name)
        log.load_state_dict(state["interventions"])
        warned = state["warned"]
        if not isinstance(warned, (list, tuple, set)) or not all(isinstance(w, str) for w in warned):
            raise TypeError(f"Expected `warned` to be a list of str, but got {warned!r:.200}.")
        diagnosis = dict(state)
        if "applied" not in diagnosis:  # written before rollbacks were tracked: the applied surgery records
            diagnosis["applied"] = [[r.step, r.target] for r in log.records if r.applied and r.kind == "gate_surgery"]
        schedule = self._new_schedule()
        if "schedule" in state:  # absent in checkpoints written before the adaptive schedule: it starts afresh
            schedule.load_state_dict(state["schedule"])
        self.diagnosis.load_state_dict(diagnosis)  # validates everything before changing anything
        self.schedule = schedule
        self._log = log
        self._warned = set(warned)


# ------------------------------------------------------------------------------------------------- helpers


def _check_fraction(
    name: str, value: object, low: float, high: float, closed_high: bool, closed_low: bool = False
) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a float, but got {type(value).__name__}: {value!r}.")
    above_low = value >= low if closed_low else value > low
    below_high = value <= high if closed_high else value < high
    if not (above_low and below_high):
        interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
        raise ValueError(f"Expected `{name}` in {interval}, but got {value}.")


def _check_names(name: str, value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"Expected `{name}` to be a list of str, but got {value!r}.")
    return list(value)


def _check_extra_gates(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError(f"Expected `extra_gates` to be a dict of module path -> kind (str -> str), but got {value!r}.")
    for path, kind in value.items():
        if kind not in EXTRA_GATE_KINDS:
            raise ValueError(f"Expected `extra_gates[{path!r}]` to be one of {EXTRA_GATE_KINDS}, but got {kind!r}.")
    return dict(value)
