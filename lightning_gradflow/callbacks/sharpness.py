"""SharpnessCallback: loss-landscape curvature during training, and learning-rate control at the edge of stability.

A thin shell: what a probe measures is :class:`~lightning_gradflow.curvature.ProbePlan`, when the learning rate changes
is :class:`~lightning_gradflow.curvature.StabilityController`; here are the hooks, the probe's isolation from training,
the all-reduce, applying the factor and logging.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gradflow import tensorboard as tb
from lightning_gradflow.callbacks._base import HealthCallback, to_host
from lightning_gradflow.callbacks._common import check_positive_int, refuse_sharded_strategy, write_layout
from lightning_gradflow.checks import check_bool, check_choice, check_int
from lightning_gradflow.curvature import (
    DEFAULT_INCREASE_BELOW,
    DEFAULT_LR_FACTOR,
    DEFAULT_MARGIN,
    DEFAULT_MIN_LR_FACTOR,
    DEFAULT_PATIENCE,
    DEFAULT_SCALES,
    METRICS,
    ProbePlan,
    StabilityController,
    StabilityDecision,
    StabilityRule,
    WarmStart,
    fixed_dropout,
    isolated,
    optimizer_preconditioner,
    stability_rule,
)
from lightning_gradflow.interventions import InterventionLog, scale_learning_rate
from lightning_gradflow.reports.sharpness import (
    FAMILY,
    NO_GRAPH_MESSAGE,
    NO_PARAMETERS_MESSAGE,
    at_floor_message,
    half_precision_message,
    manual_optimization_message,
    not_a_loss_message,
    probe_failed_message,
    scaled_message,
    sharpness_metrics,
    stability_detail,
    unknown_rule_message,
    would_scale_message,
)
from lightning_gradflow.schedule import ProbeSchedule

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_gradflow.channel import Event

__all__ = ["FAMILY", "MAX_SEED", "METRICS", "SharpnessCallback"]

#: The largest ``seed``: the probe at step ``t`` seeds torch with ``seed + t``, which must stay below ``2**64``.
MAX_SEED = 2**63 - 1
#: The adaptive schedule's dense windows: a probe every 10 steps for the first 50 optimizer steps and for the 50 after
#: a learning-rate change (made or, without ``auto_intervene``, proposed), where instability shows first.
_DENSE_EVERY, _DENSE_STEPS = 10, 50


def _setting(name: str) -> Any:
    """A read-only property for one of the controller's settings, under the constructor argument's name."""
    return property(lambda self: getattr(self.controller, name), doc="See the constructor.")


class SharpnessCallback(HealthCallback):
    r"""Measures the curvature of the training loss and keeps the learning rate below the edge of stability.

    At the probe steps of :attr:`schedule` (see :meth:`should_compute`), right after the optimizer step (in
    ``on_train_batch_end``, where gradients are enabled; validation runs under inference mode), the callback evaluates
    the training loss on a **probe batch** — the current batch (``probe="batch"``; under gradient accumulation the last
    micro-batch of the step) or a fixed one (``probe="fixed"``: the first training batch, kept on the device, or one
    given with :meth:`set_probe_batch`) — at the new weights and logs, as chosen in ``metrics``:

    * ``lambda_max`` → ``sharpness/lambda_max``: the largest Hessian eigenvalue (Lanczos, ``num_hvps`` products);
    * ``lambda_min`` → ``sharpness/lambda_min``: the smallest (same Lanczos run; negative = non-convex directions);
    * ``trace`` → ``sharpness/trace`` and ``sharpness/trace_stderr`` (Hutch++, ``trace_hvps`` products);
    * ``batch_sharpness`` → ``sharpness/batch_sharpness``: ``gᵀHg/‖g‖²``, the curvature along the gradient;
    * ``sam`` → ``sharpness/sam``: ``L(w + ρ g/‖g‖) − L(w)`` (``sam_rho``; ASAM's step with ``sam_adaptive``);
    * ``random`` → ``sharpness/random/<scale>`` (mean loss increase under filter-normalised random perturbations of
      relative size ``<scale>``) and ``sharpness/class`` (0 flat, 1 moderate, 2 sharp, 3 very sharp:
      :class:`~lightning_gradflow.curvature.SharpnessClass`);
    * ``stability_ratio`` → ``sharpness/stability_ratio`` = measured / threshold, with ``sharpness/threshold`` and,
      for Adam, ``sharpness/preconditioned_lambda_max`` or ``sharpness/preconditioned_batch_sharpness``.

    Every probe also logs ``sharpness/lr_factor`` (the cumulative learning-rate factor applied so far) and
    ``sharpness/interventions``. Definitions and accuracy: :mod:`lightning_gradflow.curvature`.

    **Schedule** (:attr:`schedule`, a :class:`~lightning_gradflow.schedule.ProbeSchedule`): a learning rate too high
    for the curvature shows in the first steps, and again after the learning rate changes, so the callback probes
    every 10 steps during the first 50 optimizer steps and the 50 after a learning-rate change (made, or proposed
    without ``auto_intervene``), and otherwise at intervals that double after each probe up to ``every_n_steps``
    (steps 0, 10, 20, 30, 40, 50, 70, 110, 190, 350, 550, … with the default 200). ``adaptive_schedule=False`` (or
    ``every_n_steps`` ≤ 10) gives the fixed schedule ``step % every_n_steps == 0``.

    **Hessian-vector products** (``hvp="auto"``, the default): exact double-backward products, computed with
    PyTorch's math attention kernel (the fused ``scaled_dot_product_attention`` kernels of ``nn.TransformerEncoder``,
    ``nn.MultiheadAttention`` and Hugging Face SDPA attention have no double backward) and, on CUDA, cuDNN off. When
    the model still has no double backward (``nn.EmbeddingBag(sparse=True)``, reentrant
    ``torch.utils.checkpoint``, custom autograd functions), the first probe of the fit says so once and every probe
    uses finite differences, which need only what ``loss.backward()`` needs and shrink their step where a ReLU kink
    would bias them (:class:`~lightning_gradflow.curvature.HessianVectorProduct`).

    **Stability** (the edge of stability, Cohen et al. 2021 and 2022): which measured quantity is compared with
    which threshold, from the optimizer (:func:`~lightning_gradflow.curvature.stability_rule`) and
    ``stability_metric``:

    * SGD: ``2/η − wd``, against λ_max or batch sharpness of the loss (``wd``: coupled weight decay, which adds
      ``wd · I`` to the Hessian the update sees);
    * SGD with momentum β and dampening d: ``(2 + 2β)/(η(1 − d)) − wd``, same quantities;
    * SGD with Nesterov momentum β: ``(2 + 2β)/((1 + 2β)η) − wd``, same quantities;
    * Adam / AdamW with β₁: ``(2 + 2β₁)/((1 − β₁)η)`` (38/η for β₁ = 0.9), against the same quantity
      *preconditioned* by Adam's ``P = (1 − β₁ᵗ)(√v̂ + ε)`` from its optimizer state: ``λ_max(P⁻¹H)``, or
      ``uᵀHu/gᵀu`` with ``u = P⁻¹g`` (logged as ``sharpness/preconditioned_...``);
    * any other optimizer, several optimizers, or param groups that differ in learning rate or momentum: no
      threshold; the ratio is NaN and a warning says so once (the other metrics are still measured).

    ``stability_metric="auto"`` uses λ_max when every optimizer step sees the whole training set (one batch per
    epoch, no accumulation: full-batch gradient descent, where λ_max settles at the threshold) and **batch
    sharpness** otherwise: with minibatches the full-batch λ_max stays below ``2/η`` while what stabilises at it is the
    curvature along the minibatch gradient (Andreyev & Beneventano 2024, "Edge of stochastic stability"); λ_max of one
    minibatch's loss sits above the threshold even in stable training, and would make the controller cut the
    learning rate needlessly. The learning rate is the one of the next step (read after the scheduler's step). For
    Adam the ratio is logged from the start but acted on only after ``1/(1 − β₁)`` steps (10 for β₁ = 0.9): before,
    the momentum the threshold is derived for has not built up and the preconditioner changes fast.

    **Control** (``auto_intervene=True``), decided by :class:`~lightning_gradflow.curvature.StabilityController`:
    when the ratio exceeds ``margin`` on ``patience`` consecutive probes, every learning rate is multiplied by
    ``lr_factor`` — scheduler-safe, through :func:`~lightning_gradflow.interventions.scale_learning_rate` (param groups
    and the schedulers' base values, so LambdaLR/OneCycleLR continue from the scaled values) — never below
    ``min_lr_factor`` of the original. With ``allow_increase`` it is raised again by ``1/lr_factor`` when the ratio
    stays below ``increase_below``, never above the original (the cumulative factor stays ≤ 1). Each change is an
    :class:`~lightning_gradflow.Intervention` with the first group's learning rate before and after. Without
    ``auto_intervene`` it warns once and records what it would do (``applied=False``); the run is bitwise unchanged.
    The cumulative factor belongs to one fit: a second ``fit()`` of the same instance (whose optimizers start from
    ``configure_optimizers`` again) starts at 1, a fit resumed from a checkpoint continues from the saved factor.

    **Rollbacks**: the callback takes part in the trainer's channel
    (:class:`~lightning_gradflow.channel.StepChannel`): when another callback (EarlyCollapseCallback) rolls the
    optimizer back to a snapshot, this callback's factor and streaks return to what they were when the snapshot was
    taken, so ``cumulative_factor``, the logged ``sharpness/lr_factor`` and the ``min_lr_factor`` floor match the
    restored learning rates.

    **Never breaks the run**: a probe that cannot measure (``training_step`` returned None, a non-finite loss, a loss
    without a graph, an error inside the products) logs NaN with one warning naming the reason; a logger that raises
    is warned about once and skipped. A loss that is linear in the weights has a zero Hessian: λ = 0 is logged. Sparse
    gradients (``nn.Embedding(sparse=True)``) are made dense inside the probe, so every metric is exact for them.

    **What a probe does to training: nothing.** It runs under
    :func:`~lightning_gradflow.curvature.isolated` (weights, ``.grad``, buffers such as BatchNorm statistics, and
    the RNG restored bit for bit), in float32 outside autocast, with the model in training mode and dropout masks held
    fixed within a probe (:func:`~lightning_gradflow.curvature.fixed_dropout`). The loss is :meth:`loss_fn`: by default
    ``pl_module.training_step(batch, 0)`` (its ``"loss"`` when it returns a dict) with ``self.log`` silenced; override
    :meth:`loss_fn` when ``training_step`` has other side effects or uses manual optimization.

    **Distributed**: every rank probes its own batch at the same step; the measured values are averaged across ranks
    in one all-reduce before they are logged or decided on, so every DDP rank makes the same change at the same step.
    Sharded strategies (FSDP, DeepSpeed) are refused.

    **Warm start** (``warm_start=True``): the top Hessian eigenvector changes slowly between probes, so each λ_max
    Lanczos run starts from the previous probe's top Ritz vector instead of a random vector, and the early stop
    (``lanczos_tol``) ends it after a few products (3-4 instead of 6-9 on the test models; it helps most with the same
    probe loss at every probe, ``probe="fixed"`` or full batch: another minibatch has another top eigenvector). The
    vector is kept flat, detached, on the module's device (one copy of the parameters; while a run goes, its Lanczos
    vectors are kept to form it, ``O(products × parameters)``), dropped when the parameters' shapes, dtype or device
    change or an estimate is not finite, and not saved in ``state_dict`` (after a resume the first probe starts cold).
    With ``"lambda_min"`` too, the early stop waits for λ_min as well, which the old top vector does not help, so the
    warm start saves few products there; the start is the old vector plus an equal-norm random vector, because a start
    close to the top eigenvector has almost no weight on the bottom eigenvectors, and λ_min could then look converged
    before it is. Adam's preconditioned λ_max (``stability_ratio`` with Adam, full batch) always starts cold.

    **Cost** (``benchmarks/sharpness.py``, CPU, one thread, models of 2-4 M parameters): batch sharpness costs 3-4
    training steps, so the defaults (batch sharpness and the stability ratio; 8 probes in the first 200 steps, then
    one every 200) cost about 15 % of the first 200 steps and 2 % after. ``hvp="auto"`` spends one trial (an exact
    and a finite-difference product, about 5 training steps) at the first probe of a fit. A cold
    λ_max estimate (≤ 20 exact products, early stop) costs 18-44 training steps (PyHessian's power iteration: 42-75,
    and 1-2 % less accurate); a warm one, 1-10 steps after the previous probe, 3-7 products or 5.5-14 training steps,
    within 0.1-1 % of a 40-product reference (``benchmarks/RESULTS.md`` §4). Other steps cost nothing.

    **torch.compile**: the probe runs the module eagerly (``torch.compiler.set_stance("force_eager")``): a compiled
    backward cannot be differentiated again (double backward), and the probe's perturbed weights would only cause
    recompilations. Should a probe still fail, the callback warns once and logs NaN instead of stopping training.

    Args:
        every_n_steps: the longest interval between probes, in optimizer steps (step 0 is probed); with
            ``adaptive_schedule=False``, the fixed interval.
        metrics: which quantities to measure, from ``"lambda_max"``, ``"lambda_min"``, ``"trace"``,
            ``"batch_sharpness"``, ``"sam"``, ``"random"``, ``"stability_ratio"``.
        probe: ``"batch"`` (the current batch) or ``"fixed"`` (the first training batch, or :meth:`set_probe_batch`).
        stability_metric: what ``stability_ratio`` compares: ``"auto"`` (see above), ``"lambda_max"`` or
            ``"batch_sharpness"``.
        hvp: Hessian-vector products: ``"auto"`` (exact when the model has a double backward, finite differences
            otherwise, said once; see above), ``"double_backward"`` (exact, with the math attention kernel and, on
            CUDA, cuDNN disabled so RNNs have a double backward) or ``"finite_difference"`` (central differences of two
            gradients, no graph kept; runs the training kernels; its step is relative to the scale of the parameter
            tensors each direction moves and shrinks at kinks, see
            :class:`~lightning_gradflow.curvature.HessianVectorProduct`).
        num_hvps: the most Lanczos steps (products) of each λ_max/λ_min estimate, in ``[1, 10000]``
            (:data:`~lightning_gradflow.curvature.MAX_HVPS`). λ_max alone runs plain Lanczos (no
            reorthogonalisation, ``O(parameters)`` per step; with ``warm_start`` its vectors are kept to form the
            Ritz vector, ``O(products × parameters)`` memory); with ``"lambda_min"`` the basis is kept and fully
            reorthogonalised, which costs ``O(num_hvps × parameters)`` memory and time per step.
        lanczos_tol: stop a Lanczos run early once its estimate changes by less than this (relative) in one step;
            ``None``: always ``num_hvps`` products.
        warm_start: start each λ_max (and λ_min) estimate from the previous probe's top Ritz vector (see above).
        trace_hvps: products of each trace estimate, in ``[3, 10000]``.
        sam_rho: radius ρ of the SAM perturbation, in ``(0, 1000]``
            (:data:`~lightning_gradflow.curvature.MAX_PERTURBATION`).
        sam_adaptive: use ASAM's scale-invariant perturbation.
        random_scales: relative perturbation sizes of ``random``, each in ``(0, 1000]``.
        random_directions: random directions per scale, in ``[1, 10000]``
            (:data:`~lightning_gradflow.curvature.MAX_DIRECTIONS`).
        auto_intervene: scale the learning rate; otherwise only observe, warn and record.
        margin: the ratio above which a probe counts as unstable (> 0; 1 is the threshold itself).
        patience: consecutive unstable (or, for increases, calm) probes before acting.
        lr_factor: the multiplier of one decrease, in (0, 1).
        allow_increase: raise the learning rate again (by ``1/lr_factor``, up to the original) when the ratio stays
            below ``increase_below``.
        increase_below: the calm mark for ``allow_increase``, in (0, ``margin``).
        min_lr_factor: the cumulative factor is never taken below this, in (0, 1].
        adaptive_schedule: probe densely at the start and after a learning-rate change, sparsely otherwise (see
            above).
        seed: seed of the probes' own random streams (start vectors, probe directions, dropout masks), in
            ``[0, 2**63 - 1]`` (the probe at step ``t`` seeds with ``seed + t``, which torch needs below ``2**64``).

    Raises:
        TypeError: for an argument of the wrong type.
        ValueError: for an out-of-range argument or an unknown metric name.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_gradflow.callbacks.sharpness import SharpnessCallback
        >>> callback = SharpnessCallback(every_n_steps=200, metrics=("lambda_max", "stability_ratio"),
        ...                              auto_intervene=True)
        >>> trainer = Trainer(callbacks=[callback], logger=False, max_steps=1)

    In a LightningCLI YAML::

        trainer:
          callbacks:
            - class_path: lightning_gradflow.callbacks.sharpness.SharpnessCallback
              init_args: {every_n_steps: 200, metrics: [lambda_max, trace, stability_ratio], auto_intervene: true}
    """

    family = FAMILY

    def __init__(
        self,
        every_n_steps: int = 200,
        metrics: Sequence[str] = ("batch_sharpness", "stability_ratio"),
        probe: Literal["batch", "fixed"] = "batch",
        stability_metric: Literal["auto", "lambda_max", "batch_sharpness"] = "auto",
        hvp: Literal["auto", "double_backward", "finite_difference"] = "auto",
        num_hvps: int = 20,
        lanczos_tol: float | None = 1e-3,
        warm_start: bool = True,
        trace_hvps: int = 30,
        sam_rho: float = 0.05,
        sam_adaptive: bool = False,
        random_scales: Sequence[float] = DEFAULT_SCALES,
        random_directions: int = 4,
        auto_intervene: bool = False,
        margin: float = DEFAULT_MARGIN,
        patience: int = DEFAULT_PATIENCE,
        lr_factor: float = DEFAULT_LR_FACTOR,
        allow_increase: bool = False,
        increase_below: float = DEFAULT_INCREASE_BELOW,
        min_lr_factor: float = DEFAULT_MIN_LR_FACTOR,
        seed: int = 0,
        adaptive_schedule: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("every_n_steps", every_n_steps)
        if isinstance(metrics, str) or not isinstance(metrics, Iterable):
            raise TypeError(f"Expected `metrics` to be a tuple of str, but got {metrics!r}.")
        metrics = tuple(metrics)
        if not all(isinstance(m, str) for m in metrics):
            raise TypeError(f"Expected `metrics` to be a tuple of str, but got {metrics!r}.")
        check_choice("probe", probe, ("batch", "fixed"))
        check_choice("stability_metric", stability_metric, ("auto", "lambda_max", "batch_sharpness"))
        check_choice("hvp", hvp, ("auto", "finite_difference", "double_backward"))
        check_bool("adaptive_schedule", adaptive_schedule)
        check_bool("warm_start", warm_start)
        if isinstance(random_scales, str) or not isinstance(random_scales, Iterable):
            raise TypeError(f"Expected `random_scales` to be a non-empty tuple of floats, but got {random_scales!r}.")
        #: what a probe measures, and how (pure; validates `num_hvps` ... `random_directions` against their bounds)
        self._plan_template = ProbePlan(
            tuple(dict.fromkeys(metrics)),
            hvp=hvp,
            num_hvps=num_hvps,
            lanczos_tol=lanczos_tol,
            trace_hvps=trace_hvps,
            sam_rho=sam_rho,
            sam_adaptive=sam_adaptive,
            random_scales=tuple(random_scales),
            random_directions=random_directions,
        )
        check_bool("auto_intervene", auto_intervene)
        #: the learning-rate decisions (pure; validates `margin` ... `min_lr_factor`)
        self.controller = StabilityController(
            margin, patience, lr_factor, allow_increase, increase_below, min_lr_factor
        )
        check_int("seed", seed, 0, MAX_SEED, "torch seeds each probe with `seed + step`, below 2**64")
        self.every_n_steps = every_n_steps
        self.metrics = self._plan_template.metrics
        self.probe = probe
        self.stability_metric = stability_metric
        self.hvp = hvp
        self.num_hvps = num_hvps
        self.lanczos_tol = None if lanczos_tol is None else float(lanczos_tol)
        self.warm_start = warm_start
        self.trace_hvps = trace_hvps
        self.sam_rho = float(sam_rho)
        self.sam_adaptive = sam_adaptive
        self.random_scales = tuple(float(s) for s in random_scales)
        self.random_directions = random_directions
        self.auto_intervene = auto_intervene
        self.seed = seed
        self.adaptive_schedule = adaptive_schedule
        self.schedule = self._new_schedule()
        #: the product method of this fit's probes: ``hvp``, or what ``"auto"`` resolved to at the first probe
        self.hvp_method: str | None = None if hvp == "auto" else hvp
        self.last_rule: StabilityRule | None = None
        self._pending_step: int | None = None
        self._user_batch: Any = None  # given with `set_probe_batch`, kept across fits
        self._fixed_batch: Any = None  # this fit's fixed probe batch, on the module's device
        self._exact_error: str | None = None  # why `hvp="auto"` fell back to finite differences
        self._warm = WarmStart()  # warm start: the last top Ritz vector (not saved in checkpoints)
        self._fit_start_state = self.controller.state_dict()

    # the controller's settings, under the names of the constructor arguments
    margin = _setting("margin")
    patience = _setting("patience")
    lr_factor = _setting("lr_factor")
    allow_increase = _setting("allow_increase")
    increase_below = _setting("increase_below")
    min_lr_factor = _setting("min_lr_factor")

    @property
    def cumulative_factor(self) -> float:
        """The product of every learning-rate factor applied in this fit (1: the learning rates as configured)."""
        return self.controller.cumulative_factor

    # ----------------------------------------------------------------------------------------------- lifecycle

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(metrics=self.metrics, probe=self.probe)

    def _new_schedule(self) -> ProbeSchedule:
        adaptive = self.adaptive_schedule and self.every_n_steps > _DENSE_EVERY
        return ProbeSchedule(self.every_n_steps, _DENSE_EVERY, _DENSE_STEPS, adaptive=adaptive)

    def should_compute(self, step: int) -> bool:
        """Whether to probe after optimizer step ``step`` (:attr:`schedule`); advances the adaptive schedule.

        Override for another schedule (it must agree on all ranks).
        """
        return self.schedule.due(step)

    def loss_fn(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        """The scalar loss whose curvature is measured, recomputed from the current weights.

        Default: ``pl_module.training_step(batch, 0)``, or its ``"loss"`` entry when it returns a mapping. Called
        with the module's ``log``/``log_dict`` silenced. Override it when ``training_step`` has other side effects
        (appends to lists, counters) or the module uses manual optimization.
        """
        out = pl_module.training_step(batch, 0)
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if loss is None:
            raise _SkippedBatchError
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise MisconfigurationException(not_a_loss_message(self.name, out))
        return loss.reshape(())

    def set_probe_batch(self, batch: Any) -> None:
        """Use ``batch`` (on any device; it is moved to the module's) as the fixed probe batch (``probe="fixed"``)."""
        if self.probe != "fixed":
            raise MisconfigurationException(
                f"{self.name}.set_probe_batch() needs `probe='fixed'`, but the callback has probe={self.probe!r}."
            )
        self._user_batch = batch
        self._fixed_batch = None

    @override
    def _reset_fit_state(self) -> None:
        # a new fit builds its optimizers from `configure_optimizers`: the learning rates are the configured ones
        self.controller.reset()
        self.schedule.reset()
        self.hvp_method = None if self.hvp == "auto" else self.hvp
        self._exact_error = None
        self.last_rule = None
        self._pending_step = None
        self._fixed_batch = None
        self._warm.clear()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        refuse_sharded_strategy(trainer, self.name, reads="whole parameters and gradients")
        if not pl_module.automatic_optimization and type(self).loss_fn is SharpnessCallback.loss_fn:
            raise MisconfigurationException(manual_optimization_message(self.name))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # joins the channel: rollbacks hand back `rollback_state()`
        self._fit_start_state = self.controller.state_dict()  # after a checkpoint restore: this fit's start

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        write_layout(self, trainer, tb.SHARPNESS_CHARTS, 0)

    # --------------------------------------------------------------------------------------------------- probe

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # Once per optimizer step (after accumulation): remember which step this is; the probe runs after it.
        # (Two optimizers under manual optimization step twice per batch: a probe is due if either step asks for it.)
        step = trainer.global_step
        if self.should_compute(step):
            self._pending_step = step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.probe == "fixed" and self._fixed_batch is None:
            source = batch if self._user_batch is None else self._user_batch
            self._fixed_batch = apply_to_collection(source, Tensor, lambda t: t.detach().clone().to(pl_module.device))
        step, self._pending_step = self._pending_step, None
        if step is None:
            return
        if not any(p.requires_grad for p in pl_module.parameters()):  # the same on every rank: no collective skipped
            self._warn_once("no_parameters", NO_PARAMETERS_MESSAGE)
            return
        rule = self._rule(trainer)
        plan = self._plan(trainer, rule)
        measured = self._measure(trainer, pl_module, batch if self.probe == "batch" else self._fixed_batch, step, plan)
        # One all-reduce, one transfer: every rank logs and decides on the same numbers.
        names = list(dict.fromkeys(plan.keys()))
        local = torch.tensor([measured.get(n, math.nan) for n in names], dtype=torch.float64, device=pl_module.device)
        reduced = to_host({"values": local}, reduce=partial(trainer.strategy.reduce, reduce_op="mean"))["values"]
        values = dict(zip(names, reduced.tolist(), strict=True))
        metrics = sharpness_metrics(values, self.metrics, rule, plan)
        ratio = metrics.get(f"{FAMILY}/stability_ratio", math.nan)
        self._control(trainer, step, ratio, stability_detail(values, rule, plan), rule)
        metrics[f"{FAMILY}/lr_factor"] = self.cumulative_factor
        metrics[f"{FAMILY}/interventions"] = float(sum(1 for r in self._log.records if r.applied))
        self.last_rule = rule
        self._log_metrics(trainer, metrics, step)
        new = self._log.unreported()
        for logger in tb.tensorboard_loggers(trainer) if new else ():
            self._tensorboard(
                trainer, "add_interventions", partial(tb.add_interventions, logger, FAMILY, new, step), step
            )

    def _rule(self, trainer: pl.Trainer) -> StabilityRule:
        if len(trainer.optimizers) != 1:
            rule = StabilityRule("unknown", math.nan, reason=f"{len(trainer.optimizers)} optimizers (need exactly 1)")
        else:
            rule = stability_rule(trainer.optimizers[0])
        if not rule.known and "stability_ratio" in self.metrics:
            self._warn_once("unknown_rule", unknown_rule_message(rule.reason))
        return rule

    def _plan(self, trainer: pl.Trainer, rule: StabilityRule) -> ProbePlan:
        quantity = self.stability_metric
        if quantity == "auto":
            full_batch = trainer.num_training_batches == 1 and trainer.accumulate_grad_batches == 1
            quantity = "lambda_max" if full_batch else "batch_sharpness"
        return dataclasses.replace(self._plan_template, quantity=quantity, preconditioned=rule.preconditioned)

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int, plan: ProbePlan
    ) -> dict[str, float]:
        """The probe's raw (local) values; NaN for each when nothing can be measured; never raises (but for setup)."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        seed = self.seed + step
        preconditioner = None
        if "stability_ratio" in self.metrics and plan.preconditioned:
            preconditioner = optimizer_preconditioner(trainer.optimizers[0], params)
            if preconditioner is None:
                self._warn_once("no_adam_state", "the optimizer has no second-moment state yet.")
        try:
            with self._probe_context(pl_module, params, seed):
                loss = fixed_dropout(lambda: self._loss(pl_module, batch), seed)
                if not self._measurable(loss, params, step):
                    return plan.nan()
                plan = self._resolved(plan, loss, params)
                return plan.measure(loss, params, seed, preconditioner, self._warm if self.warm_start else None)
        except MisconfigurationException:
            raise
        except _SkippedBatchError:  # `training_step` returned None for this batch: nothing to measure
            self._warn_once("skipped", "`training_step` returned None on the probe batch; logging NaN.")
            return plan.nan()
        except Exception as error:  # never stop training from inside a hook: report NaN (same keys on every rank)
            self._warm.clear()
            if self._exact_error is not None and plan.hvp == "finite_difference":
                self._warn_once("failed", neither_works_message(step, self._exact_error, error))
            else:
                self._warn_once("failed", probe_failed_message(step, error, plan.hvp))
            return plan.nan()

    def _resolved(self, plan: ProbePlan, loss: Callable[[], Tensor], params: Sequence[Tensor]) -> ProbePlan:
        """``plan`` with this fit's product method.

        ``hvp="auto"`` is resolved at the fit's first probe (one trial product); a fallback to finite differences
        is said once.
        """
        if self.hvp_method is None:
            resolved, error = plan.resolve(loss, params)
            self.hvp_method = resolved.hvp
            if error is not None:
                self._exact_error = f"{type(error).__name__}: {error}"
                self._warn_once("finite_difference", finite_difference_message(self._exact_error))
        return dataclasses.replace(plan, hvp=self.hvp_method)  # type: ignore[arg-type]

    def _measurable(self, loss: Callable[[], Tensor], params: Sequence[Tensor], step: int) -> bool:
        """Evaluates the probe loss once; warns (once per reason) and returns False when nothing can be measured.

        Raises:
            _SkippedBatchError: ``training_step`` returned None for the probe batch.
        """
        value = loss()
        if not bool(torch.isfinite(value.detach())):  # a diverged run: report NaN, never fail
            self._warn_once("nonfinite", f"the probe loss is not finite at step {step}; logging NaN.")
            return False
        if not value.requires_grad:
            self._warn_once("no_graph", NO_GRAPH_MESSAGE)
            return False
        if params[0].dtype in (torch.float16, torch.bfloat16):
            self._warn_once("half", half_precision_message(params[0].dtype, self.hvp))
        return True

    @contextlib.contextmanager
    def _probe_context(self, pl_module: pl.LightningModule, params: Sequence[Tensor], seed: int) -> Iterator[None]:
        # (exact products turn cuDNN off and pick the math attention kernel themselves: `exact_kernels`)
        device_type = pl_module.device.type
        with (
            isolated(pl_module, params, seed=seed),
            torch.autocast(device_type=device_type, enabled=False),
            _eager(),
            _silenced_logging(pl_module),
        ):
            yield

    def _loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        loss = self.loss_fn(pl_module, batch)
        return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss

    # ------------------------------------------------------------------------------------------------- control

    def _control(self, trainer: pl.Trainer, step: int, ratio: float, detail: str, rule: StabilityRule) -> None:
        decision = self.controller.observe(ratio, rule.settled, detail)
        if decision is None:
            return
        if decision.at_floor:
            self._warn_once("floor", at_floor_message(step, decision.reason, self.min_lr_factor))
            return
        self._apply(trainer, step, decision)

    def _apply(self, trainer: pl.Trainer, step: int, decision: StabilityDecision) -> None:
        factor, reason = decision.factor, decision.reason
        before = _first_lr(trainer)
        self.schedule.found(step)  # a learning-rate change (made or proposed): probe densely again
        if not self.auto_intervene:
            if decision.finding == "unstable" and "would_scale" not in self._warned:
                self._warn_once("would_scale", would_scale_message(step, reason, self.name, factor))
                self._log.add(step, "lr_scale", "optimizer", reason, before, before * factor, applied=False)
            return
        scale_learning_rate(trainer.optimizers, trainer.lr_scheduler_configs, factor)
        self.controller.applied(factor)
        self._log.add(step, "lr_scale", "optimizer", f"{reason}; lr × {factor:g}", before, _first_lr(trainer))
        if decision.finding == "unstable":
            self._warn_once("scaled", scaled_message(step, reason, factor, self.cumulative_factor))

    # ------------------------------------------------------------------------------------------ rollbacks, state

    def rollback_state(self) -> dict[str, Any]:
        """What a snapshot keeps of this callback: the learning-rate factor it has applied, and the streaks."""
        return self.controller.state_dict()

    def restore_rollback_state(self, state: dict[str, Any] | None, event: Event) -> None:
        """After a rollback (e.g. by EarlyCollapseCallback), the factor of the restored optimizer and its streaks.

        ``state`` is what :meth:`rollback_state` returned when the snapshot was taken; ``None`` for a snapshot taken
        before this callback joined the channel, i.e. at the start of this fit.
        """
        self.controller.load_state_dict(self._fit_start_state if state is None else state)
        self.schedule.found(event.step)  # the restored learning rates may be unstable again: probe densely

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.controller.state_dict(),
            "schedule": self.schedule.state_dict(),
            "interventions": self._log.state_dict(),
            "warned": sorted(self._warned),
        }

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        controller = copy.copy(self.controller)
        controller.load_state_dict(state)  # validates the factor and the streaks
        log = InterventionLog(self.name)
        log.load_state_dict(state["interventions"])  # validates the records
        schedule = self._new_schedule()
        if "schedule" in state:  # absent in checkpoints written before the adaptive schedule: it starts afresh
            schedule.load_state_dict(state["schedule"])
        warned = state["warned"]
        if not isinstance(warned, (list, tuple, set)) or not all(isinstance(w, str) for w in warned):
            raise TypeError(f"Expected `warned` to be a list of str, but got {warned!r}.")
        self.controller, self._log, self._warned, self.schedule = controller, log, set(warned), schedule


def finite_difference_message(exact_error: str) -> str:
    """The warning of ``hvp="auto"`` falling back to finite differences (once per callback)."""
    return (
        f"the model has no double backward, even with PyTorch's math attention kernel ({exact_error}), so every"
        " probe uses finite-difference Hessian-vector products (two gradients each, step shrunk at ReLU kinks)."
        " Pass `hvp='finite_difference'` to choose them without this warning."
    )


def neither_works_message(step: int, exact_error: str, error: BaseException) -> str:
    """The warning of a probe for which neither exact nor finite-difference products work."""
    return (
        f"the probe at step {step} failed: the model has no double backward ({exact_error}), and the"
        f" finite-difference products, which only need `loss.backward()`, failed too ({type(error).__name__}:"
        f" {error}); logging NaN. The model fails at the probe's batch or perturbed weights: override `loss_fn`, or"
        " measure fewer `metrics`."
    )


class _SkippedBatchError(Exception):
    """``training_step`` returned ``None`` (Lightning's way to skip a batch)."""


def _first_lr(trainer: pl.Trainer) -> float:
    if not trainer.optimizers or not trainer.optimizers[0].param_groups:
        return math.nan
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    return float(lr.item()) if isinstance(lr, Tensor) else float(lr)


def _eager() -> contextlib.AbstractContextManager[Any]:
    """Runs ``torch.compile``-d code eagerly.

    A compiled backward has no double backward (donated buffers), and the probe's perturbed weights would only
    trigger recompilations.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _silenced_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """``pl_module.log``/``log_dict`` as no-ops (instance attributes shadowing the methods), restored afterwards."""

    def silent(*args: Any, **kwargs: Any) -> None:
        return None

    shadowed = {name: name in vars(pl_module) for name in ("log", "log_dict")}
    saved = {name: vars(pl_module)[name] for name, present in shadowed.items() if present}
    for name in shadowed:
        object.__setattr__(pl_module, name, silent)
    try:
        yield
    finally:
        for name in shadowed:
            if name in saved:
                object.__setattr__(pl_module, name, saved[name])
            else:
                object.__delattr__(pl_module, name)
