from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradflow.stats import HistogramSpec, tensor_histograms, tensor_stats, tensorboard_histogram
from lightning_gradflow.stats import torch_backend as tb
from tests.helpers.strategies import complex_tensors, sparse_tensors, tensor_lists

SPECS = [HistogramSpec(), HistogramSpec(min_exp=-10, max_exp=4, bins_per_octave=1), HistogramSpec(-126, 127, 16)]


@settings(max_examples=50, deadline=None)
@given(ts=tensor_lists(), spec=st.sampled_from(SPECS))
def test_matches_reference_exactly(ts: list[torch.Tensor], spec: HistogramSpec) -> None:
    got = tensor_histograms(ts, spec=spec, backend="torch").counts
    want = tensor_histograms(ts, spec=spec, backend="reference").counts
    assert torch.equal(got, want)
    if ts:
        assert torch.equal(got.sum(1), torch.tensor([t.numel() for t in ts]))


def test_values_on_edges_and_extremes() -> None:
    spec = HistogramSpec(min_exp=-2, max_exp=2, bins_per_octave=2)
    edges = spec.magnitude_edges()
    assert edges == [0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]
    tiny = torch.finfo(torch.float32).tiny / 4  # a subnormal
    values = [*edges, *(-e for e in edges), 0.0, -0.0, tiny, -tiny, 1e30, -1e30, float("nan"), float("inf")]
    for dtype in [torch.float32, torch.float64]:
        x = torch.tensor(values, dtype=dtype)
        got = tensor_histograms([x], spec=spec, backend="torch").counts[0]
        want = tensor_histograms([x], spec=spec, backend="reference").counts[0]
        assert torch.equal(got, want)
        # every edge opens its own bucket; the top edge (4.0) is already overflow
        assert got[spec.pos_underflow + 1 : spec.pos_overflow].tolist() == [1] * 8
        assert int(got[spec.pos_overflow]) == 2 and int(got[spec.neg_overflow]) == 2
        assert int(got[spec.zero]) == 2 and int(got[spec.nonfinite]) == 2
        assert int(got[spec.pos_underflow]) == 1 and int(got[spec.neg_underflow]) == 1


def test_float64_beyond_float32_range() -> None:
    spec = HistogramSpec(min_exp=-126, max_exp=127)
    x = torch.tensor([1e300, 1e-300, -1e300], dtype=torch.float64)
    got = tensor_histograms([x], spec=spec, backend="torch").counts[0]
    assert int(got[spec.pos_overflow]) == 1 and int(got[spec.pos_underflow]) == 1 and int(got[spec.neg_overflow]) == 1
    assert int(got[spec.nonfinite]) == 0


def test_many_tensors_across_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb, "CHUNK", 256)
    monkeypatch.setattr(tb, "PACK_BELOW", 64)
    tb._plan.cache_clear()
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(int(n), generator=gen) for n in torch.randint(0, 700, (50,), generator=gen)]
    h = tensor_histograms(ts, backend="torch")
    assert torch.equal(h.counts, tensor_histograms(ts, backend="reference").counts)
    torch.testing.assert_close(h.reduce_rows(torch.zeros(50, dtype=torch.long), 1).counts[0], h.total())
    tb._plan.cache_clear()


def test_tensorboard_raw_round_trip(tmp_path: object) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    x = torch.randn(10_000) * 1e-3
    x[:100] = 0.0
    x[100] = float("nan")
    h = tensor_histograms([x])
    raw = tensorboard_histogram(h.total(), h.spec, stats=tensor_stats([x]))
    assert raw["num"] == 9_999  # the NaN is left out
    assert raw["bucket_limits"] == sorted(raw["bucket_limits"]) and len(raw["bucket_limits"]) == len(
        raw["bucket_counts"]
    )
    assert raw["min"] >= -float(x.nan_to_num().abs().max()) and raw["max"] <= float(x.nan_to_num().abs().max())
    torch.testing.assert_close(torch.tensor(raw["sum_squares"]), x.nan_to_num().square().sum(), rtol=1e-5, atol=0)
    writer = SummaryWriter(str(tmp_path))
    writer.add_histogram_raw("grad/layer", global_step=3, **raw)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    event = acc.Histograms("grad/layer")[0]
    assert event.step == 3 and event.histogram_value.num == 9_999


def test_tensorboard_raw_without_stats_and_all_nonfinite() -> None:
    spec = HistogramSpec(min_exp=-2, max_exp=2, bins_per_octave=1)
    h = tensor_histograms([torch.tensor([0.0, 0.3, -1.5, 3.0])], spec=spec)
    raw = tensorboard_histogram(h.total(), spec)
    assert raw["bucket_limits"] == [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    assert raw["bucket_counts"] == [1, 0, 0, 1, 0, 1, 0, 0, 1]
    assert raw["min"] == -2.0 and raw["num"] == 4
    assert tensorboard_histogram(tensor_histograms([torch.tensor([float("nan")])], spec=spec).total(), spec) == {}
    with pytest.raises(ValueError, match="counts"):
        tensorboard_histogram(torch.zeros(3), spec)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"min_exp": -200}, "min_exp"), ({"min_exp": 5, "max_exp": 5}, "max_exp"), ({"bins_per_octave": 3}, "bins_per")],
)
def test_spec_validation(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HistogramSpec(**kwargs)


def test_spec_type_is_checked() -> None:
    with pytest.raises(TypeError, match="HistogramSpec"):
        tensor_histograms([torch.ones(2)], spec={"min_exp": 0})  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    sparse=st.lists(sparse_tensors(), min_size=1, max_size=3),
    complex_=st.lists(complex_tensors(), min_size=1, max_size=3),
    spec=st.sampled_from(SPECS),
)
def test_sparse_and_complex_match_reference_exactly(
    sparse: list[torch.Tensor], complex_: list[torch.Tensor], spec: HistogramSpec
) -> None:
    # sparse: the positions not stored land in the zero bucket; complex: binned by |z| (the reference densifies)
    ts = [*sparse, *complex_]
    got = tensor_histograms(ts, spec=spec, backend="torch").counts
    want = tensor_histograms(ts, spec=spec, backend="reference").counts
    assert torch.equal(got, want)
    assert torch.equal(got.sum(1), torch.tensor([t.numel() for t in ts]))  # every dense position counted once
