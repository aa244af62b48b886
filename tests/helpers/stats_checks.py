"""Comparing statistics tables against the float64 reference, with the tolerances of each input dtype."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gradflow.stats import Stat

#: Relative tolerance of sums computed with float32 accumulation, per input dtype (values of half types are exact in
#: float32, so they share float32's tolerance; float64 inputs accumulate in float64 and are only rounded at the end).
SUM_RTOL = {torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float32: 2e-5, torch.float64: 1e-6}


def abs_sums(tensors: list[Tensor]) -> Tensor:
    """Σ|x| over the finite values of each tensor (float64): the scale of rounding errors in a signed sum."""
    out = []
    for t in tensors:
        x = t.detach().double().reshape(-1)
        out.append(x[torch.isfinite(x)].abs().sum())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def assert_stats_close(actual: Tensor, expected: Tensor, tensors: list[Tensor]) -> None:
    """Counts and maxima exactly; sums of squares relatively; signed sums relative to Σ|x|."""
    actual, expected = actual.cpu().double(), expected.cpu().double()
    assert actual.shape == expected.shape
    exact = [Stat.ABSMAX, Stat.NONFINITE, Stat.ZEROS, Stat.NUMEL]
    torch.testing.assert_close(actual[:, exact], expected[:, exact], rtol=0, atol=0)
    rtol = torch.tensor([SUM_RTOL[t.dtype] for t in tensors], dtype=torch.float64)
    sumsq_err = (actual[:, Stat.SUMSQ] - expected[:, Stat.SUMSQ]).abs()
    assert bool((sumsq_err <= rtol * expected[:, Stat.SUMSQ] + 1e-30).all()), (actual[:, 0], expected[:, 0])
    sum_err = (actual[:, Stat.SUM] - expected[:, Stat.SUM]).abs()
    assert bool((sum_err <= rtol * abs_sums(tensors) + 1e-30).all()), (actual[:, Stat.SUM], expected[:, Stat.SUM])


def comparable(t: Tensor) -> Tensor:
    """The dense real tensor whose tolerances apply to ``t``'s statistics: dense values, or float64 ``|z|``."""
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.to(torch.complex128).abs() if t.dtype.is_complex else t
