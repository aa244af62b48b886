"""Behavioural tests of GradientFlowCallback: diagnosis, interventions, exact norms, loggers, CLI, resume, AMP, order.

Every test trains a tiny model for a few dozen to a few hundred steps on CPU. Multi-process tests live in
``test_gradient_flow_ddp.py``.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn

from lightning_gradflow import GradientFlowCallback, Intervention
from lightning_gradflow.clipping import ZScoreClipper
from tests.helpers.models import (
    GradNormProbe,
    PlainDeepMLP,
    RegressionModule,
    ResidualDeepMLP,
    ScrambledOrderNet,
    SmallMLP,
    VanillaRNN,
    layer_of,
    parameters_snapshot,
    regression_loader,
    sequence_loader,
)
from tests.helpers.training import RecordingLogger, all_finite, quiet_trainer, warnings_from

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ 1. diagnosis and its twin


def test_deep_sigmoid_mlp_is_diagnosed_vanishing_in_its_early_layers(recwarn: pytest.WarningsRecorder) -> None:
    seed_everything(0, verbose=False)
    model = PlainDeepMLP(depth=24, width=16, lr=0.05)
    callback = GradientFlowCallback(log_every_n_steps=10)
    logger = RecordingLogger()
    trainer = quiet_trainer(max_steps=60, logger=logger, callbacks=[callback])
    trainer.fit(model, regression_loader(256, 8, batch_size=32))

    assert callback.layers == [f"layers/{i}" for i in range(24)] + ["head"]
    vanishing = logger.series("gradflow/vanishing_layers")
    assert sorted(vanishing) == list(range(9, 60, 10))
    assert vanishing[59] > 0, vanishing
    assert all(v == 0 for v in logger.series("gradflow/exploding_layers").values())

    messages = warnings_from(recwarn, "GradientFlowCallback", "vanishing gradients", category=RuntimeWarning)
    flagged = [re.search(r"layer '([^']+)'", m).group(1) for m in messages]  # type: ignore[union-attr]
    assert len(flagged) == len(set(flagged)) == vanishing[59]  # one warning per layer, as many as are counted
    # the flagged layers are the early ones: a prefix of the depth order that starts at the input layer
    assert set(flagged) == set(callback.layers[: len(flagged)])
    assert "layers/0" in flagged and "head" not in flagged and "layers/23" not in flagged
    assert len(flagged) >= 12  # at least the first half of a 24-layer sigmoid stack
    first = next(m for m in messages if "'layers/0'" in m)
    assert "residual connections" in first and "normalisation" in first  # the fix is named


def test_residual_prenorm_twin_is_not_flagged(recwarn: pytest.WarningsRecorder) -> None:
    seed_everything(0, verbose=False)
    model = ResidualDeepMLP(depth=24, width=16, lr=0.05)
    callback = GradientFlowCallback(log_every_n_steps=10)
    logger = RecordingLogger()
    trainer = quiet_trainer(max_steps=300, logger=logger, callbacks=[callback])
    trainer.fit(model, regression_loader(256, 8, batch_size=32))

    assert trainer.global_step == 300
    assert all(math.isfinite(loss) for loss in model.losses) and all_finite(model)
    assert sum(model.losses[-10:]) < 0.25 * sum(model.losses[:10])  # it trains
    assert callback.layers[0] == "inp" and callback.layers[-2:] == ["norm", "head"]
    rows = logger.gradflow_rows()
    assert len(rows) == 30
    assert all(r["gradflow/vanishing_layers"] == 0 and r["gradflow/exploding_layers"] == 0 for r in rows.values())
    assert all(math.isfinite(r["gradflow/grad_norm_total"]) for r in rows.values())
    assert warnings_from(recwarn, "GradientFlowCallback", category=RuntimeWarning) == []
    assert callback.interventions == []


# ------------------------------------------------------------------------------ 2. exploding RNN and clipping

# A tanh RNN whose recurrent weights are scaled ×4: the first gradients are large, the first SGD steps saturate the
# hidden state, and the head then diverges. Without any clipping the loss is non-finite within 25-60 steps for
# every seed tried (0-5); seed 0 diverges at step 43.
RNN_SEED, RNN_STEPS, RNN_SEQ_LEN = 0, 100, 20


def _fit_rnn(callbacks: list[Callback]) -> tuple[VanillaRNN, RecordingLogger]:
    seed_everything(RNN_SEED, verbose=False)
    model = VanillaRNN(hidden=32, recurrent_scale=4.0, lr=0.2)
    logger = RecordingLogger()
    trainer = quiet_trainer(max_steps=RNN_STEPS, logger=logger, callbacks=callbacks)
    trainer.fit(model, sequence_loader(512, RNN_SEQ_LEN, 4, batch_size=32, seed=RNN_SEED))
    assert trainer.global_step == RNN_STEPS
    return model, logger


def test_exploding_rnn_diverges_without_the_callback() -> None:
    model, _ = _fit_rnn([])
    assert not all(math.isfinite(loss) for loss in model.losses)


def test_exploding_rnn_stays_finite_with_zscore_clipping() -> None:
    callback = GradientFlowCallback(auto_intervene=True, clip_mode="zscore")
    model, logger = _fit_rnn([callback])
    assert all(math.isfinite(loss) for loss in model.losses)
    assert all_finite(model)
    kinds = {i.kind for i in callback.interventions}
    assert "clip" in kinds and kinds <= {"clip", "skip_step"}
    assert all(i.applied and i.callback == "GradientFlowCallback" for i in callback.interventions)
    coef = logger.series("gradflow/clip_coef")
    # the divergence starts within ZClip's 25-step warm-up: the warm-up spike bound (10x the running median) clips
    assert min(c for s, c in coef.items() if s < 25) < 0.5


def test_exploding_rnn_loss_stays_bounded_with_zscore_clipping_and_a_cap() -> None:
    # ZClip judges each norm against the run's own history, so a run that diverges from its very first steps keeps
    # raising its own baseline (documented): a hard cap (`clip_value`) on top bounds it.
    model, _ = _fit_rnn([GradientFlowCallback(auto_intervene=True, clip_mode="zscore", clip_value=1.0)])
    assert max(model.losses) < 100.0


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"clip_mode": "percentile"}, id="percentile"),
        pytest.param({"clip_mode": "norm", "clip_value": 1.0}, id="norm"),
        pytest.param({"clip_mode": "agc"}, id="agc"),
    ],
)
def test_exploding_rnn_is_rescued_by_the_other_clip_modes(kwargs: dict[str, Any]) -> None:
    callback = GradientFlowCallback(auto_intervene=True, **kwargs)
    model, logger = _fit_rnn([callback])
    assert all(math.isfinite(loss) for loss in model.losses) and all_finite(model)
    assert max(model.losses) < 50.0  # bounded, not merely finite (the initial loss is ~0.9)
    coef = logger.series("gradflow/clip_coef")
    assert len(coef) == RNN_STEPS
    if kwargs["clip_mode"] == "agc":  # logged as the fraction of units left unclipped
        assert all(0.0 <= c <= 1.0 for c in coef.values()) and min(coef.values()) < 1.0
    else:
        assert sum(c < 0.5 for c in coef.values()) >= 10
        threshold = logger.series("gradflow/clip_threshold")
        norm = logger.series("gradflow/grad_norm_total")
        for step, c in coef.items():  # coef = min(1, threshold / norm)
            assert c == pytest.approx(min(1.0, threshold[step] / norm[step]), rel=1e-4)
    assert any(i.kind == "clip" for i in callback.interventions)


def _assert_clipping_changes_nothing(callback: GradientFlowCallback) -> None:
    def fit(callbacks: list[Callback]) -> tuple[SmallMLP, RecordingLogger]:
        seed_everything(0, verbose=False)
        model = SmallMLP(lr=0.01, optimizer="adam")
        logger = RecordingLogger()
        quiet_trainer(max_steps=20, logger=logger, callbacks=callbacks).fit(model, regression_loader(320, 8))
        return model, logger

    baseline, _ = fit([])
    model, logger = fit([callback])
    assert len(logger.series("gradflow/clip_coef")) == 20
    assert set(logger.series("gradflow/clip_coef").values()) == {1.0}
    assert [i for i in callback.interventions if i.kind == "clip"] == []
    for (name, p), q in zip(model.named_parameters(), baseline.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_fixed_clipping_that_does_not_clip_changes_nothing() -> None:
    _assert_clipping_changes_nothing(GradientFlowCallback(auto_intervene=True, clip_mode="norm", clip_value=1e6))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="during-warmup"),  # 20 steps < 25 warm-up steps
        pytest.param({"warmup_steps": 2, "z_threshold": 1e3}, id="after-warmup-below-threshold"),
        pytest.param({"clip_mode": "trend"}, id="trend-default"),
    ],
)
def test_zscore_clipping_that_does_not_clip_changes_nothing(kwargs: dict[str, Any]) -> None:
    _assert_clipping_changes_nothing(GradientFlowCallback(auto_intervene=True, **{"clip_mode": "zscore", **kwargs}))


# ---------------------------------------------------------------------------------------- 3. exact norms


@pytest.mark.parametrize("accumulate", [1, 4])
def test_logged_norms_equal_torch_norms(accumulate: int) -> None:
    seed_everything(0, verbose=False)
    model = SmallMLP(lr=0.01, optimizer="adam")
    probe = GradNormProbe()
    logger = RecordingLogger()
    trainer = quiet_trainer(
        max_steps=6, logger=logger, callbacks=[probe, GradientFlowCallback()], accumulate_grad_batches=accumulate
    )
    trainer.fit(model, regression_loader(8 * 6 * accumulate, 8, batch_size=8))

    rows = logger.gradflow_rows()
    assert sorted(rows) == sorted(probe.norms) == list(range(6))
    layers = {"encoder/0", "body/mid", "head"}
    for step, row in rows.items():
        reference = probe.norms[step]
        assert set(reference) == layers | {"__total__"}
        assert row["gradflow/grad_norm_total"] == pytest.approx(reference["__total__"], rel=1e-5)
        for layer in layers:
            assert row[f"gradflow/grad_norm/{layer}"] == pytest.approx(reference[layer], rel=1e-5)
        assert {k.removeprefix("gradflow/grad_norm/") for k in row if k.startswith("gradflow/grad_norm/")} == layers


class _SharedNormReader(Callback):
    """Listed after GradientFlowCallback: reads the norm it shares, as EarlyCollapseCallback does."""

    def __init__(self, gradflow: GradientFlowCallback) -> None:
        self.gradflow = gradflow
        self.seen: dict[int, float] = {}
        self.other_step: list[Tensor | None] = []

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        shared = self.gradflow.measured_grad_norm(trainer.global_step)
        assert shared is not None
        self.seen[trainer.global_step] = float(shared)
        self.other_step.append(self.gradflow.measured_grad_norm(trainer.global_step + 1))


class _EmbeddingThenDense(RegressionModule):
    """An embedding (its gradient is zero on unused rows) feeding a dense linear head."""

    def __init__(self) -> None:
        super().__init__(lr=0.01)
        self.embed = nn.Embedding(64, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        ids = (x.abs() * 7).long().clamp(max=63)[:, :4]  # a few rows of the table per batch
        return self.head(self.embed(ids).mean(1))


def test_between_reports_only_gradients_with_zeros_are_zero_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_gradflow.callbacks import gradient_flow

    calls: list[list[bool] | None] = []
    real = gradient_flow.tensor_stats

    def spy(tensors: Any, **kwargs: Any) -> Any:
        flags = kwargs.get("count_zeros")
        calls.append(None if flags is None else list(flags))
        return real(tensors, **kwargs)

    monkeypatch.setattr(gradient_flow, "tensor_stats", spy)
    seed_everything(0, verbose=False)
    callback = GradientFlowCallback(log_every_n_steps=3, histogram_every_n_steps=0, figure_every_n_steps=0)
    logger = RecordingLogger()
    quiet_trainer(max_steps=6, logger=logger, callbacks=[callback]).fit(
        _EmbeddingThenDense(), regression_loader(8 * 6, 8, batch_size=8)
    )
    # steps 0, 1: nothing reported yet, every zero counted; step 2 reports (full statistics); then only the embedding
    assert calls[:3] == [[True, True, True], [True, True, True], None]
    assert calls[3] == [True, False, False]  # embed.weight has zero rows; head.weight and head.bias are dense
    for step, row in logger.gradflow_rows().items():
        assert 0 < row["gradflow/zero_fraction/embed"] < 1, step  # exact on every report
        assert row["gradflow/zero_fraction/head"] == 0


def test_measured_grad_norm_is_shared_per_step() -> None:
    seed_everything(0, verbose=False)
    probe = GradNormProbe()
    gradflow = GradientFlowCallback(log_every_n_steps=3)
    reader = _SharedNormReader(gradflow)
    trainer = quiet_trainer(max_steps=5, logger=False, callbacks=[probe, gradflow, reader])
    trainer.fit(SmallMLP(lr=0.01), regression_loader(8 * 5, 8, batch_size=8))
    assert sorted(reader.seen) == list(range(5))
    for step, value in reader.seen.items():
        assert value == pytest.approx(probe.norms[step]["__total__"], rel=1e-5)
    assert reader.other_step == [None] * 5


def test_measured_grad_norm_is_nan_on_a_non_finite_step() -> None:
    seed_everything(0, verbose=False)
    gradflow = GradientFlowCallback(auto_intervene=True)  # skips the bad step: later steps stay finite
    reader = _SharedNormReader(gradflow)
    trainer = quiet_trainer(max_steps=4, logger=False, callbacks=[gradflow, reader])
    trainer.fit(SmallMLP(lr=0.01), regression_loader(8 * 4, 8, batch_size=8, nan_batch=2))
    assert math.isnan(reader.seen[2])
    assert all(math.isfinite(v) for step, v in reader.seen.items() if step != 2)
    assert [i.kind for i in gradflow.interventions] == ["skip_step"]


def test_logged_norms_follow_the_callbacks_own_interval() -> None:
    seed_everything(0, verbose=False)
    probe = GradNormProbe()
    logger = RecordingLogger()
    trainer = quiet_trainer(max_steps=12, logger=logger, callbacks=[probe, GradientFlowCallback(log_every_n_steps=4)])
    trainer.fit(SmallMLP(), regression_loader(8 * 12, 8, batch_size=8))
    rows = logger.gradflow_rows()
    assert sorted(rows) == [3, 7, 11]
    for step, row in rows.items():
        assert row["gradflow/grad_norm/head"] == pytest.approx(probe.norms[step]["head"], rel=1e-5)


# ------------------------------------------------------------------------ 5. monitoring does not change the run


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {"track_update_ratio": True, "histogram_every_n_steps": 2, "figure_every_n_steps": 10}, id="everything"
        ),
        pytest.param({"track_update_ratio": False, "group_by": "parameter"}, id="per-parameter"),
    ],
)
def test_monitoring_leaves_the_weights_bitwise_identical(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    def fit(callbacks: list[Callback], name: str) -> SmallMLP:
        seed_everything(0, verbose=False)
        model = SmallMLP(dropout=0.2, lr=0.01, optimizer="adam")  # dropout: extra RNG draws would show
        logger = TensorBoardLogger(tmp_path, name=name)
        quiet_trainer(max_steps=30, logger=logger, callbacks=callbacks).fit(model, regression_loader(480, 8))
        return model

    baseline = fit([], "baseline")
    callback = GradientFlowCallback(**kwargs)
    watched = fit([callback], "watched")
    assert callback.layers  # it did watch
    for (name, p), q in zip(watched.named_parameters(), baseline.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert watched.losses == baseline.losses


# ------------------------------------------------------------------------------------------------ 6. loggers


def _fit_small(logger: Any, callback: GradientFlowCallback, steps: int = 8) -> Trainer:
    seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_steps=steps, logger=logger, callbacks=[callback])
    trainer.fit(SmallMLP(lr=0.01, optimizer="adam"), regression_loader(16 * steps, 8))
    return trainer


LAYERS = ("encoder/0", "body/mid", "head")


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_gets_every_per_layer_metric(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv", version=0)
    _fit_small(logger, GradientFlowCallback())
    rows = _csv_rows(Path(logger.log_dir) / "metrics.csv")
    with_norm = [r for r in rows if r.get("gradflow/grad_norm_total")]
    assert sorted(int(r["step"]) for r in with_norm) == list(range(8))
    for name in ("grad_norm", "grad_rms", "grad_absmax", "zero_fraction", "weight_norm", "update_ratio", "flow_ratio"):
        for layer in LAYERS:
            values = [float(r[f"gradflow/{name}/{layer}"]) for r in with_norm]
            assert all(math.isfinite(v) for v in values), (name, layer)
    assert all(float(r["gradflow/update_ratio/head"]) > 0 for r in with_norm)  # Adam moves every weight


def _event_accumulator(log_dir: str) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0, "compressedHistograms": 0}
    acc = EventAccumulator(log_dir, size_guidance=guidance)
    acc.Reload()
    return acc


def test_tensorboard_logger_gets_scalars_histograms_figure_text_and_layout(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    callback = GradientFlowCallback(
        histogram_every_n_steps=2, figure_every_n_steps=4, auto_intervene=True, clip_mode="norm", clip_value=1e-3
    )
    _fit_small(logger, callback)
    assert any(i.kind == "clip" for i in callback.interventions)  # a tiny fixed threshold clips every step

    acc = _event_accumulator(logger.log_dir)
    tags = acc.Tags()
    for layer in LAYERS:
        for name in ("grad_norm", "update_ratio", "flow_ratio"):
            events = acc.Scalars(f"gradflow/{name}/{layer}")
            assert [e.step for e in events] == list(range(8)), (name, layer)
        histograms = acc.Histograms(f"gradflow/grad_hist/{layer}")
        assert [h.step for h in histograms] == [1, 3, 5, 7]
        assert all(h.histogram_value.num > 0 for h in histograms)
    assert [e.step for e in acc.Scalars("gradflow/grad_norm_total")] == list(range(8))
    assert [e.step for e in acc.Scalars("gradflow/clip_threshold")] == list(range(8))
    assert "gradflow/flow" in tags["images"]
    assert [e.step for e in acc.Images("gradflow/flow")] == [3, 7]
    text_tags = [t for t in tags["tensors"] if t.startswith("gradflow/interventions")]
    assert text_tags, tags["tensors"]
    texts = [e.tensor_proto.string_val[0].decode() for t in text_tags for e in acc.Tensors(t)]
    assert any("clip" in text for text in texts)
    assert "custom_scalars__config__" in tags["tensors"]


def test_tensorboard_logger_with_prefix_prefixes_every_tag(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0, prefix="run")
    _fit_small(logger, GradientFlowCallback(histogram_every_n_steps=4, figure_every_n_steps=4), steps=4)
    tags = _event_accumulator(logger.log_dir).Tags()
    assert "run-gradflow/grad_norm/head" in tags["scalars"]
    assert "run-gradflow/grad_hist/head" in tags["histograms"]
    assert "run-gradflow/flow" in tags["images"]


def test_several_loggers_all_get_the_scalars(tmp_path: Path) -> None:
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    tb_logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    recording = RecordingLogger()
    trainer = _fit_small([csv_logger, tb_logger, recording], GradientFlowCallback(), steps=5)
    assert len(trainer.loggers) == 3

    recorded = recording.series("gradflow/grad_norm/head")
    assert sorted(recorded) == list(range(5))
    csv_rows = [r for r in _csv_rows(Path(csv_logger.log_dir) / "metrics.csv") if r.get("gradflow/grad_norm/head")]
    assert {int(r["step"]): float(r["gradflow/grad_norm/head"]) for r in csv_rows} == pytest.approx(recorded)
    events = _event_accumulator(tb_logger.log_dir).Scalars("gradflow/grad_norm/head")
    assert {e.step: e.value for e in events} == pytest.approx(recorded)


def test_no_logger_warns_once_and_training_works(recwarn: pytest.WarningsRecorder) -> None:
    callback = GradientFlowCallback(auto_intervene=True, clip_mode="norm", clip_value=1e-3)
    seed_everything(0, verbose=False)
    model = SmallMLP(lr=0.01, optimizer="adam")
    before = parameters_snapshot(model)
    trainer = quiet_trainer(max_steps=6, logger=False, callbacks=[callback])
    trainer.fit(model, regression_loader(96, 8))
    about_logger = [w for w in recwarn if issubclass(w.category, RuntimeWarning) and "logger" in str(w.message).lower()]
    assert len(about_logger) == 1, [str(w.message) for w in about_logger]
    assert "GradientFlowCallback" in str(about_logger[0].message)
    assert trainer.global_step == 6
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert any(i.kind == "clip" for i in callback.interventions)  # interventions work without a logger


# ----------------------------------------------------------------------------------------------- 7. LightningCLI


def _cli(init_args: dict[str, Any]) -> Any:
    from lightning.pytorch.cli import LightningCLI

    args = {
        "trainer": {
            "logger": False,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "callbacks": [{"class_path": "lightning_gradflow.GradientFlowCallback", "init_args": init_args}],
        }
    }
    return LightningCLI(
        SmallMLP, run=False, args=args, save_config_callback=None, parser_kwargs={"exit_on_error": False}
    )


def _cli_callback(cli: Any) -> GradientFlowCallback:
    found = [c for c in cli.trainer.callbacks if isinstance(c, GradientFlowCallback)]
    assert len(found) == 1
    return found[0]


def test_cli_builds_the_callback_from_a_yaml_file(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  logger: false\n"
        "  enable_progress_bar: false\n"
        "  enable_checkpointing: false\n"
        f"  default_root_dir: {tmp_path}\n"
        "  callbacks:\n"
        "    - class_path: lightning_gradflow.GradientFlowCallback\n"
        "      init_args:\n"
        "        auto_intervene: true\n"
        "        clip_mode: percentile\n"
        "        percentile: 5\n"
        "        log_every_n_steps: 7\n"
        "        group_by: parameter\n"
        "  max_steps: 3\n"
    )
    cli = LightningCLI(SmallMLP, run=False, args=["--config", str(config)], save_config_callback=None)
    callback = _cli_callback(cli)
    assert callback.auto_intervene is True
    assert callback.clip_mode == "percentile"
    assert callback.clipper is not None and callback.clipper.percentile == 5.0  # type: ignore[union-attr]
    assert callback.log_every_n_steps == 7 and callback.group_by == "parameter"
    cli.trainer.fit(cli.model, regression_loader(48, 8))
    assert callback.layers and all("/" in layer for layer in callback.layers)


def test_cli_accepts_dict_arguments() -> None:
    callback = _cli_callback(_cli({"auto_intervene": True, "clip_mode": "norm", "clip_value": 2}))
    assert callback.clip_mode == "norm" and callback.clip_value == 2.0


@pytest.mark.parametrize(
    ("init_args", "expected"),
    [
        pytest.param({"clip_mode": "bogus"}, "clip_mode", id="clip_mode-literal"),
        pytest.param({"group_by": "layer"}, "group_by", id="group_by-literal"),
        pytest.param({"log_every_n_steps": "ten"}, "log_every_n_steps", id="int-type"),
        pytest.param({"z_threshold": -1.0}, "z_threshold", id="out-of-range"),
        pytest.param({"ema_alpha": 2.0}, "ema_alpha", id="ema_alpha-range"),
        pytest.param({"clip_mode": "norm"}, "clip_value", id="norm-without-clip_value"),
    ],
)
def test_cli_rejects_bad_arguments_naming_them(init_args: dict[str, Any], expected: str) -> None:
    from jsonargparse import ArgumentError

    # the parser rejects wrong types and literals (ArgumentError); the constructor's checks surface as ValueError
    with pytest.raises((ArgumentError, ValueError)) as info:
        _cli(init_args)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"log_every_n_steps": 1.5}, TypeError, ["log_every_n_steps", "1.5"]),
        ({"log_every_n_steps": 0}, ValueError, ["log_every_n_steps", "0"]),
        ({"histogram_every_n_steps": -1}, ValueError, ["histogram_every_n_steps", "-1"]),
        ({"patience": True}, TypeError, ["patience", "True"]),
        ({"warmup_steps": "25"}, TypeError, ["warmup_steps", "'25'"]),
        ({"clip_value": "1.0"}, TypeError, ["clip_value", "'1.0'"]),
        ({"clip_value": -1.0}, ValueError, ["clip_value", "-1.0"]),
        ({"clip_value": float("inf")}, ValueError, ["clip_value", "inf"]),
        ({"z_threshold": 0}, ValueError, ["z_threshold", "0"]),
        ({"ema_alpha": 1.0}, ValueError, ["ema_alpha", "1.0"]),
        ({"percentile": 0}, ValueError, ["percentile", "0"]),
        ({"percentile": 101}, ValueError, ["percentile", "101"]),
        ({"vanishing_ratio": 2.0}, ValueError, ["vanishing_ratio", "2.0"]),
        ({"exploding_ratio": 0.5}, ValueError, ["exploding_ratio", "0.5"]),
        ({"min_grad_rms": 1.0, "max_grad_rms": 0.5}, ValueError, ["min_grad_rms", "max_grad_rms"]),
        ({"clip_mode": "norm"}, ValueError, ["clip_mode", "clip_value"]),
        ({"clip_mode": "l2"}, ValueError, ["clip_mode", "'l2'"]),
        ({"group_by": "layer"}, ValueError, ["group_by", "'layer'"]),
        ({"backend": "cuda"}, ValueError, ["backend", "'cuda'"]),
    ],
)
def test_constructor_rejects_bad_arguments_naming_them(kwargs: dict[str, Any], error: type, names: list[str]) -> None:
    with pytest.raises(error) as info:
        GradientFlowCallback(**kwargs)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"vanishing_ratio": "0.01"}, id="vanishing_ratio"),
        pytest.param({"ema_alpha": "0.9"}, id="ema_alpha"),
        pytest.param({"percentile": "10"}, id="percentile"),
        pytest.param({"auto_intervene": "yes"}, id="auto_intervene"),
        pytest.param({"track_update_ratio": 1}, id="track_update_ratio"),
    ],
)
def test_constructor_type_errors_name_every_argument(kwargs: dict[str, Any]) -> None:
    (name,) = kwargs
    with pytest.raises(TypeError, match=name):
        GradientFlowCallback(**kwargs)


# ----------------------------------------------------------------------------------------------------- 8. resume


class _StateAtStart(Callback):
    """Copies the callback's state when training starts (after any checkpoint was restored)."""

    def __init__(self, watched: GradientFlowCallback) -> None:
        self.watched = watched
        self.state: dict[str, Any] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.state = self.watched.state_dict()


def _fit_with_checkpoint(
    tmp_path: Path, make_callback: Any
) -> tuple[GradientFlowCallback, Path, GradientFlowCallback, dict[str, Any]]:
    """Trains 20 steps saving a checkpoint at step 10, then resumes a fresh model and callback from it.

    Returns the uninterrupted run's callback, the checkpoint, the resumed run's callback, and the resumed
    callback's state when training restarted.
    """

    def loader() -> Any:
        return regression_loader(160, 8, batch_size=16)  # 10 batches: the checkpoint at step 10 ends an epoch

    seed_everything(0, verbose=False)
    full_cb = make_callback()
    checkpoint = ModelCheckpoint(tmp_path, every_n_train_steps=10, save_top_k=-1, filename="{step}")
    full_model = SmallMLP(lr=0.01, optimizer="adam")
    trainer = quiet_trainer(max_steps=20, logger=False, callbacks=[full_cb, checkpoint], enable_checkpointing=True)
    trainer.fit(full_model, loader())
    ckpt_path = tmp_path / "step=10.ckpt"

    seed_everything(1, verbose=False)  # a different init: everything must come from the checkpoint
    resumed_cb = make_callback()
    at_start = _StateAtStart(resumed_cb)
    resumed_model = SmallMLP(lr=0.01, optimizer="adam")
    trainer = quiet_trainer(max_steps=20, logger=False, callbacks=[resumed_cb, at_start])
    trainer.fit(resumed_model, loader(), ckpt_path=ckpt_path)
    assert trainer.global_step == 20
    for (name, p), q in zip(resumed_model.named_parameters(), full_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)  # the resume itself is faithful
    assert at_start.state is not None
    return full_cb, ckpt_path, resumed_cb, at_start.state


def test_resume_restores_the_callback_state(tmp_path: Path) -> None:
    def make_callback() -> GradientFlowCallback:
        # a low z-threshold and a short warm-up, so that the clipper clips and its statistics move in both halves;
        # logging windows of 5 steps, so the checkpoint at step 10 falls right after a logging step
        return GradientFlowCallback(
            auto_intervene=True, clip_mode="zscore", warmup_steps=3, z_threshold=0.5, log_every_n_steps=5, patience=2
        )

    full_cb, ckpt_path, resumed_cb, state_at_start = _fit_with_checkpoint(tmp_path, make_callback)
    saved = torch.load(ckpt_path, weights_only=False)["callbacks"][full_cb.state_key]
    assert saved["clipper"]["steps"] == 10 and saved["layers"] == full_cb.layers
    assert state_at_start == saved  # restored before training went on

    assert resumed_cb.layers == full_cb.layers == ["encoder/0", "body/mid", "head"]
    assert resumed_cb.clipper is not None and full_cb.clipper is not None
    assert resumed_cb.clipper.steps == full_cb.clipper.steps == 20
    full_state, resumed_state = full_cb.clipper.state_dict(), resumed_cb.clipper.state_dict()
    assert resumed_state["mean"] == pytest.approx(full_state["mean"], rel=1e-5)
    assert resumed_state["var"] == pytest.approx(full_state["var"], rel=1e-5)
    assert any(i.kind == "clip" and i.step < 10 for i in full_cb.interventions)
    assert any(i.kind == "clip" and i.step >= 10 for i in full_cb.interventions)
    keys = [(i.step, i.kind, i.target) for i in resumed_cb.interventions]
    assert len(keys) == len(set(keys))  # nothing recorded twice
    _assert_same_interventions(resumed_cb.interventions, full_cb.interventions)


def test_resume_inside_a_logging_window_keeps_its_counts(tmp_path: Path) -> None:
    def make_callback() -> GradientFlowCallback:
        # a tiny fixed threshold clips every step; windows of 3 steps: 9-11 straddles the checkpoint at step 10
        return GradientFlowCallback(auto_intervene=True, clip_mode="norm", clip_value=1e-4, log_every_n_steps=3)

    full_cb, _, resumed_cb, _ = _fit_with_checkpoint(tmp_path, make_callback)
    assert [i.step for i in full_cb.interventions] == [2, 5, 8, 11, 14, 17, 19]  # 19: the final, partial window
    _assert_same_interventions(resumed_cb.interventions, full_cb.interventions)


def _assert_same_interventions(actual: list[Intervention], expected: list[Intervention]) -> None:
    assert [(i.step, i.kind, i.target, i.reason, i.applied) for i in actual] == [
        (i.step, i.kind, i.target, i.reason, i.applied) for i in expected
    ]
    for a, e in zip(actual, expected, strict=True):
        assert a.before == pytest.approx(e.before, rel=1e-5, nan_ok=True)
        assert a.after == pytest.approx(e.after, rel=1e-5, nan_ok=True)


# ------------------------------------------------------------------------------------------------ 9. fp16 AMP


class _OverflowProbe(Callback):
    """Records, per optimizer step, whether the (unscaled) gradients held non-finite values, and the loss scale."""

    def __init__(self) -> None:
        self.overflow: dict[int, bool] = {}
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.overflow[trainer.global_step] = any(not bool(torch.isfinite(g).all()) for g in grads)
        self.scales.append(float(trainer.precision_plugin.scaler.get_scale()))  # type: ignore[attr-defined]


def _fit_fp16(callback: GradientFlowCallback, steps: int = 40) -> tuple[SmallMLP, RecordingLogger, _OverflowProbe]:
    from lightning.pytorch.plugins import MixedPrecision

    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    except (RuntimeError, ValueError, AssertionError) as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"this torch has no CPU GradScaler: {err}")
    seed_everything(0, verbose=False)
    model = SmallMLP(lr=0.01, optimizer="adam")
    logger = RecordingLogger()
    probe = _OverflowProbe()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = quiet_trainer(max_steps=steps, logger=logger, callbacks=[probe, callback], plugins=[plugin])
    trainer.fit(model, regression_loader(16 * steps, 8))
    assert trainer.global_step == steps
    return model, logger, probe


@pytest.mark.parametrize("auto_intervene", [False, True])
def test_fp16_overflow_steps_are_counted_not_treated_as_explosions(auto_intervene: bool) -> None:
    callback = GradientFlowCallback(auto_intervene=auto_intervene)
    model, logger, probe = _fit_fp16(callback)

    overflow_steps = sorted(s for s, bad in probe.overflow.items() if bad)
    assert len(overflow_steps) >= 20  # 2**40 must come down to ~2**17 first, halving once per overflow
    assert overflow_steps[0] == 0 and probe.scales[-1] < 2.0**20
    logged = logger.series("gradflow/overflow_steps")
    assert sorted(s for s, v in logged.items() if v > 0) == overflow_steps
    assert all(v in (0.0, 1.0) for v in logged.values())  # log_every_n_steps=1: one step per window
    assert all(v == 0 for v in logger.series("gradflow/exploding_layers").values())
    assert all(v == 0 for v in logger.series("gradflow/skipped_steps").values())
    assert callback.skipped_steps == 0
    assert [i for i in callback.interventions if i.kind == "skip_step"] == []
    # training proceeds once the scale is right
    assert all(math.isfinite(loss) for loss in model.losses[overflow_steps[-1] + 1 :])
    assert all_finite(model)
    assert sum(model.losses[-5:]) < sum(model.losses[:5])


def test_fp16_overflow_steps_are_not_diagnosed_as_vanishing(recwarn: pytest.WarningsRecorder) -> None:
    _, logger, _ = _fit_fp16(GradientFlowCallback())
    assert all(v == 0 for v in logger.series("gradflow/vanishing_layers").values())
    assert warnings_from(recwarn, "GradientFlowCallback", category=RuntimeWarning) == []


def test_fp16_overflow_steps_do_not_feed_the_clip_statistics() -> None:
    callback = GradientFlowCallback(auto_intervene=True, clip_mode="zscore", warmup_steps=10)
    _, logger, probe = _fit_fp16(callback)
    norms = logger.series("gradflow/grad_norm_total")  # pre-clip norms
    reference = ZScoreClipper(warmup_steps=10)
    for step in sorted(norms):
        if not probe.overflow[step]:
            reference(torch.tensor(norms[step]))
    assert reference.mean is not None and callback.clipper is not None
    assert callback.clipper.state_dict()["mean"] == pytest.approx(reference.state_dict()["mean"], rel=1e-4)
    assert callback.clipper.state_dict()["var"] == pytest.approx(reference.state_dict()["var"], rel=1e-4)


def test_fp16_overflow_during_zclip_warmup_does_not_freeze_training() -> None:
    callback = GradientFlowCallback(auto_intervene=True, clip_mode="zscore", warmup_steps=10)
    _, logger, probe = _fit_fp16(callback, steps=50)
    last_overflow = max(s for s, bad in probe.overflow.items() if bad)
    coef = logger.series("gradflow/clip_coef")
    assert min(c for s, c in coef.items() if s > last_overflow) > 0.01


# --------------------------------------------------------------------------------- 10. grouping and depth order


def test_group_by_parameter_gives_one_layer_per_tensor() -> None:
    seed_everything(0, verbose=False)
    model = SmallMLP(lr=0.01, optimizer="adam")
    probe = GradNormProbe(group_by="parameter")
    callback = GradientFlowCallback(group_by="parameter")
    logger = RecordingLogger()
    quiet_trainer(max_steps=4, logger=logger, callbacks=[probe, callback]).fit(model, regression_loader(64, 8))

    expected = {layer_of(name, "parameter") for name, _ in model.named_parameters()}
    assert expected == {"encoder/0/weight", "encoder/0/bias", "body/mid/weight", "body/mid/bias"} | {
        "head/weight",
        "head/bias",
    }
    assert set(callback.layers) == expected and len(callback.layers) == len(expected)
    # depth order, module by module: encoder, then body, then head
    modules = [layer.rsplit("/", 1)[0] for layer in callback.layers]
    assert list(dict.fromkeys(modules)) == ["encoder/0", "body/mid", "head"]
    for step, row in logger.gradflow_rows().items():
        for layer in expected:
            assert row[f"gradflow/grad_norm/{layer}"] == pytest.approx(probe.norms[step][layer], rel=1e-5)


@pytest.mark.parametrize(
    ("group_by", "expected"),
    [
        ("module", ["inp", "shared", "mid", "head"]),
        ("parameter", ["inp", "shared", "mid", "head"]),
    ],
)
def test_depth_order_follows_the_gradient_not_the_registration(group_by: str, expected: list[str]) -> None:
    seed_everything(0, verbose=False)
    model = ScrambledOrderNet(lr=0.01)
    assert [name for name, _ in model.named_children()] == ["head", "mid", "shared", "inp"]
    probe = GradNormProbe(group_by=group_by)
    callback = GradientFlowCallback(group_by=group_by)
    logger = RecordingLogger()
    quiet_trainer(max_steps=3, logger=logger, callbacks=[probe, callback]).fit(model, regression_loader(48, 8))

    modules = [layer.split("/")[0] for layer in callback.layers]
    assert list(dict.fromkeys(modules)) == expected
    assert len(callback.layers) == (4 if group_by == "module" else 8)  # the shared module is one layer
    for step, row in logger.gradflow_rows().items():  # the shared layer's gradient sums both uses
        for layer in callback.layers:
            assert row[f"gradflow/grad_norm/{layer}"] == pytest.approx(probe.norms[step][layer], rel=1e-5)


# -------------------------------------------------------------------------------- 4b. copies sent to DDP ranks


def _spawn_copy(obj: Any) -> Any:
    """A copy made the way ``ddp_spawn`` sends the Trainer's callbacks to its worker processes."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's reductions: tensors go to shared memory)

    buffer = io.BytesIO()
    ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
    return pickle.loads(buffer.getvalue())


def test_callback_copies_sent_to_spawned_ranks_share_no_state() -> None:
    original = GradientFlowCallback(auto_intervene=True, clip_mode="norm", clip_value=1e-4, log_every_n_steps=3)
    first, second = _spawn_copy(original), _spawn_copy(original)

    def fit(callback: GradientFlowCallback) -> list[Intervention]:
        seed_everything(0, verbose=False)
        quiet_trainer(max_steps=7, logger=False, callbacks=[callback]).fit(SmallMLP(), regression_loader(112, 8))
        return callback.interventions

    # The first run ends inside an unfinished logging window (step 6): its clip is left in the first copy's window
    # counters. Were they the second copy's too, the second run's first window would report "4 of the last 3 steps".
    expected = fit(first)
    assert [i.step for i in expected][:2] == [2, 5]
    _assert_same_interventions(fit(second), expected)


# ------------------------------------------------------------------------------------------ 11. non-finite steps


class _WeightsAroundStep(Callback):
    """Copies the weights just before and just after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.before = parameters_snapshot(pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step + 1:
            self.after = parameters_snapshot(pl_module)


NAN_STEP = 3


@pytest.mark.parametrize("clip_mode", ["zscore", "percentile", "agc"])
def test_nonfinite_step_never_reaches_the_weights(clip_mode: str, recwarn: pytest.WarningsRecorder) -> None:
    seed_everything(0, verbose=False)
    model = SmallMLP(lr=0.01, optimizer="adam")
    callback = GradientFlowCallback(auto_intervene=True, clip_mode=clip_mode)  # type: ignore[arg-type]
    around = _WeightsAroundStep(NAN_STEP)
    logger = RecordingLogger()
    trainer = quiet_trainer(max_steps=8, logger=logger, callbacks=[callback, around])
    trainer.fit(model, regression_loader(128, 8, nan_batch=NAN_STEP))

    assert not math.isfinite(model.losses[NAN_STEP])  # the NaN batch really was trained on
    assert around.before and around.after
    for name, p in around.after.items():
        assert torch.equal(p, around.before[name]), name
    assert all_finite(model)
    optimizer = trainer.optimizers[0]
    for p in model.parameters():
        state = optimizer.state[p]
        assert bool(torch.isfinite(state["exp_avg"]).all()) and bool(torch.isfinite(state["exp_avg_sq"]).all())
        assert int(state["step"]) == 7  # Adam skipped exactly one step for every parameter
    skips = [i for i in callback.interventions if i.kind == "skip_step"]
    assert len(skips) == 1 and skips[0].step == NAN_STEP and skips[0].applied and skips[0].before >= 1
    assert callback.skipped_steps == 1
    assert logger.series("gradflow/skipped_steps")[7] == 1.0
    assert logger.series("gradflow/nonfinite_grads")[NAN_STEP] > 0
    assert (
        warnings_from(recwarn, "GradientFlowCallback", "non-finite", category=RuntimeWarning) == []
    )  # acted on, not warned about


def test_nonfinite_gradients_without_intervention_warn_once(recwarn: pytest.WarningsRecorder) -> None:
    seed_everything(0, verbose=False)
    model = SmallMLP(lr=0.01, optimizer="adam")
    callback = GradientFlowCallback()
    trainer = quiet_trainer(max_steps=8, logger=RecordingLogger(), callbacks=[callback])
    trainer.fit(model, regression_loader(128, 8, nan_batch=NAN_STEP))

    assert not all_finite(model)  # monitoring only: the NaN reached the weights
    messages = warnings_from(recwarn, "GradientFlowCallback", "non-finite", category=RuntimeWarning)
    assert len(messages) == 1, messages
    assert "auto_intervene=True" in messages[0]
    assert callback.skipped_steps == 0
    assert [(i.kind, i.applied) for i in callback.interventions] == [("skip_step", False)]


def test_nonfinite_gradients_warn_even_between_logging_steps(recwarn: pytest.WarningsRecorder) -> None:
    seed_everything(0, verbose=False)
    callback = GradientFlowCallback(log_every_n_steps=50)  # the Trainer's default interval
    trainer = quiet_trainer(max_steps=8, logger=RecordingLogger(), callbacks=[callback])
    trainer.fit(SmallMLP(lr=0.01, optimizer="adam"), regression_loader(128, 8, nan_batch=NAN_STEP))
    assert len(warnings_from(recwarn, "GradientFlowCallback", "non-finite", category=RuntimeWarning)) == 1
