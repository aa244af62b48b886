"""Histograms of tensors over fixed log-spaced |x| buckets, counted on the device.

Their TensorBoard form, :func:`~lightning_gradflow.tensorboard.tensorboard_histogram`, lives with the rest of the
TensorBoard formatting in :mod:`lightning_gradflow.tensorboard` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_gradflow.stats._common import BACKENDS, Backend, as_tensor_list, flat_view
from lightning_gradflow.stats._dispatch import run_grouped
from lightning_gradflow.stats.tensor_stats import prepared_values, with_dense_sizes
from lightning_gradflow.tensorboard.histograms import tensorboard_histogram

__all__ = ["HistogramSpec", "TensorHistograms", "tensor_histograms", "tensorboard_histogram"]

if TYPE_CHECKING:
    from types import ModuleType

_BINS_PER_OCTAVE = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class HistogramSpec:
    """Bucket layout: octaves ``[2**e, 2**(e+1))`` for ``min_exp <= e < max_exp``, each cut into ``bins_per_octave``.

    A finite nonzero ``x`` with ``|x| = 2**E * (1 + f)``, ``0 <= f < 1``, goes to magnitude bucket
    ``(E - min_exp) * bins_per_octave + floor(f * bins_per_octave)``, on the side of its sign; below ``2**min_exp``
    it goes to that side's underflow bucket, at or above ``2**max_exp`` to its overflow bucket. Exact zeros and
    non-finite values have buckets of their own. The rule reads only the exponent and the leading mantissa bits, so
    every backend and dtype puts every value in the same bucket.

    Row layout, ascending in value: ``[neg overflow, neg buckets (large → small |x|), neg underflow, zero,
    pos underflow, pos buckets (small → large), pos overflow, non-finite]``.

    Args:
        min_exp: exponent of the smallest magnitude edge, at least -126 (float32's normal range).
        max_exp: exponent of the largest magnitude edge, at most 127.
        bins_per_octave: 1, 2, 4, 8 or 16 (edges at ``2**e * (1 + k / bins_per_octave)``).
    """

    min_exp: int = -40
    max_exp: int = 16
    bins_per_octave: int = 2

    def __post_init__(self) -> None:
        if not -126 <= self.min_exp < self.max_exp <= 127:
            raise ValueError(
                f"Expected -126 <= `min_exp` < `max_exp` <= 127, but got min_exp={self.min_exp},"
                f" max_exp={self.max_exp}."
            )
        if self.bins_per_octave not in _BINS_PER_OCTAVE:
            raise ValueError(
                f"Expected `bins_per_octave` to be one of {_BINS_PER_OCTAVE}, but got {self.bins_per_octave}."
            )

    @property
    def num_magnitude_bins(self) -> int:
        """Buckets per sign between ``2**min_exp`` and ``2**max_exp``."""
        return (self.max_exp - self.min_exp) * self.bins_per_octave

    @property
    def num_bins(self) -> int:
        """Length of a histogram row."""
        return 2 * self.num_magnitude_bins + 6

    @property
    def neg_overflow(self) -> int:
        """Index of the bucket of ``x <= -2**max_exp``."""
        return 0

    @property
    def neg_underflow(self) -> int:
        """Index of the bucket of ``-2**min_exp < x < 0``."""
        return self.num_magnitude_bins + 1

    @property
    def zero(self) -> int:
        """Index of the bucket of exact zeros."""
        return self.num_magnitude_bins + 2

    @property
    def pos_underflow(self) -> int:
        """Index of the bucket of ``0 < x < 2**min_exp``."""
        return self.num_magnitude_bins + 3

    @property
    def pos_overflow(self) -> int:
        """Index of the bucket of ``x >= 2**max_exp``."""
        return 2 * self.num_magnitude_bins + 4

    @property
    def nonfinite(self) -> int:
        """Index of the bucket of NaN and ±Inf."""
        return 2 * self.num_magnitude_bins + 5

    def magnitude_edges(self) -> list[float]:
        """The ``num_magnitude_bins + 1`` edges on ``|x|``, ascending (exact binary fractions)."""
        n = self.bins_per_octave
        edges = [2.0**e * (1 + k / n) for e in range(self.min_exp, self.max_exp) for k in range(n)]
        return [*edges, 2.0**self.max_exp]


@dataclass(frozen=True)
class TensorHistograms:
    """Per-tensor bucket counts (``(num_tensors, spec.num_bins)`` int64, on the device) and their layout."""

    counts: Tensor
    spec: HistogramSpec

    def __len__(self) -> int:
        return self.counts.shape[0]

    def total(self) -> Tensor:
        """Counts of all the tensors together, shape ``(num_bins,)``."""
        return self.counts.sum(0)

    def reduce_rows(self, row_to_group: Tensor, num_groups: int) -> TensorHistograms:
        """Sums rows into groups (e.g. the tensors of one layer)."""
        out = torch.zeros((num_groups, self.spec.num_bins), dtype=self.counts.dtype, device=self.counts.device)
        return TensorHistograms(out.index_add_(0, row_to_group, self.counts), self.spec)

    def to_host(self) -> TensorHistograms:
        """The counts on the CPU (one transfer)."""
        return TensorHistograms(self.counts.cpu(), self.spec)


def tensor_histograms(
    tensors: Iterable[Tensor], *, spec: HistogramSpec | None = None, backend: Backend = "auto"
) -> TensorHistograms:
    """Counts of every tensor's values over the buckets of ``spec``, without copying the values to the host.

    Args:
        tensors: floating-point or complex tensors, dense or sparse (not modified). A sparse tensor's positions that
            are not stored count as zeros; a complex tensor is binned by ``|z|``.
        spec: bucket layout; default ``HistogramSpec()`` (|x| from 2**-40 to 2**16, two buckets per octave).
        backend: as in :func:`~lightning_gradflow.stats.tensor_stats`.

    Returns:
        :class:`TensorHistograms` with int64 counts on the first tensor's device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Expected `backend` to be one of {BACKENDS}, but got {backend!r}.")
    spec = spec or HistogramSpec()
    if not isinstance(spec, HistogramSpec):
        raise TypeError(f"Expected `spec` to be a HistogramSpec, but got {type(spec).__name__}.")
    items = as_tensor_list(tensors)
    values = prepared_values(items)
    assert spec is not None

    def compute(impl: ModuleType, positions: list[int]) -> Tensor:
        if getattr(impl, "READS_ANY_TENSOR", False):  # the oracle reads sparse and complex tensors itself
            return impl.histogram_rows([items[i] for i in positions], spec)
        rows = impl.histogram_rows([flat_view(values[i]) for i in positions], spec)
        return with_dense_sizes(rows, [items[i] for i in positions], [values[i] for i in positions], spec.zero)

    counts = run_grouped(
        [(t.device, t.dtype) for t in items],
        backend,
        compute,
        lambda device: torch.zeros((0, spec.num_bins), dtype=torch.long, device=device),
    )
    return TensorHistograms(counts, spec)
