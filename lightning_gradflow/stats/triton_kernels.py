"""The ``"triton"`` backend: one fused multi-tensor kernel per operation, however many tensors there are.

Every public function here takes a group of 1-D tensors that share a device and a dtype (the dispatcher groups
them) and has the semantics of the function of the same name in
:mod:`~lightning_gradflow.stats.reference`, the test oracle.

Kernel design (the same for the three operations):

* **One launch covers the whole list.** The tensors are cut into chunks of ``chunk_size`` elements (64 Ki by
  default, like ``torch._foreach_norm``); program ``c`` of a 1-D grid over *all* the chunks reads its tensor and
  its chunk number from two device tables, loads the tensor's address from a table of ``data_ptr`` values and reads
  the chunk in vectors of ``block_size`` elements: unmasked for the full vectors (128-bit loads when the tensor's
  address is 16-byte aligned, checked per tensor on the device), masked for the tail.
* **Deterministic reduction, no float atomics.** Each program writes its partial sums, maximum and counts to a
  workspace; a second kernel (one program per tensor) reduces a tensor's partials in a fixed order. The statistics
  therefore cost exactly two launches and are bitwise reproducible. Sums accumulate in float32 (float64 for float64
  inputs); counts are integers.
* **Histograms** bin each vector in registers and shared memory (``tl.histogram``) and add a chunk's nonzero
  counts to the output row with integer atomics (exact and order-independent): one launch after the zero fill.
* **No host synchronisation.** The pointer, size and chunk tables are built on the host, staged in pinned memory and
  copied with ``non_blocking=True``; they are cached in a small LRU keyed by the device and the tensors' addresses
  and sizes, so the steady state (gradients keep their addresses from step to step) copies nothing at all.
* **Streams.** A cached table is first used on the stream that copied it; a call from another stream waits for the
  copy with ``Stream.wait_event`` (no host synchronisation either).

Values are widened exactly (bfloat16 by a bit shift, so the interpreter and the GPU agree bit for bit), snapshots
are written with round-to-nearest-even through float32, as ``Tensor.copy_`` does, and histogram buckets are read
from the float32 (float64) bit pattern, so every backend puts every value in the same bucket. The kernels are
compiled without FMA contraction (``enable_fp_fusion=False``) so that they round like the interpreter.

Other floating dtypes (e.g. float8) are widened to float32 (exactly) in a temporary first. Block and chunk sizes are
module constants, and keyword arguments of the three functions, so that tests can use small ones.
"""

# ruff: noqa: N803  (Triton's convention: compile-time constants are UPPER_CASE parameters)
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_gradflow.stats._common import NUM_STATS, NUM_UPDATE_STATS, Stat, UpdateStat, triton_interpreting
from lightning_gradflow.stats.histogram import HistogramSpec

#: Elements per chunk, the unit of work of one program (64 Ki, like ``torch._foreach_norm``).
CHUNK_SIZE = 65536
#: Elements per vector, by element size in bytes: 16 KiB of float16/bfloat16, 8 KiB of float32 or float64.
BLOCK_SIZES: dict[int, int] = {2: 4096, 4: 2048, 8: 1024}
#: Elements per vector of the histogram kernel (each value costs ``log2(bins)`` warp ballots).
HISTOGRAM_BLOCK_SIZE = 1024
#: Partials per step of the finalize kernels.
FINALIZE_BLOCK_SIZE = 256
NUM_WARPS = 8
FINALIZE_NUM_WARPS = 4
#: Pointer tables kept on the device (an entry is a few int64 per tensor and per chunk).
TABLE_CACHE_SIZE = 64

_MAX_CHUNK_SIZE = 2**24

_COL_SUMSQ = tl.constexpr(int(Stat.SUMSQ))
_COL_ABSMAX = tl.constexpr(int(Stat.ABSMAX))
_COL_SUM = tl.constexpr(int(Stat.SUM))
_COL_NONFINITE = tl.constexpr(int(Stat.NONFINITE))
_COL_ZEROS = tl.constexpr(int(Stat.ZEROS))
_COL_NUMEL = tl.constexpr(int(Stat.NUMEL))
_NUM_STATS = tl.constexpr(NUM_STATS)
_COL_DELTA_SUMSQ = tl.constexpr(int(UpdateStat.DELTA_SUMSQ))
_COL_PARAM_SUMSQ = tl.constexpr(int(UpdateStat.PARAM_SUMSQ))
_NUM_UPDATE_STATS = tl.constexpr(NUM_UPDATE_STATS)

# Dtype codes of the kernels' KIND parameters.
_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
# How each dtype is loaded: bfloat16 as its raw 16 bits (widened by a shift), the others as themselves.
_LOAD_TYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.int16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}
# The histogram reads bit patterns: float16 converts (exactly) to float32 first, the others are loaded as integers.
_HISTOGRAM_LOAD_TYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.int16,
    torch.float32: tl.int32,
    torch.float64: tl.int64,
}


# ----------------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _widen(raw, KIND: tl.constexpr, ACC: tl.constexpr):  # type: ignore[no-untyped-def]
    # Exact conversion of a loaded vector to the accumulation type; bfloat16 arrives as its int16 bit pattern.
    if KIND == 1:  # noqa: SIM108
        x = (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True).to(ACC)
    else:
        x = raw.to(ACC)
    return x


@triton.jit
def _bf16_bits_rne(v):  # type: ignore[no-untyped-def]
    # float32 -> bfloat16 bit pattern, rounding to nearest even like c10::BFloat16 (NaN -> 0x7FC0).
    u = v.to(tl.uint32, bitcast=True)
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    r = tl.where(v != v, 0x7FC0, r)
    return r.to(tl.int16)


@triton.jit
def _narrow(p, S_DT: tl.constexpr, S_KIND: tl.constexpr):  # type: ignore[no-untyped-def]
    # The value ``s.copy_(p)`` stores: 16-bit targets round through float32, as c10::Half/BFloat16 do.
    if S_KIND == 1:  # bfloat16, stored as its bit pattern
        y = _bf16_bits_rne(p.to(tl.float32))
    elif S_KIND == 0:  # float16
        y = p.to(tl.float32).to(tl.float16)
    else:
        y = p.to(S_DT)
    return y


@triton.jit
def _stats_step(x, valid, sumsq, amax, total, nonfinite, zeros):  # type: ignore[no-untyped-def]
    finite = tl.abs(x) < float("inf")  # False for NaN too
    xf = tl.where(finite & valid, x, 0.0)
    sumsq += xf * xf
    amax = tl.maximum(amax, tl.abs(xf))
    total += xf
    nonfinite += ((~finite) & valid).to(tl.int32)
    zeros += ((x == 0.0) & valid).to(tl.int32)
    return sumsq, amax, total, nonfinite, zeros


@triton.jit
def _update_step(p, s, valid, delta_sumsq, param_sumsq):  # type: ignore[no-untyped-def]
    d = p - s
    delta_sumsq += tl.where((tl.abs(d) < float("inf")) & valid, d * d, 0.0)
    param_sumsq += tl.where((tl.abs(p) < float("inf")) & valid, p * p, 0.0)
    return delta_sumsq, param_sumsq


@triton.jit
def _bucket(  # type: ignore[no-untyped-def]
    raw, KIND: tl.constexpr, MIN_EXP: tl.constexpr, BPO: tl.constexpr, LOG2_BPO: tl.constexpr, M: tl.constexpr
):
    # Histogram column of each value (see HistogramSpec), from the exponent and leading mantissa bits.
    if KIND == 3:  # float64, loaded as int64
        neg = raw < 0
        mag = raw & 0x7FFFFFFFFFFFFFFF
        exponent = ((mag >> 52) & 0x7FF).to(tl.int32)
        frac = ((mag >> (52 - LOG2_BPO)) & (BPO - 1)).to(tl.int32)
        nonfinite = exponent == 0x7FF
        bucket = (exponent - (1023 + MIN_EXP)) * BPO + frac
    else:
        if KIND == 0:  # float16: exact conversion to float32
            bits = raw.to(tl.float32).to(tl.int32, bitcast=True)
        elif KIND == 1:  # bfloat16: the top half of a float32
            bits = raw.to(tl.int32) << 16
        else:  # float32, loaded as int32
            bits = raw
        neg = bits < 0
        mag = bits & 0x7FFFFFFF
        exponent = mag >> 23
        frac = (mag >> (23 - LOG2_BPO)) & (BPO - 1)
        nonfinite = exponent == 0xFF
        bucket = (exponent - (127 + MIN_EXP)) * BPO + frac
    # -1: underflow (subnormals too, since MIN_EXP >= -126); M: overflow.
    k = tl.minimum(tl.maximum(bucket, -1), M)
    col = tl.where(neg, M - k, M + 4 + k)
    col = tl.where(mag == 0, M + 2, col)
    col = tl.where(nonfinite, 2 * M + 5, col)
    return col


@triton.jit
def _stats_full_blocks(  # type: ignore[no-untyped-def]
    base,
    num_full,
    sumsq,
    amax,
    total,
    nonfinite,
    zeros,
    KIND: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # The unmasked vectors of a chunk; 16-byte aligned ones load as 128-bit vectors.
    lanes = tl.arange(0, BLOCK)
    every = tl.full([BLOCK], 1, tl.int1)
    for b in range(0, num_full):
        ptrs = base + (b * BLOCK + lanes)
        if ALIGNED:
            ptrs = tl.multiple_of(ptrs, 16)
        x = _widen(tl.load(ptrs), KIND, ACC)
        sumsq, amax, total, nonfinite, zeros = _stats_step(x, every, sumsq, amax, total, nonfinite, zeros)
    return sumsq, amax, total, nonfinite, zeros


@triton.jit
def _update_full_blocks(  # type: ignore[no-untyped-def]
    p_base,
    s_base,
    num_full,
    delta_sumsq,
    param_sumsq,
    P_KIND: tl.constexpr,
    S_DT: tl.constexpr,
    S_KIND: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    every = tl.full([BLOCK], 1, tl.int1)
    for b in range(0, num_full):
        offs = b * BLOCK + lanes
        p_ptrs = p_base + offs
        s_ptrs = s_base + offs
        if ALIGNED:
            p_ptrs = tl.multiple_of(p_ptrs, 16)
            s_ptrs = tl.multiple_of(s_ptrs, 16)
        p = _widen(tl.load(p_ptrs), P_KIND, ACC)
        s = _widen(tl.load(s_ptrs), S_KIND, ACC)
        delta_sumsq, param_sumsq = _update_step(p, s, every, delta_sumsq, param_sumsq)
        tl.store(s_ptrs, _narrow(p, S_DT, S_KIND))
    return delta_sumsq, param_sumsq


@triton.jit
def _histogram_full_blocks(  # type: ignore[no-untyped-def]
    base,
    num_full,
    counts,
    KIND: tl.constexpr,
    MIN_EXP: tl.constexpr,
    BPO: tl.constexpr,
    LOG2_BPO: tl.constexpr,
    M: tl.constexpr,
    NB_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    for b in range(0, num_full):
        ptrs = base + (b * BLOCK + lanes)
        if ALIGNED:
            ptrs = tl.multiple_of(ptrs, 16)
        counts += tl.histogram(_bucket(tl.load(ptrs), KIND, MIN_EXP, BPO, LOG2_BPO, M), NB_PAD)
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Kernels: one program per chunk of any tensor, then (for the sums) one finalize program per tensor
# ----------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_chunks"])
def _tensor_stats_kernel(  # type: ignore[no-untyped-def]
    ptr_table,
    numel_table,
    chunk_tensor,
    chunk_index,
    part_f,
    part_i,
    num_chunks,
    LOAD_DT: tl.constexpr,
    KIND: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_index + c) * CHUNK
    length = tl.minimum(tl.load(numel_table + t) - start, CHUNK).to(tl.int32)
    address = tl.load(ptr_table + t)
    base = address.to(tl.pointer_type(LOAD_DT)) + start  # CHUNK * itemsize is a multiple of 16 bytes
    sumsq = tl.zeros([BLOCK], ACC)
    amax = tl.zeros([BLOCK], ACC)
    total = tl.zeros([BLOCK], ACC)
    nonfinite = tl.zeros([BLOCK], tl.int32)
    zeros = tl.zeros([BLOCK], tl.int32)
    num_full = length // BLOCK
    if address % 16 == 0:
        sumsq, amax, total, nonfinite, zeros = _stats_full_blocks(
            base, num_full, sumsq, amax, total, nonfinite, zeros, KIND, ACC, BLOCK, True
        )
    else:
        sumsq, amax, total, nonfinite, zeros = _stats_full_blocks(
            base, num_full, sumsq, amax, total, nonfinite, zeros, KIND, ACC, BLOCK, False
        )
    offs = num_full * BLOCK + tl.arange(0, BLOCK)
    mask = offs < length
    x = _widen(tl.load(base + offs, mask=mask, other=0), KIND, ACC)
    sumsq, amax, total, nonfinite, zeros = _stats_step(x, mask, sumsq, amax, total, nonfinite, zeros)
    tl.store(part_f + c, tl.sum(sumsq, 0))
    tl.store(part_f + num_chunks + c, tl.max(amax, 0))
    tl.store(part_f + 2 * num_chunks + c, tl.sum(total, 0))
    tl.store(part_i + c, tl.sum(nonfinite, 0))
    tl.store(part_i + num_chunks + c, tl.sum(zeros, 0))


@triton.jit(do_not_specialize=["num_chunks"])
def _tensor_stats_finalize_kernel(  # type: ignore[no-untyped-def]
    chunk_start, numel_table, part_f, part_i, out, num_chunks, FBLOCK: tl.constexpr
):
    t = tl.program_id(0)
    c0 = tl.load(chunk_start + t)
    c1 = tl.load(chunk_start + t + 1)
    lanes = tl.arange(0, FBLOCK)
    acc_ty = part_f.dtype.element_ty
    sumsq = tl.zeros([FBLOCK], acc_ty)
    amax = tl.zeros([FBLOCK], acc_ty)
    total = tl.zeros([FBLOCK], acc_ty)
    nonfinite = tl.zeros([FBLOCK], tl.int64)
    zeros = tl.zeros([FBLOCK], tl.int64)
    for c in range(c0, c1, FBLOCK):  # fixed order: bitwise reproducible
        offs = c + lanes
        m = offs < c1
        sumsq += tl.load(part_f + offs, mask=m, other=0.0)
        amax = tl.maximum(amax, tl.load(part_f + num_chunks + offs, mask=m, other=0.0))
        total += tl.load(part_f + 2 * num_chunks + offs, mask=m, other=0.0)
        nonfinite += tl.load(part_i + offs, mask=m, other=0).to(tl.int64)
        zeros += tl.load(part_i + num_chunks + offs, mask=m, other=0).to(tl.int64)
    row = out + t * _NUM_STATS
    tl.store(row + _COL_SUMSQ, tl.sum(sumsq, 0).to(tl.float32))
    tl.store(row + _COL_ABSMAX, tl.max(amax, 0).to(tl.float32))
    tl.store(row + _COL_SUM, tl.sum(total, 0).to(tl.float32))
    tl.store(row + _COL_NONFINITE, tl.sum(nonfinite, 0).to(tl.float32))
    tl.store(row + _COL_ZEROS, tl.sum(zeros, 0).to(tl.float32))
    tl.store(row + _COL_NUMEL, tl.load(numel_table + t).to(tl.float32))


@triton.jit(do_not_specialize=["num_chunks"])
def _update_stats_kernel(  # type: ignore[no-untyped-def]
    param_table,
    snap_table,
    numel_table,
    chunk_tensor,
    chunk_index,
    part,
    num_chunks,
    P_DT: tl.constexpr,
    P_KIND: tl.constexpr,
    S_DT: tl.constexpr,
    S_KIND: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_index + c) * CHUNK
    length = tl.minimum(tl.load(numel_table + t) - start, CHUNK).to(tl.int32)
    p_address = tl.load(param_table + t)
    s_address = tl.load(snap_table + t)
    p_base = p_address.to(tl.pointer_type(P_DT)) + start
    s_base = s_address.to(tl.pointer_type(S_DT)) + start
    delta_sumsq = tl.zeros([BLOCK], ACC)
    param_sumsq = tl.zeros([BLOCK], ACC)
    num_full = length // BLOCK
    if (p_address | s_address) % 16 == 0:
        delta_sumsq, param_sumsq = _update_full_blocks(
            p_base, s_base, num_full, delta_sumsq, param_sumsq, P_KIND, S_DT, S_KIND, ACC, BLOCK, True
        )
    else:
        delta_sumsq, param_sumsq = _update_full_blocks(
            p_base, s_base, num_full, delta_sumsq, param_sumsq, P_KIND, S_DT, S_KIND, ACC, BLOCK, False
        )
    offs = num_full * BLOCK + tl.arange(0, BLOCK)
    mask = offs < length
    p = _widen(tl.load(p_base + offs, mask=mask, other=0), P_KIND, ACC)
    s = _widen(tl.load(s_base + offs, mask=mask, other=0), S_KIND, ACC)
    delta_sumsq, param_sumsq = _update_step(p, s, mask, delta_sumsq, param_sumsq)
    tl.store(s_base + offs, _narrow(p, S_DT, S_KIND), mask=mask)
    tl.store(part + c, tl.sum(delta_sumsq, 0))
    tl.store(part + num_chunks + c, tl.sum(param_sumsq, 0))


@triton.jit(do_not_specialize=["num_chunks"])
def _update_stats_finalize_kernel(chunk_start, part, out, num_chunks, FBLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    t = tl.program_id(0)
    c0 = tl.load(chunk_start + t)
    c1 = tl.load(chunk_start + t + 1)
    lanes = tl.arange(0, FBLOCK)
    acc_ty = part.dtype.element_ty
    delta_sumsq = tl.zeros([FBLOCK], acc_ty)
    param_sumsq = tl.zeros([FBLOCK], acc_ty)
    for c in range(c0, c1, FBLOCK):  # fixed order: bitwise reproducible
        offs = c + lanes
        m = offs < c1
        delta_sumsq += tl.load(part + offs, mask=m, other=0.0)
        param_sumsq += tl.load(part + num_chunks + offs, mask=m, other=0.0)
    row = out + t * _NUM_UPDATE_STATS
    tl.store(row + _COL_DELTA_SUMSQ, tl.sum(delta_sumsq, 0).to(tl.float32))
    tl.store(row + _COL_PARAM_SUMSQ, tl.sum(param_sumsq, 0).to(tl.float32))


@triton.jit
def _histogram_kernel(  # type: ignore[no-untyped-def]
    ptr_table,
    numel_table,
    chunk_tensor,
    chunk_index,
    out,
    LOAD_DT: tl.constexpr,
    KIND: tl.constexpr,
    MIN_EXP: tl.constexpr,
    BPO: tl.constexpr,
    LOG2_BPO: tl.constexpr,
    M: tl.constexpr,
    NUM_BINS: tl.constexpr,
    NB_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_index + c) * CHUNK
    length = tl.minimum(tl.load(numel_table + t) - start, CHUNK).to(tl.int32)
    address = tl.load(ptr_table + t)
    base = address.to(tl.pointer_type(LOAD_DT)) + start
    counts = tl.zeros([NB_PAD], tl.int32)
    num_full = length // BLOCK
    if address % 16 == 0:
        counts = _histogram_full_blocks(base, num_full, counts, KIND, MIN_EXP, BPO, LOG2_BPO, M, NB_PAD, BLOCK, True)
    else:
        counts = _histogram_full_blocks(base, num_full, counts, KIND, MIN_EXP, BPO, LOG2_BPO, M, NB_PAD, BLOCK, False)
    offs = num_full * BLOCK + tl.arange(0, BLOCK)
    mask = offs < length
    col = _bucket(tl.load(base + offs, mask=mask, other=0), KIND, MIN_EXP, BPO, LOG2_BPO, M)
    counts += tl.histogram(col, NB_PAD, mask=mask)
    bins = tl.arange(0, NB_PAD)
    # Integer atomics: exact and independent of the order the chunks finish in.
    tl.atomic_add(out + t * NUM_BINS + bins, counts.to(tl.int64), mask=(bins < NUM_BINS) & (counts > 0), sem="relaxed")


# ----------------------------------------------------------------------------------------------------------------
# Host side: pointer tables and launchers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Device tables describing one list of tensors cut into chunks (int64 views of one buffer)."""

    num_tensors: int
    num_chunks: int
    ptrs: tuple[Tensor, ...]  # one (n,) table of data_ptr values per operand (params, snapshots)
    numels: Tensor  # (n,)
    chunk_start: Tensor  # (n + 1,): tensor i owns chunks [chunk_start[i], chunk_start[i + 1])
    chunk_tensor: Tensor  # (C,)
    chunk_index: Tensor  # (C,): the chunk's position within its tensor
    staging: Tensor  # the host buffer, kept alive while its non-blocking copy may be in flight
    stream: torch.cuda.Stream | None = None  # the stream that copied the tables (CUDA only)
    ready: torch.cuda.Event | None = None  # recorded on it after the copy


_TableKey = tuple[torch.device, int, tuple[tuple[int, ...], ...], tuple[int, ...]]
_TABLES: OrderedDict[_TableKey, _Layout] = OrderedDict()
_TABLE_COUNTERS = {"builds": 0, "hits": 0}


def table_cache_info() -> dict[str, int]:
    """Counters of the device pointer-table cache.

    Returns:
        ``builds`` (tables built and copied to the device), ``hits`` (calls that reused a cached table),
        ``size`` and ``maxsize`` of the LRU.
    """
    return {**_TABLE_COUNTERS, "size": len(_TABLES), "maxsize": TABLE_CACHE_SIZE}


def clear_table_cache() -> None:
    """Drops every cached pointer table and resets the counters of :func:`table_cache_info`."""
    _TABLES.clear()
    _TABLE_COUNTERS.update(builds=0, hits=0)


def _build_layout(
    device: torch.device, chunk: int, ptrs: tuple[tuple[int, ...], ...], numels: tuple[int, ...]
) -> _Layout:
    n = len(numels)
    sizes = torch.tensor(numels, dtype=torch.int64)
    per_tensor = (sizes + (chunk - 1)) // chunk
    num_chunks = int(per_tensor.sum())
    k = len(ptrs)
    # [ptrs (k × n) | numels (n) | chunk_start (n + 1) | chunk_tensor (C) | chunk_index (C)], one host-to-device copy.
    staging = torch.empty(k * n + 2 * n + 1 + 2 * num_chunks, dtype=torch.int64, pin_memory=device.type == "cuda")
    for j, addresses in enumerate(ptrs):
        staging[j * n : (j + 1) * n] = torch.tensor(addresses, dtype=torch.int64)
    o = k * n
    staging[o : o + n] = sizes
    staging[o + n] = 0
    torch.cumsum(per_tensor, 0, out=staging[o + n + 1 : o + 2 * n + 1])
    o += 2 * n + 1
    owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), per_tensor)
    staging[o : o + num_chunks] = owner
    first = staging[k * n + n : k * n + 2 * n]  # chunk_start[:-1]
    staging[o + num_chunks :] = torch.arange(num_chunks, dtype=torch.int64) - first[owner]
    stream, ready = None, None
    if device.type == "cpu":
        table = staging
    else:
        table = staging.to(device, non_blocking=True)
        if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            stream = torch.cuda.current_stream(device)
            ready = torch.cuda.Event()
            ready.record(stream)
    o = k * n
    return _Layout(
        num_tensors=n,
        num_chunks=num_chunks,
        ptrs=tuple(table[j * n : (j + 1) * n] for j in range(k)),
        numels=table[o : o + n],
        chunk_start=table[o + n : o + 2 * n + 1],
        chunk_tensor=table[o + 2 * n + 1 : o + 2 * n + 1 + num_chunks],
        chunk_index=table[o + 2 * n + 1 + num_chunks :],
        staging=staging,
        stream=stream,
        ready=ready,
    )


def _layout(operands: Sequence[Sequence[Tensor]], chunk: int) -> _Layout:
    """The (cached) device tables of a list of tensors, or of parallel lists of equal sizes."""
    first = operands[0]
    device = first[0].device
    numels = tuple(t.numel() for t in first)
    ptrs = tuple(tuple(t.data_ptr() for t in ts) for ts in operands)
    key = (device, chunk, ptrs, numels)
    layout = _TABLES.get(key)
    if layout is not None:
        _TABLE_COUNTERS["hits"] += 1
        _TABLES.move_to_end(key)
        if layout.ready is not None:
            current = torch.cuda.current_stream(device)
            if current != layout.stream:  # another stream: order after the copy, without blocking the host
                current.wait_event(layout.ready)
        return layout
    layout = _build_layout(device, chunk, ptrs, numels)
    _TABLE_COUNTERS["builds"] += 1
    _TABLES[key] = layout
    while len(_TABLES) > TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return layout


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """Makes ``device`` current for the launch (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def _check_group(tensors: Sequence[Tensor], arg: str) -> tuple[torch.device, torch.dtype]:
    device, dtype = tensors[0].device, tensors[0].dtype
    for i, t in enumerate(tensors):
        if t.device != device or t.dtype != dtype:
            raise ValueError(
                f"Expected every tensor of `{arg}` to be on {device} with dtype {dtype}, but `{arg}[{i}]` is on"
                f" {t.device} with dtype {t.dtype}. Use `tensor_stats` and friends, which group inputs."
            )
    if device.type != "cpu" and triton_interpreting():
        raise RuntimeError(
            f"TRITON_INTERPRET=1 runs the kernels on CPU tensors only, but the tensors are on {device}. Unset it to"
            " run the compiled kernels."
        )
    return device, dtype


def _dense(t: Tensor) -> Tensor:
    """``t`` as a dense 1-D tensor with unit stride (a copy only when the caller passed something else)."""
    if t.dim() == 1 and (t.stride(0) == 1 or t.numel() <= 1):
        return t.detach()
    return t.detach().reshape(-1).contiguous()


def _readable(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Dense 1-D tensors of a dtype the kernels load; other floating dtypes (e.g. float8) widen exactly to float32."""
    out = [_dense(t) for t in tensors]
    if out[0].dtype not in _LOAD_TYPES:
        out = [t.float() for t in out]
    return out


def _sizes(chunk_size: int | None, block_size: int | None, default_block: int) -> tuple[int, int]:
    chunk = CHUNK_SIZE if chunk_size is None else chunk_size
    block = min(default_block, chunk) if block_size is None else block_size
    ok = 16 <= block <= chunk <= _MAX_CHUNK_SIZE and block & (block - 1) == 0 and chunk & (chunk - 1) == 0
    if not ok:
        raise ValueError(
            f"Expected powers of two with 16 <= `block_size` <= `chunk_size` <= 2**24, but got"
            f" chunk_size={chunk}, block_size={block}."
        )
    return chunk, block


def tensor_stats_rows(flats: list[Tensor], *, chunk_size: int | None = None, block_size: int | None = None) -> Tensor:
    """Per-tensor statistics of a group of 1-D tensors in two launches: see :class:`~lightning_gradflow.stats.Stat`.

    Args:
        flats: 1-D tensors on one device (CUDA, or the CPU under ``TRITON_INTERPRET=1``) with one dtype; not
            modified. Empty tensors are allowed.
        chunk_size: elements per program (a power of two, default :data:`CHUNK_SIZE`).
        block_size: elements per vector (a power of two dividing ``chunk_size``; default by element size,
            :data:`BLOCK_SIZES`).

    Returns:
        A ``(len(flats), NUM_STATS)`` float32 table on the tensors' device.
    """
    if not flats:
        return torch.zeros((0, NUM_STATS), dtype=torch.float32)
    device, _ = _check_group(flats, "flats")
    flats = _readable(flats)
    dtype = flats[0].dtype
    chunk, block = _sizes(chunk_size, block_size, BLOCK_SIZES[dtype.itemsize])
    layout = _layout([flats], chunk)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    c = layout.num_chunks
    part_f = torch.empty((3, max(c, 1)), dtype=acc, device=device)
    part_i = torch.empty((2, max(c, 1)), dtype=torch.int32, device=device)
    out = torch.empty((layout.num_tensors, NUM_STATS), dtype=torch.float32, device=device)
    with _on_device(device):
        if c:
            _tensor_stats_kernel[(c,)](
                layout.ptrs[0],
                layout.numels,
                layout.chunk_tensor,
                layout.chunk_index,
                part_f,
                part_i,
                c,
                LOAD_DT=_LOAD_TYPES[dtype],
                KIND=_KINDS[dtype],
                ACC=tl.float64 if acc == torch.float64 else tl.float32,
                CHUNK=chunk,
                BLOCK=block,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
        _tensor_stats_finalize_kernel[(layout.num_tensors,)](
            layout.chunk_start,
            layout.numels,
            part_f,
            part_i,
            out,
            c,
            FBLOCK=FINALIZE_BLOCK_SIZE,
            num_warps=FINALIZE_NUM_WARPS,
            enable_fp_fusion=False,
        )
    return out


def update_stats_rows(
    params: list[Tensor], snapshots: list[Tensor], *, chunk_size: int | None = None, block_size: int | None = None
) -> Tensor:
    """``Σ(p − s)²`` and ``Σp²`` over finite entries, then ``s ← p``, in one pass and two launches.

    The difference is taken in float32 (float64 when either side is float64); each snapshot receives its
    parameter's values rounded to the snapshot's dtype exactly as ``snapshot.copy_(param)`` rounds them.

    Args:
        params: 1-D tensors on one device with one dtype; not modified.
        snapshots: one dense 1-D tensor per parameter, same size and device, one dtype; overwritten in place.
        chunk_size: elements per program, as in :func:`tensor_stats_rows`.
        block_size: elements per vector, as in :func:`tensor_stats_rows`.

    Returns:
        A ``(len(params), NUM_UPDATE_STATS)`` float32 table on the parameters' device.

    Raises:
        ValueError: when the lists differ in length, a pair differs in size, or a snapshot is not dense.
    """
    if len(params) != len(snapshots):
        raise ValueError(f"Expected one snapshot per parameter, but got {len(snapshots)} for {len(params)} params.")
    if not params:
        return torch.zeros((0, NUM_UPDATE_STATS), dtype=torch.float32)
    device, _ = _check_group(params, "params")
    _check_group(snapshots, "snapshots")
    for i, (p, s) in enumerate(zip(params, snapshots, strict=True)):
        if p.numel() != s.numel() or s.device != device:
            raise ValueError(f"`snapshots[{i}]` does not match `params[{i}]` in size or device.")
        if not (s.dim() == 1 and (s.stride(0) == 1 or s.numel() <= 1)):
            raise ValueError(f"Expected `snapshots[{i}]` to be a dense 1-D tensor, but got strides {s.stride()}.")
    params = _readable(params)
    targets = [s.detach() for s in snapshots]
    # Snapshots of a dtype the kernel cannot store (e.g. float8) go through a float32 buffer, copied back below.
    widened = targets[0].dtype not in _LOAD_TYPES
    if widened:
        targets = [s.float() for s in targets]
    p_dtype, s_dtype = params[0].dtype, targets[0].dtype
    widest = max(p_dtype.itemsize, s_dtype.itemsize)
    chunk, block = _sizes(chunk_size, block_size, BLOCK_SIZES[widest])
    layout = _layout([params, targets], chunk)
    acc = torch.float64 if torch.float64 in (p_dtype, s_dtype) else torch.float32
    c = layout.num_chunks
    part = torch.empty((2, max(c, 1)), dtype=acc, device=device)
    out = torch.empty((layout.num_tensors, NUM_UPDATE_STATS), dtype=torch.float32, device=device)
    with _on_device(device):
        if c:
            _update_stats_kernel[(c,)](
                layout.ptrs[0],
                layout.ptrs[1],
                layout.numels,
                layout.chunk_tensor,
                layout.chunk_index,
                part,
                c,
                P_DT=_LOAD_TYPES[p_dtype],
                P_KIND=_KINDS[p_dtype],
                S_DT=_LOAD_TYPES[s_dtype],
                S_KIND=_KINDS[s_dtype],
                ACC=tl.float64 if acc == torch.float64 else tl.float32,
                CHUNK=chunk,
                BLOCK=block,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
        _update_stats_finalize_kernel[(layout.num_tensors,)](
            layout.chunk_start,
            part,
            out,
            c,
            FBLOCK=FINALIZE_BLOCK_SIZE,
            num_warps=FINALIZE_NUM_WARPS,
            enable_fp_fusion=False,
        )
    if widened:
        for s, buffer in zip(snapshots, targets, strict=True):
            s.detach().copy_(buffer)
    return out


def histogram_rows(
    flats: list[Tensor], spec: HistogramSpec, *, chunk_size: int | None = None, block_size: int | None = None
) -> Tensor:
    """Bucket counts of a group of 1-D tensors in one launch (after the zero fill), with the rule of ``spec``.

    Args:
        flats: 1-D tensors on one device with one dtype; not modified.
        spec: the bucket layout (:class:`~lightning_gradflow.stats.HistogramSpec`).
        chunk_size: elements per program, as in :func:`tensor_stats_rows`.
        block_size: elements per vector (default :data:`HISTOGRAM_BLOCK_SIZE`).

    Returns:
        A ``(len(flats), spec.num_bins)`` int64 table of counts on the tensors' device.
    """
    if not flats:
        return torch.zeros((0, spec.num_bins), dtype=torch.long)
    device, _ = _check_group(flats, "flats")
    flats = _readable(flats)
    dtype = flats[0].dtype
    chunk, block = _sizes(chunk_size, block_size, HISTOGRAM_BLOCK_SIZE)
    layout = _layout([flats], chunk)
    out = torch.zeros((layout.num_tensors, spec.num_bins), dtype=torch.long, device=device)
    if layout.num_chunks:
        with _on_device(device):
            _histogram_kernel[(layout.num_chunks,)](
                layout.ptrs[0],
                layout.numels,
                layout.chunk_tensor,
                layout.chunk_index,
                out,
                LOAD_DT=_HISTOGRAM_LOAD_TYPES[dtype],
                KIND=_KINDS[dtype],
                MIN_EXP=spec.min_exp,
                BPO=spec.bins_per_octave,
                LOG2_BPO=spec.bins_per_octave.bit_length() - 1,
                M=spec.num_magnitude_bins,
                NUM_BINS=spec.num_bins,
                NB_PAD=max(32, triton.next_power_of_2(spec.num_bins)),
                CHUNK=chunk,
                BLOCK=block,
                num_warps=NUM_WARPS // 2,
                enable_fp_fusion=False,
            )
    return out
