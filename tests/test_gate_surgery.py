"""GateSurgeryCallback in real (small) Lightning runs: detection, logging, surgery, state, arguments."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_gradflow.callbacks.gate_surgery import GateSurgeryCallback
from tests.helpers.gate_models import NoGates, RecurrentRegressor, saturate_, saturated_regressor, sequences
from tests.helpers.training import RecordingLogger, load_example, messages_with, quiet_trainer

LSTM_GATES = ("input", "forget", "cell", "output")
METRICS = ("saturation", "mean", "saturated_units", "sigma_prime")


pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(model: LightningModule, callback: Callback | None, steps: int, **kwargs: Any) -> Trainer:
    callbacks = kwargs.pop("callbacks", [])
    loader = kwargs.pop("loader", None) or sequences(n=8 * steps)
    ckpt_path = kwargs.pop("ckpt_path", None)
    t = quiet_trainer(max_steps=steps, callbacks=([callback] if callback else []) + callbacks, **kwargs)
    t.fit(model, loader, ckpt_path=ckpt_path)
    return t


def _healthy(seed: int = 0, **kwargs: Any) -> RecurrentRegressor:
    seed_everything(seed, verbose=False)
    return RecurrentRegressor(**kwargs)


# ---------------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "`every_n_steps` > 0, but got 0"),
        ({"every_n_steps": 2.5}, TypeError, "`every_n_steps` to be an int"),
        ({"probe_size": -1}, ValueError, "`probe_size` > 0"),
        ({"epsilon": 0.5}, ValueError, r"`epsilon` in \[1e-06, 0.5\), but got 0.5"),
        ({"epsilon": 1e-17}, ValueError, r"`epsilon` in \[1e-06, 0.5\), but got 1e-17"),
        ({"epsilon": "small"}, TypeError, "`epsilon` to be a float"),
        ({"unit_threshold": 1.5}, ValueError, r"`unit_threshold` in \(0, 1\], but got 1.5"),
        ({"saturation_threshold": 1.0}, ValueError, r"`saturation_threshold` in \[0, 1\), but got 1.0"),
        ({"patience": 0}, ValueError, "`patience` > 0"),
        ({"cooldown": -1}, ValueError, "`cooldown` >= 0"),
        ({"max_surgeries": True}, TypeError, "`max_surgeries` to be an int"),
        ({"target_std": 0.0}, ValueError, "`target_std` to be a finite number > 0"),
        ({"forget_bias": float("nan")}, ValueError, r"`forget_bias` to be a finite float in \[-10, 10\]"),
        ({"forget_bias": "one"}, TypeError, "`forget_bias` to be a float"),
        ({"extra_gates": {"proj": "relu"}}, ValueError, r"`extra_gates\['proj'\]` to be one of"),
        ({"extra_gates": ["proj"]}, TypeError, "`extra_gates` to be a dict"),
        ({"exclude": "rnn"}, TypeError, "`exclude` to be a list of str"),
        ({"repair_gates": ["forgot"]}, ValueError, r"`repair_gates` to hold gate names .* \['forgot'\]"),
        ({"repair_gates": []}, ValueError, "`repair_gates=\\[\\]` would allow no surgery"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        GateSurgeryCallback(**kwargs)


def test_unknown_module_names_fail_at_fit_start() -> None:
    with pytest.raises(ValueError, match=r"`extra_gates` names \['decoder.gate'\], which is not a module"):
        _fit(_healthy(), GateSurgeryCallback(extra_gates={"decoder.gate": "sigmoid"}), steps=1)
    with pytest.raises(ValueError, match=r"`exclude` names \['rnnn'\]"):
        _fit(_healthy(), GateSurgeryCallback(exclude=["rnnn"]), steps=1)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharded_strategies_are_refused(strategy: str) -> None:
    fake = SimpleNamespace(strategy=type(strategy, (), {})())
    with pytest.raises(MisconfigurationException, match=f"GateSurgeryCallback does not support `strategy={strategy}`"):
        GateSurgeryCallback().setup(fake, _healthy(), "fit")  # type: ignore[arg-type]


def test_state_key_is_known_at_construction_and_tells_instances_apart() -> None:
    a = GateSurgeryCallback(exclude=["encoder"])
    b = GateSurgeryCallback(exclude=["decoder"])
    assert a.state_key != b.state_key
    assert a.state_key == GateSurgeryCallback(exclude=["encoder"]).state_key
    quiet_trainer(callbacks=[a, b])  # two instances with different keys coexist


# -------------------------------------------------------------------------------------------------- no gates


def test_a_model_without_gates_warns_once_and_stays_out_of_the_way() -> None:
    recorder = RecordingLogger()
    callback = GateSurgeryCallback(every_n_steps=1, auto_intervene=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(NoGates(), callback, steps=3, logger=recorder)
    messages = messages_with(record, "GateSurgeryCallback")
    assert len(messages) == 1 and "found no gated module" in messages[0] and "extra_gates" in messages[0]
    assert recorder.gate_rows() == {} and callback.interventions == []


def test_excluding_every_gated_module_is_the_same_as_no_gates() -> None:
    with pytest.warns(RuntimeWarning, match="found no gated module .* outside `exclude`"):
        _fit(_healthy(), GateSurgeryCallback(every_n_steps=1, exclude=["rnn"]), steps=2)


# ---------------------------------------------------------------------------------------------------- logging


@pytest.mark.parametrize(
    ("kwargs", "rows", "gates"),
    [
        (
            {"kind": "lstm", "num_layers": 2, "bidirectional": True},
            ["l0", "l0_reverse", "l1", "l1_reverse"],
            LSTM_GATES,
        ),
        ({"kind": "gru", "batch_first": False}, ["l0"], ("reset", "update", "new")),
        ({"kind": "lstmcell"}, ["l0"], LSTM_GATES),
        ({"kind": "lstm", "packed": True, "bidirectional": True}, ["l0", "l0_reverse"], LSTM_GATES),
    ],
)
def test_logs_every_gate_of_every_layer_and_direction_on_probe_steps(
    kwargs: dict[str, Any], rows: list[str], gates: tuple[str, ...]
) -> None:
    recorder = RecordingLogger()
    _fit(_healthy(**kwargs), GateSurgeryCallback(every_n_steps=3), steps=7, logger=recorder)
    logged = recorder.gate_rows()
    assert sorted(logged) == [0, 3, 6]
    expected = {f"gates/{m}/rnn/{r}/{g}" for m in METRICS for r in rows for g in gates} | {"gates/surgeries"}
    for metrics in logged.values():
        assert set(metrics) == expected
        for key, value in metrics.items():
            assert math.isfinite(value), key
            if key.startswith(("gates/saturation/", "gates/saturated_units/")):
                assert 0.0 <= value <= 1.0
            if key.startswith("gates/sigma_prime/"):
                assert 0.0 < value <= (1.0 if key.endswith(("/cell", "/new")) else 0.25)


def test_probe_positions_cover_the_probe_sample_and_every_micro_batch() -> None:
    callback = GateSurgeryCallback(every_n_steps=1, probe_size=3)
    _fit(_healthy(), callback, steps=2, accumulate_grad_batches=2, loader=sequences(n=64, steps=12, batch_size=8))
    assert callback.last_stats["rnn"].positions.tolist() == [2 * 3 * 12]  # 2 micro-batches x 3 sequences x 12 steps
    packed = GateSurgeryCallback(every_n_steps=1, probe_size=4)
    _fit(_healthy(packed=True), packed, steps=1, loader=sequences(n=8, steps=12, batch_size=8))
    assert packed.last_stats["rnn"].positions.tolist() == [12 + 11 + 10 + 9]  # the first 4 sequences' lengths


class _HookCounter(Callback):
    """Counts the forward hooks on the model's RNN when each batch starts (list it after the gate callback)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.counts[trainer.global_step] = len(pl_module.rnn._forward_hooks)


def test_hooks_exist_only_on_probe_steps() -> None:
    counter = _HookCounter()
    _fit(_healthy(), GateSurgeryCallback(every_n_steps=3), steps=7, callbacks=[counter])
    assert counter.counts == {0: 1, 1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 1}


class _EveryOther(GateSurgeryCallback):
    def should_compute(self, step: int) -> bool:
        return step in (1, 4)


def test_should_compute_can_be_overridden() -> None:
    recorder = RecordingLogger()
    _fit(_healthy(), _EveryOther(), steps=6, logger=recorder)
    assert sorted(recorder.gate_rows()) == [1, 4]


def test_extra_gates_are_measured_and_repaired() -> None:
    class GatedHead(RecurrentRegressor):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(1, 1)
            with torch.no_grad():
                self.gate_proj.bias.fill_(-12.0)

        def forward(self, x: Tensor) -> Tensor:
            y = super().forward(x)
            return y * torch.sigmoid(self.gate_proj(y))

    recorder = RecordingLogger()
    callback = GateSurgeryCallback(
        every_n_steps=1, patience=1, auto_intervene=True, extra_gates={"gate_proj": "sigmoid"}
    )
    seed_everything(0, verbose=False)
    with pytest.warns(RuntimeWarning, match=r"'gate_proj/l0/gate' is saturated .* kept weight rows"):
        _fit(GatedHead(), callback, steps=2, logger=recorder)
    assert recorder.gate_rows()[0]["gates/saturation/gate_proj/l0/gate"] == 1.0
    assert [i.target for i in callback.interventions] == ["gate_proj/l0/gate"]
    assert callback.interventions[0].after < 0.01


def test_tensorboard_gets_scalars_histograms_layout_and_text(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    callback = GateSurgeryCallback(every_n_steps=2, patience=1, auto_intervene=True)
    with pytest.warns(RuntimeWarning, match="is saturated"):
        _fit(saturated_regressor(), callback, steps=4, logger=logger)
    guidance = {"scalars": 0, "histograms": 0, "tensors": 0}
    acc = EventAccumulator(logger.log_dir, size_guidance=guidance)
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("gates/saturation/rnn/l0/input")] == [0, 2]
    assert [e.step for e in acc.Scalars("gates/surgeries")] == [0, 2]
    for gate in LSTM_GATES:
        for family in ("activation_hist", "preact_hist"):
            histograms = acc.Histograms(f"gates/{family}/rnn/l0/{gate}")
            assert [h.step for h in histograms] == [0, 2]
            # probe_size 16 > batch 8: 8 sequences x 12 steps x 8 units
            assert all(h.histogram_value.num == 8 * 12 * 8 for h in histograms)
    first_input = acc.Histograms("gates/activation_hist/rnn/l0/input")[0].histogram_value
    assert first_input.max <= 0.05  # σ(−8): every activation in the lowest bucket
    assert "custom_scalars__config__" in tags["tensors"]
    texts = [
        e.tensor_proto.string_val[0].decode() for t in tags["tensors"] if "interventions" in t for e in acc.Tensors(t)
    ]
    assert any("gate_surgery" in text and "rnn/l0/input" in text for text in texts)


# ------------------------------------------------------------------------------------------------- diagnosis


def test_a_saturated_model_is_detected_and_its_healthy_twin_is_not() -> None:
    kwargs = {"num_layers": 2, "bidirectional": True}
    results = {}
    for name, model in (("saturated", saturated_regressor(**kwargs)), ("healthy", _healthy(**kwargs))):
        recorder = RecordingLogger()
        callback = GateSurgeryCallback(every_n_steps=2, patience=2)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            _fit(model, callback, steps=5, logger=recorder)
        results[name] = (recorder.gate_rows(), callback, messages_with(record, "GateSurgeryCallback"))

    rows, callback, messages = results["saturated"]
    keys = [f"rnn/{r}/{g}" for r in ("l0", "l0_reverse", "l1", "l1_reverse") for g in ("input", "output")]
    for key in keys:
        assert rows[0][f"gates/saturation/{key}"] > 0.99
        assert rows[0][f"gates/saturated_units/{key}"] == 1.0
        assert rows[0][f"gates/sigma_prime/{key}"] < 0.001
    # diagnosed at the second flagged probe (patience 2): one record and one warning per saturated gate
    assert sorted(i.target for i in callback.interventions) == sorted(keys)
    assert all(i.step == 2 and not i.applied and math.isnan(i.after) for i in callback.interventions)
    assert all(i.before > 0.99 for i in callback.interventions)
    assert len(messages) == len(keys)
    assert all("would set the bias (b_ih + b_hh) of 8 unit(s) to 0" in m for m in messages)
    assert rows[4]["gates/surgeries"] == 0.0

    rows, callback, messages = results["healthy"]
    assert callback.interventions == [] and messages == []
    for metrics in rows.values():
        assert max(v for k, v in metrics.items() if k.startswith("gates/saturation/")) < 0.1


def test_monitoring_leaves_the_run_bitwise_identical() -> None:
    def run(with_callback: bool) -> tuple[dict[str, Tensor], list[float]]:
        model = saturated_regressor(kind="lstm", num_layers=2, bidirectional=True, dropout=0.3)
        callback = GateSurgeryCallback(every_n_steps=1, patience=1) if with_callback else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _fit(model, callback, steps=4)
        return {k: v.clone() for k, v in model.state_dict().items()}, model.losses

    weights, losses = run(True)
    reference_weights, reference_losses = run(False)
    assert losses == reference_losses
    assert weights.keys() == reference_weights.keys()
    for name, value in weights.items():
        assert torch.equal(value, reference_weights[name]), name


# -------------------------------------------------------------------------------------------------- surgery


def test_surgery_repairs_the_saturated_gates_and_records_before_and_after() -> None:
    recorder = RecordingLogger()
    callback = GateSurgeryCallback(every_n_steps=2, patience=2, auto_intervene=True)
    model = saturated_regressor(num_layers=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(model, callback, steps=7, logger=recorder)
    messages = messages_with(record, "GateSurgeryCallback")
    assert len(messages) == 4
    assert all(" is saturated at step 2: 100.0% of its activations, and 8 of 8 units" in m for m in messages)
    assert all("Surgery on those units (bias set to 0, kept W_ih/W_hh rows" in m for m in messages)
    targets = sorted(i.target for i in callback.interventions)
    assert targets == sorted(f"rnn/l{k}/{g}" for k in (0, 1) for g in ("input", "output"))
    for record in callback.interventions:
        assert record.applied and record.step == 2 and record.kind == "gate_surgery"
        assert record.before > 0.99 and record.after < 0.05, record
        assert "optimizer state reset: exp_avg, exp_avg_sq" in record.reason
    assert callback.surgeries == 4
    rows = recorder.gate_rows()
    assert [rows[s]["gates/surgeries"] for s in (0, 2, 4, 6)] == [0.0, 4.0, 4.0, 4.0]
    for step in (4, 6):  # the gates stay healthy afterwards
        assert rows[step]["gates/saturation/rnn/l0/input"] < 0.05
        assert rows[step]["gates/sigma_prime/rnn/l1/output"] > 0.1
    with torch.no_grad():
        total = model.rnn.bias_ih_l1 + model.rnn.bias_hh_l1
    assert bool((total[:8].abs() < 0.1).all())  # input gate reset to 0, then 4 Adam steps of lr 0.01


def test_surgery_helps_the_broken_model() -> None:
    def final_loss(auto: bool) -> float:
        model = saturated_regressor(seed=3, hidden=16)
        callback = GateSurgeryCallback(every_n_steps=5, patience=1, auto_intervene=auto)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _fit(model, callback, steps=80, loader=sequences(n=64, batch_size=16))
        return sum(model.losses[-10:]) / 10

    repaired, stuck = final_loss(True), final_loss(False)
    assert repaired < 0.6 * stuck, (repaired, stuck)


class _Resaturate(Callback):
    """Pins the input gate back at −8 before every batch: a model that keeps saturating."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        saturate_(pl_module.rnn, {0: -8.0})


def test_cooldown_and_max_surgeries() -> None:
    callback = GateSurgeryCallback(every_n_steps=1, patience=1, cooldown=3, max_surgeries=3, auto_intervene=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(_healthy(), callback, steps=12, callbacks=[_Resaturate()])
    assert [(i.step, i.target) for i in callback.interventions] == [(s, "rnn/l0/input") for s in (0, 3, 6)]
    messages = messages_with(record, "GateSurgeryCallback")
    assert sum("max_surgeries=3" in m for m in messages) == 1
    assert sum("Surgery on those units" in m for m in messages) == 1  # one warning per finding


def test_max_surgeries_counts_the_surgeries_decided_on_the_same_probe() -> None:
    callback = GateSurgeryCallback(every_n_steps=1, patience=1, max_surgeries=1, auto_intervene=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(saturated_regressor(), callback, steps=2)
    assert [(i.step, i.target) for i in callback.interventions] == [(0, "rnn/l0/input")]
    assert callback.surgeries == 1
    assert (
        sum("`max_surgeries=1` surgeries are in effect" in m for m in messages_with(record, "GateSurgeryCallback")) == 1
    )


def test_a_second_fit_of_the_same_instance_starts_a_new_diagnosis() -> None:
    callback = GateSurgeryCallback(every_n_steps=1, patience=1, cooldown=100, auto_intervene=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _fit(saturated_regressor(), callback, steps=1)
        _fit(saturated_regressor(seed=1), callback, steps=1)  # another model: the first one's cooldowns do not apply
    targets = ["rnn/l0/input", "rnn/l0/output"]
    assert [(i.step, i.target, i.applied) for i in callback.interventions] == [(0, t, True) for t in targets] * 2
    assert callback.surgeries == 2  # in effect on the model of this fit


def test_repair_gates_limits_surgery_and_reports_the_rest() -> None:
    callback = GateSurgeryCallback(every_n_steps=1, patience=1, auto_intervene=True, repair_gates=["output"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(saturated_regressor(), callback, steps=2)
    assert [i.target for i in callback.interventions] == ["rnn/l0/output"]
    messages = messages_with(record, "GateSurgeryCallback")
    assert len(messages) == 2
    assert (
        "'rnn/l0/input' is saturated" in messages[0]
        and "only reported: its gate is not in `repair_gates`" in messages[0]
    )
    assert "'rnn/l0/output' is saturated" in messages[1] and "Surgery on those units" in messages[1]


# ----------------------------------------------------------------------------------------------------- state


def test_state_dict_round_trip() -> None:
    callback = GateSurgeryCallback(every_n_steps=1, patience=2, auto_intervene=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _fit(_healthy(), callback, steps=4, callbacks=[_Resaturate()])
    state = callback.state_dict()
    assert state["surgeries"] == 1 and state["last_surgery"] == {"rnn/l0/input": 1}
    assert state["streaks"]["rnn/l0/input"] == 2 and state["streaks"]["rnn/l0/forget"] == 0
    restored = GateSurgeryCallback(every_n_steps=1, patience=2, auto_intervene=True)
    restored.load_state_dict(torch.load(_roundtrip(state), weights_only=True))
    assert restored.state_dict() == state
    assert restored.interventions == callback.interventions and restored.surgeries == 1


def _roundtrip(state: dict[str, Any]) -> Any:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_resume_from_a_checkpoint_does_not_repeat_a_surgery(tmp_path: Path) -> None:
    def make() -> GateSurgeryCallback:
        return GateSurgeryCallback(every_n_steps=1, patience=1, cooldown=100, auto_intervene=True)

    first = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
        t = _fit(_healthy(), first, steps=2, callbacks=[_Resaturate()], loader=sequences(n=64))
        path = tmp_path / "gates.ckpt"
        t.save_checkpoint(path)
        second = make()
        _fit(_healthy(), second, steps=6, callbacks=[_Resaturate()], loader=sequences(n=64), ckpt_path=path)
    assert [(i.step, i.target) for i in first.interventions] == [(0, "rnn/l0/input")]
    assert second.interventions == first.interventions  # restored, and the cooldown holds across the resume
    assert second.surgeries == 1


# --------------------------------------------------------------------------------------------------- example


def test_example_detects_on_the_first_probe_and_surgery_lowers_the_loss() -> None:
    example = load_example("saturated_lstm")
    small = "--steps 60 --hidden 32 --layers 1 --every-n-steps 10 --patience 1 --max-chars 50000 --batch-size 16"
    args = example.parse_args([*small.split(), "--seq-len", "32"])
    without, with_surgery = example.compare(args)
    for run in (without, with_surgery):
        step, metrics = run.probes[0]
        assert step == 0 and metrics["gates/saturation/lstm/l0/input"] > 0.95
        assert metrics["gates/saturation/lstm/l0/output"] > 0.95
    assert [(i.step, i.target, i.applied) for i in without.interventions] == [
        (0, "lstm/l0/input", False),
        (0, "lstm/l0/output", False),
    ]
    assert [(i.step, i.applied) for i in with_surgery.interventions] == [(0, True), (0, True)]
    assert all(i.after < 0.05 for i in with_surgery.interventions)
    assert with_surgery.probes[-1][1]["gates/saturation/lstm/l0/input"] < 0.1
    assert without.probes[-1][1]["gates/saturation/lstm/l0/input"] > 0.5  # Adam alone is slow to get out
    assert with_surgery.final_loss(6) < 0.9 * without.final_loss(6)


# ------------------------------------------------------------------------------------------------ LightningCLI


def test_lightning_cli_builds_the_callback_from_yaml(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  logger: false\n"
        "  enable_progress_bar: false\n"
        "  enable_checkpointing: false\n"
        "  max_steps: 2\n"
        "  callbacks:\n"
        "    - class_path: lightning_gradflow.callbacks.gate_surgery.GateSurgeryCallback\n"
        "      init_args:\n"
        "        every_n_steps: 1\n"
        "        auto_intervene: true\n"
        "        epsilon: 0.02\n"
        "        exclude: [head]\n"
        "        extra_gates: {head: sigmoid}\n"
        "        repair_gates: [input, output]\n"
    )
    cli = LightningCLI(RecurrentRegressor, run=False, args=["--config", str(config)], save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, GateSurgeryCallback)]  # type: ignore[attr-defined]
    assert callback.every_n_steps == 1 and callback.auto_intervene and callback.epsilon == 0.02
    assert callback.exclude == ["head"] and callback.extra_gates == {"head": "sigmoid"}
    assert callback.repair_gates == ["input", "output"]
    cli.trainer.fit(cli.model, sequences(n=16))
    assert set(callback.last_stats) == {"rnn"}  # the excluded head is not measured
