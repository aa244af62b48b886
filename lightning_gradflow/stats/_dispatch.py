"""Runs a per-group backend operation over tensors of mixed devices and dtypes and assembles one table."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from lightning_gradflow.stats._common import group_indices, resolve_backend

_BACKEND_MODULES = {"torch": "torch_backend", "reference": "reference", "triton": "triton_kernels"}


def backend_module(name: str) -> ModuleType:
    """The module implementing a concrete backend; Triton's is imported only here, on first use."""
    if name not in _BACKEND_MODULES:  # resolve_backend() has already checked user input
        raise ValueError(f"Unknown statistics backend {name!r}.")
    return importlib.import_module(f"lightning_gradflow.stats.{_BACKEND_MODULES[name]}")


@functools.lru_cache(maxsize=256)
def _device_index(device: torch.device, positions: tuple[int, ...]) -> Tensor:
    # Cached so the host-to-device copy of a layout happens once, not on every step.
    return torch.tensor(positions, dtype=torch.long, device=device)


def run_grouped(
    keys: Sequence[tuple[Any, ...]],
    backend: str,
    compute: Callable[[ModuleType, list[int]], Tensor],
    empty: Callable[[torch.device], Tensor],
) -> Tensor:
    """Calls ``compute(backend_module, positions)`` once per group of equal keys and stacks the rows in input order.

    Args:
        keys: one key per input tensor; the first element is its device. Inputs with equal keys form a group.
        backend: the user's backend choice (resolved per device).
        compute: returns a ``(len(positions), width)`` table for one group.
        empty: returns the table for no inputs, on a given device.

    Returns:
        The table on the device of the first input (the CPU when there are no inputs).
    """
    if not keys:
        return empty(torch.device("cpu"))
    groups = group_indices(keys)
    tables = []
    for key, positions in groups.items():
        device = key[0]
        assert isinstance(device, torch.device)
        tables.append((positions, compute(backend_module(resolve_backend(backend, device)), positions)))
    if len(tables) == 1:
        return tables[0][1]
    out_device = keys[0][0]
    first = tables[0][1]
    out = torch.empty((len(keys), first.shape[1]), dtype=first.dtype, device=out_device)
    for positions, rows in tables:
        out.index_copy_(0, _device_index(out_device, tuple(positions)), rows.to(out_device, non_blocking=True))
    return out
