"""Reliability audit (issue 12), GateSurgeryCallback: one test per item it owns (3, 4, 8, 12).

Each test fails on the code before the fix: a failing logger ended the run (3); ``forget_bias=1e300`` wrote inf into
the weights and ``epsilon=1e-17`` raised ``math domain error`` inside a hook (4); a rollback that undid a surgery left
the callback counting it and cooling it down, so the restored saturated gate was never repaired again — or, with a
short cooldown, repaired and counted twice (8); a damaged checkpoint raised raw ``TypeError``/``KeyError`` naming
neither the callback nor the checkpoint key, and nonsense values were accepted (12).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_gradflow.callbacks import early_collapse
from lightning_gradflow.callbacks.gate_surgery import GateSurgeryCallback
from lightning_gradflow.channel import Event, channel_for
from tests.helpers.gate_models import saturate_, saturated_regressor, sequences
from tests.helpers.training import RecordingLogger, messages_with, quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ 3. a logger that raises once


class _FailsOnce(RecordingLogger):
    """Raises on the first row holding the gate callback's metrics, records every other row."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.failed and "gates/surgeries" in metrics:
            self.failed = True
            raise OSError("disk full")
        super().log_metrics(metrics, step)


def test_item3_a_logger_that_raises_once_warns_once_and_the_run_completes() -> None:
    logger = _FailsOnce()
    callback = GateSurgeryCallback(every_n_steps=1, patience=1, auto_intervene=True)
    t = quiet_trainer(max_steps=4, callbacks=[callback], logger=logger)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(saturated_regressor(), sequences(n=32))
    assert t.global_step == 4 and logger.failed
    failures = [m for m in messages_with(record, "GateSurgeryCallback") if "log_metrics raised OSError: disk full" in m]
    assert len(failures) == 1 and "Training goes on" in failures[0]
    assert sorted(logger.gate_rows()) == [1, 2, 3]  # step 0's row was lost, the later ones arrived
    assert callback.surgeries == 2 and callback.last_metrics["gates/surgeries"] == 2.0


# ---------------------------------------------------------------- 4. numeric arguments that broke the weights


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"forget_bias": 1e300}, r"`forget_bias` to be a finite float in \[-10, 10\], but got 1e\+300"),
        ({"forget_bias": -11.0}, r"`forget_bias` to be a finite float in \[-10, 10\]"),
        ({"forget_bias": math.inf}, r"`forget_bias`"),
        ({"epsilon": 1e-17}, r"`epsilon` in \[1e-06, 0.5\), but got 1e-17"),
    ],
)
def test_item4_values_that_would_break_the_weights_or_a_hook_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GateSurgeryCallback(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"forget_bias": 10.0}, {"forget_bias": -10.0}, {"target_std": 1e-300}, {"target_std": 1e300}, {"epsilon": 1e-6}],
)
def test_item4_the_extreme_legal_values_write_finite_weights(kwargs: dict[str, Any]) -> None:
    model = saturated_regressor()
    saturate_(model.rnn, {1: 20.0})  # the forget gate too (saturated even for ε = 1e-6), so `forget_bias` is written
    callback = GateSurgeryCallback(every_n_steps=1, patience=1, auto_intervene=True, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        quiet_trainer(max_steps=2, callbacks=[callback]).fit(model, sequences(n=16))
    assert any(i.applied and i.target == "rnn/l0/forget" for i in callback.interventions)
    for name, p in model.named_parameters():
        assert bool(torch.isfinite(p).all()), name


# ------------------------------------------------------------------------- 8. a rollback undoes a surgery


class _Rollback(Callback):
    """A minimal rollback through the channel: snapshots at train start, restores at the end of step ``at``.

    Restores weights and optimizer state, and hands every channel participant its snapshot-time state, as
    EarlyCollapseCallback does.
    """

    def __init__(self, at: int) -> None:
        self.at = at
        self.saved: dict[str, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.saved = {
            "model": copy.deepcopy(pl_module.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "participants": channel_for(trainer).participant_states(),
        }

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step - 1 == self.at:
            pl_module.load_state_dict(self.saved["model"])
            trainer.optimizers[0].load_state_dict(self.saved["optimizer"])
            event = Event("rollback", step=self.at, source="_Rollback", data={"to_step": 0})
            channel_for(trainer).restore_participants(self.saved["participants"], event)


@pytest.mark.parametrize("rollback_first", [True, False], ids=["rollback-listed-first", "rollback-listed-last"])
def test_item8_a_surgery_undone_by_a_rollback_is_recorded_once_and_redone(rollback_first: bool) -> None:
    recorder = RecordingLogger()
    callback = GateSurgeryCallback(every_n_steps=1, patience=1, cooldown=100, auto_intervene=True)
    rollback = _Rollback(at=2)
    model = saturated_regressor()
    callbacks = [rollback, callback] if rollback_first else [callback, rollback]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=5, callbacks=callbacks, logger=recorder).fit(model, sequences(n=40))
    kinds = [(i.step, i.kind, i.target) for i in callback.interventions]
    keys = ["rnn/l0/input", "rnn/l0/output"]
    assert kinds == (
        [(0, "gate_surgery", k) for k in keys]  # repaired at step 0 ...
        + [(2, "gate_surgery_undone", k) for k in keys]  # ... undone by the rollback at step 2 (to the start) ...
        + [(3, "gate_surgery", k) for k in keys]  # ... and repaired again: the cooldown of an undone surgery is gone
    )
    undone = [i for i in callback.interventions if i.kind == "gate_surgery_undone"]
    assert all("surgery of step 0 was undone by _Rollback's rollback to step 0" in i.reason for i in undone)
    assert callback.surgeries == 2  # in effect: the redone ones; the undone ones are not counted again
    assert callback.diagnosis.applied == [(3, k) for k in keys]
    assert callback.diagnosis.undone == dict.fromkeys(keys, 1)
    rows = recorder.gate_rows()
    # step 2's row is written after the rollback when the rollback runs first, before it otherwise
    assert [rows[s]["gates/surgeries"] for s in range(5)] == [2.0, 2.0, 0.0 if rollback_first else 2.0, 2.0, 2.0]
    assert rows[4]["gates/saturation/rnn/l0/input"] < 0.05  # the restored saturated gate was repaired again
    assert sum("undid 2 gate surgeries" in m for m in messages_with(record, "GateSurgeryCallback")) == 1


def test_item8_a_gate_whose_surgery_two_rollbacks_undid_is_only_reported() -> None:
    class _Twice(_Rollback):
        def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
            for self.at in (1, 3):
                super().on_train_batch_end(trainer, pl_module, *args)

    callback = GateSurgeryCallback(every_n_steps=1, patience=1, cooldown=100, auto_intervene=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=6, callbacks=[callback, _Twice(at=1)]).fit(saturated_regressor(), sequences(n=48))
    surgeries = [(i.step, i.target) for i in callback.interventions if i.kind == "gate_surgery"]
    assert [s for s, _ in surgeries] == [0, 0, 2, 2]  # first surgery, redo after the first rollback, then no more
    assert callback.surgeries == 0 and callback.diagnosis.undone == {"rnn/l0/input": 2, "rnn/l0/output": 2}
    assert sum("may be what destabilises the run" in m for m in messages_with(record, "GateSurgeryCallback")) == 2


@pytest.mark.skipif(
    "restore_participants" not in inspect.getsource(early_collapse),
    reason="EarlyCollapseCallback does not hand its rollbacks to the channel yet",
)
def test_item8_a_real_early_collapse_rollback_keeps_the_gate_view_in_step() -> None:
    from lightning_gradflow import EarlyCollapseCallback

    class _NaNTargets(Callback):  # two NaN-loss batches in a row: a collapse EarlyCollapse rolls back
        def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, idx: int) -> None:
            if trainer.global_step in (6, 7):
                batch[1].fill_(math.nan)

    gates = GateSurgeryCallback(every_n_steps=1, patience=1, cooldown=100, auto_intervene=True)
    # the only snapshot is the one taken when training starts, before the gate surgery of step 0
    collapse = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=1000, rollback_patience=2)
    model = saturated_regressor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_steps=12, callbacks=[collapse, gates, _NaNTargets()]).fit(model, sequences(n=96))
    assert collapse.rollbacks >= 1
    made = [i for i in gates.interventions if i.kind == "gate_surgery" and i.applied]
    undone = [i for i in gates.interventions if i.kind == "gate_surgery_undone"]
    assert {i.target for i in undone} == {"rnn/l0/input", "rnn/l0/output"}
    assert gates.surgeries == len(made) - len(undone) == len(gates.diagnosis.applied) == 2  # no double count
    with torch.no_grad():
        total = model.rnn.bias_ih_l0 + model.rnn.bias_hh_l0
    assert bool((total[:8].abs() < 0.5).all())  # repaired again after the rollback restored σ(−8)


# --------------------------------------------------------------------------- 12. changed or corrupt state


def _good_state() -> dict[str, Any]:
    callback = GateSurgeryCallback(every_n_steps=1, patience=1, auto_intervene=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        quiet_trainer(max_steps=2, callbacks=[callback]).fit(saturated_regressor(), sequences(n=16))
    return callback.state_dict()


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"streaks": "garbage"}, "`streaks` to be a dict"),
        ({"streaks": {"rnn/l0/input": -3}}, "`streaks` to map gate keys to ints >= 0"),
        ({"last_surgery": {"rnn/l0/input": math.nan}}, "`last_surgery` to map gate keys to ints >= 0"),
        ({"surgeries": -5}, "`surgeries` is -5"),
        ({"applied": [["x", 3]]}, "`applied` to hold"),
        ({"interventions": 17}, "TypeError"),
        ({"warned": 3}, "`warned` to be a list of str"),
        ({"streaks": None}, "`streaks`"),
    ],
)
def test_item12_corrupt_state_fails_with_one_clear_error(change: dict[str, Any], what: str) -> None:
    state = {**_good_state(), **change}
    restored = GateSurgeryCallback(every_n_steps=1, patience=1, auto_intervene=True)
    before = restored.state_dict()
    with pytest.raises(ValueError, match="GateSurgeryCallback cannot restore its state") as err:
        restored.load_state_dict(state)
    assert restored.state_key in str(err.value) and what in str(err.value)
    assert restored.state_dict() == before  # nothing half-restored


def test_item12_missing_entries_and_a_resume_with_damaged_state_name_the_checkpoint_key(tmp_path: Path) -> None:
    for missing in ("streaks", "interventions", "warned"):
        state = _good_state()
        del state[missing]
        with pytest.raises(ValueError, match=f"KeyError: '{missing}'"):
            GateSurgeryCallback().load_state_dict(state)
    callback = GateSurgeryCallback(every_n_steps=1, patience=1, auto_intervene=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = quiet_trainer(max_steps=2, callbacks=[callback])
        t.fit(saturated_regressor(), sequences(n=64))
        path = tmp_path / "gates.ckpt"
        t.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["callbacks"][callback.state_key]["last_surgery"] = [1, 2]
    torch.save(checkpoint, path)
    resumed = quiet_trainer(
        max_steps=4, callbacks=[GateSurgeryCallback(every_n_steps=1, patience=1, auto_intervene=True)]
    )
    match = r"GateSurgeryCallback cannot restore .*delete `checkpoint\['callbacks'\]"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            resumed.fit(saturated_regressor(), sequences(n=64), ckpt_path=path)


def test_item12_a_checkpoint_written_before_rollbacks_were_tracked_still_restores() -> None:
    state = _good_state()
    legacy = {k: v for k, v in state.items() if k not in ("applied", "undone")}
    legacy["interventions"] = state["interventions"]["records"]  # the plain list older versions saved
    restored = GateSurgeryCallback(every_n_steps=1, patience=1, auto_intervene=True)
    restored.load_state_dict(legacy)
    assert restored.surgeries == state["surgeries"] == 2
    assert restored.diagnosis.applied == [(0, "rnn/l0/input"), (0, "rnn/l0/output")]
