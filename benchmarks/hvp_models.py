"""Issue 17 item 3: SharpnessCallback's default λ_max on models people use vs the full float64 Hessian, and
finite differences on a residual ReLU MLP (fixed step vs kink-aware step). Run: PYTHONPATH=. .venv/bin/python
benchmarks/hvp_models.py"""

from __future__ import annotations

import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradflow.callbacks.sharpness import SharpnessCallback
from lightning_gradflow.curvature import HessianVectorProduct, hessian_eigenvalues
from lightning_gradflow.curvature import hvp as hvp_module
from tests.helpers.sharpness_models import (
    CheckpointedMLP,
    HFCausalLM,
    SparseBag,
    StockEncoder,
    bag_data,
    encoder_data,
    exact_lambda_max,
    token_batches,
)
from tests.helpers.training import fit_recorded
from tests.test_hvp_models import OnceDifferentiable, mlp_data, relu_model

torch.set_num_threads(1)
print("| model | products | default λ_max | exact float64 λ_max | rel. error | probe s |")
print("|---|---|---|---|---|---|")
for name, make, data in [
    ("nn.TransformerEncoder (fused SDPA)", StockEncoder, encoder_data),
    ("HF Llama, SDPA", lambda: HFCausalLM("llama"), token_batches),
    ("HF GPT-2, tied, SDPA", lambda: HFCausalLM("gpt2"), token_batches),
    ("reentrant checkpoint MLP", CheckpointedMLP, mlp_data),
    ("EmbeddingBag(sparse=True)", SparseBag, bag_data),
    ("@once_differentiable function", OnceDifferentiable, mlp_data),
]:
    model, batch = make(), data()
    callback = SharpnessCallback(metrics=("lambda_max",))
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fit_recorded(model, loader, [callback], steps=1).series("sharpness/lambda_max")[0]
    seconds = time.perf_counter() - start
    if isinstance(model, OnceDifferentiable):  # no double backward at all: the Hessian of mean((Xw + b - y)^2)
        design = torch.cat([batch[0], torch.ones(len(batch[0]), 1)], 1).double()
        ref = float(torch.linalg.eigvalsh(2 * design.T @ design / len(design))[-1])
    else:
        ref = exact_lambda_max(model, batch)
    print(
        f"| {name} | {callback.hvp_method} | {got:.5f} | {ref:.5f} | {abs(got - ref) / abs(ref):.1e} | {seconds:.2f} |"
    )

print()
print("Residual ReLU MLP (tests.helpers.models.ResidualDeepMLP, depth 24, width 16), float32:")
print(
    "| SGD step | exact λ_max | FD fixed step λ_max | FD kink-aware λ_max"
    " | max random-direction Hv error fixed / kink-aware | gradients per product (kink-aware) |"
)
print("|---|---|---|---|---|---|")
for step in (0, 1, 2, 5):
    model, loss = relu_model(step)
    params = list(model.parameters())
    row = {}
    for label, retries in (("fixed", 0), ("aware", hvp_module.STEP_RETRIES)):
        saved = hvp_module.STEP_RETRIES
        hvp_module.STEP_RETRIES = retries
        try:
            row[label] = float(
                hessian_eigenvalues(
                    loss, params, 1, num_hvps=30, hvp="finite_difference", generator=torch.Generator(), tol=None
                )[0]
            )
            gen = torch.Generator().manual_seed(1)
            errors = []
            fd_op = HessianVectorProduct(loss, params, "finite_difference")
            for _ in range(5):
                v = torch.randn(sum(p.numel() for p in params), generator=gen)
                exact = HessianVectorProduct(loss, params, "double_backward")(v)
                fd = fd_op(v)
                errors.append(float((fd - exact).norm() / exact.norm()))
            row[label + "_err"] = max(errors)
            row[label + "_grads"] = (fd_op.num_gradients - 1) / fd_op.num_products
        finally:
            hvp_module.STEP_RETRIES = saved
    exact_l = float(
        hessian_eigenvalues(loss, params, 1, num_hvps=30, hvp="double_backward", generator=torch.Generator(), tol=None)[
            0
        ]
    )
    print(
        f"| {step} | {exact_l:.4f} | {row['fixed']:.4f} ({(row['fixed'] - exact_l) / exact_l:+.1%}) |"
        f" {row['aware']:.4f} ({(row['aware'] - exact_l) / exact_l:+.2%}) |"
        f" {row['fixed_err']:.1%} / {row['aware_err']:.2%} | {row['aware_grads']:.1f} |"
    )
