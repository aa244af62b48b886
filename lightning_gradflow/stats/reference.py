"""The test oracle: a plain float64 loop over the tensors, written to be read, not to be fast.

Every backend implements the same three functions over a group of 1-D tensors that share a device and dtype:
``tensor_stats_rows``, ``update_stats_rows`` and ``histogram_rows``.

Unlike the fast backends, which are handed the coalesced stored values and magnitudes of sparse and complex tensors
(see :func:`~lightning_gradflow.stats._common.stat_values`), the oracle takes the tensors as the user gave them
(:data:`READS_ANY_TENSOR`) and reads them the obvious way: a sparse tensor densified with ``to_dense()``, a complex
one as ``|z|`` in complex128. Tests of sparse and complex inputs therefore check the fast path's bookkeeping against
an independent reading.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gradflow.stats._common import NUM_STATS, NUM_UPDATE_STATS, Stat, UpdateStat
from lightning_gradflow.stats.histogram import HistogramSpec

#: The dispatcher hands this backend the tensors themselves (any shape, layout and floating or complex dtype).
READS_ANY_TENSOR = True


def _float64(t: Tensor) -> Tensor:
    """``t`` as a dense 1-D float64 tensor: a sparse tensor densified, a complex one as ``|z|``."""
    x = t.detach()
    if x.layout != torch.strided:
        x = x.to_dense()
    x = x.to(torch.complex128).abs() if x.dtype.is_complex else x.to(torch.float64)
    return x.reshape(-1)


def tensor_stats_rows(flats: list[Tensor]) -> Tensor:
    """``(len(flats), NUM_STATS)`` float32 table: see :class:`~lightning_gradflow.stats.Stat`."""
    rows = torch.zeros((len(flats), NUM_STATS), dtype=torch.float64)
    for i, t in enumerate(flats):
        x = _float64(t)
        finite = torch.isfinite(x)
        values = x[finite]
        rows[i, Stat.SUMSQ] = (values * values).sum()
        rows[i, Stat.ABSMAX] = values.abs().max() if values.numel() else 0.0
        rows[i, Stat.SUM] = values.sum()
        rows[i, Stat.NONFINITE] = (~finite).sum()
        rows[i, Stat.ZEROS] = (x == 0).sum()
        rows[i, Stat.NUMEL] = x.numel()
    return rows.to(torch.float32).to(flats[0].device if flats else "cpu")


def update_stats_rows(params: list[Tensor], snapshots: list[Tensor]) -> Tensor:
    """``(len(params), 2)`` float32 table of ``Σ(p − s)²`` and ``Σp²`` over finite entries; then ``s ← p``.

    Complex pairs are read as their real and imaginary parts in float64 (``|d|² = re² + im²``), each part skipped on
    its own when it is not finite (complex subtraction would turn a NaN real part into a NaN imaginary part too).
    """
    rows = torch.zeros((len(params), NUM_UPDATE_STATS), dtype=torch.float64)
    for i, (p, s) in enumerate(zip(params, snapshots, strict=True)):
        x, old = p.detach(), s.detach()
        if p.dtype.is_complex:
            x, old = torch.view_as_real(x.to(torch.complex128)), torch.view_as_real(old.to(torch.complex128))
        x = x.to(torch.float64)
        delta = x - old.to(torch.float64)
        rows[i, UpdateStat.DELTA_SUMSQ] = delta[torch.isfinite(delta)].square().sum()
        rows[i, UpdateStat.PARAM_SUMSQ] = x[torch.isfinite(x)].square().sum()
        s.copy_(p.detach())
    return rows.to(torch.float32).to(params[0].device if params else "cpu")


def histogram_rows(flats: list[Tensor], spec: HistogramSpec) -> Tensor:
    """``(len(flats), spec.num_bins)`` int64 counts, by searching the exact float64 edges."""
    edges = torch.tensor(spec.magnitude_edges(), dtype=torch.float64)
    m = spec.num_magnitude_bins
    rows = torch.zeros((len(flats), spec.num_bins), dtype=torch.long)
    for i, t in enumerate(flats):
        x = _float64(t).cpu()
        finite = torch.isfinite(x)
        rows[i, spec.nonfinite] = (~finite).sum()
        rows[i, spec.zero] = (x == 0).sum()
        values = x[finite & (x != 0)]
        # searchsorted(right=True) - 1: the bucket j with edges[j] <= |x| < edges[j + 1]; -1 below, m at or above.
        bucket = torch.searchsorted(edges, values.abs(), right=True) - 1
        for positive in (True, False):
            side = bucket[values > 0] if positive else bucket[values < 0]
            under = int((side < 0).sum())
            over = int((side >= m).sum())
            inside = torch.bincount(side[(side >= 0) & (side < m)], minlength=m)
            if positive:
                rows[i, spec.pos_underflow] = under
                rows[i, spec.pos_underflow + 1 : spec.pos_underflow + 1 + m] = inside
                rows[i, spec.pos_overflow] = over
            else:
                rows[i, spec.neg_underflow] = under
                rows[i, 1 : m + 1] = inside.flip(0)
                rows[i, spec.neg_overflow] = over
    return rows.to(flats[0].device if flats else "cpu")
