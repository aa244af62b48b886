"""Hypothesis strategies for lists of tensors with awkward shapes, dtypes and special values."""

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
