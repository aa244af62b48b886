"""The fused Triton kernels against the float64 reference (``lightning_gradflow.stats.reference``).

Without CUDA the kernels run on CPU tensors in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``),
which is slow: the hypothesis tests draw few examples and small chunk sizes, so that several chunks per tensor and the
finalize pass are exercised on small inputs. The ``gpu`` tests at the end run the compiled kernels on real shapes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

pytest.importorskip("triton")

from lightning_gradflow.stats import (
    HistogramSpec,
    Stat,
    make_snapshot,
    reference,
    tensor_histograms,
    tensor_stats,
    update_stats,
)
from lightning_gradflow.stats import triton_kernels as tk

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = [
    pytest.mark.triton,
    # The interpreter computes with numpy, which warns on inf - inf and the like; the kernels handle those values.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SPECIALS = (math.nan, math.inf, -math.inf, 0.0, -0.0)
FEW = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------------------------------------------
# Inputs and comparisons
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def values(draw: st.DrawFn, dtype: torch.dtype, max_len: int = 160) -> Tensor:
    """A 1-D tensor: seeded normal values at a drawn scale, some exact zeros, and NaN/±Inf/±0 at drawn places."""
    length = draw(st.sampled_from([0, 1, 2, 15, 16, 17, 33, 64, 65]) | st.integers(0, max_len))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(length, generator=g, dtype=torch.float64) * scale
    if length:
        if draw(st.booleans()):
            x[torch.rand(length, generator=g) < 0.3] = 0.0
        places = draw(st.lists(st.integers(0, length - 1), max_size=min(length, 4)))
        for i in places:
            x[i] = draw(st.sampled_from(SPECIALS))
    return x.to(dtype).to(DEVICE)


@st.composite
def tensor_groups(draw: st.DrawFn, max_tensors: int = 5) -> list[Tensor]:
    dtype = draw(st.sampled_from(DTYPES))
    return draw(st.lists(values(dtype), min_size=1, max_size=max_tensors))


@st.composite
def sizes(draw: st.DrawFn) -> tuple[int, int]:
    """(chunk_size, block_size): small, so that tensors span several chunks and chunks several vectors."""
    chunk = draw(st.sampled_from([16, 32, 64, 128]))
    block = draw(st.sampled_from([b for b in (16, 32, 64) if b <= chunk]))
    return chunk, block


def rtol_for(dtype: torch.dtype) -> float:
    # float32 accumulation, except float64 inputs (float64 accumulation, then the table's float32 rounding).
    return 1e-6 if dtype == torch.float64 else 1e-5


def assert_stats_match(got: Tensor, want: Tensor, flats: list[Tensor]) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape
    assert got.dtype == torch.float32
    for col in (Stat.ABSMAX, Stat.NONFINITE, Stat.ZEROS, Stat.NUMEL):
        torch.testing.assert_close(got[:, col], want[:, col], rtol=0, atol=0, msg=f"column {col.name}")
    rtol = rtol_for(flats[0].dtype) if flats else 1e-5
    torch.testing.assert_close(got[:, Stat.SUMSQ], want[:, Stat.SUMSQ], rtol=rtol, atol=1e-35)
    # The signed sum may cancel: bound its error by the sum of |x| over the finite values.
    scale = torch.tensor(
        [float(t.double()[t.double().isfinite()].abs().sum()) if t.numel() else 0.0 for t in flats],
        dtype=torch.float64,
    )
    err = (got[:, Stat.SUM].double() - want[:, Stat.SUM].double()).abs()
    assert bool((err <= rtol * scale + 1e-35).all()), (got[:, Stat.SUM], want[:, Stat.SUM])


def assert_update_match(got: Tensor, want: Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol_for(dtype), atol=1e-35)


def assert_same_values(a: Tensor, b: Tensor) -> None:
    """Equal values and dtypes; NaNs compare equal (their bit patterns differ between torch's own code paths)."""
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    a, b = a.cpu(), b.cpu()
    assert torch.equal(a.isnan(), b.isnan())
    keep = ~a.isnan()
    assert torch.equal(a[keep].view(-1), b[keep].view(-1))
    assert torch.equal(torch.signbit(a[keep]), torch.signbit(b[keep]))  # -0.0 stays -0.0


def edge_values(spec: HistogramSpec, dtype: torch.dtype) -> Tensor:
    """Every bucket edge near the ends of the spec, its neighbours, both signs, and the special values."""
    n = spec.bins_per_octave
    picks = [spec.min_exp - 1, spec.min_exp, spec.min_exp + 1, spec.max_exp - 1, spec.max_exp, spec.max_exp + 1]
    edges = torch.tensor([2.0**e * (1 + k / n) for e in picks for k in range(n)], dtype=torch.float64)
    edges = edges.to(dtype)
    finite = edges[edges.isfinite() & (edges != 0)]
    around = torch.cat([finite, torch.nextafter(finite, finite * 2), torch.nextafter(finite, torch.zeros_like(finite))])
    specials = torch.tensor(SPECIALS, dtype=torch.float64).to(dtype)
    tiny = torch.tensor([torch.finfo(dtype).tiny, torch.finfo(dtype).tiny / 4], dtype=dtype)  # normal, subnormal
    both = torch.cat([around, -around, tiny, -tiny, specials])
    return both.to(DEVICE)


def clones(ts: list[Tensor]) -> list[Tensor]:
    return [t.clone() for t in ts]


# ---------------------------------------------------------------------------------------------------------------
# The three functions against the reference
# ---------------------------------------------------------------------------------------------------------------


@FEW
@given(flats=tensor_groups(), chunk_block=sizes())
def test_tensor_stats_rows_match_reference(flats: list[Tensor], chunk_block: tuple[int, int]) -> None:
    chunk, block = chunk_block
    before = clones(flats)
    got = tk.tensor_stats_rows(flats, chunk_size=chunk, block_size=block)
    assert got.device == DEVICE
    assert_stats_match(got, reference.tensor_stats_rows(flats), flats)
    for a, b in zip(flats, before, strict=True):  # inputs are never written
        assert_same_values(a, b)


@FEW
@given(
    data=st.data(),
    p_dtype=st.sampled_from(DTYPES),
    s_dtype=st.sampled_from(DTYPES),
    chunk_block=sizes(),
)
def test_update_stats_rows_match_reference(
    data: st.DataObject, p_dtype: torch.dtype, s_dtype: torch.dtype, chunk_block: tuple[int, int]
) -> None:
    chunk, block = chunk_block
    params = data.draw(st.lists(values(p_dtype), min_size=1, max_size=4))
    # Snapshots: the parameters a step ago, so the update is small relative to the weights.
    snaps = [(p.double() * 0.99 + 1e-3).to(s_dtype) for p in params]
    want_snaps = clones(snaps)
    before = clones(params)
    got = tk.update_stats_rows(params, snaps, chunk_size=chunk, block_size=block)
    want = reference.update_stats_rows(params, want_snaps)
    wider = torch.float64 if torch.float64 in (p_dtype, s_dtype) else torch.float32
    assert_update_match(got, want, wider)
    for s, w in zip(snaps, want_snaps, strict=True):  # refreshed exactly as `s.copy_(p)` does
        assert_same_values(s, w)
    for a, b in zip(params, before, strict=True):
        assert_same_values(a, b)


@FEW
@given(
    flats=tensor_groups(max_tensors=3),
    min_exp=st.integers(-126, 10),
    span=st.integers(1, 40),
    bins_per_octave=st.sampled_from([1, 2, 4, 8, 16]),
    chunk_block=sizes(),
)
def test_histogram_rows_match_reference(
    flats: list[Tensor], min_exp: int, span: int, bins_per_octave: int, chunk_block: tuple[int, int]
) -> None:
    chunk, block = chunk_block
    spec = HistogramSpec(min_exp=min_exp, max_exp=min(min_exp + span, 127), bins_per_octave=bins_per_octave)
    flats = [*flats, edge_values(spec, flats[0].dtype)]
    got = tk.histogram_rows(flats, spec, chunk_size=chunk, block_size=block)
    want = reference.histogram_rows(flats, spec)
    assert got.dtype == torch.long
    assert got.device == DEVICE
    assert torch.equal(got.cpu(), want.cpu())
    assert got.sum(1).tolist() == [t.numel() for t in flats]


@pytest.mark.parametrize("dtype", DTYPES)
def test_histogram_extreme_spec_every_dtype(dtype: torch.dtype) -> None:
    # The widest layout (-126..127, 16 per octave: 8102 bins, padded to 8192 in the kernel) and the narrowest.
    for spec in (HistogramSpec(-126, 127, 16), HistogramSpec(0, 1, 1)):
        flats = [edge_values(spec, dtype), (torch.randn(300, dtype=torch.float64) * 1e3).to(dtype).to(DEVICE)]
        got = tk.histogram_rows(flats, spec, chunk_size=128, block_size=64)
        assert torch.equal(got.cpu(), reference.histogram_rows(flats, spec).cpu())


def test_one_tensor_spanning_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 40 chunks, reduced by a finalize pass of 16 partials per step (three steps): the multi-chunk path end to end.
    monkeypatch.setattr(tk, "FINALIZE_BLOCK_SIZE", 16)
    x = torch.randn(40 * 256 - 7, dtype=torch.float64)
    x[::97] = 0.0
    x[5], x[5000], x[-1] = math.nan, math.inf, -math.inf
    for dtype in (torch.bfloat16, torch.float32):
        flats = [x.to(dtype).to(DEVICE), torch.randn(3, device=DEVICE).to(dtype)]
        got = tk.tensor_stats_rows(flats, chunk_size=256, block_size=64)
        assert_stats_match(got, reference.tensor_stats_rows(flats), flats)
        params = clones(flats)
        snaps, want_snaps = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        got_u = tk.update_stats_rows(params, snaps, chunk_size=256, block_size=64)
        assert_update_match(got_u, reference.update_stats_rows(params, want_snaps), dtype)
        spec = HistogramSpec()
        got_h = tk.histogram_rows(flats, spec, chunk_size=256, block_size=64)
        assert torch.equal(got_h.cpu(), reference.histogram_rows(flats, spec).cpu())


def test_many_tiny_tensors() -> None:
    # 300 tensors (a few empty) in the interpreter; the benchmark covers 1000 on the GPU.
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 12, (300,), generator=g).tolist()
    flats = [torch.randn(n, generator=g).to(DEVICE) for n in lengths]
    flats[7] = torch.full((3,), math.nan, device=DEVICE)
    assert_stats_match(tk.tensor_stats_rows(flats), reference.tensor_stats_rows(flats), flats)


def test_empty_tensors_and_lists() -> None:
    empty = torch.empty(0, device=DEVICE)
    got = tk.tensor_stats_rows([empty, empty])
    assert torch.equal(got.cpu(), torch.zeros(2, 6))
    assert tk.tensor_stats_rows([]).shape == (0, 6)
    assert tk.update_stats_rows([], []).shape == (0, 2)
    assert tk.histogram_rows([], HistogramSpec()).shape == (0, HistogramSpec().num_bins)
    assert torch.equal(tk.update_stats_rows([empty], [empty.clone()]).cpu(), torch.zeros(1, 2))
    assert torch.equal(tk.histogram_rows([empty], HistogramSpec()).cpu(), torch.zeros(1, HistogramSpec().num_bins))


def test_float64_beyond_float32_range() -> None:
    # Computed in float64, so these stay finite until the table's float32 cast (as in the reference).
    x = torch.tensor([1e200, -1e300, 1e-300, 3.0, -1e-310], dtype=torch.float64, device=DEVICE)
    y = torch.tensor([1e20, -1e20, 2.0], dtype=torch.float64, device=DEVICE)  # sumsq 2e40: finite in float64 only
    got = tk.tensor_stats_rows([x, y])
    want = reference.tensor_stats_rows([x, y])
    assert torch.equal(got.cpu(), want.cpu())
    assert math.isinf(float(got[0, Stat.ABSMAX]))
    assert math.isinf(float(got[1, Stat.SUMSQ]))
    assert float(got[0, Stat.NONFINITE]) == 0.0


def test_misaligned_views_use_the_scalar_path() -> None:
    # Views at every element offset of one buffer (DDP-bucket style): only some are 16-byte aligned.
    buffer = torch.randn(1000, device=DEVICE)
    for dtype in (torch.bfloat16, torch.float32):
        data = buffer.to(dtype)
        flats = [data[o : o + 200] for o in range(8)]
        assert {t.data_ptr() % 16 for t in flats} != {0}
        got = tk.tensor_stats_rows(flats, chunk_size=64, block_size=16)
        assert_stats_match(got, reference.tensor_stats_rows(flats), flats)
        spec = HistogramSpec(-8, 4, 4)
        got_h = tk.histogram_rows(flats, spec, chunk_size=64, block_size=16)
        assert torch.equal(got_h.cpu(), reference.histogram_rows(flats, spec).cpu())
        snaps = [torch.zeros(1000, dtype=torch.float32, device=DEVICE)[o + 1 : o + 201] for o in range(8)]
        want_snaps = [s.clone() for s in snaps]
        got_u = tk.update_stats_rows(flats, snaps, chunk_size=64, block_size=16)
        assert_update_match(got_u, reference.update_stats_rows(flats, want_snaps), dtype)
        for s, w in zip(snaps, want_snaps, strict=True):
            assert_same_values(s, w)


@pytest.mark.parametrize("s_dtype", [torch.bfloat16, torch.float16])
def test_snapshot_rounding_is_copy_rounding(s_dtype: torch.dtype) -> None:
    # Ties, near-ties, overflow to inf, subnormals, NaN and -0.0: stored exactly as `snapshot.copy_(param)` stores them.
    g = torch.Generator().manual_seed(1)
    ties = (torch.randn(64, generator=g) * 100).to(s_dtype).double()
    mantissa_bits = 7 if s_dtype == torch.bfloat16 else 10
    ulp = torch.ldexp(torch.ones_like(ties), torch.frexp(ties).exponent - 1 - mantissa_bits)
    raw = torch.cat(
        [
            ties + ulp / 2,  # exact ties: round to even
            ties + ulp / 2 + ulp / 64,
            ties + ulp / 2 - ulp / 64,
            torch.tensor([65519.0, 65520.0, 3.4e38, -3.4e38, 1e-40, -1e-42, 6e-8, -0.0, math.nan, math.inf]),
        ]
    )
    for p_dtype in (torch.float32, torch.float64):
        p = raw.to(p_dtype).to(DEVICE)
        snap = torch.zeros_like(p, dtype=s_dtype)
        tk.update_stats_rows([p], [snap])
        assert_same_values(snap, torch.empty_like(snap).copy_(p))


def test_deterministic_bitwise() -> None:
    g = torch.Generator().manual_seed(2)
    flats = [torch.randn(n, generator=g).to(DEVICE) for n in (1000, 3, 517)]
    first = tk.tensor_stats_rows(flats, chunk_size=64, block_size=16)
    second = tk.tensor_stats_rows(flats, chunk_size=64, block_size=16)
    assert torch.equal(first.view(torch.int32), second.view(torch.int32))
    snaps_a = [torch.zeros_like(t) for t in flats]
    snaps_b = [torch.zeros_like(t) for t in flats]
    ua = tk.update_stats_rows(flats, snaps_a, chunk_size=64, block_size=16)
    ub = tk.update_stats_rows(flats, snaps_b, chunk_size=64, block_size=16)
    assert torch.equal(ua.view(torch.int32), ub.view(torch.int32))
    spec = HistogramSpec()
    assert torch.equal(tk.histogram_rows(flats, spec, chunk_size=64), tk.histogram_rows(flats, spec, chunk_size=64))


def test_pointer_tables_are_cached() -> None:
    flats = [torch.randn(n, device=DEVICE) for n in (10, 0, 300)]
    tk.clear_table_cache()
    tk.tensor_stats_rows(flats)
    tk.tensor_stats_rows(flats)  # same addresses and sizes: no new table, no host-to-device copy
    tk.histogram_rows(flats, HistogramSpec())  # the same chunking serves every operation
    info = tk.table_cache_info()
    assert (info["builds"], info["hits"], info["size"]) == (1, 2, 1)
    tk.tensor_stats_rows([*flats, torch.randn(5, device=DEVICE)])  # a different list
    tk.tensor_stats_rows(flats, chunk_size=64)  # a different chunking
    snaps = [torch.zeros_like(t) for t in flats]
    tk.update_stats_rows(flats, snaps)  # two address columns
    tk.update_stats_rows(flats, snaps)
    info = tk.table_cache_info()
    assert (info["builds"], info["hits"]) == (4, 3)
    assert info["size"] <= info["maxsize"]
    tk.clear_table_cache()
    assert tk.table_cache_info()["size"] == 0


def test_table_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "TABLE_CACHE_SIZE", 2)
    tk.clear_table_cache()
    keep = [torch.randn(n, device=DEVICE) for n in (1, 2, 3)]
    for t in keep:
        tk.tensor_stats_rows([t])
    assert tk.table_cache_info()["size"] == 2
    tk.tensor_stats_rows([keep[0]])  # evicted first (least recently used): built again
    assert tk.table_cache_info()["builds"] == 4
    tk.clear_table_cache()


def test_argument_errors() -> None:
    a32, a64 = torch.ones(3, device=DEVICE), torch.ones(3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        tk.tensor_stats_rows([a32, a64])
    with pytest.raises(ValueError, match="powers of two"):
        tk.tensor_stats_rows([a32], chunk_size=100)
    with pytest.raises(ValueError, match="powers of two"):
        tk.tensor_stats_rows([a32], chunk_size=16, block_size=32)
    with pytest.raises(ValueError, match="one snapshot per parameter"):
        tk.update_stats_rows([a32], [])
    with pytest.raises(ValueError, match="size"):
        tk.update_stats_rows([a32], [torch.ones(4, device=DEVICE)])
    with pytest.raises(ValueError, match="dense 1-D"):
        tk.update_stats_rows([a32], [torch.ones(6, device=DEVICE)[::2]])


def test_float8_inputs_widen_exactly() -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    x = (torch.randn(50) * 10).to(torch.float8_e4m3fn).to(DEVICE)
    assert_stats_match(tk.tensor_stats_rows([x]), reference.tensor_stats_rows([x]), [x])
    spec = HistogramSpec(-10, 10, 4)
    assert torch.equal(tk.histogram_rows([x], spec).cpu(), reference.histogram_rows([x], spec).cpu())
    p = torch.randn(50, device=DEVICE)
    snap, want_snap = torch.zeros_like(x), torch.zeros_like(x)
    assert_update_match(tk.update_stats_rows([p], [snap]), reference.update_stats_rows([p], [want_snap]), p.dtype)
    assert_same_values(snap.float(), want_snap.float())


# ---------------------------------------------------------------------------------------------------------------
# Through the public API (grouping, strided inputs, mixed dtypes)
# ---------------------------------------------------------------------------------------------------------------


def mixed_tensors() -> list[Tensor]:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, generator=g)
    conv = torch.randn(4, 3, 5, 5, generator=g).to(memory_format=torch.channels_last)
    out = [
        w.t(),  # transposed: read in memory order without a copy
        conv,  # channels-last
        torch.randn(30, 20, generator=g)[:, ::3],  # not dense: copied
        torch.randn(7, generator=g).to(torch.bfloat16),
        torch.empty(0, 5),
        torch.randn(3, 4, generator=g, dtype=torch.float64).t(),
        torch.tensor([math.nan, -0.0, 0.0, math.inf, 2.5]).half(),
        torch.randn(1, generator=g),
    ]
    return [t.to(DEVICE) for t in out]


def test_public_tensor_stats_mixed_dtypes_and_layouts() -> None:
    ts = mixed_tensors()
    got = tensor_stats(ts, backend="triton").table
    want = tensor_stats(ts, backend="reference").table
    assert_stats_match(got, want, [t.reshape(-1) for t in ts])


def test_public_histograms_mixed_dtypes_and_layouts() -> None:
    ts = mixed_tensors()
    spec = HistogramSpec(min_exp=-12, max_exp=4, bins_per_octave=4)
    got = tensor_histograms(ts, spec=spec, backend="triton").counts
    want = tensor_histograms(ts, spec=spec, backend="reference").counts
    assert torch.equal(got.cpu(), want.cpu())


def sparse_and_complex_tensors() -> list[Tensor]:
    """A sparse embedding gradient (uncoalesced), a CSR matrix and complex tensors with non-finite parts."""
    g = torch.Generator().manual_seed(3)
    embedding = torch.nn.Embedding(40, 6, sparse=True)
    embedding(torch.tensor([3, 3, 17, 39, 3])).pow(2).sum().backward()
    assert embedding.weight.grad is not None
    z = torch.randn(50, generator=g, dtype=torch.complex64)
    z[4] = complex(math.nan, 1.0)
    z[9] = 0j
    return [
        embedding.weight.grad.to(DEVICE),
        torch.tensor([[0.0, 1.5, 0.0], [math.inf, 0.0, -2.0]]).to_sparse_csr().to(DEVICE),
        z.to(DEVICE),
        torch.randn(7, 3, generator=g, dtype=torch.complex128).t().to(DEVICE),
    ]


def test_public_sparse_and_complex_tensors_match_the_reference() -> None:
    # the Triton path reads the coalesced stored values and |z|; the oracle densifies: statistics and histograms agree
    ts = sparse_and_complex_tensors()
    dense = [(t.to_dense() if t.layout != torch.strided else t).cpu() for t in ts]
    magnitudes = [t.to(torch.complex128).abs() if t.is_complex() else t.double() for t in dense]
    for t, m in zip(ts, magnitudes, strict=True):
        got = tensor_stats([t], backend="triton").table
        assert_stats_match(got, tensor_stats([t], backend="reference").table, [m.reshape(-1)])
    spec = HistogramSpec(min_exp=-12, max_exp=4, bins_per_octave=4)
    got_h = tensor_histograms(ts, spec=spec, backend="triton").counts
    assert torch.equal(got_h.cpu(), tensor_histograms(ts, spec=spec, backend="reference").counts.cpu())


def test_public_update_stats_with_snapshots() -> None:
    params = [t.clone() for t in mixed_tensors()]
    for dtype in (None, torch.bfloat16):
        snaps_t, snaps_r = make_snapshot(params, dtype=dtype), make_snapshot(params, dtype=dtype)
        for p in params:
            p.add_(0.01)
        got = update_stats(params, snaps_t, backend="triton").table
        want = update_stats(params, snaps_r, backend="reference").table
        assert_update_match(got, want, torch.float32)
        for a, b in zip(snaps_t, snaps_r, strict=True):
            assert_same_values(a, b)
        assert float(got[0, 0]) > 0


# ---------------------------------------------------------------------------------------------------------------
# The compiled kernels
# ---------------------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, re
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lightning_gradflow.stats import triton_kernels as tk

    def ptx(fn, types, consts, num_warps):
        sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
        cx = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        src = ASTSource(fn=fn, signature=sig, constexprs=cx)
        opts = {"num_warps": num_warps, "enable_fp_fusion": False}
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

    t = {n: "*i64" for n in ("ptr_table", "numel_table", "chunk_tensor", "chunk_index", "chunk_start",
                              "param_table", "snap_table")}
    t.update(part_f="*fp32", part_i="*i32", part="*fp32", num_chunks="i32", out="*fp32")
    common = {"CHUNK": 65536, "ACC": tl.float32}
    out = {
        "stats_bf16": ptx(tk._tensor_stats_kernel, t, {"LOAD_DT": tl.int16, "KIND": 1, "BLOCK": 4096, **common}, 8),
        "stats_fp32": ptx(tk._tensor_stats_kernel, t, {"LOAD_DT": tl.float32, "KIND": 2, "BLOCK": 2048, **common}, 8),
        "finalize": ptx(tk._tensor_stats_finalize_kernel, t, {"FBLOCK": 256}, 4),
        "update": ptx(tk._update_stats_kernel, t, {"P_DT": tl.float32, "P_KIND": 2, "S_DT": tl.int16, "S_KIND": 1,
                                                   "BLOCK": 2048, **common}, 8),
        "update_finalize": ptx(tk._update_stats_finalize_kernel, t, {"FBLOCK": 256}, 4),
        "histogram": ptx(tk._histogram_kernel, {**t, "out": "*i64"},
                         {"LOAD_DT": tl.int32, "KIND": 2, "MIN_EXP": -40, "BPO": 2, "LOG2_BPO": 1, "M": 112,
                          "NUM_BINS": 230, "NB_PAD": 256, "CHUNK": 65536, "BLOCK": 1024}, 4),
    }
    print(json.dumps({k: sorted(set(re.findall(r"(?:ld|st|atom|red)\\.global[.\\w]*", v))) for k, v in out.items()}))
    """
)


def test_kernels_compile_for_hopper(tmp_path: os.PathLike[str]) -> None:
    # Compiles every kernel for sm_90 without a GPU (ptxas ships with Triton), in a process without the interpreter:
    # catches errors that only the compiler sees, and checks that aligned vectors load 128 bits at a time.
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ops = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "ld.global.v4.b32" in ops["stats_fp32"]
    assert "ld.global.v4.b32" in ops["stats_bf16"]
    assert "st.global.v4.b32" in ops["update"]  # the bfloat16 snapshot is written 8 values at a time
    assert not any(op.startswith(("atom", "red")) for op in ops["stats_fp32"] + ops["finalize"])  # no float atomics
    assert any(op.startswith("red.global") for op in ops["histogram"])  # integer atomics, histograms only


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gpt2_grads(dtype: torch.dtype) -> list[Tensor]:
    """Gradients with the 148 shapes of GPT-2 small (124M values)."""
    shapes: list[tuple[int, ...]] = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,)]
        shapes += [(768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    shapes += [(768,), (768,)]
    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(s, device="cuda", generator=g, dtype=torch.float32).mul_(1e-3).to(dtype) for s in shapes]
    grads[5].view(-1)[:10] = 0.0
    grads[7].view(-1)[3] = math.nan
    return grads


def launches(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_gpt2_shapes_match_reference(dtype: torch.dtype) -> None:
    grads = gpt2_grads(dtype)
    assert len(grads) == 148
    flats = [g.view(-1) for g in grads]
    assert_stats_match(tk.tensor_stats_rows(flats), reference.tensor_stats_rows(flats), flats)
    spec = HistogramSpec()
    assert torch.equal(tk.histogram_rows(flats, spec).cpu(), reference.histogram_rows(flats, spec).cpu())
    snaps, want_snaps = make_snapshot(grads), make_snapshot(grads)
    for g in grads:
        g.mul_(1.5)
    got = update_stats(grads, snaps, backend="triton").table
    want = update_stats(grads, want_snaps, backend="reference").table
    assert_update_match(got, want, torch.float32)
    for s, g in zip(snaps, grads, strict=True):
        assert_same_values(s, g)
    # Many tiny tensors: one launch pair however many there are.
    tiny = [torch.randn(int(n), device="cuda", dtype=dtype) for n in torch.randint(0, 2048, (1000,))]
    assert_stats_match(tk.tensor_stats_rows(tiny), reference.tensor_stats_rows(tiny), tiny)


@pytest.mark.gpu
@needs_cuda
def test_gpu_warm_calls_do_not_sync_and_launch_two_kernels() -> None:
    grads = gpt2_grads(torch.bfloat16)
    snaps = make_snapshot(grads)
    spec = HistogramSpec()

    def step() -> None:
        tensor_stats(grads, backend="triton")
        update_stats(grads, snaps, backend="triton")
        tensor_histograms(grads, spec=spec, backend="triton")

    step()  # compiles the kernels and caches the pointer tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert launches(lambda: tensor_stats(grads, backend="triton")) <= 2
    assert launches(lambda: update_stats(grads, snaps, backend="triton")) <= 2
    assert launches(lambda: tensor_histograms(grads, spec=spec, backend="triton")) <= 2  # zero fill + kernel
    first = tensor_stats(grads, backend="triton").table
    assert torch.equal(first, tensor_stats(grads, backend="triton").table)
