"""Shared test helpers: comparing statistics tables against the float64 reference."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
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


# ------------------------------------------------------------------------------- sparse and complex test inputs

SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0]


@st.composite
def sparse_tensors(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> Tensor:
    """A sparse COO tensor: 1-3 dims, hybrid or not, uncoalesced (positions stored twice) or coalesced, specials.

    Each position is stored at most twice, so summing duplicates is exact in any order (``a + b == b + a``): the
    coalesced values and the reference's ``to_dense()`` then agree bit for bit.
    """
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(1, 12), min_size=ndim, max_size=ndim))
    sparse_dim = draw(st.integers(1, ndim))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    positions = 1
    for n in shape[:sparse_dim]:
        positions *= n
    stored = torch.randperm(positions, generator=gen)[: draw(st.integers(0, positions))]
    twice = stored[: draw(st.integers(0, stored.numel()))]
    flat_index = torch.cat([stored, twice])
    indices = torch.stack(torch.unravel_index(flat_index, shape[:sparse_dim])) if flat_index.numel() else None
    if indices is None:
        indices = torch.zeros((sparse_dim, 0), dtype=torch.long)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    values = torch.randn((flat_index.numel(), *shape[sparse_dim:]), generator=gen, dtype=torch.float64) * scale
    if values.numel():
        flat = values.view(-1)
        for value in draw(st.lists(st.sampled_from(SPECIALS), max_size=3)):
            flat[draw(st.integers(0, flat.numel() - 1))] = value
    t = torch.sparse_coo_tensor(indices, values.to(dtype), shape, check_invariants=True)
    return t.coalesce() if draw(st.booleans()) else t


@st.composite
def complex_tensors(draw: st.DrawFn) -> Tensor:
    """A complex64/complex128 tensor (0-2 dims, maybe transposed) with NaN/Inf/zeros in either part."""
    dtype = draw(st.sampled_from([torch.complex64, torch.complex128]))
    shape = draw(st.lists(st.integers(0, 20), min_size=0, max_size=2))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    parts = torch.randn((*shape, 2), generator=gen, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if parts.numel():
        flat = parts.view(-1)
        for value in draw(st.lists(st.sampled_from(SPECIALS), max_size=4)):
            flat[draw(st.integers(0, flat.numel() - 1))] = value
        if draw(st.booleans()):
            parts.view(-1, 2)[: parts.numel() // 4] = 0.0  # some exact complex zeros
    z = torch.view_as_complex(parts).to(dtype)
    return z.t() if z.ndim == 2 and draw(st.booleans()) else z


def comparable(t: Tensor) -> Tensor:
    """The dense real tensor whose tolerances apply to ``t``'s statistics: dense values, or float64 ``|z|``."""
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.to(torch.complex128).abs() if t.dtype.is_complex else t
