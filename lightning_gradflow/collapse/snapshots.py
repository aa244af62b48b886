"""Snapshots: deep copies of everything a rollback restores, and a ring of the last few.

:func:`take_snapshot` copies a module's ``state_dict``, its optimizers', LR schedulers' and GradScaler's states (to
the CPU by default), :func:`restore_snapshot` loads them back in place, :class:`SnapshotRing` keeps the last ``N``.
Sparse and complex tensors are copied as they are (``Tensor.to(copy=True)`` keeps layout and dtype).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def copy_tree(obj: Any, device: torch.device | str | None = None) -> Any:
    """A deep copy of nested dicts/lists/tuples, tensors cloned (to ``device`` when given; never aliased).

    Example::

        >>> t = torch.zeros(2)
        >>> c = copy_tree({"a": [t, 1.0]})
        >>> _ = c["a"][0].add_(1)
        >>> t
        tensor([0., 0.])
    """
    if isinstance(obj, Tensor):
        out = obj.detach().to(device if device is not None else obj.device, copy=True)
        return out
    if isinstance(obj, dict):
        return type(obj)((k, copy_tree(v, device)) for k, v in obj.items())
    if isinstance(obj, list):
        return [copy_tree(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(copy_tree(v, device) for v in obj)
    return copy.deepcopy(obj)


def tree_nbytes(obj: Any) -> int:
    """Bytes held by the tensors of a nested structure."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tree_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tree_nbytes(v) for v in obj)
    return 0


@dataclass
class Snapshot:
    """Everything a rollback restores, copied at the end of optimizer step ``step`` (``global_step`` after it).

    Attributes:
        step: ``trainer.global_step`` when taken.
        model: the module's ``state_dict`` (parameters and buffers).
        optimizers: each optimizer's ``state_dict``.
        schedulers: each LR scheduler's ``state_dict``.
        scaler: the GradScaler's ``state_dict`` (None without one).
        rng: the RNG states (torch, CUDA, Python, NumPy), None when not kept.
        extra: the owner's own state (e.g. the detectors), as plain data.
    """

    step: int
    model: dict[str, Any]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes held by the snapshot's tensors."""
        return tree_nbytes([self.model, self.optimizers, self.schedulers])


def take_snapshot(
    step: int,
    module: torch.nn.Module,
    optimizers: Sequence[Any],
    schedulers: Sequence[Any] = (),
    scaler: Any = None,
    rng: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> Snapshot:
    """Deep copies (tensors moved to ``device``) of a module, its optimizers, schedulers and GradScaler.

    Example::

        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(net.parameters())
        >>> snap = take_snapshot(0, net, [opt])
        >>> with torch.no_grad(): _ = net.weight.add_(1)
        >>> restore_snapshot(snap, net, [opt])
        >>> bool(torch.equal(net.weight, snap.model["weight"]))
        True
    """
    return Snapshot(
        step=step,
        model=copy_tree(module.state_dict(), device),
        optimizers=[copy_tree(o.state_dict(), device) for o in optimizers],
        schedulers=[copy_tree(s.state_dict(), device) for s in schedulers],
        scaler=None if scaler is None else copy_tree(scaler.state_dict(), device),
        rng=None if rng is None else copy_tree(rng),
        extra=copy_tree(extra or {}),
    )


def restore_snapshot(
    snapshot: Snapshot,
    module: torch.nn.Module,
    optimizers: Sequence[Any],
    schedulers: Sequence[Any] = (),
    scaler: Any = None,
) -> None:
    """Restores a :func:`take_snapshot` in place (parameters keep their identity; the snapshot stays intact).

    Optimizer states are loaded from fresh copies: ``Optimizer.load_state_dict`` keeps tensors that are already on
    the right device and dtype, so loading the snapshot itself would let the optimizer mutate it.
    """
    module.load_state_dict(snapshot.model)  # copies into the existing tensors
    if len(optimizers) != len(snapshot.optimizers) or len(schedulers) != len(snapshot.schedulers):
        raise RuntimeError(
            f"The snapshot holds {len(snapshot.optimizers)} optimizer(s) and {len(snapshot.schedulers)} scheduler(s),"
            f" the trainer has {len(optimizers)} and {len(schedulers)}: they cannot be restored."
        )
    for optimizer, state in zip(optimizers, snapshot.optimizers, strict=True):
        optimizer.load_state_dict(copy_tree(state))
    for scheduler, state in zip(schedulers, snapshot.schedulers, strict=True):
        scheduler.load_state_dict(copy_tree(state))
    if scaler is not None and snapshot.scaler is not None:
        scaler.load_state_dict(copy_tree(snapshot.scaler))


class SnapshotRing:
    """The last ``capacity`` snapshots, oldest first.

    Args:
        capacity: how many snapshots are kept (the oldest is dropped first).

    Example::

        >>> ring = SnapshotRing(2)
        >>> for step in (10, 20, 30):
        ...     ring.push(Snapshot(step, {}, [], []))
        >>> ring.steps(), ring.latest().step, ring.pop_latest().step, ring.steps()
        ([20, 30], 30, 30, [20])
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Snapshot] = deque(maxlen=capacity)

    def push(self, snapshot: Snapshot) -> None:
        """Adds a snapshot, dropping the oldest when full."""
        self._items.append(snapshot)

    def latest(self) -> Snapshot | None:
        """The newest snapshot (None when empty)."""
        return self._items[-1] if self._items else None

    def pop_latest(self) -> Snapshot | None:
        """Removes and returns the newest snapshot (None when empty)."""
        return self._items.pop() if self._items else None

    def steps(self) -> list[int]:
        """The steps of the snapshots kept, oldest first."""
        return [s.step for s in self._items]

    def clear(self) -> None:
        """Drops every snapshot."""
        self._items.clear()

    def nbytes(self) -> int:
        """Bytes held by all snapshots' tensors."""
        return sum(s.nbytes() for s in self._items)

    def __len__(self) -> int:
        return len(self._items)
