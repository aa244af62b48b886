"""SharpnessCallback: loss-landscape curvature during training, and learning-rate control at the edge of stability."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
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
    refuse_sharded_strategy,
)
from lightning_gradflow.curvature import (
    DEFAULT_SCALES,
    SharpnessClass,
    StabilityRule,
    fixed_dropout,
    hessian_eigenvalues,
    hessian_trace,
    isolated,
    optimizer_preconditioner,
    preconditioned_batch_sharpness,
    preconditioned_sharpness,
    random_sharpness,
    sam_sharpness,
    stability_rule,
)
from lightning_gradflow.interventions import Intervention, InterventionLog, scale_learning_rate

if TYPE_CHECKING:
    import lightning.pytorch as pl

FAMILY = "sharpness"
_NAME = "SharpnessCallback"
METRICS: tuple[str, ...] = ("lambda_max", "lambda_min", "trace", "batch_sharpness", "sam", "random", "stability_ratio")
_CLASS_INDEX = {label: float(i) for i, label in enumerate(SharpnessClass)}


class SharpnessCallback(Callback):
    r"""Measures the curvature of the training loss and keeps the learning rate below the edge of stability.

    Every ``every_n_steps`` optimizer steps (see :meth:`should_compute`), right after the step (in
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

    **Control** (``auto_intervene=True``): when the ratio exceeds ``margin`` on ``patience`` consecutive probes, every
    learning rate is multiplied by ``lr_factor`` — scheduler-safe, through
    :func:`~lightning_gradflow.interventions.scale_learning_rate` (param groups and the schedulers' base values, so
    LambdaLR/OneCycleLR continue from the scaled values) — never below ``min_lr_factor`` of the original. With
    ``allow_increase`` it is raised again by ``1/lr_factor`` when the ratio stays below ``increase_below``, never above
    the original (the cumulative factor stays ≤ 1). Each change is an :class:`~lightning_gradflow.Intervention` with
    the first group's learning rate before and after. Without ``auto_intervene`` it warns once and records what it
    would do (``applied=False``); the run is bitwise unchanged.

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
    training steps, so the defaults (batch sharpness and the stability ratio every 200 steps) cost about 2 %. A cold
    λ_max estimate (≤ 20 exact products, early stop) costs 18-44 training steps (PyHessian's power iteration: 42-75,
    and 1-2 % less accurate); a warm one, 1-10 steps after the previous probe, 3-7 products or 5.5-14 training steps,
    within 0.1-1 % of a 40-product reference (``benchmarks/RESULTS.md`` §4). Other steps cost nothing.

    **torch.compile**: the probe runs the module eagerly (``torch.compiler.set_stance("force_eager")``): a compiled
    backward cannot be differentiated again (double backward), and the probe's perturbed weights would only cause
    recompilations. Should a probe still fail, the callback warns once and logs NaN instead of stopping training.

    Args:
        every_n_steps: optimizer steps between probes (step 0 is probed).
        metrics: which quantities to measure, from ``"lambda_max"``, ``"lambda_min"``, ``"trace"``,
            ``"batch_sharpness"``, ``"sam"``, ``"random"``, ``"stability_ratio"``.
        probe: ``"batch"`` (the current batch) or ``"fixed"`` (the first training batch, or :meth:`set_probe_batch`).
        stability_metric: what ``stability_ratio`` compares: ``"auto"`` (see above), ``"lambda_max"`` or
            ``"batch_sharpness"``.
        hvp: Hessian-vector products: ``"double_backward"`` (exact; on CUDA the probe runs with cuDNN disabled so RNNs
            have a double backward) or ``"finite_difference"`` (central differences of two gradients, no graph kept;
            runs the training kernels, e.g. fused attention; its step is relative to the scale of the parameter
            tensors each direction moves, see :class:`~lightning_gradflow.curvature.HessianVectorProduct`).
        num_hvps: the most Lanczos steps (products) of each λ_max/λ_min estimate. λ_max alone runs plain Lanczos
            (no reorthogonalisation, ``O(parameters)`` per step; with ``warm_start`` its vectors are kept to form the
            Ritz vector, ``O(products × parameters)`` memory); with ``"lambda_min"`` the basis is kept and fully
            reorthogonalised, which costs ``O(num_hvps × parameters)`` memory and time per step.
        lanczos_tol: stop a Lanczos run early once its estimate changes by less than this (relative) in one step;
            ``None``: always ``num_hvps`` products.
        warm_start: start each λ_max (and λ_min) estimate from the previous probe's top Ritz vector (see above).
        trace_hvps: products of each trace estimate (≥ 3).
        sam_rho: radius ρ of the SAM perturbation.
        sam_adaptive: use ASAM's scale-invariant perturbation.
        random_scales: relative perturbation sizes of ``random``.
        random_directions: random directions per scale.
        auto_intervene: scale the learning rate; otherwise only observe, warn and record.
        margin: the ratio above which a probe counts as unstable (> 0; 1 is the threshold itself).
        patience: consecutive unstable (or, for increases, calm) probes before acting.
        lr_factor: the multiplier of one decrease, in (0, 1).
        allow_increase: raise the learning rate again (by ``1/lr_factor``, up to the original) when the ratio stays
            below ``increase_below``.
        increase_below: the calm mark for ``allow_increase``, in (0, ``margin``).
        min_lr_factor: the cumulative factor is never taken below this, in (0, 1].
        seed: seed of the probes' own random streams (start vectors, probe directions, dropout masks).

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

    def __init__(
        self,
        every_n_steps: int = 200,
        metrics: Sequence[str] = ("batch_sharpness", "stability_ratio"),
        probe: Literal["batch", "fixed"] = "batch",
        stability_metric: Literal["auto", "lambda_max", "batch_sharpness"] = "auto",
        hvp: Literal["double_backward", "finite_difference"] = "double_backward",
        num_hvps: int = 20,
        lanczos_tol: float | None = 1e-3,
        warm_start: bool = True,
        trace_hvps: int = 30,
        sam_rho: float = 0.05,
        sam_adaptive: bool = False,
        random_scales: Sequence[float] = DEFAULT_SCALES,
        random_directions: int = 4,
        auto_intervene: bool = False,
        margin: float = 1.1,
        patience: int = 2,
        lr_factor: float = 0.5,
        allow_increase: bool = False,
        increase_below: float = 0.5,
        min_lr_factor: float = 1e-3,
        seed: int = 0,
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps)
        if isinstance(metrics, str) or not isinstance(metrics, Iterable):
            raise TypeError(f"Expected `metrics` to be a tuple of str, but got {metrics!r}.")
        metrics = tuple(metrics)
        if not all(isinstance(m, str) for m in metrics):
            raise TypeError(f"Expected `metrics` to be a tuple of str, but got {metrics!r}.")
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"Expected `metrics` to be a non-empty selection of {METRICS}, but got {tuple(metrics)}.")
        check_choice("probe", probe, ("batch", "fixed"))
        check_choice("stability_metric", stability_metric, ("auto", "lambda_max", "batch_sharpness"))
        check_choice("hvp", hvp, ("finite_difference", "double_backward"))
        check_positive_int("num_hvps", num_hvps)
        check_positive_float("lanczos_tol", lanczos_tol, allow_none=True)
        check_bool("warm_start", warm_start)
        check_positive_int("trace_hvps", trace_hvps)
        if trace_hvps < 3:
            raise ValueError(f"Expected `trace_hvps` >= 3 (Hutch++ needs three thirds), but got {trace_hvps}.")
        check_positive_float("sam_rho", sam_rho)
        check_bool("sam_adaptive", sam_adaptive)
        if isinstance(random_scales, str) or not isinstance(random_scales, Iterable):
            raise TypeError(f"Expected `random_scales` to be a non-empty tuple of floats, but got {random_scales!r}.")
        random_scales = tuple(random_scales)
        if not random_scales:
            raise TypeError(f"Expected `random_scales` to be a non-empty tuple of floats, but got {random_scales!r}.")
        for scale in random_scales:
            check_positive_float("random_scales", scale)
        check_positive_int("random_directions", random_directions)
        check_bool("auto_intervene", auto_intervene)
        check_positive_float("margin", margin)
        check_positive_int("patience", patience)
        check_float_in("lr_factor", lr_factor, 0.0, 1.0)
        check_bool("allow_increase", allow_increase)
        check_float_in("increase_below", increase_below, 0.0, float(margin))
        check_float_in("min_lr_factor", min_lr_factor, 0.0, 1.0, closed_high=True)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"Expected `seed` to be an int, but got {type(seed).__name__}: {seed!r}.")
        self.every_n_steps = every_n_steps
        self.metrics = tuple(dict.fromkeys(metrics))
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
        self.margin = float(margin)
        self.patience = patience
        self.lr_factor = float(lr_factor)
        self.allow_increase = allow_increase
        self.increase_below = float(increase_below)
        self.min_lr_factor = float(min_lr_factor)
        self.seed = seed
        self._log = InterventionLog(_NAME)
        self.cumulative_factor = 1.0
        self.last_metrics: dict[str, float] = {}  # the most recent probe's logged values
        self.last_rule: StabilityRule | None = None
        self._high_streak = 0
        self._low_streak = 0
        self._warned: set[str] = set()
        self._pending_step: int | None = None
        self._fixed_batch: Any = None
        self._user_batch = False
        # warm start: the last top Ritz vector and the (shapes, dtype, device) of the parameters it belongs to
        self._ritz_vector: Tensor | None = None
        self._ritz_key: tuple[Any, ...] | None = None

    @property
    def interventions(self) -> list[Intervention]:
        """Every learning-rate change made (or, without ``auto_intervene``, that would have been made)."""
        return self._log.records

    # ----------------------------------------------------------------------------------------------- lifecycle

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(metrics=self.metrics, probe=self.probe)

    def should_compute(self, step: int) -> bool:
        """Whether to probe after optimizer step ``step``; override for another schedule (must agree on all ranks)."""
        return step % self.every_n_steps == 0

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
            raise MisconfigurationException(
                f"{_NAME}: `training_step` returned {type(out).__name__}, not a scalar loss tensor (or a dict with"
                " one under 'loss'). Override `SharpnessCallback.loss_fn(pl_module, batch)` to return the loss."
            )
        return loss.reshape(())

    def set_probe_batch(self, batch: Any) -> None:
        """Use ``batch`` (on any device; it is moved to the module's) as the fixed probe batch (``probe="fixed"``)."""
        if self.probe != "fixed":
            raise MisconfigurationException(
                f"{_NAME}.set_probe_batch() needs `probe='fixed'`, but the callback has probe={self.probe!r}."
            )
        self._fixed_batch = batch
        self._user_batch = True

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, _NAME, reads="whole parameters and gradients")
        if not pl_module.automatic_optimization and type(self).loss_fn is SharpnessCallback.loss_fn:
            raise MisconfigurationException(
                f"{_NAME} calls `training_step` to get the loss, which under manual optimization would step the"
                " optimizer. Subclass it and override `loss_fn(pl_module, batch)` to return the loss without"
                " stepping, or use automatic optimization."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in tb.tensorboard_loggers(trainer):
            tb.add_layout_category(
                logger,
                FAMILY,
                {
                    "edge of stability: sharpness vs threshold": [
                        f"{FAMILY}/lambda_max",
                        f"{FAMILY}/batch_sharpness",
                        f"{FAMILY}/preconditioned",
                        f"{FAMILY}/threshold",
                    ],
                    "stability ratio (measured / threshold)": [f"{FAMILY}/stability_ratio"],
                    "smallest eigenvalue": [f"{FAMILY}/lambda_min"],
                    "trace (± stderr)": [f"{FAMILY}/trace"],
                    "SAM sharpness": [f"{FAMILY}/sam"],
                    "random-perturbation sharpness": [f"{FAMILY}/random/", f"{FAMILY}/class"],
                    "learning-rate factor": [f"{FAMILY}/lr_factor", f"{FAMILY}/interventions"],
                },
            )

    # --------------------------------------------------------------------------------------------------- probe

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # Once per optimizer step (after accumulation): remember which step this is; the probe runs after it.
        step = trainer.global_step
        self._pending_step = step if self.should_compute(step) else None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.probe == "fixed" and self._fixed_batch is None:
            self._fixed_batch = apply_to_collection(batch, Tensor, lambda t: t.detach().clone())
        step, self._pending_step = self._pending_step, None
        if step is None:
            return
        if not any(p.requires_grad for p in pl_module.parameters()):  # the same on every rank: no collective skipped
            self._warn_once(
                "no_parameters",
                f"{_NAME}: the module has no trainable parameters, so there is no curvature to measure; nothing is"
                " logged. Unfreeze parameters, or remove the callback.",
            )
            return
        probe_batch = batch if self.probe == "batch" else self._fixed_batch
        if self._user_batch and self.probe == "fixed":
            probe_batch = apply_to_collection(probe_batch, Tensor, lambda t: t.to(pl_module.device))
            self._fixed_batch, self._user_batch = probe_batch, False
        rule = self._rule(trainer)
        quantity = self._stability_quantity(trainer)
        try:
            measured = self._measure(trainer, pl_module, probe_batch, step, rule, quantity)
        except RuntimeError as error:  # never stop training from inside a hook: report NaN (same keys on every rank)
            self._ritz_vector = self._ritz_key = None
            self._warn_once(
                "failed",
                f"{_NAME}: the probe at step {step} failed ({type(error).__name__}: {error}); logging NaN. With"
                f" `hvp={self.hvp!r}`, try `hvp='finite_difference'` (no double backward: it works with kernels and"
                " compiled code that cannot be differentiated twice), or override `loss_fn` to run the model eagerly.",
            )
            measured = dict.fromkeys(self._keys(rule, quantity), math.nan)
        # One all-reduce: every rank logs and decides on the same numbers.
        names = list(measured)
        local = torch.tensor([measured[n] for n in names], dtype=torch.float64, device=pl_module.device)
        reduced = trainer.strategy.reduce(local, reduce_op="mean")
        values = dict(zip(names, reduced.cpu().tolist(), strict=True))
        metrics = self._metrics(values, rule, quantity)
        ratio = metrics.get(f"{FAMILY}/stability_ratio", math.nan)
        self._decide(trainer, step, ratio, rule, quantity, values)
        metrics[f"{FAMILY}/lr_factor"] = self.cumulative_factor
        metrics[f"{FAMILY}/interventions"] = float(sum(1 for r in self._log.records if r.applied))
        self.last_metrics = metrics
        self.last_rule = rule
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        new = self._log.unreported()
        if new:
            for logger in tb.tensorboard_loggers(trainer):
                tb.add_interventions(logger, FAMILY, new, step)

    def _rule(self, trainer: pl.Trainer) -> StabilityRule:
        if len(trainer.optimizers) != 1:
            rule = StabilityRule("unknown", math.nan, reason=f"{len(trainer.optimizers)} optimizers (need exactly 1)")
        else:
            rule = stability_rule(trainer.optimizers[0])
        if not rule.known and "stability_ratio" in self.metrics:
            self._warn_once(
                "unknown_rule",
                f"{_NAME}: {rule.reason}, so `sharpness/stability_ratio` is logged as NaN and the learning rate is"
                " never changed. The other sharpness metrics are still measured.",
            )
        return rule

    def _stability_quantity(self, trainer: pl.Trainer) -> str:
        if self.stability_metric != "auto":
            return self.stability_metric
        full_batch = trainer.num_training_batches == 1 and trainer.accumulate_grad_batches == 1
        return "lambda_max" if full_batch else "batch_sharpness"

    def _measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        step: int,
        rule: StabilityRule,
        quantity: str,
    ) -> dict[str, float]:
        """The probe's raw (local) values; every rank returns the same keys."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        seed = self.seed + step
        wanted = set(self.metrics)
        preconditioner = None
        if "stability_ratio" in wanted and rule.preconditioned:
            found = optimizer_preconditioner(trainer.optimizers[0], params)
            if found is None:
                self._warn_once("no_adam_state", f"{_NAME}: the optimizer has no second-moment state yet.")
            preconditioner = found
        out: dict[str, float] = {}

        def generator() -> torch.Generator:
            return torch.Generator().manual_seed(seed)

        with self._probe_context(pl_module, params, seed):
            loss = fixed_dropout(lambda: self._loss(pl_module, batch), seed)
            try:
                finite = bool(torch.isfinite(loss().detach()))
            except _SkippedBatchError:  # `training_step` returned None for this batch: nothing to measure
                self._warn_once("skipped", f"{_NAME}: `training_step` returned None on the probe batch; logging NaN.")
                return dict.fromkeys(self._keys(rule, quantity), math.nan)
            if not finite:  # a diverged run: report NaN (the same keys on every rank), never fail
                self._warn_once("nonfinite", f"{_NAME}: the probe loss is not finite at step {step}; logging NaN.")
                return dict.fromkeys(self._keys(rule, quantity), math.nan)
            if params and params[0].dtype in (torch.float16, torch.bfloat16):
                self._warn_once(
                    "half",
                    f"{_NAME}: the parameters are {params[0].dtype}, so the probe's Hessian-vector products are too"
                    " (finite differences in half precision are coarse); prefer `hvp='double_backward'` or train"
                    " with mixed precision (float32 weights).",
                )
            need_eig = bool(wanted & {"lambda_max", "lambda_min"}) or (
                "stability_ratio" in wanted and quantity == "lambda_max" and not rule.preconditioned
            )
            if need_eig:
                which: Literal["largest", "both"] = "both" if "lambda_min" in wanted else "largest"
                eig, vector = self._eigenvalues(loss, params, which, generator)
                out["lambda_max"] = float(eig[0])
                if which == "both":
                    out["lambda_min"] = float(eig[-1])
                self._keep_ritz_vector(params, vector if math.isfinite(out["lambda_max"]) else None)
            if "batch_sharpness" in wanted or (
                "stability_ratio" in wanted and quantity == "batch_sharpness" and not rule.preconditioned
            ):
                out["batch_sharpness"] = preconditioned_batch_sharpness(loss, params, None, self.hvp)
            if "stability_ratio" in wanted and rule.preconditioned:
                name = f"preconditioned_{quantity}"
                if preconditioner is None:
                    out[name] = math.nan
                elif quantity == "lambda_max":
                    out[name] = preconditioned_sharpness(
                        loss,
                        preconditioner[0],
                        preconditioner[1],
                        self.num_hvps,
                        hvp=self.hvp,
                        generator=generator(),
                        tol=self.lanczos_tol,
                        reorthogonalize=False,
                    )
                else:
                    out[name] = preconditioned_batch_sharpness(loss, preconditioner[0], preconditioner[1], self.hvp)
            if "trace" in wanted:
                estimate = hessian_trace(loss, params, self.trace_hvps, hvp=self.hvp, generator=generator())
                out["trace"], out["trace_stderr"] = estimate.value, estimate.stderr
            if "sam" in wanted:
                out["sam"] = sam_sharpness(loss, params, self.sam_rho, adaptive=self.sam_adaptive)
            if "random" in wanted:
                found_random = random_sharpness(
                    loss, params, self.random_scales, self.random_directions, generator=generator()
                )
                for scale, increase in found_random.increases.items():
                    out[f"random/{scale:g}"] = increase
                out["random_score"] = found_random.score
        return out

    def _eigenvalues(
        self,
        loss: Callable[[], Tensor],
        params: Sequence[Tensor],
        which: Literal["largest", "both"],
        generator: Callable[[], torch.Generator],
    ) -> tuple[Tensor, Tensor | None]:
        """λ_max (and λ_min) by Lanczos, warm-started; the top Ritz vector only with ``warm_start``."""
        options: dict[str, Any] = {
            "num_hvps": self.num_hvps,
            "hvp": self.hvp,
            "generator": generator(),
            "tol": self.lanczos_tol,
            "reorthogonalize": which == "both",  # λ_max alone needs no basis (see `lanczos`)
        }
        if not self.warm_start:  # no Lanczos vectors kept
            return hessian_eigenvalues(loss, params, 1, which, **options), None
        v0 = self._start_vector(params, which, generator())
        return hessian_eigenvalues(loss, params, 1, which, **options, v0=v0, return_vector=True)

    @staticmethod
    def _params_key(params: Sequence[Tensor]) -> tuple[Any, ...]:
        return (tuple(tuple(p.shape) for p in params), params[0].dtype, params[0].device) if params else ()

    def _start_vector(self, params: Sequence[Tensor], which: str, generator: torch.Generator) -> Tensor | None:
        """The warm start of the next Lanczos run: the last top Ritz vector (mixed with a random one for λ_min)."""
        vector = self._ritz_vector
        if not self.warm_start or vector is None or self._ritz_key != self._params_key(params):
            self._ritz_vector = self._ritz_key = None  # cold: nothing kept, or the parameters changed
            return None
        if which == "largest":
            return vector
        # λ_min too: equal parts of the old top vector and a random one (see the class docstring)
        noise = torch.randn(vector.numel(), generator=generator, dtype=vector.dtype).to(vector.device)
        return vector / torch.linalg.vector_norm(vector) + noise / torch.linalg.vector_norm(noise)

    def _keep_ritz_vector(self, params: Sequence[Tensor], vector: Tensor | None) -> None:
        if not self.warm_start or vector is None or not bool(torch.isfinite(vector).all()):
            self._ritz_vector = self._ritz_key = None
            return
        self._ritz_vector = vector.detach()
        self._ritz_key = self._params_key(params)

    def _keys(self, rule: StabilityRule, quantity: str) -> list[str]:
        """The raw keys :meth:`_measure` returns for this configuration (all ranks agree on them)."""
        wanted = set(self.metrics)
        ratio = "stability_ratio" in wanted
        keys = []
        if wanted & {"lambda_max", "lambda_min"} or (ratio and quantity == "lambda_max" and not rule.preconditioned):
            keys.append("lambda_max")
            if "lambda_min" in wanted:
                keys.append("lambda_min")
        if "batch_sharpness" in wanted or (ratio and quantity == "batch_sharpness" and not rule.preconditioned):
            keys.append("batch_sharpness")
        if ratio and rule.preconditioned:
            keys.append(f"preconditioned_{quantity}")
        if "trace" in wanted:
            keys += ["trace", "trace_stderr"]
        if "sam" in wanted:
            keys.append("sam")
        if "random" in wanted:
            keys += [f"random/{scale:g}" for scale in self.random_scales] + ["random_score"]
        return keys

    @contextlib.contextmanager
    def _probe_context(self, pl_module: pl.LightningModule, params: Sequence[Tensor], seed: int) -> Iterator[None]:
        device_type = pl_module.device.type
        cudnn_off = self.hvp == "double_backward" and device_type == "cuda"
        with (
            isolated(pl_module, params, seed=seed),
            torch.autocast(device_type=device_type, enabled=False),
            torch.backends.cudnn.flags(enabled=False) if cudnn_off else contextlib.nullcontext(),
            _eager(),
            _silenced_logging(pl_module),
        ):
            yield

    def _loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        loss = self.loss_fn(pl_module, batch)
        return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss

    def _metrics(self, values: dict[str, float], rule: StabilityRule, quantity: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, value in values.items():
            if name == "random_score":
                metrics[f"{FAMILY}/class"] = _CLASS_INDEX[SharpnessClass.of(value)] if math.isfinite(value) else value
            elif name in ("lambda_max", "lambda_min", "batch_sharpness") and name not in self.metrics:
                continue  # measured only for the stability ratio: logged through it
            else:
                metrics[f"{FAMILY}/{name}"] = value
        if "stability_ratio" in self.metrics:
            measured = values.get(f"preconditioned_{quantity}" if rule.preconditioned else quantity, math.nan)
            metrics[f"{FAMILY}/stability_ratio"] = rule.ratio(measured)
            metrics[f"{FAMILY}/threshold"] = rule.threshold
            if quantity not in self.metrics and not rule.preconditioned:
                metrics[f"{FAMILY}/{quantity}"] = measured
        return metrics

    # ------------------------------------------------------------------------------------------------- control

    def _decide(
        self,
        trainer: pl.Trainer,
        step: int,
        ratio: float,
        rule: StabilityRule,
        quantity: str,
        values: dict[str, float],
    ) -> None:
        if math.isnan(ratio) or not rule.settled:
            return
        self._high_streak = self._high_streak + 1 if ratio > self.margin else 0
        self._low_streak = self._low_streak + 1 if ratio < self.increase_below else 0
        measured = values.get(f"preconditioned_{quantity}" if rule.preconditioned else quantity, math.nan)
        what = f"{'preconditioned ' if rule.preconditioned else ''}{quantity} {measured:.4g}"
        if self._high_streak >= self.patience:
            self._high_streak = 0
            factor = max(self.lr_factor, self.min_lr_factor / self.cumulative_factor)
            reason = (
                f"stability ratio {ratio:.3g} > margin {self.margin:g} for {self.patience} probe(s): {what} vs"
                f" threshold {rule.threshold:.4g} ({rule.kind}, lr {rule.lr:.4g})"
            )
            if factor >= 1.0 - 1e-12:
                self._warn_once(
                    "floor",
                    f"{_NAME}: step {step}: {reason}, but the learning rate is already at `min_lr_factor="
                    f"{self.min_lr_factor:g}` of its original value; lower `min_lr_factor`, or look for the cause.",
                )
                return
            self._scale(trainer, step, factor, reason, finding="unstable")
        elif self.allow_increase and self._low_streak >= self.patience and self.cumulative_factor < 1.0:
            self._low_streak = 0
            factor = min(1.0 / self.lr_factor, 1.0 / self.cumulative_factor)
            reason = (
                f"stability ratio {ratio:.3g} < {self.increase_below:g} for {self.patience} probe(s): {what} vs"
                f" threshold {rule.threshold:.4g}; raising back toward the original learning rate"
            )
            self._scale(trainer, step, factor, reason, finding="calm")

    def _scale(self, trainer: pl.Trainer, step: int, factor: float, reason: str, finding: str) -> None:
        before = _first_lr(trainer)
        if not self.auto_intervene:
            if finding == "unstable" and "would_scale" not in self._warned:
                self._warn_once(
                    "would_scale",
                    f"{_NAME}: step {step}: {reason}. Training is past its edge of stability (expect oscillating or"
                    f" diverging loss). With `auto_intervene=True` {_NAME} would multiply the learning rate by"
                    f" {factor:g}; or lower it yourself.",
                )
                self._log.add(step, "lr_scale", "optimizer", reason, before, before * factor, applied=False)
            return
        scale_learning_rate(trainer.optimizers, trainer.lr_scheduler_configs, factor)
        self.cumulative_factor *= factor
        after = _first_lr(trainer)
        self._log.add(step, "lr_scale", "optimizer", f"{reason}; lr × {factor:g}", before, after)
        if finding == "unstable":
            self._warn_once(
                "scaled",
                f"{_NAME}: step {step}: {reason}. Learning rate multiplied by {factor:g} (cumulative"
                f" {self.cumulative_factor:g}); further changes are only listed in `interventions` and logged.",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)

    # ----------------------------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "cumulative_factor": self.cumulative_factor,
            "high_streak": self._high_streak,
            "low_streak": self._low_streak,
            "interventions": self._log.state_dict(),
            "warned": sorted(self._warned),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cumulative_factor = float(state_dict["cumulative_factor"])
        self._high_streak = int(state_dict["high_streak"])
        self._low_streak = int(state_dict["low_streak"])
        self._log.load_state_dict(state_dict["interventions"])
        self._warned = {str(w) for w in state_dict["warned"]}


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
