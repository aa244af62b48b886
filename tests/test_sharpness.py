"""SharpnessCallback: exact values on quadratics, stability rules, monitoring leaves runs bitwise unchanged, the
learning-rate controller rescues a run past its edge of stability, and resuming does not repeat an intervention."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_gradflow import curvature
from lightning_gradflow.callbacks.sharpness import METRICS, SharpnessCallback
from lightning_gradflow.curvature import (
    adam_preconditioner,
    hessian_eigenvalues,
    lanczos,
    optimizer_preconditioner,
    preconditioned_batch_sharpness,
    preconditioned_sharpness,
    stability_rule,
    stability_threshold,
)
from tests.helpers.sharpness_models import (
    LinearRegression,
    NoisyNet,
    QuietMLP,
    exact_hessian,
    loader,
    regression_data,
    top_eigenvalue,
    unstable_regression,
)
from tests.helpers.training import fit_recorded, load_example, quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- stability rules


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [
        ({}, "gd"),
        ({"momentum": 0.9}, "heavy_ball"),
        ({"momentum": 0.5, "dampening": 0.3}, "heavy_ball"),
        ({"momentum": 0.9, "nesterov": True}, "nesterov"),
        ({"momentum": 0.6, "weight_decay": 0.5}, "heavy_ball"),
    ],
)
def test_sgd_threshold_is_where_pytorch_sgd_starts_to_diverge(kwargs: dict[str, Any], kind: str) -> None:
    """PyTorch's own SGD on ``λ/2 w²``: it converges 3 % below the threshold and diverges 3 % above it."""
    lr = 0.1
    w = nn.Parameter(torch.ones((), dtype=torch.float64))
    rule = stability_rule(torch.optim.SGD([w], lr=lr, **kwargs))
    assert rule.kind == kind
    for factor, grows in ((0.97, False), (1.03, True)):
        curvature = factor * rule.threshold
        w = nn.Parameter(torch.ones((), dtype=torch.float64))
        opt = torch.optim.SGD([w], lr=lr, **kwargs)
        for _ in range(1000):
            opt.zero_grad()
            (0.5 * curvature * w**2).backward()
            opt.step()
        value = abs(float(w.detach()))
        assert (not value < 1e-3) == grows, (factor, value)  # NaN (overflow) counts as grown


def test_adam_rule_and_preconditioner_match_adams_update() -> None:
    """``Δw = −η m / P``: the preconditioner is exactly what divides Adam's momentum in its step."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5))
    opt = torch.optim.Adam([w], lr=0.01, betas=(0.8, 0.99))
    assert not stability_rule(opt).settled
    for _ in range(6):
        opt.zero_grad()
        (w**4).sum().backward()
        before = w.detach().clone()
        opt.step()
    state = opt.state[w]
    p = adam_preconditioner(state["exp_avg_sq"], float(state["step"]), (0.8, 0.99), 1e-8)
    torch.testing.assert_close(before - w.detach(), 0.01 * state["exp_avg"] / p)
    rule = stability_rule(opt)
    assert (rule.kind, rule.preconditioned, rule.settled) == ("adam", True, True)  # 6 steps >= 1/(1 - 0.8)
    assert rule.threshold == pytest.approx((2 + 2 * 0.8) / (0.2 * 0.01))
    kept, found = optimizer_preconditioner(opt, [w])  # type: ignore[misc]
    assert kept == [w] and torch.equal(found[0], p)


def test_preconditioned_sharpness_against_the_exact_matrix() -> None:
    torch.manual_seed(0)
    x, y = regression_data(32, 4)
    model = nn.Linear(4, 1).double()
    params = list(model.parameters())

    def loss() -> Tensor:
        return nn.functional.mse_loss(model(x.double()), y.double())

    h = exact_hessian(x)  # parameter order: weight (4), bias (1)
    p = [torch.rand(1, 4, dtype=torch.float64) + 0.1, torch.rand(1, dtype=torch.float64) + 0.1]
    d = torch.cat([q.reshape(-1) for q in p]).rsqrt()
    exact = float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1])
    assert preconditioned_sharpness(loss, params, p, 5) == pytest.approx(exact, rel=1e-10)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss(), params)])
    u = g / torch.cat([q.reshape(-1) for q in p])
    expected = float(u @ h @ u / (g @ u))
    assert preconditioned_batch_sharpness(loss, params, p) == pytest.approx(expected, rel=1e-10)
    assert preconditioned_batch_sharpness(loss, params) == pytest.approx(float(g @ h @ g / (g @ g)), rel=1e-10)
    assert expected <= exact


@pytest.mark.parametrize(("track_smallest", "reorthogonalize"), [(False, True), (True, True), (False, False)])
def test_lanczos_stops_early_within_its_tolerance(track_smallest: bool, reorthogonalize: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(400, 400, generator=gen, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([50.0, 20.0, -8.0]), torch.randn(397, generator=gen)]).double()
    matrix = q @ torch.diag(spectrum) @ q.T
    calls = []

    def matvec(v: Tensor) -> Tensor:
        calls.append(1)
        return matrix @ v

    ritz = lanczos(
        matvec,
        400,
        60,
        dtype=torch.float64,
        generator=gen,
        tol=1e-3,
        track_smallest=track_smallest,
        reorthogonalize=reorthogonalize,
    )
    assert len(calls) < 60  # stopped early
    assert float(ritz[-1]) == pytest.approx(50.0, rel=2e-3)
    if track_smallest:
        assert float(ritz[0]) == pytest.approx(-8.0, abs=2e-3 * 50)


@pytest.mark.parametrize("seed", range(5))
def test_plain_lanczos_finds_lambda_max_of_a_network_within_one_percent(seed: int) -> None:
    """Without reorthogonalisation (the callback's λ_max-only path), in float32, against the exact float64 Hessian."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    params = list(model.parameters())

    def loss() -> Tensor:
        return nn.functional.cross_entropy(model(x), y)

    flat = torch.cat([p.detach().reshape(-1) for p in params]).double()
    shapes = [p.shape for p in params]

    def as_function(v: Tensor) -> Tensor:
        pieces, offset = [], 0
        for shape in shapes:
            n = math.prod(shape)
            pieces.append(v[offset : offset + n].view(shape))
            offset += n
        h = torch.tanh(x.double() @ pieces[0].T + pieces[1])
        h = torch.tanh(h @ pieces[2].T + pieces[3])
        return nn.functional.cross_entropy(h @ pieces[4].T + pieces[5], y)

    exact = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(as_function, flat))[-1])
    found = hessian_eigenvalues(
        loss, params, num_hvps=20, reorthogonalize=False, generator=torch.Generator().manual_seed(0)
    )
    assert float(found[0]) == pytest.approx(exact, rel=1e-2)


def test_unknown_optimizer_logs_nan_and_warns_once() -> None:
    x, y = regression_data()
    callback = SharpnessCallback(every_n_steps=1, metrics=("lambda_max", "stability_ratio"), auto_intervene=True)
    with pytest.warns(RuntimeWarning, match="no stability threshold is known for RMSprop"):
        logger = fit_recorded(LinearRegression(lr=0.01, optimizer="rmsprop"), loader(x, y), [callback], steps=3)
    ratios = logger.series("sharpness/stability_ratio")
    assert len(ratios) == 3 and all(math.isnan(v) for v in ratios.values())
    assert all(math.isfinite(v) for v in logger.series("sharpness/lambda_max").values())
    assert callback.interventions == []
    with pytest.raises(ValueError, match="kind"):
        stability_threshold("rmsprop", 0.1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- exact values


@pytest.mark.parametrize("hvp", ["double_backward", "finite_difference"])
def test_values_on_a_quadratic_match_the_exact_hessian(hvp: str) -> None:
    x, y = regression_data()
    lr = 0.05
    callback = SharpnessCallback(
        every_n_steps=1, metrics=("lambda_max", "lambda_min", "trace", "batch_sharpness", "stability_ratio"), hvp=hvp
    )  # type: ignore[arg-type]
    model = LinearRegression(lr=lr)
    logger = fit_recorded(model, loader(x, y), [callback], steps=1)
    row = logger.series
    h = exact_hessian(x)
    eig = torch.linalg.eigvalsh(h)
    rtol = 1e-5 if hvp == "double_backward" else 1e-3
    assert row("sharpness/lambda_max")[0] == pytest.approx(float(eig[-1]), rel=rtol)
    assert row("sharpness/lambda_min")[0] == pytest.approx(float(eig[0]), rel=rtol, abs=rtol * float(eig[-1]))
    assert row("sharpness/trace")[0] == pytest.approx(float(h.trace()), rel=rtol)
    w = torch.cat([model.layer.weight.detach().reshape(-1), model.layer.bias.detach()]).double()
    design = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    g = 2 * design.T @ (design @ w - y.double().squeeze(1)) / len(x)
    assert row("sharpness/batch_sharpness")[0] == pytest.approx(float(g @ h @ g / (g @ g)), rel=rtol)
    # full batch: the stability quantity is λ_max, against 2/η
    assert row("sharpness/threshold")[0] == pytest.approx(2 / lr)
    assert row("sharpness/stability_ratio")[0] == pytest.approx(float(eig[-1]) * lr / 2, rel=rtol)
    assert row("sharpness/lr_factor")[0] == 1.0


def test_minibatches_compare_batch_sharpness_and_fixed_probe_keeps_its_batch() -> None:
    x, y = regression_data(64)
    callback = SharpnessCallback(every_n_steps=1, metrics=("stability_ratio",), probe="fixed")
    logger = fit_recorded(LinearRegression(lr=0.05), loader(x, y, 16), [callback], steps=4)
    sharpness, ratio = logger.series("sharpness/batch_sharpness"), logger.series("sharpness/stability_ratio")
    logged = logger.keys()
    assert "sharpness/lambda_max" not in logged
    assert len(ratio) == 4
    for step, value in ratio.items():
        assert value == pytest.approx(sharpness[step] * 0.05 / 2)

    # a fixed probe batch: λ_max of a quadratic is the same at every probe, the first batch's
    callback = SharpnessCallback(every_n_steps=2, metrics=("lambda_max",), probe="fixed", hvp="double_backward")
    logger = fit_recorded(LinearRegression(lr=0.05), loader(x, y, 16), [callback], steps=5)
    assert list(logger.series("sharpness/lambda_max")) == [0, 2, 4]
    for value in logger.series("sharpness/lambda_max").values():
        assert value == pytest.approx(top_eigenvalue(x[:16]), rel=1e-5)

    # a batch given by the user
    callback = SharpnessCallback(every_n_steps=1, metrics=("lambda_max",), probe="fixed", hvp="double_backward")
    callback.set_probe_batch((x[40:], y[40:]))
    logger = fit_recorded(LinearRegression(lr=0.05), loader(x, y, 16), [callback], steps=2)
    assert logger.series("sharpness/lambda_max")[1] == pytest.approx(top_eigenvalue(x[40:]), rel=1e-5)


def test_all_metrics_are_logged() -> None:
    seed_everything(0, verbose=False)
    x, y = regression_data(64)
    callback = SharpnessCallback(every_n_steps=1, metrics=METRICS, random_scales=(0.01, 0.1), random_directions=2)
    logger = fit_recorded(NoisyNet(optimizer="adam"), loader(x, y, 32), [callback], steps=2)
    expected = {
        "lambda_max",
        "lambda_min",
        "trace",
        "trace_stderr",
        "batch_sharpness",
        "sam",
        "random/0.01",
        "random/0.1",
        "class",
        "stability_ratio",
        "threshold",
        "preconditioned_batch_sharpness",
        "lr_factor",
        "interventions",
    }
    logged = logger.keys()
    assert {k for k in logged if k.startswith("sharpness/")} == {f"sharpness/{k}" for k in expected}
    row = callback.last_metrics
    assert row["sharpness/lambda_min"] <= row["sharpness/batch_sharpness"] <= row["sharpness/lambda_max"]
    assert row["sharpness/class"] in (0.0, 1.0, 2.0, 3.0)
    assert row["sharpness/trace_stderr"] >= 0


# ------------------------------------------------------------------------------------- monitoring changes nothing


@pytest.mark.parametrize(
    ("optimizer", "accumulate", "hvp"),
    [("sgd", 1, "finite_difference"), ("adam", 2, "double_backward")],
)
def test_monitoring_leaves_training_bitwise_identical(optimizer: str, accumulate: int, hvp: str) -> None:
    """Dropout, BatchNorm, momentum/Adam state, accumulation, `self.log` in training_step: nothing differs."""
    x, y = regression_data(96)

    def run(callbacks: list[Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        seed_everything(0, verbose=False)
        model = NoisyNet(optimizer=optimizer)
        trainer = quiet_trainer(max_steps=5, logger=False, callbacks=callbacks, accumulate_grad_batches=accumulate)
        trainer.fit(model, loader(x, y, 16))
        return model.state_dict(), trainer.optimizers[0].state_dict()

    baseline, baseline_opt = run([])
    callback = SharpnessCallback(every_n_steps=1, metrics=METRICS, hvp=hvp, random_directions=2)  # type: ignore[arg-type]
    watched, watched_opt = run([callback])
    assert callback.last_metrics  # it did measure
    for name, value in baseline.items():
        assert torch.equal(value, watched[name]), name  # weights and BatchNorm statistics, bit for bit
    for key, state in baseline_opt["state"].items():
        for entry, value in state.items():
            assert torch.equal(value, watched_opt["state"][key][entry]), (key, entry)


# ---------------------------------------------------------------------------------------------------- control


def test_controller_rescues_a_run_past_its_edge_of_stability() -> None:
    model, data, lr = unstable_regression(schedule=True)
    logger = fit_recorded(model, data, [SharpnessCallback(every_n_steps=1, metrics=("stability_ratio",))], steps=40)
    assert model.losses[-1] > 1e6 * model.losses[0]  # fixed learning rate: diverges

    model, data, lr = unstable_regression(schedule=True)
    callback = SharpnessCallback(every_n_steps=1, metrics=("stability_ratio",), auto_intervene=True, patience=1)
    logger = fit_recorded(model, data, [callback], steps=40)
    assert model.losses[-1] < 0.05 * model.losses[0]  # the controller: converges
    assert [(i.step, i.kind, i.applied) for i in callback.interventions] == [(0, "lr_scale", True)]
    assert callback.interventions[0].before == pytest.approx(lr)
    assert callback.interventions[0].after == pytest.approx(lr / 2)
    assert callback.cumulative_factor == 0.5
    # LambdaLR recomputes lr from base_lrs at every step: the scaled value survives it
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr / 2)
    assert logger.series("sharpness/stability_ratio")[1] == pytest.approx(0.75, rel=1e-3)
    assert logger.series("sharpness/lr_factor")[39] == 0.5
    assert logger.series("sharpness/interventions")[39] == 1.0


def test_without_auto_intervene_it_warns_and_records_what_it_would_do() -> None:
    model, data, lr = unstable_regression(schedule=True)
    callback = SharpnessCallback(every_n_steps=1, metrics=("stability_ratio",), patience=2)
    with pytest.warns(RuntimeWarning, match="would multiply the learning rate by 0.5"):
        fit_recorded(model, data, [callback], steps=6)
    assert [(i.step, i.applied) for i in callback.interventions] == [(1, False)]
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == lr
    assert callback.cumulative_factor == 1.0


def test_increase_never_goes_above_the_original_and_floor_holds() -> None:
    model, data, lr = unstable_regression(schedule=True)
    callback = SharpnessCallback(
        every_n_steps=1,
        metrics=("stability_ratio",),
        auto_intervene=True,
        patience=1,
        lr_factor=0.2,
        allow_increase=True,
        increase_below=0.5,
    )
    fit_recorded(model, data, [callback], steps=6)
    factors = [i.after / lr for i in callback.interventions]
    assert factors == pytest.approx([0.2, 1.0, 0.2, 1.0, 0.2, 1.0])  # ratio 1.5 → 0.3 → back to 1.5 ...
    assert callback.cumulative_factor == pytest.approx(1.0)

    model, data, lr = unstable_regression(schedule=True)
    callback = SharpnessCallback(
        every_n_steps=1, metrics=("stability_ratio",), auto_intervene=True, patience=1, min_lr_factor=0.7, margin=1.0
    )
    with pytest.warns(RuntimeWarning, match="min_lr_factor"):
        fit_recorded(model, data, [callback], steps=4)
    assert callback.cumulative_factor == pytest.approx(0.7)  # clipped to the floor, then left there


def test_resume_does_not_repeat_an_intervention(tmp_path: Path) -> None:
    def callback() -> SharpnessCallback:
        return SharpnessCallback(every_n_steps=2, metrics=("stability_ratio",), auto_intervene=True, patience=2)

    def checkpoints() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)

    model, data, lr = unstable_regression(schedule=True)
    first = callback()
    fit_recorded(model, data, [first, checkpoints()], steps=12, enable_checkpointing=True)
    assert [(i.step, i.applied) for i in first.interventions] == [(2, True)]
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    path = str(tmp_path / "epoch=3-step=4.ckpt")
    resumed_model, data, _ = unstable_regression(schedule=True)
    second = callback()
    fit_recorded(resumed_model, data, [second], steps=12, ckpt_path=path)
    assert second.interventions == first.interventions  # restored, not repeated
    assert second.cumulative_factor == 0.5
    assert resumed_model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr / 2)
    for name, value in weights.items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name  # the same run as without a break


def test_a_second_fit_of_the_same_instance_starts_from_the_configured_learning_rate() -> None:
    """``configure_optimizers`` runs again: the factor starts at 1 (it used to carry 0.5 over and read 0.25 after
    one cut of the fresh learning rate); a resumed fit keeps its factor (``test_resume_does_not_repeat...``)."""
    callback = SharpnessCallback(every_n_steps=1, metrics=("stability_ratio",), auto_intervene=True, patience=1)
    model, data, lr = unstable_regression(schedule=True)
    fit_recorded(model, data, [callback], steps=2)
    assert callback.cumulative_factor == 0.5
    model, data, lr = unstable_regression(schedule=True)
    logger = fit_recorded(model, data, [callback], steps=2)
    assert callback.cumulative_factor == 0.5
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr / 2)
    assert logger.series("sharpness/lr_factor") == {0: 0.5, 1: 0.5}


def test_tensorboard_layout_and_intervention_text(tmp_path: Path) -> None:
    model, data, _ = unstable_regression(schedule=False)
    callback = SharpnessCallback(every_n_steps=1, metrics=("stability_ratio",), auto_intervene=True, patience=1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = quiet_trainer(max_steps=3, logger=logger, callbacks=[callback])
    trainer.fit(model, data)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "sharpness/stability_ratio" in events.Tags()["scalars"]
    assert any("sharpness/interventions" in tag for tag in events.Tags()["tensors"])


# -------------------------------------------------------------------------------------------------- arguments


class _Manual(LinearRegression):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class _SkipsEverySecondCall(LinearRegression):
    """``training_step`` returns None on every second call: each training step's probe gets None."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:  # type: ignore[override]
        self.calls += 1
        return None if self.calls % 2 == 0 else super().training_step(batch, batch_idx)


def test_a_skipped_probe_batch_logs_nan() -> None:
    x, y = regression_data()
    callback = SharpnessCallback(every_n_steps=1, metrics=("lambda_max", "stability_ratio"))
    with pytest.warns(RuntimeWarning, match="returned None on the probe batch"):
        logger = fit_recorded(_SkipsEverySecondCall(), loader(x, y), [callback], steps=2)
    assert all(math.isnan(v) for v in logger.series("sharpness/lambda_max").values())
    assert len(logger.series("sharpness/stability_ratio")) == 2


def test_manual_optimization_needs_a_loss_fn() -> None:
    x, y = regression_data()
    with pytest.raises(MisconfigurationException, match="override `loss_fn"):
        fit_recorded(_Manual(), loader(x, y), [SharpnessCallback()], steps=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"metrics": ("lambda_max", "hessian")}, ValueError, "metrics"),
        ({"metrics": "lambda_max"}, TypeError, "metrics"),
        ({"metrics": ()}, ValueError, "metrics"),
        ({"probe": "random"}, ValueError, "probe"),
        ({"stability_metric": "trace"}, ValueError, "stability_metric"),
        ({"hvp": "jvp"}, ValueError, "hvp"),
        ({"trace_hvps": 2}, ValueError, "trace_hvps"),
        ({"lr_factor": 1.0}, ValueError, "lr_factor"),
        ({"increase_below": 1.5}, ValueError, "increase_below"),
        ({"min_lr_factor": 0.0}, ValueError, "min_lr_factor"),
        ({"random_scales": (0.1, -1.0)}, ValueError, "random_scales"),
        ({"auto_intervene": 1}, TypeError, "auto_intervene"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"metrics": 3}, TypeError, "`metrics`"),
        ({"random_scales": 3}, TypeError, "`random_scales`"),
        ({"warm_start": "yes"}, TypeError, "warm_start"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SharpnessCallback(**kwargs)


# ------------------------------------------------------------------------------------------------- warm start


def _counted_run(
    monkeypatch: pytest.MonkeyPatch,
    warm_start: bool,
    metrics: tuple[str, ...],
    steps: int = 5,
    hvp: str = "double_backward",
    batch_size: int = 64,
) -> tuple[dict[int, float], dict[int, float], list[int], SharpnessCallback]:
    """Trains QuietMLP with a probe at every step; returns λ_max and λ_min per step and the products per probe."""
    products: list[int] = []
    original = curvature.HessianVectorProduct.__call__

    def counted(self: curvature.HessianVectorProduct, v: Tensor) -> Tensor:
        products[-1] += 1
        return original(self, v)

    class Counting(SharpnessCallback):
        def _measure(self, *args: Any, **kwargs: Any) -> dict[str, float]:
            products.append(0)
            return super()._measure(*args, **kwargs)

    monkeypatch.setattr(curvature.HessianVectorProduct, "__call__", counted)
    x, y = regression_data(64)
    callback = Counting(every_n_steps=1, metrics=metrics, warm_start=warm_start, hvp=hvp)  # type: ignore[arg-type]
    logger = fit_recorded(QuietMLP(), loader(x, y, batch_size), [callback], steps=steps)
    monkeypatch.undo()
    return logger.series("sharpness/lambda_max"), logger.series("sharpness/lambda_min"), products, callback


@pytest.mark.parametrize("batch_size", [64, 32])
@pytest.mark.parametrize("hvp", ["double_backward", "finite_difference"])
def test_warm_start_gives_the_same_lambda_max_with_fewer_products(
    monkeypatch: pytest.MonkeyPatch, hvp: str, batch_size: int
) -> None:
    """Full batch (64): the same loss at every probe, warm probes stop after 3-4 products. Minibatches (32): each
    probe sees another batch, whose top eigenvector differs more, so the saving is smaller but still there."""
    cold, _, cold_products, _ = _counted_run(monkeypatch, False, ("lambda_max",), hvp=hvp, batch_size=batch_size)
    warm, _, warm_products, callback = _counted_run(monkeypatch, True, ("lambda_max",), hvp=hvp, batch_size=batch_size)
    assert list(warm) == list(cold) == [0, 1, 2, 3, 4]
    for step, value in cold.items():
        assert warm[step] == pytest.approx(value, rel=1e-2), step
    assert warm_products[0] == cold_products[0]  # the first probe has nothing to start from
    assert sum(warm_products[1:]) < sum(cold_products[1:]), (warm_products, cold_products)
    if batch_size == 64:
        assert max(warm_products[1:]) <= 4, (warm_products, cold_products)
    # kept on the device, detached, one entry per parameter; not part of the checkpoint
    vector = callback._warm.vector
    assert vector is not None and not vector.requires_grad
    assert vector.numel() == sum(p.numel() for p in QuietMLP().parameters())
    assert not any("ritz" in key for key in callback.state_dict())


def test_warm_start_with_lambda_min_and_a_change_of_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    cold_max, cold_min, _, _ = _counted_run(monkeypatch, False, ("lambda_max", "lambda_min"))
    warm_max, warm_min, _, callback = _counted_run(monkeypatch, True, ("lambda_max", "lambda_min"))
    scale = max(abs(v) for v in cold_max.values())
    for step in cold_max:
        assert warm_max[step] == pytest.approx(cold_max[step], rel=1e-2)
        assert warm_min[step] == pytest.approx(cold_min[step], abs=1e-2 * scale)
    # another model (other shapes): the kept vector is dropped and the next estimate starts cold
    params = [torch.zeros(3, requires_grad=True)]
    assert callback._warm.start(params, "largest", torch.Generator()) is None
    assert callback._warm.vector is None


def test_compiled_module_gets_finite_sharpness() -> None:
    """A `torch.compile`d module: the probe runs eagerly, so the default double-backward products work (the
    compiled backward cannot be differentiated again) and the values equal those of the uncompiled module."""
    x, y = regression_data(64)
    metrics = ("lambda_max", "batch_sharpness", "stability_ratio")
    callback = SharpnessCallback(every_n_steps=1, metrics=metrics, num_hvps=5)
    compiled: Any = torch.compile(QuietMLP())
    logger = fit_recorded(compiled, loader(x, y, 32), [callback], steps=3)
    eager = fit_recorded(
        QuietMLP(), loader(x, y, 32), [SharpnessCallback(every_n_steps=1, metrics=metrics, num_hvps=5)], steps=1
    )
    for key in ("sharpness/lambda_max", "sharpness/batch_sharpness", "sharpness/stability_ratio"):
        values = logger.series(key)
        assert len(values) == 3 and all(math.isfinite(v) for v in values.values()), (key, values)
        assert values[0] == pytest.approx(eager.series(key)[0], rel=1e-4)


def test_a_failing_probe_warns_once_and_logs_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: curvature.HessianVectorProduct, v: Tensor) -> Tensor:
        raise RuntimeError("no double backward here")

    monkeypatch.setattr(curvature.HessianVectorProduct, "__call__", broken)
    x, y = regression_data(64)
    callback = SharpnessCallback(every_n_steps=1, metrics=("lambda_max", "stability_ratio"))
    with pytest.warns(RuntimeWarning, match="hvp='finite_difference'") as record:
        logger = fit_recorded(QuietMLP(), loader(x, y, 32), [callback], steps=2)
    assert sum("probe at step" in str(w.message) for w in record) == 1
    assert [math.isnan(v) for v in logger.series("sharpness/lambda_max").values()] == [True, True]


# ---------------------------------------------------------------------------------------------------- example


@pytest.mark.slow
def test_edge_of_stability_example() -> None:
    """The example, shortened: sharpness reaches 2/η and the loss oscillates at a fixed learning rate; the
    controller keeps the loss decreasing monotonically, and rescues the run that diverges from the first step."""
    example = load_example("edge_of_stability")
    runs = example.main(steps=300, every=10, quiet=True)

    fixed, controlled = runs[0.1]["fixed lr"], runs[0.1]["auto_intervene"]
    assert max(fixed.ratio.values()) > 1.0  # progressive sharpening up to the edge of stability
    assert fixed.increases >= 5  # ... where the full-batch loss starts to oscillate
    assert controlled.interventions >= 1 and controlled.increases == 0
    assert controlled.final_lr < controlled.lr

    fixed, controlled = runs[0.5]["fixed lr"], runs[0.5]["auto_intervene"]
    assert not math.isfinite(fixed.losses[-1]) or fixed.losses[-1] > fixed.losses[0]  # diverged
    assert math.isfinite(controlled.losses[-1]) and controlled.losses[-1] < 0.6 * controlled.losses[0]


# --------------------------------------------------------------------------------------------------- schedule


class LaterUnstable(LinearRegression):
    """Full-batch GD at half its edge of stability until step 80, then at 1.5× (a learning-rate warm-up gone wrong)."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 80 else 3.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def probe_steps(logger: Any) -> list[int]:
    return sorted(logger.series("sharpness/lr_factor"))


def test_default_schedule_is_dense_early_then_sparse() -> None:
    # Before: every 200 steps, so one probe in the first 200 steps, where a learning rate too high shows first.
    x, y = regression_data()
    model = LinearRegression(lr=1.0 / top_eigenvalue(x))
    logger = fit_recorded(model, loader(x, y), [SharpnessCallback()], steps=120)
    assert probe_steps(logger) == [0, 10, 20, 30, 40, 50, 70, 110]
    for options, expected in [
        ({"every_n_steps": 7}, list(range(0, 120, 7))),  # at most the dense interval: the fixed schedule
        ({"every_n_steps": 40, "adaptive_schedule": False}, [0, 40, 80]),
    ]:
        model = LinearRegression(lr=1.0 / top_eigenvalue(x))
        logger = fit_recorded(model, loader(x, y), [SharpnessCallback(**options)], steps=120)
        assert probe_steps(logger) == expected, options


def test_schedule_is_dense_again_after_a_learning_rate_change() -> None:
    x, y = regression_data()
    model = LaterUnstable(lr=1.0 / top_eigenvalue(x))
    callback = SharpnessCallback(every_n_steps=40, metrics=("stability_ratio",), auto_intervene=True, patience=1)
    logger = fit_recorded(model, loader(x, y), [callback], steps=200)
    assert [(i.step, i.applied) for i in callback.interventions] == [(110, True)]  # the first probe past step 80
    steps = probe_steps(logger)
    assert steps == [0, 10, 20, 30, 40, 50, 70, 110, 120, 130, 140, 150, 160, 180]
    restored = SharpnessCallback(every_n_steps=40)
    restored.load_state_dict(callback.state_dict())
    assert restored.schedule.state_dict() == callback.schedule.state_dict()
