"""Hypothesis strategies for tensors with awkward shapes, dtypes, layouts (sparse, complex) and special values."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import Tensor

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0]


@st.composite
def tensors(draw: st.DrawFn, max_numel: int = 3000, dtypes: list[torch.dtype] | None = None) -> Tensor:
    """One tensor: 0-3 dims (empty and one-element included), random scale, optional specials, maybe strided."""
    dtype = draw(st.sampled_from(dtypes or DTYPES))
    ndim = draw(st.integers(0, 3))
    shape = draw(st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim))
    numel = 1
    for n in shape:
        numel *= n
    if numel > max_numel:
        shape = [1] * ndim
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e3]))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if x.numel():
        flat = x.view(-1)
        for value in draw(st.lists(st.sampled_from(SPECIALS), max_size=4)):
            flat[draw(st.integers(0, flat.numel() - 1))] = value
        if draw(st.booleans()):  # a run of zeros, as after ReLU
            flat[: flat.numel() // 2] = 0.0
    x = x.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed" and x.ndim >= 2:
        x = x.transpose(0, -1)
    elif layout == "strided" and x.ndim >= 1 and x.shape[0] > 1:
        x = x[::2]
    return x


def tensor_lists(max_size: int = 8, **kwargs: object) -> st.SearchStrategy[list[Tensor]]:
    return st.lists(tensors(**kwargs), min_size=0, max_size=max_size)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- sparse and complex test inputs


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
