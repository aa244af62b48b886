from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradflow.stats import Stat, TensorStats, tensor_stats
from lightning_gradflow.stats import torch_backend as tb
from tests.helpers.stats_checks import assert_stats_close, comparable
from tests.helpers.strategies import complex_tensors, sparse_tensors, tensor_lists, tensors

BACKENDS = ["torch"]  # the Triton backend has its own test module (interpreter on CPU)


def reference(ts: list[torch.Tensor]) -> torch.Tensor:
    return tensor_stats(ts, backend="reference").table


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 256 elements, packing below 64: every path (slices, packs, merges) on small inputs."""
    monkeypatch.setattr(tb, "CHUNK", 256)
    monkeypatch.setattr(tb, "PACK_BELOW", 64)
    tb._plan.cache_clear()
    yield
    tb._plan.cache_clear()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None)
@given(ts=tensor_lists())
def test_matches_reference(backend: str, ts: list[torch.Tensor]) -> None:
    assert_stats_close(tensor_stats(ts, backend=backend).table, reference(ts), ts)


@pytest.mark.usefixtures("small_chunks")
@settings(max_examples=40, deadline=None)
@given(ts=tensor_lists(max_size=12))
def test_matches_reference_across_batches(ts: list[torch.Tensor]) -> None:
    assert_stats_close(tensor_stats(ts, backend="torch").table, reference(ts), ts)


@settings(max_examples=20, deadline=None)
@given(t=tensors(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_inputs_are_not_modified(t: torch.Tensor, dtype: torch.dtype) -> None:
    ts = [t, t.to(dtype)]
    before = [x.clone() for x in ts]
    tensor_stats(ts, backend="torch")
    for x, y in zip(ts, before, strict=True):
        assert torch.equal(x.nan_to_num(), y.nan_to_num()) and torch.equal(x.isnan(), y.isnan())


def test_known_values() -> None:
    nan, inf = float("nan"), float("inf")
    ts = [
        torch.tensor([3.0, -4.0, 0.0, -0.0]),
        torch.tensor([nan, 2.0, -inf, inf]),
        torch.empty(0),
        torch.tensor([7.0]),
    ]
    for backend in ["torch", "reference"]:
        s = tensor_stats(ts, backend=backend)
        expected = torch.tensor(
            [
                [25.0, 4.0, -1.0, 0.0, 2.0, 4.0],
                [4.0, 2.0, 2.0, 3.0, 0.0, 4.0],
                [0.0] * 6,
                [49.0, 7.0, 7.0, 0.0, 0.0, 1.0],
            ]
        )
        torch.testing.assert_close(s.table, expected, rtol=0, atol=0)
        torch.testing.assert_close(s.norm, torch.tensor([5.0, 2.0, 0.0, 7.0]))
        torch.testing.assert_close(s.rms, torch.tensor([2.5, 2.0, 0.0, 7.0]))  # over the finite values
        torch.testing.assert_close(s.mean, torch.tensor([-0.25, 2.0, 0.0, 7.0]))
        torch.testing.assert_close(s.zero_fraction, torch.tensor([0.5, 0.0, 0.0, 0.0]))
        torch.testing.assert_close(s.total_norm(), torch.tensor((25.0 + 4.0 + 49.0) ** 0.5))


def test_one_nan_does_not_blank_the_rest() -> None:
    x = torch.randn(100_000)
    y = x.clone()
    y[12345] = float("nan")
    s = tensor_stats([x, y], backend="torch")
    finite = torch.cat([y[:12345], y[12346:]])
    torch.testing.assert_close(s.sumsq[1], finite.double().square().sum().float(), rtol=1e-5, atol=0)
    assert float(s.nonfinite[1]) == 1.0 and float(s.nonfinite[0]) == 0.0


def test_many_tiny_tensors_and_one_huge() -> None:
    gen = torch.Generator().manual_seed(0)
    tiny = [torch.randn(int(n), generator=gen) for n in torch.randint(0, 9, (1000,), generator=gen)]
    huge = torch.randn(5_000_000, generator=gen)
    huge[::1000] = 0.0
    huge[4_999_999] = float("inf")
    ts = [*tiny, huge]
    assert_stats_close(tensor_stats(ts, backend="torch").table, reference(ts), ts)


def test_large_tensor_sum_of_squares_is_accurate() -> None:
    # torch._foreach_norm on CPU loses ~1e-3 here (one float32 accumulator per lane); the engine must not.
    x = torch.randn(20_000_000, generator=torch.Generator().manual_seed(1))
    exact = x.double().square().sum()
    s = tensor_stats([x], backend="torch")
    assert abs(float(s.sumsq[0]) / float(exact) - 1) < 1e-6


def test_mixed_dtypes_keep_input_order() -> None:
    ts = [torch.randn(5).to(dt) for dt in [torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.float32]]
    s = tensor_stats(ts, backend="torch")
    assert_stats_close(s.table, reference(ts), ts)
    assert s.table.dtype == torch.float32


def test_parameters_with_requires_grad() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    s = tensor_stats(list(model.parameters()), backend="torch")
    assert not s.table.requires_grad
    assert s.table.shape == (4, 6)


def test_empty_list() -> None:
    s = tensor_stats([], backend="torch")
    assert s.table.shape == (0, 6) and len(s) == 0
    assert float(s.total_norm()) == 0.0


def test_generator_input() -> None:
    model = torch.nn.Linear(3, 3)
    assert len(tensor_stats(p.detach() for p in model.parameters())) == 2


# ------------------------------------------------------------------------------------------- combining statistics


@settings(max_examples=30, deadline=None)
@given(t=tensors(max_numel=2000, dtypes=[torch.float32, torch.float64]), parts=st.integers(1, 5))
def test_combining_shards_equals_the_whole(t: torch.Tensor, parts: int) -> None:
    flat = t.reshape(-1)
    shards = list(flat.tensor_split(parts))
    combined = TensorStats.combine([tensor_stats([s], backend="torch") for s in shards])
    assert_stats_close(combined.table, reference([t]), [t])


def test_reduce_rows_merges_layers_exactly() -> None:
    ts = [torch.randn(10), torch.tensor([5.0, float("nan")]), torch.randn(3, 3) * 10, torch.zeros(4)]
    s = tensor_stats(ts, backend="torch")
    merged = s.reduce_rows(torch.tensor([0, 0, 1, 1]), 2)
    layer0 = tensor_stats([torch.cat([ts[0], ts[1]])], backend="reference").table
    layer1 = tensor_stats([torch.cat([ts[2].reshape(-1), ts[3]])], backend="reference").table
    assert_stats_close(merged.table, torch.cat([layer0, layer1]), [ts[0], ts[2]])


def test_combine_rejects_mismatched_parts() -> None:
    with pytest.raises(ValueError, match="same table shape"):
        TensorStats.combine([tensor_stats([torch.ones(2)]), tensor_stats([torch.ones(2), torch.ones(3)])])
    with pytest.raises(ValueError, match="at least one"):
        TensorStats.combine([])


def test_to_host_is_identity_on_cpu() -> None:
    s = tensor_stats([torch.ones(3)])
    assert s.to_host() is s


def test_table_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="table"):
        TensorStats(torch.zeros(3, 4))


def test_stat_columns() -> None:
    assert [s.name for s in Stat] == ["SUMSQ", "ABSMAX", "SUM", "NONFINITE", "ZEROS", "NUMEL"]


# ------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ([torch.ones(2), "grad"], TypeError, r"`tensors\[1\]` to be a torch.Tensor, but got str"),
        ([torch.ones(2, dtype=torch.int64)], TypeError, r"floating-point dtype.*torch.int64"),
        ([torch.ones(2, dtype=torch.bool)], TypeError, r"floating-point dtype.*torch.bool"),
        ([torch.ones(2, device="meta")], ValueError, "meta device"),
        ([torch.ones(2).to_mkldnn()], TypeError, "dense.*or sparse"),
        ([torch.nested.as_nested_tensor([torch.ones(2), torch.ones(3)])], TypeError, "nested tensor"),
        (torch.ones(3), TypeError, r"single Tensor.*Wrap it in a list"),
        (3, TypeError, "sequence of tensors, but got int"),
    ],
)
def test_bad_input_names_the_argument(bad: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        tensor_stats(bad, backend="torch")  # type: ignore[arg-type]


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match=r"`backend` to be one of .* but got 'cuda'"):
        tensor_stats([torch.ones(1)], backend="cuda")  # type: ignore[arg-type]


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_gradflow.stats import _common

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_common, "triton_importable", lambda: True)
    with pytest.raises(ValueError, match="CUDA tensors"):
        _common.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setattr(_common, "triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'lightning_gradflow\[triton\]'"):
        _common.resolve_backend("triton", torch.device("cpu"))
    assert _common.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_package_imports_without_triton() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lightning_gradflow.stats import tensor_stats\n"
        "from lightning_gradflow.stats._common import triton_importable\n"
        "assert not triton_importable()\n"
        "print(tensor_stats([torch.ones(4)]).table.tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "[[4.0, 1.0, 4.0, 0.0, 0.0, 4.0]]" in out.stdout


@pytest.mark.usefixtures("small_chunks")
@settings(max_examples=30, deadline=None)
@given(ts=tensor_lists(max_size=10))
def test_norms_only_statistics(ts: list[torch.Tensor]) -> None:
    """``full=False`` keeps every column the norms and the flow diagnosis need; max and sum may be left NaN."""
    got = tensor_stats(ts, backend="torch", full=False).table
    want = reference(ts)
    kept = [Stat.SUMSQ, Stat.NONFINITE, Stat.ZEROS, Stat.NUMEL]
    assert not torch.isnan(got[:, kept]).any()
    filled = got.clone()
    for col in (Stat.ABSMAX, Stat.SUM):  # a column is either left out (NaN) or right
        left_out = torch.isnan(got[:, col])
        filled[left_out, col] = want[left_out, col]
    assert_stats_close(filled, want, ts)


def test_norms_only_skips_max_and_sum_of_large_cpu_tensors() -> None:
    x = torch.randn(100_000)
    x[:10] = 0.0
    got = tensor_stats([x], backend="torch", full=False)
    assert torch.isnan(got.absmax).all() and torch.isnan(got.sum).all()
    torch.testing.assert_close(got.sumsq, x.double().square().sum().float().reshape(1), rtol=1e-6, atol=0)
    assert got.zeros.tolist() == [10.0] and got.nonfinite.tolist() == [0.0]
    x[5] = float("nan")  # a non-finite value: the full masked statistics instead
    got = tensor_stats([x], backend="torch", full=False)
    assert got.nonfinite.tolist() == [1.0] and not torch.isnan(got.absmax).any()


def test_count_zeros_false_skips_only_the_zero_count_of_large_cpu_tensors() -> None:
    large = torch.randn(100_000)
    large[::4] = 0
    small = torch.zeros(10)
    counted = tensor_stats([large, small, large], full=False)
    skipped = tensor_stats([large, small, large], full=False, count_zeros=[False, True, True])
    assert math.isnan(float(skipped.table[0, Stat.ZEROS]))
    assert float(skipped.table[1, Stat.ZEROS]) == 10
    assert float(skipped.table[2, Stat.ZEROS]) == float(counted.table[2, Stat.ZEROS]) == 25_000
    torch.testing.assert_close(skipped.table[:, Stat.SUMSQ], counted.table[:, Stat.SUMSQ], rtol=0, atol=0)
    torch.testing.assert_close(skipped.table[:, Stat.NONFINITE], counted.table[:, Stat.NONFINITE], rtol=0, atol=0)


def test_count_zeros_needs_one_flag_per_tensor() -> None:
    with pytest.raises(ValueError, match="`count_zeros`"):
        tensor_stats([torch.ones(3), torch.ones(4)], full=False, count_zeros=[True])


def test_count_zeros_false_still_sees_non_finite_values() -> None:
    x = torch.randn(100_000)
    x[7] = math.inf
    stats = tensor_stats([x], full=False, count_zeros=[False])
    assert float(stats.nonfinite[0]) == 1


# ------------------------------------------------------------------------------- sparse and complex tensors
# The fast backends read a sparse tensor's coalesced values and count the positions it does not store as zeros, and a
# complex tensor by |z|; the oracle densifies (to_dense) and takes |z| itself: an independent reading.


@settings(max_examples=60, deadline=None)
@given(ts=st.lists(sparse_tensors(), min_size=1, max_size=5), dense=tensor_lists(max_size=3))
def test_sparse_tensors_match_the_reference(ts: list[torch.Tensor], dense: list[torch.Tensor]) -> None:
    mixed = [*ts, *dense]
    table = tensor_stats(mixed, backend="torch").table
    assert_stats_close(table, reference(mixed), [comparable(t) for t in mixed])
    assert table[: len(ts), Stat.NUMEL].tolist() == [float(t.numel()) for t in ts]  # the dense size


@settings(max_examples=60, deadline=None)
@given(ts=st.lists(complex_tensors(), min_size=1, max_size=5), dense=tensor_lists(max_size=3))
def test_complex_tensors_match_the_reference(ts: list[torch.Tensor], dense: list[torch.Tensor]) -> None:
    mixed = [*ts, *dense]
    assert_stats_close(tensor_stats(mixed, backend="torch").table, reference(mixed), [comparable(t) for t in mixed])


@settings(max_examples=30, deadline=None)
@given(ts=st.lists(sparse_tensors(), min_size=1, max_size=4))
def test_sparse_flow_statistics_match_the_reference(ts: list[torch.Tensor]) -> None:
    # the every-step path (no max, no sum; zero counts only where asked): sums of squares and counts stay exact
    flags = [i % 2 == 0 for i in range(len(ts))]
    table = tensor_stats(ts, backend="torch", full=False, count_zeros=flags).table
    expected = reference(ts)
    for column in (Stat.NONFINITE, Stat.NUMEL):
        torch.testing.assert_close(table[:, column], expected[:, column], rtol=0, atol=0)
    counted = torch.tensor(flags)
    torch.testing.assert_close(table[counted, Stat.ZEROS], expected[counted, Stat.ZEROS], rtol=0, atol=0)
    torch.testing.assert_close(table[:, Stat.SUMSQ], expected[:, Stat.SUMSQ], rtol=2e-5, atol=1e-30)


def test_sparse_known_values() -> None:
    # index 0 stored twice (1 + 2 = 3), index 3 holds -4 and an explicit zero at 4: dense [3, 0, 0, -4, 0, 0]
    t = torch.sparse_coo_tensor([[0, 3, 0, 4]], [1.0, -4.0, 2.0, 0.0], (6,), check_invariants=True)
    for backend in ("torch", "reference"):
        assert tensor_stats([t], backend=backend).table.tolist() == [[25.0, 4.0, -1.0, 0.0, 4.0, 6.0]]
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 1, 7])).sum().backward()
    grad = embedding.weight.grad
    assert grad is not None and grad.layout == torch.sparse_coo and not grad.is_coalesced()
    # rows 1 (twice: 2.0) and 7 (1.0) of three columns; 24 zeros over the dense 10 x 3
    assert tensor_stats([grad], backend="torch").table.tolist() == [[15.0, 2.0, 9.0, 0.0, 24.0, 30.0]]


def test_sparse_compressed_layouts() -> None:
    dense = torch.tensor([[0.0, 2.0, 0.0], [-3.0, 0.0, float("nan")]])
    for t in (dense.to_sparse_csr(), dense.to_sparse_csc(), dense.to_sparse_bsr((1, 1))):
        assert_stats_close(tensor_stats([t], backend="torch").table, reference([dense]), [dense])


def test_complex_known_values() -> None:
    z = torch.tensor([3 + 4j, 0j, complex(float("inf"), 1.0), complex(1.0, float("nan"))], dtype=torch.complex64)
    for backend in ("torch", "reference"):
        # |z| = 5, 0 (finite ones): Σ|z|² = 25, max |z| = 5, Σ|z| = 5; two values with a non-finite part
        assert tensor_stats([z], backend=backend).table.tolist() == [[25.0, 5.0, 5.0, 2.0, 1.0, 4.0]]


def test_scaled_statistics_are_those_of_the_scaled_tensors() -> None:
    ts = [torch.randn(50), torch.tensor([0.0, float("nan"), -2.0])]
    scale = torch.tensor(0.25)
    scaled = tensor_stats(ts, backend="torch").scaled(scale)
    assert_stats_close(scaled.table, reference([t * scale for t in ts]), ts)
    assert_stats_close(tensor_stats(ts).scaled(-2.0).table, reference([t * -2.0 for t in ts]), ts)


def test_l1_norms_of_dense_sparse_and_complex_tensors() -> None:
    from lightning_gradflow.stats import l1_norms

    sparse = torch.sparse_coo_tensor([[0, 2, 0]], [1.0, -2.0, 2.0], (4,), check_invariants=True)
    ts = [torch.tensor([1.0, -2.0]), sparse, torch.tensor([3 + 4j, -1j])]
    torch.testing.assert_close(l1_norms(ts), torch.tensor([3.0, 5.0, 6.0]))
