"""Definitions shared by every statistics backend: the columns, input checking, grouping and flat views.

This module is the one place where the layout of the statistics tables is defined.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import Literal

import torch
from torch import Tensor

from lightning_gradflow.checks import check_float, check_int  # noqa: F401  (re-exported)

Backend = Literal["auto", "torch", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "reference")


class Stat(IntEnum):
    """Columns of a :class:`~lightning_gradflow.stats.TensorStats` table, one row per tensor.

    ``SUMSQ``, ``ABSMAX`` and ``SUM`` are taken over the finite values only; non-finite values are counted in
    ``NONFINITE``. ``ZEROS`` counts exact zeros (``+0.0`` and ``-0.0``).

    **Sparse tensors** (COO, coalesced first; CSR/CSC/BSR/BSC) are described exactly as their dense equivalent: the
    sums, maximum and non-finite count come from the stored values, ``ZEROS`` adds the positions not stored, and
    ``NUMEL`` is the dense size. **Complex tensors** are described by their magnitudes ``|z|``: ``SUMSQ`` is
    ``Σ|z|²`` (the squared norm), ``ABSMAX`` is ``max |z|``, ``SUM`` is ``Σ|z|`` (the L1 norm: magnitudes carry no
    sign, so there is no signed sum to report), ``NONFINITE`` counts values with a NaN or infinite part, ``ZEROS``
    counts ``z == 0``. Magnitudes are taken in float64.
    """

    SUMSQ = 0
    ABSMAX = 1
    SUM = 2
    NONFINITE = 3
    ZEROS = 4
    NUMEL = 5


NUM_STATS = len(Stat)
#: Columns that add when shards of one tensor, or tensors of one layer, are merged; the others take the maximum.
ADDITIVE_STATS: tuple[int, ...] = (Stat.SUMSQ, Stat.SUM, Stat.NONFINITE, Stat.ZEROS, Stat.NUMEL)
MAX_STATS: tuple[int, ...] = (Stat.ABSMAX,)


class UpdateStat(IntEnum):
    """Columns of an :class:`~lightning_gradflow.stats.UpdateStats` table: ``Σ(p − snapshot)²`` and ``Σp²``.

    Both sums skip non-finite entries, like :class:`Stat`.
    """

    DELTA_SUMSQ = 0
    PARAM_SUMSQ = 1


NUM_UPDATE_STATS = len(UpdateStat)


#: Sparse layouts whose stored values are read directly (compressed layouts store each position once).
SPARSE_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)
SPARSE_LAYOUTS = (torch.sparse_coo, *SPARSE_COMPRESSED)


def as_tensor_list(tensors: Iterable[Tensor], arg: str = "tensors", *, allow_sparse: bool = True) -> list[Tensor]:
    """Checks a user-given collection of floating-point or complex tensors and returns it as a list.

    Args:
        tensors: the collection.
        arg: the argument's name, for messages.
        allow_sparse: accept sparse tensors (COO and compressed layouts) besides dense (strided) ones.

    Raises:
        TypeError: if ``tensors`` is a single tensor or not iterable, or an item is not a floating-point or complex
            tensor with the strided (or, with ``allow_sparse``, a sparse) layout.
        ValueError: if an item lives on the ``meta`` device (it holds no values).
    """
    if isinstance(tensors, Tensor):
        raise TypeError(
            f"Expected `{arg}` to be a sequence of tensors, but got a single Tensor of shape {tuple(tensors.shape)}."
            f" Wrap it in a list: `[{arg}]`."
        )
    try:
        items = list(tensors)
    except TypeError:
        raise TypeError(f"Expected `{arg}` to be a sequence of tensors, but got {type(tensors).__name__}.") from None
    layouts = (torch.strided, *SPARSE_LAYOUTS) if allow_sparse else (torch.strided,)
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"Expected `{arg}[{i}]` to be a torch.Tensor, but got {type(t).__name__}: {t!r:.80}.")
        if not (t.dtype.is_floating_point or t.dtype.is_complex):
            raise TypeError(
                f"Expected `{arg}[{i}]` to have a floating-point dtype (float16, bfloat16, float32, float64) or a"
                f" complex one, but got {t.dtype}."
            )
        if t.is_nested:
            raise TypeError(f"Expected `{arg}[{i}]` to be a tensor, but got a nested tensor; pass its components.")
        if t.layout not in layouts:
            kinds = "a dense (strided) or sparse" if allow_sparse else "a dense (strided)"
            raise TypeError(f"Expected `{arg}[{i}]` to be {kinds} tensor, but got layout {t.layout}.")
        if t.device.type == "meta":
            raise ValueError(
                f"`{arg}[{i}]` is on the meta device and holds no values; materialise it (e.g. `module.to_empty`)"
                " before computing statistics."
            )
    return items


def is_plain(t: Tensor) -> bool:
    """Whether ``t`` is dense and real: every backend reads it as it is."""
    return t.layout == torch.strided and not t.dtype.is_complex


def stored_values(t: Tensor) -> Tensor:
    """The values a tensor stores: a sparse tensor's explicit values, ``t`` itself for a dense one.

    A COO tensor is coalesced first, so duplicates are summed and each position appears once. Positions not stored
    are zeros.
    """
    t = t.detach()
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    if t.layout in SPARSE_COMPRESSED:
        return t.values()
    return t


def magnitudes(t: Tensor) -> Tensor:
    """``|z|`` of a complex tensor in float64 (a new tensor); a real tensor unchanged.

    Float64, so maxima are exact whatever the complex precision and squares of large magnitudes cannot overflow.
    """
    if not t.dtype.is_complex:
        return t
    return t.to(torch.complex128).abs()


def stat_values(t: Tensor) -> Tensor:
    """The dense real tensor whose statistics describe ``t``: the magnitudes of its stored values.

    Together with ``t.numel()`` (the dense size) this is all the backends need: the positions a sparse tensor does
    not store are zeros, added to the zero count over the dense size.
    """
    return magnitudes(stored_values(t))


def flat_view(t: Tensor) -> Tensor:
    """A detached 1-D tensor with the same values, in some order: a view where memory allows, else a copy.

    All statistics here are order-independent, so a permuted but dense tensor (e.g. a transposed weight) is read
    in memory order without a copy.
    """
    t = t.detach()
    if t.is_contiguous():
        return t.view(-1)
    if is_dense(t):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return t.reshape(-1)


def is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers a gap-free block of memory without overlap, in some order of its dimensions."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def group_indices(keys: Sequence[tuple[object, ...]]) -> dict[tuple[object, ...], list[int]]:
    """Positions of equal keys, in first-seen order (keys are e.g. ``(device, dtype)``)."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """Whether the ``triton`` package can be imported (checked once; nothing is imported before it is needed)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - a broken install behaves as no install
        return False
    return True


def triton_interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``), which executes kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``.

    ``"auto"`` picks the fused Triton kernels on CUDA when Triton imports, and the torch path otherwise.

    Raises:
        ValueError: for an unknown backend name, or ``"triton"`` on a device Triton cannot run on.
        RuntimeError: for ``"triton"`` when the package is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Expected `backend` to be one of {BACKENDS}, but got {backend!r}.")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    if backend == "triton":
        if not triton_importable():
            raise RuntimeError(
                "`backend='triton'` needs the triton package: `pip install 'lightning_gradflow[triton]'`,"
                " or use `backend='auto'`."
            )
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"`backend='triton'` runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), but the tensors are on"
                f" {device}. Use `backend='auto'` or `backend='torch'`."
            )
    return backend


# The pure argument checks live in `lightning_gradflow.checks`; re-exported here for older imports.
