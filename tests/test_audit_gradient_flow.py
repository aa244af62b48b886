"""Reliability audit (issues 11 and 12), GradientFlowCallback's part: one test (or a few) per item.

Tiny CPU models, a few steps each. Items: 1 the shared base; 2 the global norm on the channel; 3 sparse and complex
gradients (issue 12, items 1-2); 4 constructor values that used to fail in hooks, one home per default; 5 a NaN at
step 0 recorded at step 0; 6 rollbacks restore the clip statistics; 7 a failing logger; 8 corrupt checkpoints;
9 one definition of the end-to-end ratio and of the unscaling.
"""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradflow import GradientFlowCallback
from lightning_gradflow.callbacks import gradient_flow
from lightning_gradflow.callbacks._base import HealthCallback, is_log_step
from lightning_gradflow.callbacks._common import unscaled_for_optimizer
from lightning_gradflow.channel import Event, channel_for
from lightning_gradflow.clipping import (
    MAX_PERCENTILE_WINDOW,
    MAX_WARMUP_STEPS,
    AutoClipConfig,
    ZClipConfig,
    agc_clip_,
)
from lightning_gradflow.flow import MAX_PATIENCE, FlowRule, end_to_end_ratio
from lightning_gradflow.stats import tensor_stats
from tests.helpers.models import GradNormProbe, SmallMLP, regression_loader
from tests.helpers.stats_checks import comparable
from tests.helpers.training import RecordingLogger, all_finite, quiet_trainer, warnings_from

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- models and probes


def token_loader(n: int = 64, vocab: int = 200, seq: int = 5, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Token sequences (with repeated tokens inside a batch: uncoalesced sparse gradients) and a regression target."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq), generator=gen)
    y = torch.randn(n, 1, generator=gen)
    return DataLoader(TensorDataset(tokens, y), batch_size=batch_size, shuffle=False)


class SparseEmbeddingNet(LightningModule):
    """``nn.Embedding(sparse=True)`` and a linear head.

    ``"sgd"``: SGD on both (automatic optimization); ``"sparseadam"``: SparseAdam on the embedding, the head frozen
    (automatic); ``"sparseadam+adam"``: SparseAdam and Adam, two optimizers (manual optimization).
    """

    def __init__(self, optimizer: str = "sgd", vocab: int = 200, dim: int = 6) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, sparse=True)
        self.head = nn.Linear(dim, 1)
        self.optimizer_name = optimizer
        self.automatic_optimization = optimizer != "sparseadam+adam"
        if optimizer == "sparseadam":
            self.head.requires_grad_(False)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embedding(tokens).mean(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, y = batch
        loss = nn.functional.mse_loss(self(tokens), y)
        if self.automatic_optimization:
            return loss
        optimizers = self.optimizers()
        assert isinstance(optimizers, list)
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1)
        if self.optimizer_name == "sparseadam":
            return torch.optim.SparseAdam(list(self.embedding.parameters()), lr=0.01)
        return [
            torch.optim.SparseAdam(list(self.embedding.parameters()), lr=0.01),
            torch.optim.Adam(self.head.parameters(), lr=0.01),
        ]


class ComplexNet(LightningModule):
    """A complex-valued layer (``spectral.weight`` is complex64) between real input and a real head."""

    def __init__(self) -> None:
        super().__init__()
        self.spectral = nn.Module()
        self.spectral.weight = nn.Parameter(torch.randn(8, 6, dtype=torch.complex64) * 0.5)
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((x.to(torch.complex64) @ self.spectral.weight).abs())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _layer(name: str) -> str:
    return name.rpartition(".")[0].replace(".", "/")


class DenseProbe(Callback):
    """In ``on_before_optimizer_step``: every gradient and weight as a dense copy, and the float64 oracle's per-layer
    statistics of the dense gradients (``|z|`` for complex ones), for the parameters of the optimizer that steps.

    List it before the callback to see the gradients it reads, after it to see what it left (clipped).
    """

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, Tensor]] = {}
        self.weights: dict[int, dict[str, Tensor]] = {}
        self.layers: dict[int, dict[str, list[float]]] = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}  # this optimizer's only
        grads = {
            n: p.grad.to_dense().clone()
            for n, p in pl_module.named_parameters()
            if p.grad is not None and id(p) in stepped
        }
        self.grads[step] = grads
        self.weights[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters() if n in grads}
        per_layer: dict[str, list[Tensor]] = {}
        for name, g in grads.items():
            per_layer.setdefault(_layer(name), []).append(comparable(g).reshape(-1))
        self.layers[step] = {
            layer: tensor_stats([torch.cat(parts)], backend="reference").table[0].tolist()
            for layer, parts in per_layer.items()
        }


def _assert_logged_match_the_oracle(logger: RecordingLogger, probe: DenseProbe) -> int:
    """Per-layer norms, maxima and zero fractions logged at every step equal the oracle's; returns the rows checked."""
    checked = 0
    for step, row in logger.gradflow_rows().items():
        for layer, (sumsq, absmax, _, _, zeros, numel) in probe.layers[step].items():
            assert row[f"gradflow/grad_norm/{layer}"] == pytest.approx(math.sqrt(sumsq), rel=2e-5), (step, layer)
            assert row[f"gradflow/grad_absmax/{layer}"] == pytest.approx(absmax, rel=1e-6), (step, layer)
            assert row[f"gradflow/zero_fraction/{layer}"] == pytest.approx(zeros / numel, rel=1e-6), (step, layer)
            checked += 1
    return checked


def _fit(model: LightningModule, loader: Any, callbacks: list[Callback], steps: int, **kwargs: Any) -> Trainer:
    trainer = quiet_trainer(max_steps=steps, callbacks=callbacks, **kwargs)
    trainer.fit(model, loader)
    return trainer


# ------------------------------------------------------------------------------------ 1. the shared base class


def test_is_a_health_callback_of_the_gradflow_family_with_one_schedule() -> None:
    callback = GradientFlowCallback(log_every_n_steps=3, histogram_every_n_steps=0, figure_every_n_steps=0)
    assert isinstance(callback, HealthCallback) and callback.family == "gradflow"
    assert not hasattr(gradient_flow, "_to_host")  # the base's to_host is the one host transfer
    seed_everything(0, verbose=False)
    logger = RecordingLogger()
    _fit(SmallMLP(), regression_loader(160, 8), [callback], steps=10, logger=logger)
    # logging on Lightning's axis (is_log_step), plus the unfinished window at the end
    assert sorted(logger.gradflow_rows()) == [s for s in range(10) if is_log_step(s, 3)] + [9]
    assert callback.last_metrics == logger.gradflow_rows()[9]


# ------------------------------------------------------------------------------- 2. the global norm on the channel


class ChannelReader(Callback):
    """Reads the channel's ``"grad_norm"`` after each step; listed *before* the publisher: order does not matter."""

    def __init__(self) -> None:
        self.values: dict[int, Tensor | None] = {}

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        step = trainer.global_step - 1
        self.values[step] = channel_for(trainer).read(step, "grad_norm")


@pytest.mark.parametrize("auto_intervene", [False, True])
def test_the_global_norm_is_published_on_the_channel_before_clipping(auto_intervene: bool) -> None:
    seed_everything(0, verbose=False)
    reader, probe = ChannelReader(), GradNormProbe()
    # a tiny fixed threshold clips every step: the published norm must be the one before clipping
    callback = GradientFlowCallback(auto_intervene=auto_intervene, clip_mode="norm", clip_value=1e-3)
    _fit(SmallMLP(), regression_loader(128, 8, nan_batch=3), [reader, probe, callback], steps=6, logger=False)
    assert sorted(reader.values) == list(range(6))
    for step, value in reader.values.items():
        assert isinstance(value, Tensor) and value.ndim == 0, step
        if step == 3:
            assert math.isnan(float(value))  # a non-finite gradient value: NaN
        elif not auto_intervene and step > 3:
            continue  # monitoring only: the NaN reached the weights, every later norm is NaN too
        else:
            assert float(value) == pytest.approx(probe.norms[step]["__total__"], rel=1e-5), step
            assert float(value) > 1e-3  # not the clipped norm
    assert callback.measured_grad_norm(5) is reader.values[5]  # the public accessor still works


# ------------------------------------------------------------------------ 3. sparse and complex gradients


OPTIMIZERS = [
    pytest.param("sgd", id="sgd-automatic"),
    pytest.param("sparseadam", id="sparseadam-automatic"),
    pytest.param("sparseadam+adam", id="sparseadam-adam-manual"),
]


@pytest.mark.parametrize("auto_intervene", [False, True], ids=["monitoring", "auto"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_sparse_embedding_gradients_train_and_match_the_oracle(optimizer: str, auto_intervene: bool) -> None:
    seed_everything(0, verbose=False)
    model = SparseEmbeddingNet(optimizer)
    probe, logger = DenseProbe(), RecordingLogger()
    callback = GradientFlowCallback(auto_intervene=auto_intervene, log_every_n_steps=1)
    trainer = _fit(model, token_loader(), [probe, callback], steps=8, logger=logger)
    assert trainer.global_step == 8 and all_finite(model)
    grad = model.embedding.weight.grad
    assert grad is not None and grad.layout == torch.sparse_coo  # really trained on sparse gradients
    assert _assert_logged_match_the_oracle(logger, probe) >= 8
    rows = logger.gradflow_rows()
    # most of the embedding table saw no token: its zero fraction counts the rows the sparse gradient does not store
    embedding_rows = [r for r in rows.values() if "gradflow/zero_fraction/embedding" in r]
    assert embedding_rows and all(r["gradflow/zero_fraction/embedding"] > 0.3 for r in embedding_rows)
    assert all(r["gradflow/update_ratio/embedding"] > 0 for r in embedding_rows)


def _clip_kwargs(clip_mode: str) -> dict[str, Any]:
    # each mode made to clip every step: a cap of 1e-3 on the global norm, or a tiny AGC factor
    return {
        "zscore": {"warmup_steps": 2, "z_threshold": 0.5, "clip_value": 1e-3},
        "percentile": {"percentile": 1.0, "percentile_window": 4, "clip_value": 1e-3},
        "norm": {"clip_value": 1e-3},
        "agc": {"agc_clip_factor": 1e-4},
    }[clip_mode]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("clip_mode", ["zscore", "percentile", "norm", "agc"])
def test_every_clip_mode_clips_sparse_gradients_exactly(clip_mode: str, optimizer: str) -> None:
    seed_everything(0, verbose=False)
    model = SparseEmbeddingNet(optimizer)
    before, after = DenseProbe(), DenseProbe()
    callback = GradientFlowCallback(auto_intervene=True, clip_mode=clip_mode, **_clip_kwargs(clip_mode))  # type: ignore[arg-type]
    trainer = _fit(model, token_loader(), [before, callback, after], steps=6, logger=False)
    assert trainer.global_step == 6 and all_finite(model)
    for step, grads in before.grads.items():
        clipped = after.grads[step]
        if clip_mode == "agc":  # unit-wise: exactly what AGC does to the dense gradient; the output layer untouched
            output = callback.layers[-1]  # the head, or the embedding when the head is frozen
            names = [n for n in grads if _layer(n) != output]
            dense = [grads[n].clone() for n in names]
            agc_clip_([before.weights[step][n] for n in names], dense, 1e-4, 1e-3)
            for name, expected in zip(names, dense, strict=True):
                torch.testing.assert_close(clipped[name], expected, rtol=1e-5, atol=1e-12)
            for name in grads:
                if _layer(name) == output:
                    assert torch.equal(clipped[name], grads[name])
            assert not names or any(not torch.equal(clipped[n], grads[n]) for n in names)
            continue
        norm_before = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
        norm_after = math.sqrt(sum(float(g.double().square().sum()) for g in clipped.values()))
        assert norm_before > 1e-3 and norm_after <= 1e-3 * (1 + 1e-4), (step, norm_before, norm_after)
        coef = norm_after / norm_before
        for name, g in grads.items():  # every gradient, sparse and dense, scaled by the same coefficient
            torch.testing.assert_close(clipped[name], g * coef, rtol=1e-4, atol=1e-12)
    assert all(i.kind == "clip" for i in callback.interventions)
    # AGC leaves the output layer alone: with the head frozen, the embedding is the only (so the output) layer
    assert bool(callback.interventions) == (clip_mode != "agc" or optimizer != "sparseadam")


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="monitoring"),
        pytest.param({"auto_intervene": True}, id="zscore"),
        pytest.param({"auto_intervene": True, "clip_mode": "agc", "agc_clip_factor": 1e-3}, id="agc"),
        pytest.param({"auto_intervene": True, "clip_mode": "norm", "clip_value": 1e-3}, id="norm"),
    ],
)
def test_a_complex_parameter_trains_and_is_measured_by_its_magnitudes(kwargs: dict[str, Any]) -> None:
    seed_everything(0, verbose=False)
    model = ComplexNet()
    probe, after, logger = DenseProbe(), DenseProbe(), RecordingLogger()
    callback = GradientFlowCallback(log_every_n_steps=1, **kwargs)
    trainer = _fit(model, regression_loader(96, 8), [probe, callback, after], steps=6, logger=logger)
    assert trainer.global_step == 6 and all_finite(model)
    assert model.spectral.weight.grad is not None and model.spectral.weight.grad.is_complex()
    assert _assert_logged_match_the_oracle(logger, probe) == 12  # both layers, every step
    rows = logger.gradflow_rows()
    assert all(r["gradflow/update_ratio/spectral"] > 0 for r in rows.values())
    if kwargs.get("clip_mode") == "norm":
        for step, grads in after.grads.items():
            norm = math.sqrt(sum(float(comparable(g).square().sum()) for g in grads.values()))
            assert norm <= 1e-3 * (1 + 1e-4), step


def test_sparse_and_complex_histograms_and_figures_reach_tensorboard(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for model, loader in [(SparseEmbeddingNet(), token_loader()), (ComplexNet(), regression_loader(64, 8))]:
        seed_everything(0, verbose=False)
        logger = TensorBoardLogger(tmp_path, name=type(model).__name__)
        callback = GradientFlowCallback(log_every_n_steps=1, histogram_every_n_steps=1, figure_every_n_steps=2)
        _fit(model, loader, [callback], steps=4, logger=logger)
        logger.experiment.flush()
        events = EventAccumulator(str(logger.log_dir), size_guidance={"histograms": 0, "images": 0}).Reload()
        layer = "embedding" if isinstance(model, SparseEmbeddingNet) else "spectral"
        assert f"gradflow/grad_hist/{layer}" in events.Tags()["histograms"]
        assert "gradflow/flow" in events.Tags()["images"]
    assert (
        warnings_from(recwarn, "GradientFlowCallback", "raised") == []
    )  # no TensorBoard write failed (the guard would warn)


# -------------------------------------------------------------------- 4. constructor values, one home per default


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"exploding_ratio": 10**30}, id="exploding_ratio-huge"),
        pytest.param({"max_grad_rms": 2**70}, id="max_grad_rms-2**70"),
        pytest.param({"z_threshold": 1e300}, id="z_threshold-hugef"),
        pytest.param({"z_threshold": 10**30, "warmup_steps": 1}, id="z_threshold-huge-after-warmup"),
        pytest.param({"clip_mode": "norm", "clip_value": 1e300}, id="clip_value-hugef"),
        pytest.param({"clip_mode": "percentile", "clip_value": 2**70}, id="percentile-clip_value-2**70"),
        pytest.param({"clip_mode": "agc", "agc_eps": 1e300, "agc_clip_factor": 1e300}, id="agc-hugef"),
        pytest.param({"patience": MAX_PATIENCE, "warmup_steps": MAX_WARMUP_STEPS}, id="largest-bounds"),
    ],
)
def test_huge_legal_values_train(kwargs: dict[str, Any]) -> None:
    seed_everything(0, verbose=False)
    callback = GradientFlowCallback(auto_intervene=True, log_every_n_steps=1, **kwargs)
    model = SmallMLP()
    trainer = _fit(model, regression_loader(64, 8), [callback], steps=4, logger=RecordingLogger())
    assert trainer.global_step == 4 and all_finite(model)


@pytest.mark.parametrize(
    ("name", "value", "bound"),
    [
        ("patience", MAX_PATIENCE + 1, MAX_PATIENCE),
        ("patience", 10**30, MAX_PATIENCE),
        ("warmup_steps", 2**70, MAX_WARMUP_STEPS),
        ("percentile_window", 10**10, MAX_PERCENTILE_WINDOW),  # would allocate 40 GB
        ("percentile_window", MAX_PERCENTILE_WINDOW + 1, MAX_PERCENTILE_WINDOW),
    ],
)
def test_values_beyond_the_documented_bounds_are_refused_at_construction(name: str, value: int, bound: int) -> None:
    with pytest.raises(ValueError, match=rf"`{name}`.*\b{bound}\b.*got {value}"):
        GradientFlowCallback(**{name: value})


def test_each_default_is_declared_and_validated_in_one_place() -> None:
    defaults = {n: p.default for n, p in inspect.signature(GradientFlowCallback).parameters.items()}
    for config in (FlowRule(), ZClipConfig(), AutoClipConfig()):
        for field, value in vars(config).items():
            assert defaults[field] == value, field
    # the callback's messages are the pure layer's, word for word
    for kwargs, pure in [
        ({"vanishing_ratio": 2.0}, lambda: FlowRule(vanishing_ratio=2.0)),
        ({"exploding_ratio": 0.5}, lambda: FlowRule(exploding_ratio=0.5)),
        ({"patience": 0}, lambda: FlowRule(patience=0)),
        ({"min_grad_rms": 1.0, "max_grad_rms": 0.5}, lambda: FlowRule(min_grad_rms=1.0, max_grad_rms=0.5)),
        ({"ema_alpha": 1.0}, lambda: ZClipConfig(ema_alpha=1.0)),
        ({"z_threshold": "2"}, lambda: ZClipConfig(z_threshold="2")),  # type: ignore[arg-type]
        ({"warmup_steps": 0}, lambda: ZClipConfig(warmup_steps=0)),
        ({"percentile": 101}, lambda: AutoClipConfig(percentile=101)),
    ]:
        with pytest.raises((TypeError, ValueError)) as from_callback:
            GradientFlowCallback(**kwargs)
        with pytest.raises((TypeError, ValueError)) as from_rule:
            pure()
        assert str(from_callback.value) == str(from_rule.value), kwargs


# ------------------------------------------------------------------------- 5. a NaN at step 0 is recorded at step 0


@pytest.mark.parametrize("nan_step", [0, 3])
def test_monitoring_records_a_non_finite_step_at_the_step_it_happened(
    nan_step: int, recwarn: pytest.WarningsRecorder
) -> None:
    seed_everything(0, verbose=False)
    callback = GradientFlowCallback(log_every_n_steps=2)  # logging steps 1, 3, 5: never the NaN step 0
    _fit(SmallMLP(), regression_loader(96, 8, nan_batch=nan_step), [callback], steps=6, logger=RecordingLogger())
    assert [(i.step, i.kind, i.applied) for i in callback.interventions] == [(nan_step, "skip_step", False)]
    (message,) = warnings_from(recwarn, "GradientFlowCallback", "non-finite")
    assert f"from step {nan_step}" in message


# ----------------------------------------------------------------- 6. a rollback restores the clip statistics


class Roller(Callback):
    """Takes the channel's participant states after step ``take`` and restores them after step ``restore``."""

    def __init__(self, watched: GradientFlowCallback, take: int, restore: int) -> None:
        self.watched, self.take, self.restore = watched, take, restore
        self.saved: dict[str, Any] = {}
        self.then: dict[str, Any] = {}
        self.before_restore: dict[str, Any] = {}
        self.restored: dict[str, Any] = {}

    def _view(self) -> dict[str, Any]:
        clipper = self.watched.clipper
        return {
            "clipper": None if clipper is None else copy.deepcopy(clipper.state_dict()),
            "streaks": self.watched.monitor.state_dict(),
        }

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        channel = channel_for(trainer)
        if trainer.global_step == self.take:
            assert self.watched.state_key in channel.participants  # joined by the base at fit start
            self.saved, self.then = channel.participant_states(), self._view()
        elif trainer.global_step == self.restore:
            self.before_restore = self._view()
            event = Event("rollback", trainer.global_step, "test", {"to_step": self.take})
            channel.restore_participants(self.saved, event)
            self.restored = self._view()


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"warmup_steps": 3, "z_threshold": 0.5}, id="zscore"),
        pytest.param({"clip_mode": "percentile", "percentile_window": 5}, id="percentile"),
    ],
)
def test_a_rollback_on_the_channel_restores_clip_statistics_and_streaks(kwargs: dict[str, Any]) -> None:
    seed_everything(0, verbose=False)
    # an RMS floor above every gradient: every layer "vanishes" on every step, so the streaks grow step by step
    callback = GradientFlowCallback(auto_intervene=True, patience=100, min_grad_rms=10.0, max_grad_rms=1e3, **kwargs)
    roller = Roller(callback, take=5, restore=12)
    _fit(SmallMLP(), regression_loader(256, 8), [callback, roller], steps=16, logger=False)
    assert roller.then and roller.restored
    assert roller.before_restore != roller.then  # the statistics moved on between the snapshot and the rollback
    assert roller.restored == roller.then
    assert roller.then["streaks"][0] == [5.0, 5.0, 5.0] and roller.before_restore["streaks"][0] == [12.0] * 3
    assert callback.clipper is not None and callback.clipper.steps == 5 + (16 - 12)  # continued from the snapshot


def test_a_rollback_to_a_snapshot_taken_before_the_callback_joined_changes_nothing() -> None:
    seed_everything(0, verbose=False)
    callback = GradientFlowCallback(auto_intervene=True, warmup_steps=2)
    roller = Roller(callback, take=3, restore=6)
    roller.saved = {}  # as if the snapshot predated the callback
    roller.take = -1
    _fit(SmallMLP(), regression_loader(128, 8), [callback, roller], steps=8, logger=False)
    assert roller.restored == roller.before_restore


# ---------------------------------------------------------------------------------- 7. a logger that raises once


class FlakyLogger(RecordingLogger):
    """Raises on its first ``log_metrics`` call (a full disk, a dropped connection), then works."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls += 1
        if self.calls == 1:
            raise OSError("No space left on device")
        super().log_metrics(metrics, step)


def test_a_logger_that_raises_once_warns_once_and_the_run_completes(recwarn: pytest.WarningsRecorder) -> None:
    seed_everything(0, verbose=False)
    logger = FlakyLogger()
    callback = GradientFlowCallback(log_every_n_steps=1)
    trainer = _fit(SmallMLP(), regression_loader(96, 8), [callback], steps=6, logger=logger)
    assert trainer.global_step == 6
    (message,) = warnings_from(recwarn, "GradientFlowCallback", "FlakyLogger.log_metrics raised OSError")
    assert "Training goes on" in message
    assert sorted(logger.gradflow_rows()) == [1, 2, 3, 4, 5]  # every later step logged


# ---------------------------------------------------------------------- 8. corrupt or changed checkpoint state


def _trained_state(**kwargs: Any) -> tuple[GradientFlowCallback, dict[str, Any]]:
    seed_everything(0, verbose=False)
    kwargs = {"clip_mode": "zscore", **kwargs}  # ZClip's statistics unless told otherwise
    callback = GradientFlowCallback(auto_intervene=True, warmup_steps=3, **kwargs)
    _fit(SmallMLP(), regression_loader(96, 8), [callback], steps=6, logger=False)
    return callback, callback.state_dict()


def _set(path: str, value: Any) -> Any:
    def corrupt(state: dict[str, Any]) -> None:
        *keys, last = path.split(".")
        target = state
        for key in keys:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value

    return corrupt


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(_set("layers", 5), id="layers-not-a-list"),
        pytest.param(_set("skipped_steps", -3), id="negative-counter"),
        pytest.param(_set("streaks", [[math.nan, 0.0, 0.0], [0.0, 0.0, 0.0]]), id="nan-streak"),
        pytest.param(_set("streaks", [[1.0], [0.0]]), id="streaks-of-another-model"),
        pytest.param(_set("clipper.mean", math.nan), id="nan-clip-mean"),
        pytest.param(_set("clipper.var", -1.0), id="negative-clip-variance"),
        pytest.param(_set("clipper.warmup", [1.0] * 7), id="warmup-of-another-length"),
        pytest.param(_set("window.clipped", -1.0), id="negative-window-count"),
        pytest.param(_set("window.worst", "bad"), id="garbage-window"),
        pytest.param(_set("clipper", KeyError), id="missing-key"),
        pytest.param(_set("interventions", {"records": 3, "total": 1}), id="garbage-interventions"),
    ],
)
def test_corrupt_state_gives_one_clear_error_and_changes_nothing(corrupt: Any) -> None:
    _, state = _trained_state()
    corrupt(state)
    fresh = GradientFlowCallback(auto_intervene=True, clip_mode="zscore", warmup_steps=3)
    pristine = fresh.state_dict()
    with pytest.raises(ValueError, match="GradientFlowCallback cannot restore") as info:
        fresh.load_state_dict(state)
    assert fresh.state_key in str(info.value) and "checkpoint" in str(info.value)
    assert fresh.state_dict() == pristine  # nothing half-restored


@pytest.mark.parametrize(
    ("key", "value"),
    [("level", math.nan), ("spread", -1.0), ("clip_rate", 2.0), ("slope", KeyError)],
)
def test_corrupt_trend_clip_state_gives_one_clear_error(key: str, value: Any) -> None:
    _, state = _trained_state(clip_mode="trend")
    assert "level" in state["clipper"]
    _set(f"clipper.{key}", value)(state)
    fresh = GradientFlowCallback(auto_intervene=True)
    pristine = fresh.state_dict()
    with pytest.raises(ValueError, match="GradientFlowCallback cannot restore"):
        fresh.load_state_dict(state)
    assert fresh.state_dict() == pristine


def test_a_changed_percentile_window_is_refused_at_restore() -> None:
    _, state = _trained_state(clip_mode="percentile", percentile_window=8)
    with pytest.raises(ValueError, match="percentile_window=5"):
        GradientFlowCallback(auto_intervene=True, clip_mode="percentile", percentile_window=5).load_state_dict(state)


def test_older_checkpoints_without_the_new_fields_still_restore() -> None:
    callback, state = _trained_state()
    state["warned"] = [["vanishing", "head"]]  # the pair format of earlier versions
    del state["window"]["first_nonfinite"]
    fresh = GradientFlowCallback(auto_intervene=True, clip_mode="zscore", warmup_steps=3)
    fresh.load_state_dict(state)
    assert fresh.layers == callback.layers and "vanishing:head" in fresh._warned


def test_a_corrupt_checkpoint_fails_the_resume_with_the_clear_error(tmp_path: Path) -> None:
    seed_everything(0, verbose=False)
    callback = GradientFlowCallback(auto_intervene=True, clip_mode="zscore", warmup_steps=3)
    checkpoint = ModelCheckpoint(tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    _fit(SmallMLP(), regression_loader(96, 8), [callback, checkpoint], steps=4, logger=False, enable_checkpointing=True)
    path = tmp_path / "step=4.ckpt"
    saved = torch.load(path, weights_only=False)
    saved["callbacks"][callback.state_key]["clipper"]["mean"] = -math.inf
    torch.save(saved, path)
    resumed = GradientFlowCallback(auto_intervene=True, clip_mode="zscore", warmup_steps=3)
    trainer = quiet_trainer(max_steps=8, callbacks=[resumed], logger=False)
    with pytest.raises(ValueError, match=r"GradientFlowCallback cannot restore .*callbacks\["):
        trainer.fit(SmallMLP(), regression_loader(96, 8), ckpt_path=path)


def test_a_reused_instance_starts_a_second_fit_afresh() -> None:
    callback = GradientFlowCallback(auto_intervene=True, warmup_steps=3)
    for steps in (6, 4):
        seed_everything(0, verbose=False)
        _fit(SmallMLP(), regression_loader(96, 8, nan_batch=1), [callback], steps=steps, logger=False)
    assert callback.clipper is not None and callback.clipper.steps == 4 - 1  # this fit's finite steps only
    assert callback.skipped_steps == 1  # not 2: the counter belongs to one fit
    assert len([i for i in callback.interventions if i.kind == "skip_step"]) == 2  # the records are kept


# ------------------------------------------------------------- 9. one definition per concept (issue 11, item 3)


def test_the_end_to_end_ratio_has_one_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    assert float(end_to_end_ratio(torch.tensor([2.0, 4.0]))) == 0.5
    assert float(end_to_end_ratio(torch.tensor([2.0, 0.0]))) == 0.0  # no gradient at the output: no flow, not 1e38
    calls: list[float] = []

    def recording(rms: Tensor) -> Tensor:
        out = end_to_end_ratio(rms)
        calls.append(float(out))
        return out

    monkeypatch.setattr(gradient_flow, "end_to_end_ratio", recording)
    seed_everything(0, verbose=False)
    logger = RecordingLogger()
    _fit(SmallMLP(), regression_loader(64, 8), [GradientFlowCallback(log_every_n_steps=1)], steps=4, logger=logger)
    assert list(logger.series("gradflow/flow_ratio_end_to_end").values()) == pytest.approx(calls) and len(calls) == 4


def test_unscaling_for_fused_optimizers_is_the_stats_layers_scaling() -> None:
    class Scaler:
        def _get_scale_async(self) -> Tensor:
            return torch.tensor(8.0)

    fused = torch.optim.Adam([nn.Parameter(torch.ones(1))])
    fused._step_supports_amp_scaling = True  # type: ignore[attr-defined]
    stats = tensor_stats([torch.tensor([8.0, -16.0, 0.0]), torch.tensor([math.nan, 4.0])])
    unscaled = unscaled_for_optimizer(stats, Scaler(), fused)
    torch.testing.assert_close(unscaled.table, stats.scaled(1 / 8).table)
    expected = tensor_stats([torch.tensor([1.0, -2.0, 0.0]), torch.tensor([math.nan, 0.5])])
    torch.testing.assert_close(unscaled.table, expected.table)
    assert unscaled_for_optimizer(stats, None, fused) is stats
