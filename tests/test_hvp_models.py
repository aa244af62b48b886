"""Hessian-vector products on the models people use: SharpnessCallback's defaults measure λ_max on stock attention
(``nn.TransformerEncoder``, Hugging Face SDPA attention), reentrant checkpointing and sparse ``EmbeddingBag``s, within
1 % of the full float64 Hessian; finite differences stay accurate on a residual ReLU network."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradflow.callbacks.sharpness import SharpnessCallback
from lightning_gradflow.curvature import HessianVectorProduct, choose_method, hessian_eigenvalues, isolated
from tests.helpers.models import ResidualDeepMLP
from tests.helpers.sharpness_models import (
    CheckpointedMLP,
    HFCausalLM,
    SparseBag,
    StockEncoder,
    ThirdPartyModule,
    bag_data,
    encoder_data,
    exact_lambda_max,
    token_batches,
)
from tests.helpers.training import fit_recorded, warnings_from

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def mlp_data() -> tuple[Tensor, Tensor]:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(5)), torch.randn(16, generator=torch.Generator())


def probe_defaults(model: ThirdPartyModule, batch: tuple[Tensor, ...], steps: int = 1) -> tuple[dict[int, float], list]:
    """Trains ``steps`` full-batch steps with ``SharpnessCallback(metrics=("lambda_max",))``, otherwise defaults."""
    data = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger = fit_recorded(model, data, [SharpnessCallback(metrics=("lambda_max",))], steps=steps)
    return logger.series("sharpness/lambda_max"), list(record)


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


CASES: list[Any] = [
    pytest.param(StockEncoder, encoder_data, "double_backward", id="nn.TransformerEncoder"),
    pytest.param(
        lambda: HFCausalLM("llama"),
        token_batches,
        "double_backward",
        id="hf-llama-sdpa",
        marks=pytest.mark.skipif(not hf_available(), reason="transformers is not installed"),
    ),
    pytest.param(
        lambda: HFCausalLM("gpt2"),
        token_batches,
        "double_backward",
        id="hf-gpt2-tied",
        marks=pytest.mark.skipif(not hf_available(), reason="transformers is not installed"),
    ),
    pytest.param(CheckpointedMLP, mlp_data, "finite_difference", id="reentrant-checkpoint"),
    pytest.param(SparseBag, bag_data, "finite_difference", id="sparse-embedding-bag"),
]


@pytest.mark.parametrize(("make", "data", "method"), CASES)
def test_default_lambda_max_matches_the_exact_hessian(make: Any, data: Any, method: str) -> None:
    # Before: NaN for the whole run (fused attention, EmbeddingBag and reentrant checkpointing have no double
    # backward, and the reentrant one refused the finite-difference gradients too).
    model, batch = make(), data()
    series, record = probe_defaults(model, batch)
    measured = series[0]
    reference = exact_lambda_max(model, batch)  # the weights after step 0, which the probe measured
    assert math.isfinite(measured)
    assert measured == pytest.approx(reference, rel=0.01)
    fallbacks = warnings_from(record, "SharpnessCallback", "finite-difference")
    assert len(fallbacks) == (method == "finite_difference")
    assert not warnings_from(record, "SharpnessCallback", "failed")


def test_fallback_is_said_once_and_kept_for_the_fit() -> None:
    model, batch = CheckpointedMLP(), mlp_data()
    callback = SharpnessCallback(every_n_steps=1, metrics=("lambda_max", "batch_sharpness"))
    data = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger = fit_recorded(model, data, [callback], steps=3)
    assert callback.hvp_method == "finite_difference"
    assert len(warnings_from(list(record), "SharpnessCallback", "no double backward")) == 1
    assert all(math.isfinite(v) for v in logger.series("sharpness/batch_sharpness").values())
    assert len(logger.series("sharpness/lambda_max")) == 3


def test_choose_method_prefers_the_math_attention_kernel() -> None:
    model, (x, y) = StockEncoder(), encoder_data()
    params = list(model.parameters())
    with isolated(model, params):
        method, error = choose_method(lambda: model.loss((x, y)), params)
    assert (method, error) == ("double_backward", None)
    # what the fused kernel alone does: no double backward (the reason the probe picks the math kernel)
    loss = model.loss((x, y))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(grads[0].sum(), params, allow_unused=True)


def test_finite_differences_use_backward_under_reentrant_checkpointing() -> None:
    model, batch = CheckpointedMLP(), mlp_data()
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    fd = HessianVectorProduct(lambda: model.loss(batch), params, "finite_difference")(v)
    exact = HessianVectorProduct(lambda: model.reference_loss(batch), params, "double_backward")(v)
    assert torch.allclose(fd, exact, rtol=1e-2, atol=1e-3 * float(exact.norm()))
    assert all(p.grad is None for p in params)  # `.backward()` left no gradient behind


def relu_model(step: int) -> tuple[ResidualDeepMLP, Any]:
    torch.manual_seed(0)
    model = ResidualDeepMLP()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen), torch.randn(64, 1, generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(step):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model, lambda: nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("step", [0, 1])
def test_finite_differences_are_accurate_on_a_residual_relu_network(step: int) -> None:
    # Before: the fixed step crossed ReLU kinks: random-direction products off by 2-4x, λ_max 3 % high at step 1.
    model, loss = relu_model(step)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(sum(p.numel() for p in params), generator=gen)
        exact = HessianVectorProduct(loss, params, "double_backward")(v)
        fd = HessianVectorProduct(loss, params, "finite_difference")(v)
        assert float((fd - exact).norm() / exact.norm()) < 0.05
    lambdas = {
        hvp: float(hessian_eigenvalues(loss, params, 1, num_hvps=30, hvp=hvp, generator=torch.Generator(), tol=None)[0])
        for hvp in ("double_backward", "finite_difference")
    }
    assert lambdas["finite_difference"] == pytest.approx(lambdas["double_backward"], rel=0.01)


class _OnceDifferentiableSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class OnceDifferentiable(ThirdPartyModule):
    """A custom autograd function without a double backward: only finite differences can measure it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return _OnceDifferentiableSquare.apply(self.layer(x).squeeze(-1) - y).mean()


class FailsWhenPerturbed(SharpnessCallback):
    """The probe loss raises at any weights but the trained ones (a model that cannot run perturbed)."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.trained = [p.detach().clone() for p in pl_module.parameters()]
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def loss_fn(self, pl_module: Any, batch: Any) -> Tensor:
        if not all(torch.equal(p, q) for p, q in zip(pl_module.parameters(), self.trained, strict=True)):
            raise RuntimeError("the model cannot run at perturbed weights")
        return super().loss_fn(pl_module, batch)


def test_custom_function_without_double_backward_falls_back() -> None:
    series, record = probe_defaults(OnceDifferentiable(), mlp_data())
    x, _ = mlp_data()
    design = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    exact = float(torch.linalg.eigvalsh(2 * design.T @ design / len(x))[-1])  # Hessian of mean((Xw + b − y)²)
    assert series[0] == pytest.approx(exact, rel=1e-3)
    assert len(warnings_from(record, "SharpnessCallback", "no double backward")) == 1


def test_only_where_neither_product_works_the_probe_says_both_failed() -> None:
    callback = FailsWhenPerturbed(metrics=("lambda_max",))
    ids, y = bag_data()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger = fit_recorded(SparseBag(), DataLoader(TensorDataset(ids, y), batch_size=16), [callback], steps=1)
    failed = warnings_from(list(record), "FailsWhenPerturbed", "failed too")
    assert len(failed) == 1
    assert "_embedding_bag_backward" in failed[0]  # why not exact
    assert "cannot run at perturbed weights" in failed[0]  # why not finite differences
    assert math.isnan(logger.series("sharpness/lambda_max")[0])


def test_auto_keeps_the_exact_product_on_a_relu_cnn_with_batchnorm() -> None:
    # float32 finite differences cannot step below the kinks of BatchNorm-centred ReLUs (off by 10-150 %): the exact
    # product must win there, not a cross-check against finite differences (what the first version of the trial did)
    from tests.helpers.zoo import ResidualCNN, teacher_images

    torch.manual_seed(0)
    model, (x, y) = ResidualCNN(), teacher_images(16, 0)
    params = list(model.parameters())
    with isolated(model, params):
        method, error = choose_method(lambda: nn.functional.cross_entropy(model(x), y), params)
    assert (method, error) == ("double_backward", None)
