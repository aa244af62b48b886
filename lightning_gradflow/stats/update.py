"""Update-to-weight statistics: ‖p − snapshot‖ and ‖p‖ per tensor, refreshing the snapshot in the same pass."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from lightning_gradflow.stats._common import (
    BACKENDS,
    NUM_UPDATE_STATS,
    Backend,
    UpdateStat,
    as_tensor_list,
    flat_view,
    is_dense,
)
from lightning_gradflow.stats._dispatch import run_grouped

#: ‖Δw‖/‖w‖ divides by at least this, so a zero-initialised tensor (e.g. a bias) gives a finite ratio.
RATIO_FLOOR = 1e-12


@dataclass(frozen=True)
class UpdateStats:
    """Per tensor: sum of squares of the update ``p − snapshot`` and of the parameter, both over finite entries.

    Example::

        >>> import torch
        >>> from lightning_gradflow.stats import make_snapshot, update_stats
        >>> w = [torch.tensor([3.0, 4.0])]
        >>> snap = make_snapshot(w)
        >>> w[0].add_(torch.tensor([0.3, 0.4]))
        tensor([3.3000, 4.4000])
        >>> round(float(update_stats(w, snap).ratio[0]), 4)  # ‖Δw‖/‖w‖ = 0.5/5.5
        0.0909
        >>> snap[0]  # refreshed in the same pass
        tensor([3.3000, 4.4000])
    """

    table: Tensor

    def __post_init__(self) -> None:
        if self.table.ndim != 2 or self.table.shape[1] != NUM_UPDATE_STATS:
            raise ValueError(
                f"Expected a (num_tensors, {NUM_UPDATE_STATS}) table, but got shape {tuple(self.table.shape)}."
            )

    def __len__(self) -> int:
        return self.table.shape[0]

    @property
    def delta_norm(self) -> Tensor:
        """‖p − snapshot‖ per tensor."""
        return self.table[:, UpdateStat.DELTA_SUMSQ].sqrt()

    @property
    def param_norm(self) -> Tensor:
        """‖p‖ per tensor."""
        return self.table[:, UpdateStat.PARAM_SUMSQ].sqrt()

    @property
    def ratio(self) -> Tensor:
        """Update-to-weight ratio ‖Δw‖/‖w‖ per tensor."""
        return self.delta_norm / self.param_norm.clamp(min=RATIO_FLOOR)

    def total_ratio(self) -> Tensor:
        """‖Δw‖/‖w‖ over all the tensors together (0-dim)."""
        sums = self.table.sum(0)
        return sums[UpdateStat.DELTA_SUMSQ].sqrt() / sums[UpdateStat.PARAM_SUMSQ].sqrt().clamp(min=RATIO_FLOOR)

    def reduce_rows(self, row_to_group: Tensor, num_groups: int) -> UpdateStats:
        """Sums rows into groups (e.g. the tensors of one layer)."""
        out = torch.zeros((num_groups, NUM_UPDATE_STATS), dtype=self.table.dtype, device=self.table.device)
        return UpdateStats(out.index_add_(0, row_to_group, self.table))

    def to_host(self, non_blocking: bool = False) -> UpdateStats:
        """The same statistics on the CPU (see :meth:`TensorStats.to_host`)."""
        if self.table.device.type == "cpu":
            return self
        host = torch.empty(self.table.shape, dtype=self.table.dtype, pin_memory=non_blocking)
        return UpdateStats(host.copy_(self.table, non_blocking=non_blocking))


_COMPLEX_OF = {torch.float16: torch.complex32, torch.float32: torch.complex64, torch.float64: torch.complex128}


def make_snapshot(params: Iterable[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """Copies of ``params`` (same device and memory layout) to pass to :func:`update_stats`.

    Args:
        params: dense floating-point or complex tensors.
        dtype: snapshot dtype; e.g. ``torch.bfloat16`` halves the memory for float32 parameters at the cost of
            rounding the reference point. A complex parameter's snapshot gets the complex dtype of that precision
            (``float16`` → ``complex32``; there is no complex bfloat16). Default: the parameter's dtype.
    """
    items = as_tensor_list(params, "params", allow_sparse=False)
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"Expected `dtype` to be a floating-point dtype, but got {dtype}.")
    return [torch.empty_like(p, dtype=_snapshot_dtype(p, dtype)).copy_(p.detach()) for p in items]


def _snapshot_dtype(p: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return p.dtype
    if not p.dtype.is_complex:
        return dtype
    if dtype not in _COMPLEX_OF:
        raise TypeError(f"`dtype={dtype}` has no complex counterpart for the complex parameter ({p.dtype}).")
    return _COMPLEX_OF[dtype]


def _real(t: Tensor) -> Tensor:
    """A real view of ``t``: its real and imaginary parts side by side when complex (shares memory)."""
    return torch.view_as_real(t) if t.dtype.is_complex else t


def _paired_flat_views(p: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    # Both must be read in the same element order; the snapshot must be a view so it can be refreshed in place.
    if p.stride() == s.stride() and is_dense(s):
        return flat_view(p), flat_view(s)
    if s.is_contiguous():
        return p.detach().reshape(-1), s.view(-1)
    raise ValueError(
        f"A snapshot with shape {tuple(s.shape)} and strides {s.stride()} can be neither read in the parameter's"
        f" order (strides {p.stride()}) nor refreshed in place; create snapshots with `make_snapshot(params)`."
    )


def update_stats(params: Iterable[Tensor], snapshots: Iterable[Tensor], *, backend: Backend = "auto") -> UpdateStats:
    """‖p − snapshot‖² and ‖p‖² per tensor in one pass, then ``snapshot ← p`` in the same pass.

    Complex parameters (with complex snapshots) are read as their real and imaginary parts
    (``torch.view_as_real``): the sums are ``Σ|p − s|²`` and ``Σ|p|²``, each part skipped on its own when it is not
    finite. Sparse parameters are refused (optimizers keep parameters dense; sparse *gradients* are fine).

    Args:
        params: dense floating-point or complex tensors (not modified).
        snapshots: one tensor per parameter, same shape, any floating dtype (complex for a complex parameter), on the
            same device (see :func:`make_snapshot`); overwritten with the current parameter values.
        backend: as in :func:`~lightning_gradflow.stats.tensor_stats`.

    Returns:
        An :class:`UpdateStats` on the first parameter's device.

    Raises:
        ValueError: when the lists differ in length, or a pair differs in shape or device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Expected `backend` to be one of {BACKENDS}, but got {backend!r}.")
    ps = as_tensor_list(params, "params", allow_sparse=False)
    ss = as_tensor_list(snapshots, "snapshots", allow_sparse=False)
    if len(ps) != len(ss):
        raise ValueError(f"Expected one snapshot per parameter, but got {len(ss)} snapshots for {len(ps)} params.")
    for i, (p, s) in enumerate(zip(ps, ss, strict=True)):
        if p.shape != s.shape or p.device != s.device:
            raise ValueError(
                f"`snapshots[{i}]` has shape {tuple(s.shape)} on {s.device}, but `params[{i}]` has shape"
                f" {tuple(p.shape)} on {p.device}; rebuild the snapshots with `make_snapshot(params)`."
            )
        if p.dtype.is_complex != s.dtype.is_complex:
            raise ValueError(
                f"`snapshots[{i}]` has dtype {s.dtype}, but `params[{i}]` has dtype {p.dtype}: a complex parameter"
                " needs a complex snapshot and a real one a real snapshot; rebuild them with `make_snapshot(params)`."
            )

    def compute(impl: ModuleType, positions: list[int]) -> Tensor:
        if getattr(impl, "READS_ANY_TENSOR", False):  # the oracle subtracts complex values itself
            pairs = [_paired_flat_views(ps[i], ss[i]) for i in positions]
        else:
            pairs = [_paired_flat_views(_real(ps[i].detach()), _real(ss[i])) for i in positions]
        return impl.update_stats_rows([a for a, _ in pairs], [b for _, b in pairs])

    table = run_grouped(
        [(p.device, p.dtype, s.dtype) for p, s in zip(ps, ss, strict=True)],
        backend,
        compute,
        lambda device: torch.zeros((0, NUM_UPDATE_STATS), device=device),
    )
    return UpdateStats(table)
