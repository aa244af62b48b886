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

Backend = Literal["auto", "torch", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "reference")


class Stat(IntEnum):
    """Columns of a :class:`~lightning_gradflow.stats.TensorStats` table, one row per tensor.

    ``SUMSQ``, ``ABSMAX`` and ``SUM`` are taken over the finite values only; non-finite values are counted in
    ``NONFINITE``. ``ZEROS`` counts exact zeros (``+0.0`` and ``-0.0``).
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


def as_tensor_list(tensors: Iterable[Tensor], arg: str = "tensors") -> list[Tensor]:
    """Checks a user-given collection of floating-point tensors and returns it as a list.

    Raises:
        TypeError: if ``tensors`` is a single tensor or not iterable, or an item is not a real floating-point
            tensor with the strided layout.
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
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"Expected `{arg}[{i}]` to be a torch.Tensor, but got {type(t).__name__}: {t!r:.80}.")
        if not t.dtype.is_floating_point:
            raise TypeError(
                f"Expected `{arg}[{i}]` to have a real floating-point dtype (float16, bfloat16, float32, float64),"
                f" but got {t.dtype}."
            )
        if t.layout != torch.strided:
            raise TypeError(f"Expected `{arg}[{i}]` to be a dense (strided) tensor, but got layout {t.layout}.")
        if t.device.type == "meta":
            raise ValueError(
                f"`{arg}[{i}]` is on the meta device and holds no values; materialise it (e.g. `module.to_empty`)"
                " before computing statistics."
            )
    return items


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
