from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradflow.stats import UpdateStats, make_snapshot, update_stats
from lightning_gradflow.stats import torch_backend as tb
from tests.helpers.strategies import complex_tensors, tensor_lists


def _perturbed(ts: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [t + (torch.randn(t.shape, generator=gen, dtype=torch.float64) * 1e-2).to(t.dtype) for t in ts]


@pytest.fixture(params=["default", "small_chunks"])
def chunking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param == "small_chunks":
        monkeypatch.setattr(tb, "CHUNK", 256)
        monkeypatch.setattr(tb, "PACK_BELOW", 64)
    tb._plan.cache_clear()
    yield
    tb._plan.cache_clear()


@pytest.mark.usefixtures("chunking")
@settings(max_examples=40, deadline=None)
@given(ts=tensor_lists(), seed=st.integers(0, 1000), snapshot_dtype=st.sampled_from([None, torch.bfloat16]))
def test_matches_reference_and_refreshes_snapshot(
    ts: list[torch.Tensor], seed: int, snapshot_dtype: torch.dtype | None
) -> None:
    old = [t.detach().clone() for t in ts]
    new = _perturbed(old, seed)
    snap_torch = make_snapshot(old, dtype=snapshot_dtype)
    snap_ref = make_snapshot(old, dtype=snapshot_dtype)
    got = update_stats(new, snap_torch, backend="torch").table.double()
    want = update_stats(new, snap_ref, backend="reference").table.double()
    torch.testing.assert_close(got, want, rtol=5e-5, atol=1e-30)
    for p, s in zip(new, snap_torch, strict=True):
        expected = p.to(s.dtype)
        assert torch.equal(s.nan_to_num(), expected.nan_to_num()) and torch.equal(s.isnan(), expected.isnan())


def test_ratio_known_values() -> None:
    w = [torch.tensor([3.0, 4.0]), torch.zeros(3)]
    snap = make_snapshot(w)
    w[0] += torch.tensor([0.6, 0.8])
    w[1] += 1.0
    for backend in ["torch", "reference"]:
        s = make_snapshot([torch.tensor([3.0, 4.0]), torch.zeros(3)])
        stats = update_stats(w, s, backend=backend)
        torch.testing.assert_close(stats.delta_norm, torch.tensor([1.0, 3.0**0.5]))
        torch.testing.assert_close(stats.param_norm, torch.tensor([6.0, 3.0**0.5]))
        torch.testing.assert_close(stats.ratio, torch.tensor([1 / 6, 1.0]))
        torch.testing.assert_close(stats.total_ratio(), torch.tensor((4.0 / 39.0) ** 0.5))
    assert torch.equal(snap[0], torch.tensor([3.0, 4.0]))  # a snapshot not passed in is untouched


def test_zero_parameter_gives_finite_ratio() -> None:
    p = [torch.zeros(4)]
    stats = update_stats(p, make_snapshot(p), backend="torch")
    assert float(stats.ratio[0]) == 0.0


def test_non_finite_entries_are_skipped() -> None:
    p = [torch.tensor([1.0, float("nan"), 2.0])]
    snap = [torch.tensor([0.0, 0.0, 2.0])]
    for backend in ["torch", "reference"]:
        s = [snap[0].clone()]
        stats = update_stats(p, s, backend=backend)
        torch.testing.assert_close(stats.table, torch.tensor([[1.0, 5.0]]))


def test_transposed_parameters_pair_elementwise() -> None:
    w = torch.randn(30, 20).t()  # dense, not contiguous
    snap = make_snapshot([w])
    assert snap[0].stride() == w.stride()
    w2 = w + 1.0
    stats = update_stats([w2], [snap[0].contiguous()], backend="torch")
    torch.testing.assert_close(stats.delta_norm, torch.tensor([600.0**0.5]))


def test_reduce_rows_sums_layers() -> None:
    stats = UpdateStats(torch.tensor([[1.0, 4.0], [3.0, 5.0], [2.0, 2.0]]))
    torch.testing.assert_close(
        stats.reduce_rows(torch.tensor([0, 0, 1]), 2).table, torch.tensor([[4.0, 9.0], [2.0, 2.0]])
    )


def test_bad_input() -> None:
    p = [torch.ones(3)]
    with pytest.raises(ValueError, match="one snapshot per parameter"):
        update_stats(p, [])
    with pytest.raises(ValueError, match=r"`snapshots\[0\]` has shape \(4,\)"):
        update_stats(p, [torch.ones(4)])
    with pytest.raises(ValueError, match="make_snapshot"):
        update_stats([torch.ones(4, 4)], [torch.ones(4, 8)[:, ::2]])
    with pytest.raises(TypeError, match="floating-point dtype"):
        make_snapshot(p, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"`snapshots\[0\]`"):
        update_stats(p, [None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"`params\[0\]` to be a dense"):  # sparse gradients yes, parameters no
        update_stats([torch.ones(3).to_sparse()], [torch.ones(3)])
    with pytest.raises(ValueError, match="complex snapshot"):
        update_stats([torch.ones(3, dtype=torch.complex64)], [torch.ones(3)])


@settings(max_examples=40, deadline=None)
@given(ts=st.lists(complex_tensors(), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_complex_parameters_match_reference(ts: list[torch.Tensor], seed: int) -> None:
    # Σ|p − s|² and Σ|p|² over real and imaginary parts; the snapshot is refreshed to the complex values
    gen = torch.Generator().manual_seed(seed)
    moved = [t + torch.randn(t.shape, generator=gen, dtype=t.dtype) * 1e-2 for t in ts]
    fast, slow = make_snapshot(ts), make_snapshot(ts)
    got = update_stats(moved, fast, backend="torch").table
    want = update_stats(moved, slow, backend="reference").table
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-30, equal_nan=True)
    for a, b, p in zip(fast, slow, moved, strict=True):
        assert torch.equal(torch.view_as_real(a).nan_to_num(), torch.view_as_real(p).nan_to_num())
        assert torch.equal(torch.view_as_real(b).nan_to_num(), torch.view_as_real(p).nan_to_num())
    assert make_snapshot(ts, dtype=torch.float64)[0].dtype == torch.complex128  # a complex snapshot of that precision
