"""Per-tensor statistics of many tensors in one fused pass: the engine under every callback."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_gradflow.stats._common import (
    ADDITIVE_STATS,
    BACKENDS,
    MAX_STATS,
    NUM_STATS,
    Backend,
    Stat,
    as_tensor_list,
    flat_view,
    is_plain,
    stat_values,
)
from lightning_gradflow.stats._dispatch import run_grouped

if TYPE_CHECKING:
    from types import ModuleType

    from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class TensorStats:
    """Statistics of a list of tensors: one row per tensor, the columns of :class:`Stat`.

    The table is ``float32`` and stays on the device of the inputs; nothing here synchronises with the host
    until :meth:`to_host` is called. Counts are exact up to 2**24 per tensor (float32 integers).
    Means and RMS are over the finite values (0 when there are none).

    Example::

        >>> import torch
        >>> from lightning_gradflow.stats import tensor_stats
        >>> s = tensor_stats([torch.tensor([3.0, -4.0, 0.0]), torch.tensor([1.0, float("nan")])])
        >>> s.norm.tolist(), s.absmax.tolist(), s.nonfinite.tolist(), s.zero_fraction.tolist()
        ([5.0, 1.0], [4.0, 1.0], [0.0, 1.0], [0.3333333432674408, 0.0])
        >>> float(s.total_norm())  # sqrt(9 + 16 + 1): the square root of the summed squares
        5.099019527435303
    """

    table: Tensor

    def __post_init__(self) -> None:
        if self.table.ndim != 2 or self.table.shape[1] != NUM_STATS:
            raise ValueError(f"Expected a (num_tensors, {NUM_STATS}) table, but got shape {tuple(self.table.shape)}.")

    def __len__(self) -> int:
        return self.table.shape[0]

    def column(self, stat: Stat) -> Tensor:
        """One column of the table, shape ``(num_tensors,)``."""
        return self.table[:, stat]

    @property
    def sumsq(self) -> Tensor:
        """Sum of squares of the finite values."""
        return self.column(Stat.SUMSQ)

    @property
    def norm(self) -> Tensor:
        """L2 norm of the finite values."""
        return self.sumsq.sqrt()

    @property
    def absmax(self) -> Tensor:
        """Largest finite ``|x|`` (0 for an empty tensor)."""
        return self.column(Stat.ABSMAX)

    @property
    def sum(self) -> Tensor:
        """Sum of the finite values."""
        return self.column(Stat.SUM)

    @property
    def nonfinite(self) -> Tensor:
        """Number of NaN and ±Inf values."""
        return self.column(Stat.NONFINITE)

    @property
    def zeros(self) -> Tensor:
        """Number of exact zeros."""
        return self.column(Stat.ZEROS)

    @property
    def numel(self) -> Tensor:
        """Number of elements."""
        return self.column(Stat.NUMEL)

    @property
    def finite_count(self) -> Tensor:
        """Number of finite values."""
        return self.numel - self.nonfinite

    @property
    def rms(self) -> Tensor:
        """Root mean square of the finite values."""
        return (self.sumsq / self.finite_count.clamp(min=1)).sqrt()

    @property
    def mean(self) -> Tensor:
        """Mean of the finite values."""
        return self.sum / self.finite_count.clamp(min=1)

    @property
    def zero_fraction(self) -> Tensor:
        """Fraction of the elements that are exactly zero."""
        return self.zeros / self.numel.clamp(min=1)

    def total_norm(self) -> Tensor:
        """Global L2 norm of all the tensors: the square root of the summed squares (a 0-dim tensor)."""
        return self.sumsq.sum().sqrt()

    def scaled(self, factor: Tensor | float) -> TensorStats:
        """The statistics the same tensors would have with every value multiplied by ``factor``.

        Sums of squares scale by ``factor²``, maxima by ``|factor|``, sums by ``factor``; counts stay. E.g. gradients
        that are still multiplied by a loss scale: ``stats.scaled(1 / scale)``. A 0-dim tensor ``factor`` is read on
        the device (no host sync).

        Example::

            >>> import torch
            >>> from lightning_gradflow.stats import tensor_stats
            >>> s = tensor_stats([torch.tensor([3.0, -4.0, 0.0])]).scaled(0.5)
            >>> s.norm.tolist(), s.absmax.tolist(), s.sum.tolist(), s.zeros.tolist()
            ([2.5], [2.0], [-0.5], [1.0])
        """
        f = torch.as_tensor(factor, device=self.table.device).to(self.table.dtype)
        factors = torch.ones(NUM_STATS, dtype=self.table.dtype, device=self.table.device)
        factors[Stat.SUMSQ] = f * f
        factors[Stat.ABSMAX] = f.abs()
        factors[Stat.SUM] = f
        return TensorStats(self.table * factors)

    def to_host(self, non_blocking: bool = False) -> TensorStats:
        """The same statistics on the CPU: the one explicit device-to-host transfer.

        With ``non_blocking=True`` on CUDA the copy goes to pinned memory asynchronously; read it after the
        stream has passed this point (e.g. one step later, or after ``torch.cuda.current_stream().synchronize()``).
        """
        if self.table.device.type == "cpu":
            return self
        host = torch.empty(self.table.shape, dtype=self.table.dtype, pin_memory=non_blocking)
        host.copy_(self.table, non_blocking=non_blocking)
        return TensorStats(host)

    def reduce_rows(self, row_to_group: Tensor, num_groups: int) -> TensorStats:
        """Merges rows into groups exactly (e.g. the tensors of one layer): sums add, maxima take the maximum.

        Args:
            row_to_group: ``(num_tensors,)`` long tensor on the table's device, the group of each row.
            num_groups: number of groups.
        """
        out = torch.zeros((num_groups, NUM_STATS), dtype=self.table.dtype, device=self.table.device)
        out.index_add_(0, row_to_group, self.table)
        for col in MAX_STATS:
            out[:, col] = 0.0
            out[:, col].scatter_reduce_(0, row_to_group, self.table[:, col], reduce="amax", include_self=True)
        return TensorStats(out)

    @staticmethod
    def combine(parts: Sequence[TensorStats]) -> TensorStats:
        """Merges statistics of shards of the same tensors (same rows), exactly: sums add, maxima take the max."""
        if not parts:
            raise ValueError("Expected `parts` to hold at least one TensorStats, but got none.")
        shapes = {tuple(p.table.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"Expected every part to have the same table shape, but got {sorted(shapes)}.")
        stacked = torch.stack([p.table for p in parts])
        out = stacked.sum(0)
        for col in MAX_STATS:
            out[:, col] = stacked[:, :, col].amax(0)
        return TensorStats(out)

    def all_reduce(self, group: ProcessGroup | None = None) -> TensorStats:
        """Combines the shards held by every rank of ``group`` (two collectives; returns a new object)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        additive = self.table[:, list(ADDITIVE_STATS)].contiguous()
        maxed = self.table[:, list(MAX_STATS)].contiguous()
        dist.all_reduce(additive, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
        out = torch.empty_like(self.table)
        out[:, list(ADDITIVE_STATS)] = additive
        out[:, list(MAX_STATS)] = maxed
        return TensorStats(out)


def tensor_stats(
    tensors: Iterable[Tensor],
    *,
    backend: Backend = "auto",
    full: bool = True,
    count_zeros: Sequence[bool] | None = None,
) -> TensorStats:
    """Sum of squares, max ``|x|``, sum, non-finite count, zero count and size of every tensor, in one pass.

    Args:
        tensors: floating-point or complex tensors of any shapes, dtypes (float16, bfloat16, float32, float64,
            complex), devices, strides and layouts (dense, or sparse COO/CSR/CSC/BSR/BSC); empty tensors allowed.
            They are never modified. Sparse tensors are described exactly as their dense equivalent, complex ones by
            their magnitudes ``|z|`` (see :class:`Stat`).
        backend: ``"auto"`` (fused Triton kernel on CUDA when Triton imports, else ``"torch"``), ``"torch"``,
            ``"triton"`` or ``"reference"`` (a float64 loop, the test oracle).
        full: ``False`` asks only for what norms, RMS, clipping and the flow diagnosis need (sum of squares,
            non-finite and zero counts, size): a backend may then leave ``absmax`` and ``sum`` as NaN to save
            work (the torch backend does on the CPU, at about half the cost; the others compute everything).
        count_zeros: with ``full=False``, one flag per tensor: ``False`` lets a backend leave that tensor's zero
            count as NaN (the torch backend then reads a large CPU tensor once instead of twice). ``None``: count all.

    Returns:
        A :class:`TensorStats` whose ``(len(tensors), 6)`` float32 table lives on the first tensor's device.

    Raises:
        TypeError: for a non-tensor item, a dtype that is neither floating-point nor complex, or another layout.
        ValueError: for an unknown backend or a tensor on the meta device.

    Example::

        >>> import torch
        >>> from lightning_gradflow.stats import tensor_stats
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> stats = tensor_stats([p.grad for p in model.parameters()])
        >>> stats.table.shape
        torch.Size([2, 6])
        >>> sparse = torch.sparse_coo_tensor([[0, 3, 0]], [1.0, 2.0, 2.0], (6,), check_invariants=True)
        >>> tensor_stats([sparse]).table.tolist()  # index 0 is stored twice: 3.0 there
        [[13.0, 3.0, 5.0, 0.0, 4.0, 6.0]]
    """
    if backend not in BACKENDS:
        raise ValueError(f"Expected `backend` to be one of {BACKENDS}, but got {backend!r}.")
    items = as_tensor_list(tensors)
    if count_zeros is not None and len(count_zeros) != len(items):
        raise ValueError(
            f"Expected `count_zeros` to have one flag per tensor ({len(items)}), but got {len(count_zeros)}."
        )
    values = prepared_values(items)

    def compute(impl: ModuleType, positions: list[int]) -> Tensor:
        if getattr(impl, "READS_ANY_TENSOR", False):  # the oracle reads sparse and complex tensors itself
            return impl.tensor_stats_rows([items[i] for i in positions])
        rows = _rows(impl, [flat_view(values[i]) for i in positions], full, count_zeros, positions)
        return with_dense_sizes(rows, [items[i] for i in positions], [values[i] for i in positions], Stat.ZEROS)

    table = run_grouped(
        [(t.device, t.dtype) for t in items],
        backend,
        compute,
        lambda device: torch.zeros((0, NUM_STATS), device=device),
    )
    return TensorStats(table)


def prepared_values(items: list[Tensor]) -> list[Tensor]:
    """What the fast backends read for each tensor: itself when dense and real, else its :func:`stat_values`."""
    return [t if is_plain(t) else stat_values(t) for t in items]


def with_dense_sizes(rows: Tensor, items: list[Tensor], values: list[Tensor], zero_column: int) -> Tensor:
    """Counts the positions a sparse tensor does not store as zeros (in ``zero_column``), over its dense size.

    In a statistics table ``NUMEL`` becomes the dense size too. Dense rows are left as they are.
    """
    missing = [(i, t.numel() - v.numel()) for i, (t, v) in enumerate(zip(items, values, strict=True)) if v is not t]
    missing = [(i, n) for i, n in missing if n]
    if not missing:
        return rows
    index = torch.tensor([i for i, _ in missing], device=rows.device)
    extra = torch.tensor([float(n) for _, n in missing], dtype=rows.dtype, device=rows.device)
    rows[:, zero_column].index_add_(0, index, extra)
    if rows.dtype.is_floating_point and rows.shape[1] == NUM_STATS:
        dense = torch.tensor([float(items[i].numel()) for i, _ in missing], dtype=rows.dtype, device=rows.device)
        rows[:, Stat.NUMEL].index_copy_(0, index, dense)
    return rows


def l1_norms(tensors: Iterable[Tensor]) -> Tensor:
    """``Σ|x|`` of every tensor (``Σ|z|`` for complex ones, over the stored values of sparse ones), float32.

    Non-finite values propagate (as in ``torch.linalg.vector_norm(x, 1)``). The result lives on the first tensor's
    device.

    Example::

        >>> import torch
        >>> l1_norms([torch.tensor([3.0, -4.0]), torch.tensor([3 + 4j])]).tolist()
        [7.0, 5.0]
    """
    items = as_tensor_list(tensors)
    if not items:
        return torch.zeros(0)
    device = items[0].device
    plain = [i for i, t in enumerate(items) if is_plain(t)]
    out = torch.zeros(len(items), device=device)
    if plain:
        norms = torch._foreach_norm([items[i].detach() for i in plain], 1)
        out[plain] = torch.stack([n.float().to(device) for n in norms])
    for i, t in enumerate(items):
        if not is_plain(t):
            out[i] = stat_values(t).float().abs().sum().to(device)
    return out


def _rows(
    impl: ModuleType, flats: list[Tensor], full: bool, count_zeros: Sequence[bool] | None, positions: list[int]
) -> Tensor:
    flow = None if full else getattr(impl, "flow_stats_rows", None)
    if flow is None:
        return impl.tensor_stats_rows(flats)
    flags = None if count_zeros is None else [bool(count_zeros[i]) for i in positions]
    return flow(flats, count_zeros=flags)
