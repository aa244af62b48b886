"""EarlyCollapseCallback: detection, the intervention ladder, rollback exactness, state, and no false alarms."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gradflow.callbacks import early_collapse as early_collapse_module
from lightning_gradflow.callbacks.early_collapse import CollapseStopReason, EarlyCollapseCallback
from lightning_gradflow.callbacks.gradient_flow import GradientFlowCallback
from lightning_gradflow.collapse import Snapshot, copy_tree, effective_rank, feature_std
from tests.helpers.collapse_models import (
    LinearRegressor,
    ReluMLP,
    StateLoader,
    collapse_loader,
    first_nonfinite_step,
    slow_divergence_problem,
)
from tests.helpers.training import RecordingLogger, load_example, quiet_trainer, same_tensors, state_copy

STEPS = 120
EXTREME = 60  # the batch of extreme inputs


# the callback's warnings are expected here (tests that check them catch them with pytest.warns or recwarn)
pytestmark = pytest.mark.filterwarnings("ignore:.*EarlyCollapseCallback.*:RuntimeWarning")


def _fit(
    callbacks: list[Any] | None = None,
    extreme: bool = True,
    steps: int = STEPS,
    logger: Any = False,
    **model_kwargs: Any,
) -> tuple[ReluMLP, Trainer]:
    seed_everything(0, verbose=False)
    model = ReluMLP(**model_kwargs)
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks or [], logger=logger)
    trainer.fit(model, collapse_loader(steps, extreme_batch=EXTREME if extreme else None))
    return model, trainer


# ----------------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"auto_intervene": 1}, TypeError, "auto_intervene"),
        ({"window": 0}, ValueError, "window"),
        ({"loss_z_threshold": -1.0}, ValueError, "loss_z_threshold"),
        ({"lr_cut_factor": 1.5}, ValueError, "lr_cut_factor"),
        ({"divergence_ratio": 1.0}, ValueError, "divergence_ratio"),
        ({"spike_detector": "iqr"}, ValueError, "spike_detector"),
        ({"risk_threshold": 0.0}, ValueError, "risk_threshold"),
        ({"representation_layers": "head"}, TypeError, "representation_layers"),
        ({"snapshot_device": 3}, TypeError, "snapshot_device"),
        ({"max_rollbacks": -1}, ValueError, "max_rollbacks"),
        ({"scale_floor": -0.1}, ValueError, "scale_floor"),
        ({"scale_floor": "0.1"}, TypeError, "scale_floor"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        EarlyCollapseCallback(**kwargs)


def test_unknown_layer_names_are_refused_with_the_known_ones() -> None:
    with pytest.raises(MisconfigurationException, match=r"'nope'.*Known modules"):
        _fit([EarlyCollapseCallback(representation_layers=["nope"])], extreme=False, steps=2)


class _FakeStrategy:
    pass


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_are_refused_at_setup(name: str) -> None:
    strategy = type(name, (_FakeStrategy,), {})()
    trainer: Any = type("T", (), {"strategy": strategy})()
    with pytest.raises(MisconfigurationException, match="rollback=False"):
        EarlyCollapseCallback(auto_intervene=True).setup(trainer, LightningModule(), "fit")
    with pytest.raises(MisconfigurationException, match=f"does not support `strategy={name}`"):
        EarlyCollapseCallback(auto_intervene=True, rollback=False).setup(trainer, LightningModule(), "fit")


# --------------------------------------------------------------------------------- collapse and recovery


def test_a_collapse_is_fatal_without_the_callback_and_recovered_with_it() -> None:
    healthy, _ = _fit(extreme=False)
    broken, _ = _fit()
    assert first_nonfinite_step(healthy) is None
    assert first_nonfinite_step(broken) is not None and not math.isfinite(broken.final_loss())

    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10)
    recovered, trainer = _fit([callback])
    kinds = [(i.step, i.kind) for i in callback.interventions]
    assert (EXTREME, "lr_scale") in kinds
    assert (EXTREME + 1, "rollback") in kinds
    assert callback.rollbacks == 1 and callback.stopped_reason is CollapseStopReason.NOT_STOPPED
    rollback = next(i for i in callback.interventions if i.kind == "rollback")
    assert rollback.after == EXTREME  # the snapshot taken just before the extreme batch
    assert trainer.global_step == STEPS  # the step counter keeps going forward
    assert all(math.isfinite(loss) for step, loss in recovered.losses if step > EXTREME + 1)
    assert recovered.final_loss() == pytest.approx(healthy.final_loss(), rel=0.25)
    assert all(torch.isfinite(p).all() for p in recovered.parameters())


def test_the_first_warning_comes_at_or_before_the_first_nonfinite_loss() -> None:
    callback = EarlyCollapseCallback()
    broken, _ = _fit([callback])
    first_bad = first_nonfinite_step(broken)
    assert first_bad is not None and callback.warnings
    assert callback.warnings[0][0] <= first_bad
    assert callback.warnings[0][0] == EXTREME  # the extreme batch's own loss and gradient norm give it away
    # what auto mode would do, not applied: cut the LR, then roll back (after which auto mode would be elsewhere)
    would = [(i.step, i.kind, i.applied) for i in callback.interventions]
    assert would == [(EXTREME, "lr_scale", False), (EXTREME + 1, "rollback", False)]


def test_a_slow_divergence_warns_before_the_loss_has_doubled() -> None:
    loader, lr = slow_divergence_problem(growth=1.02)  # the loss grows ~4 % per step once past its best
    callback = EarlyCollapseCallback()
    model = LinearRegressor(8, lr)
    quiet_trainer(callbacks=[callback], max_steps=150, max_epochs=-1).fit(model, loader)
    losses = [loss for _, loss in model.losses]
    best, doubled = math.inf, None
    for step, loss in enumerate(losses):
        if loss >= 2 * best:
            doubled = step
            break
        best = min(best, loss)
    assert doubled is not None and callback.warnings
    assert callback.warnings[0][0] < doubled
    assert "smoothed loss" in callback.warnings[0][1]


def test_monitoring_only_leaves_the_run_bitwise_unchanged() -> None:
    plain, _ = _fit(extreme=False, steps=60)
    watched, _ = _fit([EarlyCollapseCallback(every_n_steps=5, log_every_n_steps=7)], extreme=False, steps=60)
    assert same_tensors(state_copy(plain), state_copy(watched))
    assert plain.losses == watched.losses


def test_lr_cut_alone_is_recorded_and_logged() -> None:
    logger = RecordingLogger()
    callback = EarlyCollapseCallback(auto_intervene=True, rollback=False, lr_cut_factor=0.25, stop_on_failure=False)
    _fit([callback], logger=logger)
    cuts = [i for i in callback.interventions if i.kind == "lr_scale"]
    assert cuts and cuts[0].step == EXTREME and cuts[0].after == 0.25
    assert logger.series("collapse/lr_scale")[EXTREME] == 0.25


# ---------------------------------------------------------------------------------------------------- stopping


def test_persisting_collapse_stops_with_a_reason_when_rollback_is_off() -> None:
    callback = EarlyCollapseCallback(auto_intervene=True, rollback=False, lr_cut_factor=None, stop_patience=5)
    _, trainer = _fit([callback])
    assert callback.stopped_reason is CollapseStopReason.COLLAPSE_PERSISTS
    assert trainer.global_step < STEPS
    assert "COLLAPSE_PERSISTS" in callback.stop_message
    assert callback.interventions[-1].kind == "stop"


def test_max_rollbacks_exhausted_stops_the_run() -> None:
    callback = EarlyCollapseCallback(auto_intervene=True, max_rollbacks=0, snapshot_every_n_steps=10)
    _, trainer = _fit([callback])
    assert callback.stopped_reason is CollapseStopReason.MAX_ROLLBACKS
    assert callback.rollbacks == 0 and trainer.global_step < STEPS


def test_nonfinite_steps_are_skipped_before_they_reach_the_weights() -> None:
    seed_everything(0, verbose=False)
    model = ReluMLP()
    loader = collapse_loader(40)
    loader.dataset.tensors[0][20 * 16] = math.nan  # type: ignore[attr-defined]
    callback = EarlyCollapseCallback(auto_intervene=True)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(model, loader)
    assert [(i.step, i.kind) for i in callback.interventions][:1] == [(20, "skip_step")]
    assert callback.skipped_steps == 1 and callback.rollbacks == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------- bitwise after rollback


class _KeepRestored(EarlyCollapseCallback):
    """Keeps a copy of the snapshot each rollback restored."""

    restored: list[Snapshot]

    def _restore(self, trainer: Any, pl_module: Any, snapshot: Snapshot, step: int) -> None:
        self.restored = [*getattr(self, "restored", []), copy_tree(snapshot)]  # type: ignore[list-item]
        super()._restore(trainer, pl_module, snapshot, step)


def test_after_a_rollback_training_is_bitwise_identical_to_training_resumed_from_the_snapshot() -> None:
    callback = _KeepRestored(auto_intervene=True, snapshot_every_n_steps=10)
    rolled, _ = _fit([callback], optimizer="adam", lr=0.01)
    snapshot = callback.restored[-1]  # the last rollback (an earlier one may have gone to a snapshot too recent)
    rollback_step = [i.step for i in callback.interventions if i.kind == "rollback"][-1]
    assert len(callback.restored) == callback.rollbacks >= 1
    assert [i.step for i in callback.interventions if i.step > rollback_step] == []

    # a fresh run: the snapshot's weights, optimizer, scheduler and RNG, fed the batches after the rollback step
    seed_everything(123, verbose=False)
    fresh = ReluMLP(optimizer="adam", lr=0.01)
    fresh.load_state_dict(snapshot.model)
    replay = quiet_trainer(
        max_epochs=1, callbacks=[StateLoader(snapshot.optimizers, snapshot.schedulers, snapshot.rng)]
    )
    replay.fit(fresh, collapse_loader(STEPS, extreme_batch=EXTREME, start=rollback_step + 1))
    assert same_tensors(state_copy(rolled), state_copy(fresh))
    tail = [loss for step, loss in rolled.losses if step > rollback_step]
    assert tail == [loss for _, loss in fresh.losses]


# ---------------------------------------------------------------------------------------------- no false alarm


def _fp16_plugin() -> Any:
    from lightning.pytorch.plugins import MixedPrecision

    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=25)
    except (RuntimeError, ValueError, AssertionError) as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"this torch has no CPU GradScaler: {err}")
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def test_no_false_alarm_on_a_healthy_noisy_run_with_warmup_and_fp16_overflow_steps() -> None:
    steps = 400

    def run(callbacks: list[Any]) -> tuple[ReluMLP, Trainer]:
        seed_everything(0, verbose=False)
        model = ReluMLP(lr=0.05, warmup_steps=50, hidden=16)
        trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, plugins=[_fp16_plugin()], logger=logger)
        trainer.fit(model, collapse_loader(steps, batch_size=32, noise=0.3))
        return model, trainer

    logger = RecordingLogger()
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=25, every_n_steps=20)
    model, trainer = run([callback])
    assert trainer.global_step == steps
    assert callback.overflow_steps >= 10  # the scale grows every 25 steps and overflows back
    assert callback.warnings == [] and callback.interventions == [] and callback.rollbacks == 0
    assert max(logger.series("collapse/risk").values()) < callback.warn_threshold
    assert all(v == 0 for v in logger.series("collapse/skipped_steps").values())
    assert logger.series("collapse/overflow_steps")[steps - 1] == callback.overflow_steps
    assert logger.series("collapse/lr_scale")[steps - 1] == 1.0
    plain, _ = run([])
    assert same_tensors(state_copy(plain), state_copy(model))  # nothing was changed, not even with auto_intervene


# --------------------------------------------------------------------------------------------- representations


def test_dead_units_are_flagged_with_the_right_fraction() -> None:
    seed_everything(0, verbose=False)
    model = ReluMLP(hidden=32, lr=0.0)  # frozen weights: each probe's fraction can be recomputed
    with torch.no_grad():
        model.fc1.bias[:24] -= 1e3  # 24 of 32 units of act1 are dead on every input
    logger = RecordingLogger()
    callback = EarlyCollapseCallback(every_n_steps=5)
    loader = collapse_loader(20)
    x = loader.dataset.tensors[0]  # type: ignore[attr-defined]
    with pytest.warns(RuntimeWarning, match=r"\d+% of the units of 'act1' are dead at step 0"):
        quiet_trainer(max_epochs=1, callbacks=[callback], logger=logger).fit(model, loader)
    dead = logger.series("collapse/dead_fraction/act1")
    assert sorted(dead) == [0, 5, 10, 15]
    with torch.no_grad():
        for step, value in dead.items():
            h = model.act1(model.fc1(x[16 * step : 16 * (step + 1)]))  # the probe step's batch
            expected = float((h == 0).all(dim=0).float().mean())
            assert expected >= 24 / 32
            assert value == pytest.approx(expected)
    assert all(v < 0.5 for v in logger.series("collapse/dead_fraction/act2").values())
    assert callback.last_metrics["collapse/risk"] <= 0.5  # representations alone stay below the alarm
    assert callback.warnings[0][1].startswith(f"{round(100 * dead[0])}% of the units")
    assert callback.interventions == []


def test_logged_rankme_and_feature_std_are_those_of_the_head_input() -> None:
    seed_everything(0, verbose=False)
    model = ReluMLP(lr=0.0)  # the weights never change: the probe's features can be recomputed
    logger = RecordingLogger()
    callback = EarlyCollapseCallback(every_n_steps=4, rank_sample_size=48)
    loader = collapse_loader(8)
    quiet_trainer(max_epochs=1, callbacks=[callback], logger=logger).fit(model, loader)
    x = loader.dataset.tensors[0]  # type: ignore[attr-defined]
    with torch.no_grad():
        features = model.act2(model.fc2(model.act1(model.fc1(x))))
    # probes at steps 0 and 4 saw batches 0 and 4 (16 rows each); the buffer holds both
    sample = torch.cat([features[0:16], features[64:80]])
    rank = logger.series("collapse/effective_rank/head")
    std = logger.series("collapse/feature_std/head")
    assert rank[4] == pytest.approx(float(effective_rank(sample)), rel=1e-5)
    assert std[4] == pytest.approx(float(feature_std(sample)), rel=1e-5)
    assert rank[0] == pytest.approx(float(effective_rank(features[0:16])), rel=1e-5)


# ------------------------------------------------------------------------------------------ keys and sharing


def test_logged_keys() -> None:
    logger = RecordingLogger()
    _fit([EarlyCollapseCallback(auto_intervene=True, every_n_steps=10)], logger=logger, steps=70)
    keys = logger.keys()
    for key in [
        "collapse/risk",
        "collapse/loss_zscore",
        "collapse/grad_norm_zscore",
        "collapse/divergence",
        "collapse/rollbacks",
        "collapse/lr_scale",
        "collapse/skipped_steps",
        "collapse/overflow_steps",
        "collapse/interventions",
        "collapse/dead_fraction/act1",
        "collapse/dead_fraction/act2",
        "collapse/effective_rank/head",
        "collapse/feature_std/head",
    ]:
        assert key in keys, key
    assert logger.series("collapse/rollbacks")[69] == 1.0


class _Verdicts(Callback):
    def __init__(self, watched: EarlyCollapseCallback) -> None:
        self.watched = watched
        self.risks: dict[int, float] = {}

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        v = self.watched.last_verdict
        if v is not None:
            self.risks[v.step] = v.risk


@pytest.mark.parametrize("flow_first", [True, False])
def test_the_gradient_norm_comes_through_the_channel_whatever_the_order(
    flow_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(with_flow: bool) -> tuple[EarlyCollapseCallback, _Verdicts]:
        callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10)
        verdicts = _Verdicts(callback)
        flow = [GradientFlowCallback()] if with_flow else []
        _fit([*flow, callback, verdicts] if flow_first else [callback, *flow, verdicts])
        return callback, verdicts

    alone, alone_verdicts = run(False)
    calls: list[int] = []
    original = early_collapse_module.tensor_stats
    monkeypatch.setattr(early_collapse_module, "tensor_stats", lambda *a, **k: calls.append(1) or original(*a, **k))
    shared, shared_verdicts = run(True)
    assert (calls == []) is flow_first  # listed first, GradientFlowCallback published every step's norm
    assert [(i.step, i.kind) for i in shared.interventions] == [(i.step, i.kind) for i in alone.interventions]
    assert shared_verdicts.risks == pytest.approx(alone_verdicts.risks, abs=1e-6)


# -------------------------------------------------------------------------------------------------- resume


def test_detectors_counters_and_interventions_survive_resume(tmp_path: Path) -> None:
    def loader() -> Any:
        return collapse_loader(40, extreme_batch=25)

    def make() -> EarlyCollapseCallback:
        return EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=5, num_snapshots=2)

    seed_everything(0, verbose=False)
    straight_cb = make()
    straight = ReluMLP()
    quiet_trainer(callbacks=[straight_cb], max_epochs=2).fit(straight, loader())

    seed_everything(0, verbose=False)
    first_cb = make()
    first = ReluMLP()
    t1 = quiet_trainer(callbacks=[first_cb], max_epochs=1)
    t1.fit(first, loader())
    assert first_cb.rollbacks == 1
    t1.save_checkpoint(tmp_path / "epoch1.ckpt")

    seed_everything(0, verbose=False)
    resumed_cb = make()
    resumed = ReluMLP()
    quiet_trainer(callbacks=[resumed_cb], max_epochs=2).fit(resumed, loader(), ckpt_path=tmp_path / "epoch1.ckpt")

    assert straight_cb.rollbacks == resumed_cb.rollbacks == 2  # the extreme batch comes once per epoch
    assert resumed_cb.interventions == straight_cb.interventions  # none repeated, none lost
    a, b = straight_cb.state_dict(), resumed_cb.state_dict()
    a.pop("snapshot_steps")  # the ring restarts at the resumed step
    b.pop("snapshot_steps")
    assert a == b
    assert same_tensors(state_copy(straight), state_copy(resumed))


# -------------------------------------------------------------------------------------------------- example


def test_the_example_recovers_a_run_that_collapses_without_the_callback() -> None:
    example = load_example("collapse_recovery")
    result = example.main(["--steps", "200", "--spike-step", "100"])
    assert not math.isfinite(result["broken_loss"]) or result["broken_loss"] > 100 * result["reference_loss"]
    assert result["rollbacks"] >= 1 and result["first_alarm_step"] == 101
    assert math.isfinite(result["recovered_loss"])
    assert result["recovered_loss"] == pytest.approx(result["reference_loss"], abs=0.01)


# ------------------------------------------------------------------------------------------ variants and extras


@pytest.mark.parametrize("spike_detector", ["mad", "ema"])
def test_recovery_with_gradient_accumulation_and_either_detector(spike_detector: str) -> None:
    seed_everything(0, verbose=False)
    model = ReluMLP()
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=5, spike_detector=spike_detector)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], accumulate_grad_batches=2)
    trainer.fit(model, collapse_loader(STEPS, extreme_batch=EXTREME))
    assert trainer.global_step == STEPS // 2
    rollbacks = [i for i in callback.interventions if i.kind == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0].step == EXTREME // 2 + 1  # optimizer steps, not batches
    assert math.isfinite(model.final_loss())


def test_skip_batches_drops_the_gradients_of_the_batches_after_a_rollback() -> None:
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10, skip_batches=3)
    model, _ = _fit([callback])
    assert callback.rollbacks == 1 and callback.skipped_steps == 3
    assert "skipping 3 batch(es)" in next(i.reason for i in callback.interventions if i.kind == "rollback")
    assert math.isfinite(model.final_loss())


def test_tensorboard_gets_the_layout_and_the_interventions(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10)
    _fit([callback], logger=TensorBoardLogger(str(tmp_path), name="run"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = list(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(event_file), size_guidance={"tensors": 0})
    acc.Reload()
    assert "collapse/risk" in acc.Tags()["scalars"]
    assert any("collapse/interventions" in tag for tag in acc.Tags()["tensors"])


def test_state_dict_round_trips_through_a_fresh_instance() -> None:
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10)
    _fit([callback])
    fresh = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10)
    fresh.load_state_dict(callback.state_dict())
    saved, restored = callback.state_dict(), fresh.state_dict()
    assert saved.pop("snapshot_steps") == [110, 120] and restored.pop("snapshot_steps") == []  # not in checkpoints
    assert restored == saved
    assert (
        fresh.state_key
        == callback.state_key
        == "EarlyCollapseCallback{'representation_layers': None, 'dead_unit_layers': None}"
    )


def test_manual_optimization_recovers_too() -> None:
    from tests.helpers.collapse_models import ManualReluMLP

    seed_everything(0, verbose=False)
    model = ManualReluMLP()
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(model, collapse_loader(STEPS, extreme_batch=EXTREME))
    assert [(i.step, i.kind) for i in callback.interventions][-1] == (EXTREME + 1, "rollback")
    assert math.isfinite(model.final_loss())


# ------------------------------------------------------------------------------------------------- the schedule


def _probe_steps(steps: int = 120, **kwargs: Any) -> tuple[list[int], EarlyCollapseCallback]:
    seed_everything(0, verbose=False)
    model = ReluMLP(hidden=32, lr=0.0)
    with torch.no_grad():
        model.fc1.bias[:24] -= 1e3  # dead from initialisation: a finding at the first probe
    logger = RecordingLogger()
    callback = EarlyCollapseCallback(**kwargs)
    quiet_trainer(max_epochs=1, callbacks=[callback], logger=logger).fit(model, collapse_loader(steps))
    return sorted(logger.series("collapse/dead_fraction/act1")), callback


def test_default_probes_are_dense_at_the_start_and_after_a_finding_then_sparse() -> None:
    probes, callback = _probe_steps()
    assert probes[:4] == [0, 5, 10, 15]  # dead units from step 0 are measured every 5 steps, not every 50
    assert callback.warnings and "at step 0" in callback.warnings[0][1]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert max(gaps) <= callback.every_n_steps and gaps[-1] > 5  # sparser once past the dense windows
    fixed, _ = _probe_steps(adaptive_schedule=False)
    assert fixed == [0, 50, 100]  # the fixed schedule: every `every_n_steps`
    assert _probe_steps(every_n_steps=0)[0] == []


def test_schedule_state_is_checkpointed() -> None:
    _, callback = _probe_steps(steps=30)
    state = callback.state_dict()
    assert state["schedule"] == callback.schedule.state_dict()
    fresh = EarlyCollapseCallback()
    fresh.load_state_dict(state)
    assert fresh.schedule.state_dict() == callback.schedule.state_dict()
    fresh.load_state_dict({k: v for k, v in state.items() if k != "schedule"})  # an older checkpoint still loads


def test_no_rank_warning_at_initialisation_on_a_model_whose_features_have_not_spread() -> None:
    """The demo warned "effective rank of 1.03 at step 0" on healthy runs: near-constant features at init."""
    seed_everything(0, verbose=False)
    model = ReluMLP(lr=0.0)
    with torch.no_grad():
        model.fc2.weight.mul_(1e-4)  # the head's input barely depends on the sample: RankMe ≈ 1 from the bias
        model.fc2.bias.fill_(1.0)
    logger = RecordingLogger()
    callback = EarlyCollapseCallback(every_n_steps=5)
    quiet_trainer(max_epochs=1, callbacks=[callback], logger=logger).fit(model, collapse_loader(20))
    ranks = logger.series("collapse/effective_rank/head")
    assert ranks and max(ranks.values()) < 1.5  # the low rank is measured and logged ...
    assert not [w for _, w in callback.warnings if "effective rank" in w]  # ... but is no collapse finding
