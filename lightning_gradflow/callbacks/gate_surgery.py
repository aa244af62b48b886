"""GateSurgeryCallback: gate saturation of LSTMs and GRUs in TensorBoard, and surgery on the saturated units."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gradflow import tensorboard as tb
from lightning_gradflow.callbacks._common import (
    check_bool,
    check_positive_float,
    check_positive_int,
    refuse_sharded_strategy,
)
from lightning_gradflow.flow import layer_path
from lightning_gradflow.gates import (
    ALL_GATES,
    EXTRA_GATE_KINDS,
    GateCapture,
    GatedModule,
    GateMeasurement,
    GateStats,
    capture_call,
    find_gated_modules,
    healthy_bias,
    histogram_raw,
    measure_gates,
    repair_gate_units_,
    reset_optimizer_rows_,
    row_scales,
)
from lightning_gradflow.interventions import Intervention, InterventionLog
from lightning_gradflow.stats import HistogramSpec, tensorboard_histogram

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.utils.hooks import RemovableHandle

FAMILY = "gates"
_NAME = "GateSurgeryCallback"
_ACTIVATION_BINS = 20
#: Pre-activation histograms: |z| from 2**-10 to 2**7 (a saturated sigmoid needs |z| > 4.6), two buckets per octave.
_PREACT_SPEC = HistogramSpec(min_exp=-10, max_exp=7, bins_per_octave=2)


@dataclass(frozen=True)
class _Repair:
    """One gate of one layer/direction that qualifies for surgery, with the reduced numbers it was decided on."""

    module: int  # index into the callback's gated modules
    row: int
    gate: str
    key: str
    units: list[int]
    weight_rms: list[float]
    before: float


@dataclass
class _Probe:
    """The host copy of one probe's reduced statistics and what it decided."""

    step: int
    stats: dict[str, GateStats]
    activation_counts: dict[str, Tensor] = field(default_factory=dict)
    preact_counts: dict[str, Tensor] = field(default_factory=dict)
    repairs: list[_Repair] = field(default_factory=list)


class GateSurgeryCallback(Callback):
    r"""Watches the gates of every LSTM and GRU for saturation and, with ``auto_intervene=True``, repairs them.

    A saturated gate (σ pinned near 0 or 1) has a derivative near 0: neither information nor gradient passes it,
    and training stalls without an error. Every ``every_n_steps`` optimizer steps (see :meth:`should_compute`) the
    callback captures, with forward hooks that exist only during that step, the first ``probe_size`` sequences of
    each gated module's input, initial state and output in the real training batch, recomputes every gate's
    pre-activations for all time steps from them with batched matrix products, and measures per module, layer,
    direction and gate (definitions, the choice of ε and the recomputation: :mod:`lightning_gradflow.gates`):

    * ``gates/saturation/<module>/<layer>/<gate>``: the fraction of activations with σ < ε or σ > 1 − ε
      (tanh gates: \|tanh\| > 1 − ε);
    * ``gates/mean/...``: the mean activation;
    * ``gates/saturated_units/...``: the fraction of units saturated on at least ``unit_threshold`` of the probe
      positions;
    * ``gates/sigma_prime/...``: the mean σ′ (tanh′ for the cell/new gates), the gradient the gate lets through;
    * ``gates/surgeries``: surgeries so far.

    ``<layer>`` is ``l0``, ``l0_reverse``, ``l1``, … as in PyTorch's parameter names; gates are ``input``,
    ``forget``, ``cell``, ``output`` (LSTM), ``reset``, ``update``, ``new`` (GRU) and ``gate`` (``extra_gates``).
    TensorBoard (rank zero): a custom-scalars category ``gates``, histograms of the activations
    (``gates/activation_hist/...``, equal buckets over [0, 1] or [−1, 1]) and pre-activations
    (``gates/preact_hist/...``, log-spaced \|z\| buckets of the statistics engine), interventions as text.
    Steps without a probe cost nothing: no hooks are registered then. A probe step makes one all-reduce and one
    host transfer (two of each on a step with a surgery); on CPU it costs about one training step of the example's
    character LSTM with histograms, half of that without (``benchmarks/gates.py``), so 1 % at the default schedule.

    **Surgery** (``auto_intervene=True``): when a gate's saturation stays above ``saturation_threshold`` with at
    least one saturated unit for ``patience`` consecutive probes, its saturated units get their biases reset
    (``b_ih + b_hh``: 0, or ``forget_bias`` for the LSTM forget and GRU update gates), their rows of ``W_ih`` and
    ``W_hh`` scaled down so their pre-activations spread at most ``target_std`` (RMS) about the new bias, and the
    optimizer state
    of those rows reset (Adam's moments, momentum buffers), in ``on_train_batch_end`` after the optimizer step. The
    probe then runs again on the same captured input, and each repaired gate becomes an :class:`Intervention` with
    its saturation before and after. A repaired gate is not touched again for ``cooldown`` steps, and after
    ``max_surgeries`` repairs the callback only reports. Without ``auto_intervene`` it warns once per finding and
    records what it would do (``applied=False``); the run is left bitwise unchanged.

    **Distributed**: the per-unit counts are summed across ranks (one all-reduce per probe) before anything is
    decided, so every DDP rank repairs the same rows at the same step with the same factors. Sharded strategies
    (FSDP, DeepSpeed) are refused. Packed sequences, ``batch_first`` both ways, bidirectional, stacked and projected
    LSTMs and unbatched inputs are supported. With ``torch.compile`` the hooks of probe steps cause recompilation;
    compile the model's inner modules rather than the gated ones, or raise ``every_n_steps``.

    Args:
        every_n_steps: optimizer steps between probes (step 0 is probed).
        probe_size: sequences (batch rows) of each gated module's input used by a probe.
        epsilon: saturation margin ε, in (0, 0.5).
        unit_threshold: a unit is saturated when it is saturated on at least this fraction of probe positions.
        saturation_threshold: a gate is flagged when more than this fraction of its activations are saturated and
            it has a saturated unit. The default 0.25 leaves healthy gates alone: the input and output gates of a
            character LSTM trained on Python source (``examples/saturated_lstm.py``) sit at 2-18 %.
        patience: consecutive flagged probes before a gate is diagnosed.
        cooldown: optimizer steps after a surgery during which the same gate is not repaired again.
        max_surgeries: the most gate repairs in a run (0: report only).
        target_std: the largest spread of a repaired unit's pre-activation about its new bias: the root mean square
            over probe positions of its weight contribution (its standard deviation when that has zero mean); rows
            above it are scaled down to it, never up.
        forget_bias: the total bias of repaired LSTM forget / GRU update gate units (Jozefowicz et al. 2015: 1).
        auto_intervene: repair saturated gates; otherwise only observe, warn and record what would be done.
        extra_gates: other gated modules by dotted path: ``"sigmoid"`` when the module's output is a gate's
            pre-activation (``nn.Linear`` modules can be repaired), ``"sigmoid_output"`` when it is σ already.
        exclude: dotted module paths to leave alone (with everything inside them).
        repair_gates: the gate names surgery may touch (default: all); e.g. leave out ``"forget"`` for tasks whose
            forget gates should stay saturated open to remember over long spans.
        histograms: write TensorBoard histograms of gate activations and pre-activations on probe steps.

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
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps)
        check_positive_int("probe_size", probe_size)
        check_positive_int("patience", patience)
        check_positive_int("cooldown", cooldown, allow_zero=True)
        check_positive_int("max_surgeries", max_surgeries, allow_zero=True)
        check_positive_float("target_std", target_std)
        check_bool("auto_intervene", auto_intervene)
        check_bool("histograms", histograms)
        _check_fraction("epsilon", epsilon, low=0.0, high=0.5, closed_high=False)
        _check_fraction("unit_threshold", unit_threshold, low=0.0, high=1.0, closed_high=True)
        _check_fraction(
            "saturation_threshold", saturation_threshold, low=0.0, high=1.0, closed_high=False, closed_low=True
        )
        if not isinstance(forget_bias, (int, float)) or isinstance(forget_bias, bool) or not math.isfinite(forget_bias):
            raise TypeError(f"Expected `forget_bias` to be a finite float, but got {forget_bias!r}.")
        self.extra_gates = _check_extra_gates(extra_gates)
        self.exclude = _check_names("exclude", exclude)
        self.repair_gates = _check_names("repair_gates", repair_gates)
        unknown = [g for g in self.repair_gates if g not in ALL_GATES]
        if unknown:
            raise ValueError(f"Expected `repair_gates` to hold gate names from {ALL_GATES}, but got {unknown}.")
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
        self._log = InterventionLog(_NAME)
        self.surgeries = 0
        self.last_metrics: dict[str, float] = {}  # the most recent probe's metrics
        self.last_stats: dict[str, GateStats] = {}  # the most recent probe's reduced statistics (host), per module
        self._gated: list[GatedModule] = []
        self._captures: dict[str, list[GateCapture]] = {}
        self._seen_units: dict[str, int] = {}
        self._hooks: list[RemovableHandle] = []
        self._capture_step: int | None = None
        self._processed_step: int | None = None
        self._pending: _Probe | None = None
        self._streaks: dict[str, int] = {}
        self._last_surgery: dict[str, int] = {}
        self._warned: set[str] = set()

    # ----------------------------------------------------------------------------------------------- lifecycle

    @property
    def interventions(self) -> list[Intervention]:
        """Every action taken (or, with ``auto_intervene=False``, that would have been taken), oldest first."""
        return self._log.records

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(extra_gates=sorted(self.extra_gates.items()), exclude=sorted(self.exclude))

    def should_compute(self, step: int) -> bool:
        """Whether optimizer step ``step`` runs a probe; override for another schedule (must agree on all ranks)."""
        return step % self.every_n_steps == 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, _NAME, reads="whole weight rows and layer activations")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After `configure_model`, so modules created there are found too.
        self._gated = find_gated_modules(pl_module, self.extra_gates, self.exclude)
        if not self._gated and "no_gates" not in self._warned:
            self._warned.add("no_gates")
            rank_zero_warn(
                f"{_NAME} found no gated module (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell) in"
                f" {type(pl_module).__name__}{' outside `exclude`' if self.exclude else ''}, so it does nothing."
                " Name other sigmoid-gated modules with `extra_gates={'path.to.module': 'sigmoid'}`, or remove the"
                " callback.",
                category=RuntimeWarning,
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._gated:
            return
        for logger in tb.tensorboard_loggers(trainer):
            tb.add_layout_category(
                logger,
                FAMILY,
                {
                    "saturation (fraction of activations)": [f"{FAMILY}/saturation/"],
                    "saturated units (fraction of units)": [f"{FAMILY}/saturated_units/"],
                    "mean activation": [f"{FAMILY}/mean/"],
                    "mean σ′ (gradient through the gate)": [f"{FAMILY}/sigma_prime/"],
                    "surgeries": [f"{FAMILY}/surgeries"],
                },
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._captures.clear()
        self._pending = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------------------------------------- capture

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._gated or self._hooks or step == self._processed_step or not self.should_compute(step):
            return
        if step != self._capture_step:  # a new probe step: drop what an unprocessed earlier one left
            self._captures = {g.name: [] for g in self._gated}
            self._capture_step = step
        for index, gated in enumerate(self._gated):
            hook = partial(self._capture, index)
            self._hooks.append(gated.module.register_forward_hook(hook, with_kwargs=True))

    def _capture(
        self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        gated = self._gated[index]
        capture = capture_call(gated, args, kwargs, output, self.probe_size)
        if capture is None:
            self._warn_once(
                f"unreadable:{gated.name}",
                f"{_NAME}: the output of '{gated.name}' is not a floating-point tensor (nor a tuple starting with"
                " one), so its gates cannot be read; it is skipped. Check its entry in `extra_gates`.",
            )
            return
        if gated.family == "sigmoid":
            units = capture.output.shape[-1] if capture.output is not None else 0
            known = gated.units or self._seen_units.get(gated.name)
            if known is not None and units != known:
                self._warn_once(
                    f"units:{gated.name}",
                    f"{_NAME}: '{gated.name}' returned {units} units in one call and {known} in another; calls"
                    f" with other than {known} units are skipped (its last dimension must hold the gate's units).",
                )
                return
            self._seen_units.setdefault(gated.name, units)
        self._captures.setdefault(gated.name, []).append(capture)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # --------------------------------------------------------------------------------------------------- probe

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # The weights here are those of the forward pass that was captured: the recomputed gates are exact.
        if self._capture_step is None or self._capture_step == self._processed_step:
            return
        self._remove_hooks()
        self._processed_step = self._capture_step
        self._resolve_units(trainer)
        measured = self._measure(trainer, pl_module.device, use_captured_output=True, histograms=self.histograms)
        probe = _Probe(self._capture_step, *measured)
        probe.repairs = self._diagnose(probe)
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
            captures = self._captures.get(gated.name, [])
            measured[gated.name] = measure_gates(
                gated,
                captures,
                self.epsilon,
                use_captured_output=use_captured_output,
                device=device,
                activation_bins=_ACTIVATION_BINS if histograms else 0,
                preact_spec=_PREACT_SPEC if histograms else None,
            )
        parts = [t for m in measured.values() for t in m.tensors()]
        if not parts:
            return {}, {}, {}
        flat = torch.cat([t.reshape(-1).double() for t in parts])
        host = trainer.strategy.reduce(flat, reduce_op="sum").cpu()
        stats, activation, preact, offset = {}, {}, {}, 0
        for name, m in measured.items():
            tensors = []
            for t in m.tensors():
                tensors.append(host[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()
            stats[name] = GateStats(tensors[0])
            if len(tensors) == 3:
                activation[name], preact[name] = tensors[1], tensors[2]
        return stats, activation, preact

    def _diagnose(self, probe: _Probe) -> list[_Repair]:
        repairs = []
        for index, gated in enumerate(self._gated):
            stats = probe.stats.get(gated.name)
            if stats is None:
                continue
            saturation = stats.saturation
            unit_mask = stats.saturated_units(self.unit_threshold)
            weight_rms = stats.weight_rms
            for row, row_name in enumerate(gated.row_names()):
                for g, gate in enumerate(gated.gates):
                    key = f"{layer_path(gated.name)}/{row_name}/{gate}"
                    units = unit_mask[row, g].nonzero().flatten().tolist()
                    flagged = float(saturation[row, g]) > self.saturation_threshold and bool(units)
                    self._streaks[key] = self._streaks.get(key, 0) + 1 if flagged else 0
                    if self._streaks[key] < self.patience:
                        continue
                    repair = _Repair(
                        index, row, gate, key, units, weight_rms[row, g, units].tolist(), float(saturation[row, g])
                    )
                    if self._may_repair(gated, repair, probe.step):
                        repairs.append(repair)
        return repairs

    def _may_repair(self, gated: GatedModule, repair: _Repair, step: int) -> bool:
        """Whether to repair now; otherwise warns (once per finding) and records what would have been done."""
        if not gated.repairable or (self.repair_gates and repair.gate not in self.repair_gates):
            why = "its module has no rows to repair" if not gated.repairable else "its gate is not in `repair_gates`"
            self._warn_once(f"found:{repair.key}", self._finding(repair, step) + f" It is only reported: {why}.")
            return False
        if not self.auto_intervene:
            if f"found:{repair.key}" not in self._warned:
                self._warn_once(
                    f"found:{repair.key}",
                    self._finding(repair, step) + f" With `auto_intervene=True` {_NAME} would {self._plan(repair)}.",
                )
                self._record(step, repair, math.nan, self._plan(repair), applied=False)
            return False
        last = self._last_surgery.get(repair.key)
        if last is not None and step - last < self.cooldown:
            return False
        if self.surgeries >= self.max_surgeries:
            self._warn_once(
                "max_surgeries",
                self._finding(repair, step) + f" {_NAME} has made `max_surgeries={self.max_surgeries}` repairs and"
                " now only reports; raise `max_surgeries`, or look for the cause (learning rate, initialisation).",
            )
            return False
        return True

    def _finding(self, repair: _Repair, step: int) -> str:
        gated = self._gated[repair.module]
        return (
            f"{_NAME}: gate '{repair.key}' is saturated at step {step}: {repair.before:.1%} of its activations, and"
            f" {len(repair.units)} of {gated.units} units on ≥{self.unit_threshold:.0%} of the probe positions, for"
            f" {self.patience} probe(s) in a row."
        )

    def _plan(self, repair: _Repair) -> str:
        bias = healthy_bias(repair.gate, self.forget_bias)
        which = "bias" if self._gated[repair.module].family == "sigmoid" else "bias (b_ih + b_hh)"
        return (
            f"set the {which} of {len(repair.units)} unit(s) to {bias:g}, {self._scaling(repair)} and reset their"
            " optimizer state"
        )

    def _scaling(self, repair: _Repair, done: bool = False) -> str:
        rows = "weight" if self._gated[repair.module].family == "sigmoid" else "W_ih/W_hh"
        scales = row_scales(torch.tensor(repair.weight_rms), self.target_std)
        low, high = float(scales.min()), float(scales.max())
        if low == 1.0:
            return f"{'kept' if done else 'keep their'} {rows} rows (weight RMS already ≤ {self.target_std:g})"
        factor = f"{low:.3g}" if math.isclose(low, high, rel_tol=1e-3) else f"{low:.3g}-{high:.3g}"
        verb = f"{rows} rows scaled" if done else f"scale their {rows} rows"
        return f"{verb} by {factor} (weight RMS ≤ {self.target_std:g})"

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
        for repair in probe.repairs:
            gated = self._gated[repair.module]
            units = torch.tensor(repair.units, dtype=torch.long)
            weight_rms = torch.tensor(repair.weight_rms, dtype=torch.float64)
            touched = repair_gate_units_(
                gated,
                repair.row,
                repair.gate,
                units,
                weight_rms,
                target_std=self.target_std,
                forget_bias=self.forget_bias,
            )
            entries.update(reset_optimizer_rows_(trainer.optimizers, touched))
        after, _, _ = self._measure(trainer, pl_module.device, use_captured_output=False, histograms=False)
        reset = f"optimizer state reset: {', '.join(sorted(entries))}" if entries else "no optimizer state yet"
        for repair in probe.repairs:
            gated = self._gated[repair.module]
            g = gated.gates.index(repair.gate)
            saturation_after = float(after[gated.name].saturation[repair.row, g])
            bias = healthy_bias(repair.gate, self.forget_bias)
            how = f"bias set to {bias:g}, {self._scaling(repair, done=True)}, {reset}"
            self._record(probe.step, repair, saturation_after, how, applied=True)
            self._warn_once(
                f"found:{repair.key}",
                self._finding(repair, probe.step) + f" Surgery on those units ({how}): saturation"
                f" {repair.before:.1%} → {saturation_after:.1%} on the probe.",
            )
            self._streaks[repair.key] = 0
            self._last_surgery[repair.key] = probe.step
            self.surgeries += 1

    def _record(self, step: int, repair: _Repair, after: float, how: str, applied: bool) -> None:
        gated = self._gated[repair.module]
        reason = (
            f"{len(repair.units)}/{gated.units} units saturated on ≥{self.unit_threshold:.0%} of probe positions"
            f" for {self.patience} probe(s); {how}"
        )
        self._log.add(step, "gate_surgery", repair.key, reason, repair.before, after, applied=applied)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)

    # ------------------------------------------------------------------------------------------------ reporting

    def _report(self, trainer: pl.Trainer, probe: _Probe) -> None:
        metrics: dict[str, float] = {f"{FAMILY}/surgeries": float(self.surgeries)}
        for gated in self._gated:
            stats = probe.stats.get(gated.name)
            if stats is None:
                continue
            columns = {
                "saturation": stats.saturation,
                "mean": stats.mean,
                "saturated_units": stats.saturated_unit_fraction(self.unit_threshold),
                "sigma_prime": stats.sigma_prime,
            }
            has_positions = stats.positions > 0
            for row, row_name in enumerate(gated.row_names()):
                if not bool(has_positions[row]):
                    continue
                for g, gate in enumerate(gated.gates):
                    key = f"{layer_path(gated.name)}/{row_name}/{gate}"
                    for metric, values in columns.items():
                        metrics[f"{FAMILY}/{metric}/{key}"] = float(values[row, g])
        self.last_metrics = metrics
        self.last_stats = probe.stats
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=probe.step)
        self._write_tensorboard(trainer, probe)

    def _write_tensorboard(self, trainer: pl.Trainer, probe: _Probe) -> None:
        loggers = tb.tensorboard_loggers(trainer)
        if not loggers:
            return
        new = self._log.unreported()
        for logger in loggers:
            for gated in self._gated:
                if gated.name not in probe.activation_counts:
                    continue
                activation = probe.activation_counts[gated.name]
                preact = probe.preact_counts[gated.name]
                for row, row_name in enumerate(gated.row_names()):
                    for g, gate in enumerate(gated.gates):
                        key = f"{layer_path(gated.name)}/{row_name}/{gate}"
                        low = -1.0 if gated.tanh_mask[g] else 0.0
                        counts = [int(c) for c in activation[row, g].tolist()]
                        tb.add_histogram(
                            logger, f"{FAMILY}/activation_hist/{key}", histogram_raw(counts, low, 1.0), probe.step
                        )
                        raw = tensorboard_histogram(preact[row * len(gated.gates) + g].long(), _PREACT_SPEC)
                        tb.add_histogram(logger, f"{FAMILY}/preact_hist/{key}", raw, probe.step)
            if new:
                tb.add_interventions(logger, FAMILY, new, probe.step)

    # ----------------------------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "streaks": dict(self._streaks),
            "last_surgery": dict(self._last_surgery),
            "surgeries": self.surgeries,
            "interventions": self._log.state_dict(),
            "warned": sorted(self._warned),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._streaks = {str(k): int(v) for k, v in state_dict["streaks"].items()}
        self._last_surgery = {str(k): int(v) for k, v in state_dict["last_surgery"].items()}
        self.surgeries = int(state_dict["surgeries"])
        self._log.load_state_dict(state_dict["interventions"])
        self._warned = {str(w) for w in state_dict["warned"]}


# ------------------------------------------------------------------------------------------------- validation


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
