"""Pure-torch backend: the CPU path and the GPU fallback when Triton is missing.

Each group of tensors is cut into *batches* of about :data:`CHUNK` elements: a slice of one large tensor, or many
small tensors packed together. A batch is small enough to stay in cache, so the several reductions it needs read
memory once (on this project's 2-core CPU a cached reduction runs 3-5x faster than one streaming from memory).
Per-batch results are merged per tensor at the end.

On the CPU, a batch whose largest ``|x|`` is finite has no NaN or Inf (both propagate through ``max``) and takes the
fast path; only batches with non-finite values pay for masking. That test reads a value, so on other devices every
batch is masked instead: the GPU path never synchronises with the host.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_gradflow.stats._common import NUM_STATS, NUM_UPDATE_STATS, Stat
from lightning_gradflow.stats.histogram import HistogramSpec

#: Elements per batch on the CPU (4 MiB of float32: stays in the last-level cache between reductions).
CHUNK = 1 << 20
#: Elements per batch on other devices (bounds the temporaries of the fallback path).
DEVICE_CHUNK = 1 << 24
#: Tensors smaller than this are packed with others; larger ones are reduced slice by slice.
PACK_BELOW = 1 << 14
#: Elements per packed batch. Its working columns (up to 4 rows) then stay under torch's parallel grain size (32768
#: elements), so every operation on the batch runs on the calling thread: thousands of small operations pay no thread
#: synchronisation, which on a busy machine costs more than the work itself.
PACK_CHUNK = 1 << 13


@dataclass(frozen=True)
class _Batch:
    """Pieces ``(tensor index, start, length)`` processed together; one piece means a slice of one tensor."""

    pieces: tuple[tuple[int, int, int], ...]


@functools.lru_cache(maxsize=64)
def _plan(numels: tuple[int, ...], chunk: int) -> tuple[_Batch, ...]:
    """Cuts tensors of the given sizes into batches of at most ``chunk`` elements (cached: layouts repeat)."""
    batches: list[_Batch] = []
    packed: list[tuple[int, int, int]] = []
    packed_size = 0
    for i, n in enumerate(numels):
        if n == 0:  # an empty tensor's row is all zeros: nothing to read
            continue
        if n >= PACK_BELOW:
            batches.extend(_Batch(((i, start, min(chunk, n - start)),)) for start in range(0, n, chunk))
            continue
        if packed_size + n > min(chunk, PACK_CHUNK) and packed:
            batches.append(_Batch(tuple(packed)))
            packed, packed_size = [], 0
        packed.append((i, 0, n))
        packed_size += n
    if packed:
        batches.append(_Batch(tuple(packed)))
    return tuple(batches)


@functools.lru_cache(maxsize=64)
def _piece_owner(numels: tuple[int, ...], chunk: int, device: torch.device) -> Tensor:
    """Tensor index of every piece of the plan, on ``device`` (copied there once per layout)."""
    owners = [i for batch in _plan(numels, chunk) for i, _, _ in batch.pieces]
    return torch.tensor(owners, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=64)
def _numels(numels: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(numels, dtype=dtype, device=device)


@functools.lru_cache(maxsize=4096)
def _batch_owner(batch: _Batch, device: torch.device) -> Tensor:
    """Tensor index of every element of a batch."""
    owners = torch.tensor([i for i, _, _ in batch.pieces], dtype=torch.long, device=device)
    return owners[_segment_ids(batch, device)]


_SCRATCH = threading.local()


def _scratch(slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable buffer of at least ``numel`` elements, kept per thread, slot, dtype and device.

    Allocating the multi-MiB buffers afresh on every call would cost the operating system's page faults (and their
    zeroing) on every training step; a buffer kept alive costs its memory once (at most ``CHUNK`` elements per slot
    on the CPU, ``DEVICE_CHUNK`` on other devices).
    """
    buffers: dict[tuple[int, torch.dtype, torch.device], Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (slot, dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_size(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else DEVICE_CHUNK


def _batch_values(flats: list[Tensor], batch: _Batch, acc: torch.dtype, convert: Tensor | None = None) -> Tensor:
    """The batch's values as one 1-D tensor of the accumulation dtype (a view when no copy is needed).

    A slice that must change dtype is converted into ``convert`` when given (a reused buffer).
    """
    parts = [flats[i][start : start + n] for i, start, n in batch.pieces]
    if len(parts) > 1:
        return torch.cat(parts).to(acc)
    if parts[0].dtype == acc:
        return parts[0]
    if convert is not None:
        return convert[: parts[0].numel()].copy_(parts[0])
    return parts[0].to(acc)


@functools.lru_cache(maxsize=4096)
def _lengths(batch: _Batch, device: torch.device) -> Tensor:
    return torch.tensor([n for _, _, n in batch.pieces], dtype=torch.long, device=device)


@functools.lru_cache(maxsize=4096)
def _segment_ids(batch: _Batch, device: torch.device) -> Tensor:
    """Position of the piece every element of a packed batch belongs to."""
    lengths = [n for _, _, n in batch.pieces]
    # built with numpy on the host, once per layout: torch's repeat_interleave stalls on a busy machine
    return torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths)).to(device)


def _iter_batches(flats: list[Tensor], chunk: int) -> Iterator[_Batch]:
    yield from _plan(tuple(t.numel() for t in flats), chunk)


# ---------------------------------------------------------------------------------------------- tensor statistics


def _masked(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` with non-finite values replaced by 0, and the non-finite indicator (as x's dtype)."""
    finite = torch.isfinite(x)
    return torch.where(finite, x, 0.0), (~finite).to(x.dtype)


def _slice_stats(x: Tensor, masked: bool, scratch: Tensor) -> Tensor:
    """The six statistics of one 1-D tensor as a ``(NUM_STATS,)`` tensor of ``x.dtype``.

    ``scratch`` (at least ``x.numel()`` elements of ``x.dtype``) is reused for every temporary: a fresh multi-MiB
    buffer per batch would cost the operating system's page faults on every step.
    """
    absx = torch.abs(x, out=scratch[: x.numel()])
    absmax = absx.amax()
    if not masked and x.device.type == "cpu" and not math.isfinite(absmax):
        masked = True
    zeros = torch.eq(x, 0, out=absx).sum()  # counted before masking: a NaN is not a zero
    if masked:
        x, nonfinite_flags = _masked(x)
        absmax = x.abs().amax()
        nonfinite = nonfinite_flags.sum()
    else:
        nonfinite = torch.zeros((), dtype=x.dtype, device=x.device)
    sumsq = torch.mul(x, x, out=absx).sum()
    numel = torch.full((), x.numel(), dtype=x.dtype, device=x.device)
    return torch.stack([sumsq, absmax, x.sum(), nonfinite, zeros, numel])


def _slice_flow_stats(x: Tensor, scratch: Tensor, count_zeros: bool = True) -> Tensor:
    """Sum of squares, non-finite and zero counts, size of one 1-D CPU tensor; ``ABSMAX`` and ``SUM`` are NaN.

    Two cached passes instead of four (one without ``count_zeros``: ``ZEROS`` is NaN then). A non-finite sum of
    squares (a NaN or Inf, or squares beyond the dtype's range) falls back to the full masked statistics of the slice.
    """
    buffer = scratch[: x.numel()]
    nan = torch.full((), math.nan, dtype=x.dtype)
    zeros = torch.eq(x, 0, out=buffer).sum() if count_zeros else nan
    sumsq = torch.mul(x, x, out=buffer).sum()
    if not math.isfinite(sumsq):
        return _slice_stats(x, masked=True, scratch=scratch)
    numel = torch.full((), x.numel(), dtype=x.dtype)
    return torch.stack([sumsq, nan, nan, torch.zeros((), dtype=x.dtype), zeros, numel])


def _packed_stats(x: Tensor, batch: _Batch, masked: bool) -> Tensor:
    """Statistics of the pieces of a packed batch, shape ``(len(batch.pieces), NUM_STATS)``.

    Small tensors only (< PACK_BELOW elements each); their sums accumulate in float64, which is cheap at this size
    and keeps the sequential segment sums as accurate as the cascade sums of the slice path.
    """
    absx = x.abs()
    if not masked and x.device.type == "cpu":
        masked = not math.isfinite(absx.amax())
    zeros = x == 0
    if masked:
        x, nonfinite = _masked(x)
        absx = x.abs()
    else:
        nonfinite = torch.zeros_like(x)
    wide = x.to(torch.float64)
    columns = torch.stack([wide * wide, wide, nonfinite.to(torch.float64), zeros.to(torch.float64)])
    lengths = _lengths(batch, x.device)
    sums = torch.segment_reduce(columns, "sum", lengths=lengths.expand(4, -1), axis=1, unsafe=True)
    out = torch.empty((len(batch.pieces), NUM_STATS), dtype=x.dtype, device=x.device)
    out[:, [Stat.SUMSQ, Stat.SUM, Stat.NONFINITE, Stat.ZEROS]] = sums.t().to(x.dtype)
    out[:, Stat.ABSMAX] = 0.0
    out[:, Stat.ABSMAX].scatter_reduce_(0, _segment_ids(batch, x.device), absx, reduce="amax", include_self=True)
    return out


def _merge_pieces(piece_rows: Tensor, owner: Tensor, num_tensors: int) -> Tensor:
    out = torch.zeros((num_tensors, NUM_STATS), dtype=piece_rows.dtype, device=piece_rows.device)
    out.index_add_(0, owner, piece_rows)
    out[:, Stat.ABSMAX] = 0.0
    out[:, Stat.ABSMAX].scatter_reduce_(0, owner, piece_rows[:, Stat.ABSMAX], reduce="amax", include_self=True)
    return out


def _foreach_small_stats(xs: list[Tensor], acc: torch.dtype, full: bool = True) -> Tensor:
    """CPU statistics of many small non-empty tensors with torch's multi-tensor (``_foreach``) operations.

    A ``_foreach`` call loops over the tensors in C++, so a thousand tiny tensors cost a handful of calls instead of
    a few thousand; the non-finite test reads values, which is free on the CPU. The sums of squares come from
    ``_foreach_norm`` (accurate at these sizes: under ``PACK_BELOW`` elements each), the signed sums from one float64
    segmented sum, the zero counts from the L0 "norm" (the count of nonzero entries, NaN included). Without
    ``full``, ``ABSMAX`` and ``SUM`` are NaN (as in :func:`flow_stats_rows`); a non-finite value still shows, as a
    non-finite norm.
    """
    lengths = [x.numel() for x in xs]
    packed = torch.cat(xs).to(acc)
    views = list(packed.split(lengths))
    norms = torch.stack(torch._foreach_norm(views, 2)).to(acc)
    if full:
        absmax = torch.stack(torch._foreach_max(torch._foreach_abs(views))).to(acc)
    else:
        absmax = torch.full_like(norms, math.nan)
    if not ((not full or math.isfinite(absmax.sum())) and math.isfinite(norms.sum())):
        # a non-finite value (or a sum of squares beyond the dtype's range): the masked path for those tensors only
        rows = [_slice_stats(v, masked=True, scratch=torch.empty_like(v)) for v in views]
        return torch.stack(rows)
    nonzero = torch.stack(torch._foreach_norm(views, 0)).to(acc)
    numel = torch.tensor(lengths, dtype=acc)
    if full:
        sums = torch.segment_reduce(packed.double(), "sum", lengths=torch.tensor(lengths), unsafe=True).to(acc)
    else:
        sums = torch.full_like(norms, math.nan)
    zeros = torch.zeros_like(norms)
    return torch.stack([norms.square(), absmax, sums, zeros, numel - nonzero, numel], dim=1)


def flow_stats_rows(flats: list[Tensor], count_zeros: Sequence[bool] | None = None) -> Tensor:
    """Like :func:`tensor_stats_rows`, but on the CPU large tensors skip ``ABSMAX`` and ``SUM`` (NaN in the table).

    What gradient-norm monitoring, clipping and the flow diagnosis need every step, at about half the cost; other
    devices get the full statistics (memory-bound there, the extra columns cost nothing). ``count_zeros[i] = False``
    also skips the zero count of a large CPU tensor (``ZEROS`` NaN): one pass instead of two.
    """
    return tensor_stats_rows(flats, full=flats[0].device.type != "cpu", count_zeros=count_zeros)


def tensor_stats_rows(flats: list[Tensor], full: bool = True, count_zeros: Sequence[bool] | None = None) -> Tensor:
    """``(len(flats), NUM_STATS)`` float32 table: see :class:`~lightning_gradflow.stats.Stat`."""
    device = flats[0].device
    acc = _accumulation_dtype(flats[0].dtype)
    chunk = _chunk_size(device)
    masked = device.type != "cpu"
    numels = tuple(t.numel() for t in flats)
    small = [i for i, n in enumerate(numels) if 0 < n < PACK_BELOW] if device.type == "cpu" else []
    if len(small) > 1:  # on the CPU, small tensors take the multi-tensor path; the plan then skips them
        numels = tuple(0 if 0 < n < PACK_BELOW else n for n in numels)
    else:
        small = []
    largest = max(numels)
    scratch = _scratch(0, min(chunk, largest), acc, device)
    convert = _scratch(1, min(chunk, largest), acc, device) if flats[0].dtype != acc and largest >= PACK_BELOW else None
    rows = []
    for batch in _plan(numels, chunk):
        values = _batch_values(flats, batch, acc, convert)
        if len(batch.pieces) > 1:
            rows.append(_packed_stats(values, batch, masked))
        elif full:
            rows.append(_slice_stats(values, masked, scratch).unsqueeze(0))
        else:
            count = count_zeros is None or count_zeros[batch.pieces[0][0]]
            rows.append(_slice_flow_stats(values, scratch, count).unsqueeze(0))
    if rows:
        table = _merge_pieces(torch.cat(rows), _piece_owner(numels, chunk, device), len(flats))
    else:
        table = torch.zeros((len(flats), NUM_STATS), dtype=acc, device=device)
    table[:, Stat.NUMEL] = _numels(tuple(t.numel() for t in flats), acc, device)
    if small:
        table.index_copy_(0, torch.tensor(small), _foreach_small_stats([flats[i] for i in small], acc, full))
    return table.to(torch.float32)


# ---------------------------------------------------------------------------------------------- update statistics


def _slice_update(p: Tensor, s: Tensor, masked: bool, scratch: Tensor) -> Tensor:
    """``[Σ(p − s)², Σp²]`` of one slice, reusing ``scratch`` for the temporaries."""
    delta = torch.sub(p, s, out=scratch[: p.numel()])
    if not masked:
        sums = torch.stack([torch.mul(delta, delta, out=delta).sum(), torch.mul(p, p, out=delta).sum()])
        if p.device.type != "cpu" or math.isfinite(sums.sum()):
            return sums
        delta = torch.sub(p, s, out=delta)  # a non-finite value somewhere: redo with masking
    delta = torch.where(torch.isfinite(delta), delta, 0.0)
    p = torch.where(torch.isfinite(p), p, 0.0)
    return torch.stack([delta.square().sum(), p.square().sum()])


def _packed_update(p: Tensor, s: Tensor, batch: _Batch) -> Tensor:
    """``[Σ(p − s)², Σp²]`` per piece of a packed batch (float64 sums, as in :func:`_packed_stats`)."""
    wide = p.to(torch.float64)
    delta = wide - s.to(torch.float64)
    columns = torch.stack([delta * delta, wide * wide])
    columns = torch.where(torch.isfinite(columns), columns, 0.0)
    lengths = _lengths(batch, p.device).expand(2, -1)
    return torch.segment_reduce(columns, "sum", lengths=lengths, axis=1, unsafe=True).t().to(p.dtype)


def update_stats_rows(params: list[Tensor], snapshots: list[Tensor]) -> Tensor:
    """``(len(params), 2)`` float32 table of ``Σ(p − s)²`` and ``Σp²`` over finite entries; then ``s ← p``."""
    device = params[0].device
    acc = _accumulation_dtype(params[0].dtype)
    chunk = _chunk_size(device)
    masked = device.type != "cpu"
    largest = max(t.numel() for t in params)
    scratch = _scratch(0, min(chunk, largest), acc, device)
    convert = (
        _scratch(1, min(chunk, largest), acc, device) if params[0].dtype != acc and largest >= PACK_BELOW else None
    )
    rows = []
    for batch in _iter_batches(params, chunk):
        p = _batch_values(params, batch, acc, convert)
        if len(batch.pieces) == 1:
            i, start, n = batch.pieces[0]
            rows.append(_slice_update(p, snapshots[i][start : start + n], masked, scratch).unsqueeze(0))
        else:
            rows.append(_packed_update(p, _batch_values(snapshots, batch, snapshots[0].dtype), batch))
    torch._foreach_copy_(snapshots, params)
    if not rows:
        return torch.zeros((len(params), NUM_UPDATE_STATS), dtype=torch.float32, device=device)
    owner = _piece_owner(tuple(t.numel() for t in params), chunk, device)
    out = torch.zeros((len(params), NUM_UPDATE_STATS), dtype=acc, device=device)
    return out.index_add_(0, owner, torch.cat(rows)).to(torch.float32)


# ---------------------------------------------------------------------------------------------- histograms


# bit-pattern dtype, mantissa bits, exponent mask, exponent bias, mask of everything but the sign
_FLOAT_LAYOUT = {
    torch.float32: (torch.int32, 23, 0xFF, 127, 0x7FFFFFFF),
    torch.float64: (torch.int64, 52, 0x7FF, 1023, 0x7FFFFFFFFFFFFFFF),
}


def bucket_index(x: Tensor, spec: HistogramSpec) -> Tensor:
    """Bucket of every value of ``x`` (float32 or float64) under ``spec``, read from its exponent and mantissa bits.

    Integer operations on the bit pattern only, so it is exact and needs no ``log``; a subnormal has the smallest
    exponent field and falls in the underflow bucket, an all-ones exponent field is ``NaN``/``Inf``.
    """
    int_dtype, mantissa_bits, exponent_mask, bias, magnitude_mask = _FLOAT_LAYOUT[x.dtype]
    m = spec.num_magnitude_bins
    bits = x.view(int_dtype)
    exponent = (bits >> mantissa_bits) & exponent_mask
    sub_bits = spec.bins_per_octave.bit_length() - 1
    sub = (bits >> (mantissa_bits - sub_bits)) & (spec.bins_per_octave - 1)
    # the magnitude bucket, clamped to -1 (underflow) .. m (overflow); both sides share it
    magnitude = ((exponent - (bias + spec.min_exp)) * spec.bins_per_octave + sub).clamp_(-1, m)
    index = torch.where(bits < 0, m - magnitude, spec.pos_underflow + 1 + magnitude)
    index = torch.where((bits & magnitude_mask) == 0, spec.zero, index)  # +0.0 and -0.0
    return torch.where(exponent == exponent_mask, spec.nonfinite, index).to(torch.long)


def histogram_rows(flats: list[Tensor], spec: HistogramSpec) -> Tensor:
    """``(len(flats), spec.num_bins)`` int64 counts: see :class:`~lightning_gradflow.stats.HistogramSpec`."""
    device = flats[0].device
    acc = _accumulation_dtype(flats[0].dtype)
    chunk = _chunk_size(device)
    bins = spec.num_bins
    out = torch.zeros(len(flats) * bins, dtype=torch.long, device=device)
    for batch in _iter_batches(flats, chunk):
        values = _batch_values(flats, batch, acc)
        # the batch's tensors are consecutive: count into their rows only, not the whole table
        first, last = batch.pieces[0][0], batch.pieces[-1][0]
        rows = out[first * bins : (last + 1) * bins]
        flat_index = bucket_index(values, spec)
        if len(batch.pieces) > 1:
            flat_index += (_batch_owner(batch, device) - first) * bins
        if device.type == "cpu":
            rows += torch.bincount(flat_index, minlength=rows.numel())
        else:  # bincount reads the largest index back to the host; scatter_add does not
            rows.scatter_add_(0, flat_index, torch.ones_like(flat_index))
    return out.view(len(flats), bins)
