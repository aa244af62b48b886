"""Reliability audit (issue 12), SharpnessCallback: one test per defect, each on a tiny model.

1. sparse gradients: exact values (or one warning), not NaN at every probe;
3. a logger that raises once: one warning, training goes on;
4. constructor values that used to fail inside hooks (seed overflow, huge product or direction counts): refused at
   construction with the argument, the value and the bound;
8. a rollback by another callback: the callback's learning-rate factor follows the restored optimizer;
12. corrupt or changed checkpoint state: one clear error naming the callback and the checkpoint key;
13. messages that misled (half-precision and failure advice, a linear loss).
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_gradflow import EarlyCollapseCallback, curvature
from lightning_gradflow.callbacks.sharpness import MAX_SEED, SharpnessCallback
from lightning_gradflow.channel import Event, channel_for
from lightning_gradflow.curvature import MAX_DIRECTIONS, MAX_HVPS, MAX_PERTURBATION
from tests.helpers.collapse_models import ReluMLP, collapse_loader
from tests.helpers.sharpness_models import (
    DenseCurvature,
    LinearLoss,
    LinearRegression,
    ModuleLossSharpness,
    QuietMLP,
    SparseEmbedding,
    loader,
    regression_data,
    token_data,
    unstable_regression,
)
from tests.helpers.training import RecordingLogger, fit_recorded, messages_with, quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------- 1. sparse gradients


@pytest.mark.parametrize("optimizer", ["sgd", "sparse_adam"])
def test_sparse_gradients_give_exact_sharpness(optimizer: str) -> None:
    """``nn.Embedding(sparse=True)`` with SGD (automatic) and SparseAdam + Adam (manual optimization): λ_max, the
    trace and batch sharpness match the exact Hessian of the dense lookup, with no warning (today: NaN every probe)."""
    x, y = token_data(32)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    metrics = ("lambda_max", "batch_sharpness", "trace", "sam", "stability_ratio")
    # 45 parameters: 45 Lanczos steps and a full Hutch++ sketch are exact
    options: dict[str, Any] = {"every_n_steps": 1, "metrics": metrics, "num_hvps": 45, "lanczos_tol": None}
    options["trace_hvps"] = 135
    callback = SharpnessCallback(**options) if optimizer == "sgd" else ModuleLossSharpness(**options)
    oracle = DenseCurvature()
    steps = 2 if optimizer == "sgd" else 4  # two optimizers: two optimizer steps per batch
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger = fit_recorded(SparseEmbedding(optimizer), data, [callback, oracle], steps=steps)
    assert [
        m for m in messages_with(record, "SharpnessCallback") if "stability threshold" not in m
    ] == []  # SparseAdam: no known threshold
    for key in ("lambda_max", "trace", "batch_sharpness"):
        logged = logger.series(f"sharpness/{key}")
        assert len(logged) == 2 and list(logged) == list(oracle.exact), key
        for step, value in logged.items():
            assert value == pytest.approx(oracle.exact[step][key], rel=1e-4), (key, step)
    assert all(math.isfinite(v) for v in logger.series("sharpness/sam").values())


def test_sparse_gradients_leave_training_bitwise_identical() -> None:
    x, y = token_data(32)

    def run(callbacks: list[Any]) -> dict[str, Tensor]:
        model = SparseEmbedding("sgd")
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        quiet_trainer(max_steps=4, logger=False, callbacks=callbacks).fit(model, data)
        return model.state_dict()

    baseline = run([])
    watched = run([SharpnessCallback(every_n_steps=1, metrics=("lambda_max", "batch_sharpness", "sam"))])
    for name, value in baseline.items():
        assert torch.equal(value, watched[name]), name


# ----------------------------------------------------------------------------------- 3. a failing logger


class _FailsOnce(RecordingLogger):
    """Raises ``OSError`` the first time it is given the callback's metrics (a full disk, a dropped connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.failed and any(k.startswith("sharpness/") for k in metrics):
            self.failed = True
            raise OSError("No space left on device")
        super().log_metrics(metrics, step)


def test_a_logger_that_raises_once_is_warned_about_and_training_goes_on() -> None:
    x, y = regression_data()
    logger = _FailsOnce()
    with pytest.warns(RuntimeWarning, match="log_metrics raised OSError: No space left on device") as record:
        fit_recorded(LinearRegression(), loader(x, y), [SharpnessCallback(every_n_steps=1)], steps=3, logger=logger)
    assert len(messages_with(record, "raised OSError")) == 1
    assert list(logger.series("sharpness/batch_sharpness")) == [1, 2]  # the later probes are logged


# ---------------------------------------------------------------------- 4. values that failed inside hooks


@pytest.mark.parametrize(
    ("name", "value", "metrics", "bound"),
    [
        ("seed", 2**70, ("random", "trace", "lambda_max"), MAX_SEED),
        ("seed", -1, ("random",), MAX_SEED),
        ("trace_hvps", 10**30, ("trace",), MAX_HVPS),
        ("trace_hvps", MAX_HVPS + 1, ("trace",), MAX_HVPS),
        ("num_hvps", 10**30, ("lambda_max", "lambda_min"), MAX_HVPS),
        ("random_directions", 10**30, ("random",), MAX_DIRECTIONS),
        ("random_directions", MAX_DIRECTIONS + 1, ("random",), MAX_DIRECTIONS),
        ("sam_rho", 1e300, ("sam",), f"{MAX_PERTURBATION:g}"),
        ("random_scales", (0.01, 1e300), ("random",), f"{MAX_PERTURBATION:g}"),
    ],
)
def test_values_that_failed_inside_hooks_are_refused_at_construction(
    name: str, value: Any, metrics: tuple[str, ...], bound: Any
) -> None:
    """``seed=2**70`` overflowed ``torch.manual_seed`` in the hook, ``trace_hvps=10**30`` raised TypeError there,
    ``random_directions=10**30`` hung it and ``sam_rho=1e300`` overflowed the perturbation: each is refused with the
    argument, the value and the documented bound."""
    with pytest.raises(ValueError, match=rf"`{name}`") as error:
        SharpnessCallback(metrics=metrics, **{name: value})
    shown = value[-1] if isinstance(value, tuple) else value
    assert str(shown) in str(error.value) and str(bound) in str(error.value)


def test_the_largest_accepted_seed_trains_with_every_seeded_metric() -> None:
    x, y = regression_data()
    metrics = ("lambda_max", "lambda_min", "trace", "random", "batch_sharpness")
    callback = SharpnessCallback(every_n_steps=1, metrics=metrics, seed=MAX_SEED, random_directions=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger = fit_recorded(QuietMLP(), loader(x, y), [callback], steps=3)
    assert messages_with(record, "SharpnessCallback") == []
    assert all(math.isfinite(v) for v in logger.series("sharpness/trace").values())


# ---------------------------------------------------------------------------- 8. rollbacks by another callback


class _FactorWatch(Callback):
    """Per step: the factor the optimizer really has, and the one the SharpnessCallback believes in."""

    def __init__(self) -> None:
        self.actual: dict[int, float] = {}
        self.believed: dict[int, float] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.lr0 = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sharpness = next(c for c in trainer.callbacks if isinstance(c, SharpnessCallback))  # type: ignore[attr-defined]
        self.actual[trainer.global_step - 1] = trainer.optimizers[0].param_groups[0]["lr"] / self.lr0
        self.believed[trainer.global_step - 1] = sharpness.cumulative_factor


class _ChannelRollback(_FactorWatch):
    """What EarlyCollapseCallback's rollback does, through the channel: keep the optimizer, the weights and every
    participant's state at ``snapshot_step``; restore them at ``rollback_step``. List it after the SharpnessCallback.
    Records, per step, the factor the optimizer really has and the one the callback believes in."""

    def __init__(self, snapshot_step: int, rollback_step: int) -> None:
        super().__init__()
        self.snapshot_step, self.rollback_step = snapshot_step, rollback_step
        self.saved: Any = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step - 1
        channel = channel_for(trainer)
        if step == self.snapshot_step:
            weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.saved = (copy.deepcopy(trainer.optimizers[0].state_dict()), weights, channel.participant_states())
        if step == self.rollback_step:
            optimizer, weights, states = self.saved
            trainer.optimizers[0].load_state_dict(optimizer)
            pl_module.load_state_dict(weights)
            channel.restore_participants(states, Event("rollback", step, "test", {"to_step": self.snapshot_step}))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_after_a_rollback_the_factor_matches_the_restored_optimizer() -> None:
    """A cut at every probe (0.5, 0.25, 0.125 = snapshot, 0.0625, 0.05 = the floor), then a rollback to the snapshot:
    the callback's factor is the restored 0.125 again, so the next cut goes to 0.0625 and the one after to the floor
    0.05 (today it kept 0.05, stopped cutting at a "floor" that the real learning rate, 0.125, was far above)."""
    model, data, _ = unstable_regression()
    callback = SharpnessCallback(
        every_n_steps=1,
        metrics=("stability_ratio",),
        auto_intervene=True,
        patience=1,
        margin=0.01,  # every probe is "unstable": a cut at each
        increase_below=0.005,
        min_lr_factor=0.05,
    )
    rollback = _ChannelRollback(snapshot_step=2, rollback_step=4)
    logger = fit_recorded(model, data, [callback, rollback], steps=7)
    assert rollback.actual == pytest.approx({0: 0.5, 1: 0.25, 2: 0.125, 3: 0.0625, 4: 0.125, 5: 0.0625, 6: 0.05})
    assert rollback.believed == pytest.approx(rollback.actual)
    logged = logger.series("sharpness/lr_factor")
    assert logged[5] == pytest.approx(0.0625) and logged[6] == pytest.approx(0.05)


def test_after_a_real_early_collapse_rollback_the_factor_matches_the_restored_optimizer() -> None:
    """EarlyCollapseCallback rolls back over the extreme batch 60, undoing the cut this callback made at step 60:
    from the rollback on, the callback's factor is the restored optimizer's again (it read half of it)."""
    seed_everything(0, verbose=False)
    sharpness = SharpnessCallback(
        every_n_steps=20,
        metrics=("stability_ratio",),
        probe="fixed",  # the first batch: measurable at step 60 too
        auto_intervene=True,
        patience=1,
        margin=1e-6,  # every probe is "unstable": a cut at each
        increase_below=1e-7,
    )
    collapse = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10)
    watch = _FactorWatch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_epochs=1, callbacks=[sharpness, collapse, watch]).fit(
            ReluMLP(), collapse_loader(120, extreme_batch=60)
        )
    rollback = next(i for i in collapse.interventions if i.kind == "rollback")
    snapshot_step = int(rollback.after)
    assert any(snapshot_step <= i.step <= rollback.step for i in sharpness.interventions)  # a cut the rollback undid
    own_cuts = {i.step for i in collapse.interventions if i.kind == "lr_scale" and i.step < rollback.step}
    for step, actual in watch.actual.items():
        if not any(cut <= step < rollback.step for cut in own_cuts):  # EarlyCollapse's own cut is not ours
            assert watch.believed[step] == pytest.approx(actual), step
    assert watch.believed[rollback.step] == pytest.approx(watch.believed[snapshot_step - 1])


def test_a_snapshot_from_before_the_callback_joined_restores_the_fit_start() -> None:
    """``state=None`` (the snapshot predates this callback): back to the factor the fit started with."""
    model, data, _ = unstable_regression()
    callback = SharpnessCallback(every_n_steps=1, metrics=("stability_ratio",), auto_intervene=True, patience=1)
    fit_recorded(model, data, [callback], steps=2)
    assert callback.cumulative_factor == 0.5
    callback.restore_rollback_state(None, Event("rollback", 2, "test"))
    assert callback.cumulative_factor == 1.0


# --------------------------------------------------------------------------------- 12. corrupt checkpoint state


def _state(**changes: Any) -> dict[str, Any]:
    state = SharpnessCallback().state_dict()
    state.update(changes)
    return {k: v for k, v in state.items() if v is not _MISSING}


_MISSING = object()


@pytest.mark.parametrize(
    "changes",
    [
        {"cumulative_factor": math.nan},
        {"cumulative_factor": -5.0},
        {"cumulative_factor": 0.0},
        {"cumulative_factor": 4.0},
        {"cumulative_factor": "abc"},
        {"high_streak": -1},
        {"low_streak": 1.5},
        {"cumulative_factor": _MISSING},
        {"interventions": "garbage"},
        {"interventions": [{"step": 1}]},
        {"warned": 3},
    ],
    ids=lambda changes: "-".join(f"{k}=missing" if v is _MISSING else f"{k}={v!r}" for k, v in changes.items()),
)
def test_corrupt_state_is_refused_with_the_callback_and_the_checkpoint_key(changes: dict[str, Any]) -> None:
    callback = SharpnessCallback()
    with pytest.raises(ValueError, match="SharpnessCallback cannot restore its state") as error:
        callback.load_state_dict(_state(**changes))
    assert callback.state_key in str(error.value)
    assert callback.cumulative_factor == 1.0  # nothing half-restored


def test_resuming_from_a_checkpoint_with_a_negative_factor_fails_clearly(tmp_path: Path) -> None:
    model, data, _ = unstable_regression()

    def callback() -> SharpnessCallback:
        return SharpnessCallback(every_n_steps=1, metrics=("stability_ratio",), auto_intervene=True, patience=1)

    first = callback()
    fit_recorded(
        model, data, [first, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)], 2, enable_checkpointing=True
    )
    path = next(tmp_path.glob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["callbacks"][first.state_key]["cumulative_factor"] = -5.0
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"cumulative_factor.*-5\.0") as error:
        fit_recorded(unstable_regression()[0], data, [callback()], steps=4, ckpt_path=str(path))
    assert "SharpnessCallback cannot restore" in str(error.value) and "delete" in str(error.value)


# ----------------------------------------------------------------------------------------- 13. clear messages


def test_half_precision_advice_never_names_the_setting_in_use() -> None:
    """fp16 weights with ``hvp='double_backward'``: the warning advised ``hvp='double_backward'``."""
    x, y = regression_data()
    for hvp, wrong in (("double_backward", "hvp='double_backward'"), ("finite_difference", "hvp='finite_difference'")):
        callback = SharpnessCallback(every_n_steps=1, metrics=("lambda_max",), hvp=hvp)  # type: ignore[arg-type]
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fit_recorded(LinearRegression(lr=0.01), loader(x, y), [callback], steps=1, precision="16-true")
        (message,) = messages_with(record, "torch.float16")
        assert wrong not in message and "mixed precision" in message, message


def test_failure_advice_with_finite_differences_does_not_suggest_finite_differences(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: curvature.HessianVectorProduct, v: Tensor) -> Tensor:
        raise RuntimeError("kernel failure")

    monkeypatch.setattr(curvature.HessianVectorProduct, "__call__", broken)
    x, y = regression_data()
    callback = SharpnessCallback(every_n_steps=1, metrics=("lambda_max",), hvp="finite_difference")
    with pytest.warns(RuntimeWarning, match="kernel failure") as record:
        logger = fit_recorded(LinearRegression(), loader(x, y), [callback], steps=2)
    (message,) = messages_with(record, "probe at step")
    assert "try `hvp='finite_difference'`" not in message and "loss_fn" in message
    assert all(math.isnan(v) for v in logger.series("sharpness/lambda_max").values())


@pytest.mark.parametrize("hvp", ["double_backward", "finite_difference"])
def test_a_linear_loss_reports_zero_curvature(hvp: str) -> None:
    """A linear loss has a zero Hessian: λ_max, λ_min, the trace and batch sharpness are 0 (it failed with "element 0
    of tensors does not require grad" and logged NaN)."""
    x, y = regression_data()
    metrics = ("lambda_max", "lambda_min", "trace", "batch_sharpness", "stability_ratio")
    callback = SharpnessCallback(every_n_steps=1, metrics=metrics, hvp=hvp)  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger = fit_recorded(LinearLoss(), loader(x, y), [callback], steps=2)
    assert messages_with(record, "SharpnessCallback") == []
    for key in ("lambda_max", "lambda_min", "trace", "batch_sharpness", "stability_ratio"):
        assert logger.series(f"sharpness/{key}") == {0: pytest.approx(0.0, abs=1e-6), 1: pytest.approx(0.0, abs=1e-6)}


class _DetachedLoss(SharpnessCallback):
    def loss_fn(self, pl_module: LightningModule, batch: Any) -> Tensor:
        return super().loss_fn(pl_module, batch).detach()


def test_a_loss_without_a_graph_says_why_nothing_is_measured() -> None:
    x, y = regression_data()
    with pytest.warns(RuntimeWarning, match="does not depend on the trainable parameters") as record:
        logger = fit_recorded(LinearRegression(), loader(x, y), [_DetachedLoss(every_n_steps=1)], steps=2)
    assert not messages_with(record, "does not require grad")
    assert all(math.isnan(v) for v in logger.series("sharpness/batch_sharpness").values())
