"""Reliability audit (issue 12), EarlyCollapseCallback: one test per defect, each on a tiny model.

Items: 1 sparse gradients, 2 complex parameters, 3 a failing logger, 4 values accepted then failing in hooks,
5 ``stopped_reason`` across resume and fit, 6 detector windows across fits, 7 LR cuts without floor or recovery,
8 rollbacks and other callbacks' state, 9 snapshots frozen by a warning episode, 10 monitoring records that auto mode
never takes, 11 accumulation and the loss, 12 resume with changed or corrupt state.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradflow import EarlyCollapseCallback
from lightning_gradflow.callbacks.early_collapse import CollapseStopReason
from lightning_gradflow.channel import Event, channel_for
from tests.helpers.collapse_models import (
    ComplexLinear,
    LinearRegressor,
    ReluMLP,
    SparseEmbedding,
    collapse_loader,
    regression_data,
    same_batch_loader,
    sparse_loader,
)
from tests.helpers.training import RecordingLogger, quiet_trainer, same_tensors, state_copy

STEPS = 120
EXTREME = 60


# the callbacks' warnings are expected here (tests that check them record them)
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*EarlyCollapseCallback.*:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:.*GradientFlowCallback.*"),
]


class GradNorms(Callback):
    """Listed before the callback: the reference global gradient norm (float64, dense) and the verdicts, per step."""

    def __init__(self, watched: EarlyCollapseCallback) -> None:
        self.watched = watched
        self.norms: dict[int, float] = {}
        self.verdicts: dict[int, Any] = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        dense = [g.to_dense() if g.is_sparse else g for g in grads]
        total = sum(float(g.abs().double().pow(2).sum()) for g in dense)  # |z| for complex gradients
        self.norms[trainer.global_step] = math.sqrt(total)

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        v = self.watched.last_verdict
        if v is not None:
            self.verdicts[v.step] = v


def _kinds(callback: EarlyCollapseCallback) -> list[tuple[int, str]]:
    return [(i.step, i.kind) for i in callback.interventions]


# ------------------------------------------------------------------------------------------- 1. sparse gradients


@pytest.mark.parametrize(
    ("optimizer", "manual"), [("sgd", False), ("sparse_adam", False), ("sgd", True), ("sparse_adam", True)]
)
def test_sparse_gradients_are_judged_skipped_and_rolled_back(optimizer: str, manual: bool) -> None:
    seed_everything(0, verbose=False)
    model = SparseEmbedding(optimizer=optimizer, manual=manual)
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=2, rollback_patience=1)
    probe = GradNorms(callback)
    quiet_trainer(max_epochs=1, callbacks=[probe, callback], max_steps=16).fit(model, sparse_loader(16, nan_batch=9))
    assert _kinds(callback) == [(9, "skip_step"), (9, "rollback")]  # the NaN batch: skipped and rolled back
    assert callback.rollbacks == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    healthy = [s for s in probe.norms if s != 9]
    for step in healthy:  # the norm of sparse gradients, exactly: from their (coalesced) values
        assert probe.verdicts[step].grad_norm == pytest.approx(probe.norms[step], rel=1e-5)
    assert probe.verdicts[9].nonfinite


# ------------------------------------------------------------------------------------------ 2. complex parameters


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_complex_parameters_are_judged_skipped_and_rolled_back(optimizer: str) -> None:
    seed_everything(0, verbose=False)
    model = ComplexLinear(optimizer=optimizer)
    x, y = regression_data(16 * 20)
    x[16 * 12, 0] = math.nan
    loader = DataLoader(TensorDataset(x, y.squeeze(-1)), batch_size=16, shuffle=False)
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=2, rollback_patience=1)
    probe = GradNorms(callback)
    quiet_trainer(max_epochs=1, callbacks=[probe, callback]).fit(model, loader)
    assert _kinds(callback) == [(12, "skip_step"), (12, "rollback")]
    assert model.w.dtype == torch.complex64 and bool(torch.isfinite(torch.view_as_real(model.w)).all())
    for step in [s for s in probe.norms if s != 12]:  # the norm over |z|
        assert probe.verdicts[step].grad_norm == pytest.approx(probe.norms[step], rel=1e-5)


# --------------------------------------------------------------------------------------------- 3. a failing logger


class FailOnce(RecordingLogger):
    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.failed and any(k.startswith("collapse/") for k in metrics):
            self.failed = True
            raise OSError("disk full")
        super().log_metrics(metrics, step)


def test_a_logger_failing_once_warns_once_and_the_run_completes() -> None:
    seed_everything(0, verbose=False)
    logger = FailOnce()
    callback = EarlyCollapseCallback(auto_intervene=True)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], logger=logger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ReluMLP(), collapse_loader(20))
    assert logger.failed and trainer.global_step == 20
    about = [str(w.message) for w in caught if "FailOnce.log_metrics raised OSError" in str(w.message)]
    assert len(about) == 1, about
    assert "collapse/risk" in logger.keys()  # noqa: SIM118  (later steps were logged again)


# ------------------------------------------------------------------------------ 4. values accepted, then failing


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"snapshot_device": "bogus"}, "snapshot_device"),
        ({"rank_sample_size": 10**10}, "rank_sample_size"),
        ({"window": 10**10}, "window"),
        ({"num_snapshots": 10**10}, "num_snapshots"),
        ({"divergence_smoothing": 10**10}, "divergence_smoothing"),
        ({"min_history": 50, "window": 20}, "min_history"),
        ({"warn_threshold": 0.9, "risk_threshold": 0.5}, "warn_threshold"),
    ],
)
def test_values_that_would_fail_in_a_hook_are_refused_at_construction(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        EarlyCollapseCallback(**kwargs)


@pytest.mark.parametrize("device", ["meta", "cuda"])
def test_an_unusable_snapshot_device_is_refused_at_setup(device: str) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `snapshot_device='cuda'` is legal here")
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_device=device)
    model = ReluMLP()
    with pytest.raises(MisconfigurationException, match="`snapshot_device="):
        quiet_trainer(max_epochs=1, callbacks=[callback], max_steps=3).fit(model, collapse_loader(3))


# ----------------------------------------------------------------------- 5. stopped_reason across resume and fit


def _stops(tmp_path: Path | None = None) -> tuple[EarlyCollapseCallback, ReluMLP, Path | None]:
    """A run stopped by the callback (two NaN batches in a row, no rollback budget); its weights are healthy."""
    seed_everything(0, verbose=False)
    model = ReluMLP()
    loader = collapse_loader(40)
    x = loader.dataset.tensors[0]  # type: ignore[attr-defined]
    x[10 * 16, 0] = x[11 * 16, 0] = math.nan
    callback = EarlyCollapseCallback(auto_intervene=True, max_rollbacks=0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback])
    trainer.fit(model, loader)
    assert callback.stopped_reason is CollapseStopReason.MAX_ROLLBACKS and trainer.global_step == 12
    path = None
    if tmp_path is not None:
        path = tmp_path / "stopped.ckpt"
        trainer.save_checkpoint(path)
    return callback, model, path


def test_a_second_fit_of_a_stopped_instance_trains() -> None:
    callback, model, _ = _stops()
    before = state_copy(model)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback])
    trainer.fit(model, collapse_loader(20, seed=1))
    assert trainer.global_step == 20 and callback.stopped_reason is CollapseStopReason.NOT_STOPPED
    assert not same_tensors(before, state_copy(model))  # the gradients were applied, not dropped


def test_resuming_a_stopped_run_trains_and_says_so(tmp_path: Path) -> None:
    _, model, path = _stops(tmp_path)
    before = state_copy(model)
    callback = EarlyCollapseCallback(auto_intervene=True, max_rollbacks=0)
    trainer = quiet_trainer(callbacks=[callback], max_steps=30, max_epochs=-1)
    with pytest.warns(RuntimeWarning, match=r"saved after this callback stopped the run .*MAX_ROLLBACKS.*resumes"):
        trainer.fit(model, collapse_loader(40, seed=1), ckpt_path=str(path))
    assert trainer.global_step == 30 and callback.stopped_reason is CollapseStopReason.NOT_STOPPED
    assert not same_tensors(before, state_copy(model))


# ------------------------------------------------------------------------------- 6. detector windows per fit


def test_a_second_fit_starts_with_fresh_detectors() -> None:
    def second_fit(callback: EarlyCollapseCallback) -> None:
        seed_everything(1, verbose=False)
        model = ReluMLP()
        loader = collapse_loader(40, seed=1)
        loader.dataset.tensors[1].mul_(20.0)  # type: ignore[attr-defined]  # a higher loss than the first fit's
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(model, loader)

    reused = EarlyCollapseCallback(auto_intervene=True)
    seed_everything(0, verbose=False)
    quiet_trainer(max_epochs=1, callbacks=[reused]).fit(ReluMLP(), collapse_loader(100))
    first = len(reused.interventions)
    second_fit(reused)
    fresh = EarlyCollapseCallback(auto_intervene=True)
    second_fit(fresh)
    assert reused.interventions[first:] == fresh.interventions
    assert reused.state_dict()["monitor"] == fresh.state_dict()["monitor"]


# ------------------------------------------------------------------------------- 7. LR cuts: floor and recovery


class LearningRates(Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_isolated_nonfinite_batches_never_cut_the_lr() -> None:
    steps, lr = 2000, 0.05
    x, y = regression_data(64, in_features=4, noise=0.0)
    bad = {k: "nan" for k in range(99, steps, 100)}  # one NaN batch every 100 steps
    seed_everything(0, verbose=False)
    model = LinearRegressor(4, lr)
    callback = EarlyCollapseCallback(auto_intervene=True, every_n_steps=0)
    lrs = LearningRates()
    quiet_trainer(max_epochs=1, callbacks=[callback, lrs], log_every_n_steps=50).fit(
        model, same_batch_loader(x, y, steps, bad)
    )
    assert _kinds(callback) == [(k, "skip_step") for k in bad]  # each skipped, none a reason to cut the LR
    assert min(lrs.seen) == lr == lrs.seen[-1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------- 8. rollback and the other callbacks


class Counter:
    """A participant whose own view is the last step it saw."""

    def __init__(self) -> None:
        self.value = 0
        self.restored: list[tuple[Any, Event]] = []
        self.events: list[Event] = []

    def rollback_state(self) -> dict[str, int]:
        return {"value": self.value}

    def restore_rollback_state(self, state: Any, event: Event) -> None:
        self.restored.append((state, event))
        self.value = state["value"]

    def on_channel_event(self, event: Event) -> None:
        self.events.append(event)


class JoinCounter(Callback):
    def __init__(self) -> None:
        self.counter = Counter()
        self.after_rollback: list[int] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        channel_for(trainer).join("counter", self.counter)

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.counter.restored and not self.after_rollback:
            self.after_rollback.append(self.counter.value)
        self.counter.value = trainer.global_step


def test_a_rollback_hands_every_participant_its_snapshot_time_state() -> None:
    seed_everything(0, verbose=False)
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10)
    joined = JoinCounter()  # listed after the callback: its batch end runs after the restore
    quiet_trainer(max_epochs=1, callbacks=[callback, joined]).fit(
        ReluMLP(), collapse_loader(STEPS, extreme_batch=EXTREME)
    )
    assert (EXTREME + 1, "rollback") in _kinds(callback)
    event = Event("rollback", EXTREME + 1, "EarlyCollapseCallback", {"to_step": EXTREME})
    assert joined.counter.restored == [({"value": EXTREME - 1}, event)]  # its view when the snapshot was taken
    assert joined.counter.events == [event]
    assert joined.after_rollback == [EXTREME - 1]


# --------------------------------------------------------------------- 9. snapshots during a warning episode


def test_a_representation_warning_does_not_freeze_the_snapshot_ring() -> None:
    seed_everything(0, verbose=False)
    model = ReluMLP(hidden=32)
    with torch.no_grad():
        model.fc1.bias[:16] -= 1e3  # half the units of act1 dead from the start: a standing representation warning
    loader = collapse_loader(30)
    x = loader.dataset.tensors[0]  # type: ignore[attr-defined]
    for k in (3, 12, 13):  # a NaN batch opens an episode; two in a row later force a rollback
        x[k * 16, 0] = math.nan
    callback = EarlyCollapseCallback(auto_intervene=True, every_n_steps=5, snapshot_every_n_steps=1)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(model, loader)
    assert any("of the units of 'act1' are dead" in m for _, m in callback.warnings)
    rollback = next(i for i in callback.interventions if i.kind == "rollback")
    assert (rollback.step, rollback.after) == (13, 12)  # back to the newest healthy step, not to step 3


# ---------------------------------------------------------------- 10. monitoring records = what auto mode does


@pytest.mark.parametrize("fault", ["spike", "nan"])
def test_monitoring_records_are_what_auto_mode_does(fault: str) -> None:
    def run(auto: bool) -> EarlyCollapseCallback:
        seed_everything(0, verbose=False)
        loader = collapse_loader(STEPS, extreme_batch=EXTREME if fault == "spike" else None)
        if fault == "nan":
            loader.dataset.tensors[0][EXTREME * 16, 0] = math.nan  # type: ignore[attr-defined]
        callback = EarlyCollapseCallback(auto_intervene=auto, snapshot_every_n_steps=10)
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(ReluMLP(), loader)
        return callback

    auto, watched = run(True), run(False)
    assert _kinds(auto) and _kinds(watched) == _kinds(auto)
    assert all(i.applied for i in auto.interventions) and not any(i.applied for i in watched.interventions)


# ----------------------------------------------------------------------------- 11. accumulation and the loss


def test_the_loss_of_an_accumulated_step_is_the_mean_of_its_micro_batches() -> None:
    seed_everything(0, verbose=False)
    model = ReluMLP()
    callback = EarlyCollapseCallback(auto_intervene=True)
    probe = GradNorms(callback)
    trainer = quiet_trainer(callbacks=[callback, probe], accumulate_grad_batches=3, max_epochs=2)
    trainer.fit(model, collapse_loader(10))  # 10 batches per epoch: steps of 3, 3, 3 and 1 micro-batches
    assert trainer.global_step == 8
    micro = [loss for _, loss in model.losses]
    per_epoch = [micro[0:3], micro[3:6], micro[6:9], micro[9:10]]
    expected = [sum(group) / len(group) for group in per_epoch] + [
        sum(group) / len(group) for group in (micro[10:13], micro[13:16], micro[16:19], micro[19:20])
    ]
    assert [probe.verdicts[s].loss for s in range(8)] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------- 12. changed or corrupt state


def _set(state: Any, key: str, value: Any) -> bool:
    """Sets ``key`` wherever it is in the nested state; whether it was found."""
    if isinstance(state, dict):
        if key in state:
            state[key] = value
            return True
        return any(_set(v, key, value) for v in state.values())
    return False


@pytest.fixture(scope="module")
def saved_state() -> dict[str, Any]:
    seed_everything(0, verbose=False)
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(ReluMLP(), collapse_loader(STEPS, extreme_batch=EXTREME))
    assert callback.rollbacks == 1
    return callback.state_dict()


@pytest.mark.parametrize(
    ("key", "value"),
    [("lr_scale", math.nan), ("lr_scale", -5.0), ("strikes", -1), ("rollbacks", "three"), ("values", [math.nan])],
)
def test_corrupt_state_is_refused_with_a_clear_error(saved_state: dict[str, Any], key: str, value: Any) -> None:
    import copy

    state = copy.deepcopy(saved_state)
    assert _set(state, key, value)
    fresh = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10)
    with pytest.raises(ValueError, match=r"EarlyCollapseCallback cannot restore .*callbacks\[.*delete"):
        fresh.load_state_dict(state)


def test_resuming_with_another_spike_detector_gives_a_clear_error(tmp_path: Path) -> None:
    seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=1, callbacks=[EarlyCollapseCallback(auto_intervene=True)], max_steps=30)
    trainer.fit(ReluMLP(), collapse_loader(40))
    trainer.save_checkpoint(tmp_path / "mad.ckpt")
    ema = EarlyCollapseCallback(auto_intervene=True, spike_detector="ema")
    resumed = quiet_trainer(max_epochs=1, callbacks=[ema], max_steps=35)
    with pytest.raises(ValueError, match=r"cannot restore .*spike_detector='mad'"):
        resumed.fit(ReluMLP(), collapse_loader(40), ckpt_path=str(tmp_path / "mad.ckpt"))
