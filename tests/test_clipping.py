from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lightning_gradflow.clipping import (
    MAX_PERCENTILE_WINDOW,
    MAX_WARMUP_STEPS,
    AutoClipConfig,
    PercentileClipper,
    ZClipConfig,
    ZScoreClipper,
    agc_clip_,
    clip_coefficient,
    max_norm_threshold,
    scale_grads_,
    unitwise_norm,
)


def test_clip_coefficient() -> None:
    coef = clip_coefficient(torch.tensor([0.5, 2.0, 4.0, 1e-7, float("inf"), float("nan")]), torch.tensor(2.0))
    assert coef[[0, 1, 3]].tolist() == [1.0, 1.0, 1.0]  # at or under the threshold: exactly untouched
    torch.testing.assert_close(coef[2], torch.tensor(2.0 / (4.0 + 1e-6)))
    assert coef[4] == 1.0 and coef[5] == 1.0  # non-finite steps are skipped, not scaled


def zclip_reference(norms: list[float], z_thr: float, alpha: float, warmup: int) -> list[float]:
    """ZClip's algorithm written out with Python floats, for comparison."""
    out, mean, var = [], 0.0, 0.0
    for t, g in enumerate(norms):
        if t < warmup:
            out.append(g)
            if t == warmup - 1:
                mean = sum(norms[:warmup]) / warmup
                var = sum((x - mean) ** 2 for x in norms[:warmup]) / warmup
            continue
        std = math.sqrt(var)
        z = (g - mean) / (std + 1e-6)
        clipped = mean + std * z_thr**2 / z if z > z_thr else g
        mean = alpha * mean + (1 - alpha) * clipped
        var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
        out.append(clipped)
    return out


def test_zscore_matches_written_out_algorithm() -> None:
    gen = torch.Generator().manual_seed(0)
    norms = (1 + 0.1 * torch.randn(200, generator=gen)).tolist()
    norms[60] = norms[130] = 25.0  # spikes
    clipper = ZScoreClipper(z_threshold=2.5, alpha=0.97, warmup_steps=25)
    got = [float(clipper(torch.tensor(g))) for g in norms]
    want = zclip_reference(norms, 2.5, 0.97, 25)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert got[60] < 2.0  # the spike is clipped close to the running mean


def test_zscore_ignores_non_finite_norms_and_caps() -> None:
    clipper = ZScoreClipper(warmup_steps=3, max_norm=0.5)
    for g in [1.0, 1.0, 1.0]:
        clipper(torch.tensor(g))
    mean, var = float(clipper.mean), float(clipper.var)  # type: ignore[arg-type]
    assert float(clipper(torch.tensor(float("nan")))) == 0.5
    assert float(clipper.mean) == mean and float(clipper.var) == var  # type: ignore[arg-type]


def test_zscore_warmup_counts_only_finite_norms() -> None:
    clipper = ZScoreClipper(warmup_steps=3)
    for g in [1.0, float("inf"), 2.0, float("nan"), 3.0]:
        clipper(torch.tensor(g))
    assert float(clipper.count) == 3.0  # type: ignore[arg-type]
    assert float(clipper.mean) == 2.0  # type: ignore[arg-type]


def test_zscore_std_floor_keeps_identical_warmup_from_freezing() -> None:
    clipper = ZScoreClipper(warmup_steps=5, std_floor=1e-2)
    for _ in range(5):
        clipper(torch.tensor(1.0))
    # sigma is floored at 1% of the mean: a norm 1% above the mean is not clipped, and the EMA follows slow growth
    assert float(clipper(torch.tensor(1.01))) == pytest.approx(1.01)
    norms = [1.0 * 1.002**k for k in range(1, 200)]
    thresholds = [float(clipper(torch.tensor(g))) for g in norms]
    assert thresholds[-1] == pytest.approx(norms[-1])  # not clipped: the baseline moved with the norms
    assert float(clipper.mean) > 1.3  # type: ignore[arg-type]


def test_zscore_bounds_spikes_during_warmup() -> None:
    clipper = ZScoreClipper(warmup_steps=25, warmup_factor=10.0)
    for g in [1.0, 1.2, 0.9]:
        assert float(clipper(torch.tensor(g))) == pytest.approx(g)
    assert float(clipper(torch.tensor(1e6))) == pytest.approx(10.0)  # 10 x the median so far
    assert float(clipper._warmup[3]) == pytest.approx(10.0)  # type: ignore[index]  # the clipped value is recorded


def test_zscore_state_round_trip() -> None:
    a = ZScoreClipper(warmup_steps=4)
    for g in [1.0, 2.0, 1.5, 1.2, 1.1, 9.0]:
        a(torch.tensor(g))
    b = ZScoreClipper(warmup_steps=4)
    b.load_state_dict(a.state_dict())
    assert b.steps == a.steps
    assert float(a(torch.tensor(3.0))) == float(b(torch.tensor(3.0)))


def test_zscore_state_during_warmup_round_trip() -> None:
    a = ZScoreClipper(warmup_steps=4)
    a(torch.tensor(1.0))
    b = ZScoreClipper(warmup_steps=4)
    b.load_state_dict(a.state_dict())
    for g in [2.0, 3.0, 4.0, 50.0]:
        assert float(a(torch.tensor(g))) == float(b(torch.tensor(g)))


def test_percentile_threshold_and_window() -> None:
    clipper = PercentileClipper(percentile=50, window=4)
    thresholds = [float(clipper(torch.tensor(float(g)))) for g in [1, 2, 3, 4, 5, 100]]
    assert thresholds[:4] == [1.0, 1.5, 2.0, 2.5]
    assert thresholds[4] == pytest.approx(float(torch.tensor([5.0, 2, 3, 4]).quantile(0.5)))
    assert thresholds[5] == pytest.approx(float(torch.tensor([5.0, 100, 3, 4]).quantile(0.5)))
    clipper(torch.tensor(float("inf")))  # non-finite norms do not enter the history
    assert torch.isfinite(clipper._history).all()  # type: ignore[arg-type]
    other = PercentileClipper(percentile=50, window=4)
    other.load_state_dict(clipper.state_dict())
    assert float(other(torch.tensor(7.0))) == float(clipper(torch.tensor(7.0)))


def test_unitwise_norm() -> None:
    w = torch.randn(4, 3, 2)
    torch.testing.assert_close(unitwise_norm(w).reshape(-1), w.reshape(4, -1).norm(dim=1))
    b = torch.randn(5)
    torch.testing.assert_close(unitwise_norm(b), b.norm())


def test_agc_clips_units_relative_to_their_weights() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    g = torch.tensor([[1.0, 0.0], [0.0, 0.01]])  # unit 0: ratio 1 (clipped), unit 1: ratio 0.001 (kept)
    fraction = agc_clip_([w], [g], clip_factor=0.01, eps=1e-3)
    torch.testing.assert_close(g, torch.tensor([[0.01, 0.0], [0.0, 0.01]]), rtol=1e-5, atol=1e-7)
    assert float(fraction) == 0.5
    zero_w, big_g = torch.zeros(3), torch.ones(3)  # a zero-initialised bias still moves: eps floor
    agc_clip_([zero_w], [big_g], clip_factor=0.01, eps=1e-3)
    torch.testing.assert_close(big_g.norm(), torch.tensor(1e-5), rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------------- sparse and complex gradients


def _sparse_grad(vocab: int = 12, dim: int = 3, tokens: tuple[int, ...] = (1, 1, 4, 9, 1)) -> torch.Tensor:
    embedding = torch.nn.Embedding(vocab, dim, sparse=True)
    (embedding(torch.tensor(tokens)) * torch.arange(1.0, dim + 1)).sum().backward()
    grad = embedding.weight.grad
    assert grad is not None and grad.layout == torch.sparse_coo and not grad.is_coalesced()
    return grad


def test_scale_grads_scales_dense_sparse_and_complex_gradients_in_place() -> None:
    sparse = _sparse_grad()
    compressed = torch.tensor([[0.0, 2.0], [4.0, 0.0]]).to_sparse_csr()
    dense, complex_ = torch.tensor([1.0, -2.0]), torch.tensor([1 + 1j, 2j])
    expected = [t.to_dense() * 0.5 if t.layout != torch.strided else t * 0.5 for t in [sparse, compressed]]
    scale_grads_([dense, sparse, compressed, complex_], torch.tensor(0.5))  # _foreach_mul_ alone refuses sparse
    torch.testing.assert_close(dense, torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(sparse.to_dense(), expected[0])
    torch.testing.assert_close(compressed.to_dense(), expected[1])
    torch.testing.assert_close(complex_, torch.tensor([0.5 + 0.5j, 1j]))


@pytest.mark.parametrize("coalesced", [False, True])
def test_agc_on_a_sparse_gradient_is_exactly_agc_on_its_dense_equivalent(coalesced: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(12, 3)
    weight[4] = 0.0  # a zero unit: the eps floor
    sparse = _sparse_grad()
    sparse = sparse.coalesce() if coalesced else sparse
    dense = sparse.to_dense()
    fraction_sparse = agc_clip_([weight], [sparse], clip_factor=0.05, eps=1e-3)
    fraction_dense = agc_clip_([weight], [dense], clip_factor=0.05, eps=1e-3)
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=1e-6, atol=1e-9)
    assert float(fraction_sparse) == float(fraction_dense) > 0  # units that got no gradient count, unclipped
    assert sparse.layout == torch.sparse_coo  # still sparse, clipped in place


def test_agc_on_complex_gradients_uses_magnitudes() -> None:
    weight = torch.tensor([[3 + 4j, 0j], [1j, 0j]])  # unit norms 5 and 1
    grad = torch.tensor([[10j, 0j], [0.001 + 0j, 0j]])
    agc_clip_([weight], [grad], clip_factor=0.1, eps=1e-3)
    torch.testing.assert_close(grad, torch.tensor([[0.5j, 0j], [0.001 + 0j, 0j]]))


# ------------------------------------------------------------------------- settings, rollback, corrupt states


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ZClipConfig(warmup_steps=MAX_WARMUP_STEPS + 1), rf"`warmup_steps`.*{MAX_WARMUP_STEPS}\b"),
        (lambda: AutoClipConfig(percentile_window=10**10), rf"`percentile_window`.*{MAX_PERCENTILE_WINDOW}\b"),
        (lambda: ZClipConfig(ema_alpha=math.nan), "`ema_alpha` in"),
        (lambda: ZClipConfig(z_threshold=10**400), "`z_threshold` to be a finite number"),
        (lambda: ZScoreClipper(warmup_steps=0), r"`warmup_steps`.*got 0"),
        (lambda: PercentileClipper(window=-1), r"`percentile_window`.*got -1"),
        (lambda: ZScoreClipper(max_norm=-1.0), "`max_norm`"),
    ],
)
def test_settings_are_validated_where_they_are_declared(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_a_huge_z_threshold_or_cap_never_overflows() -> None:
    clipper = ZScoreClipper(z_threshold=1e300, warmup_steps=2, max_norm=1e300)
    thresholds = [float(clipper(torch.tensor(g))) for g in [1.0, 1.1, 50.0, float("nan")]]
    assert thresholds[2] == 50.0  # never clipped after the warm-up
    assert all(not math.isnan(t) for t in thresholds)
    assert float(max_norm_threshold(1e300) or 0) == float(torch.finfo(torch.float32).max)


@pytest.mark.parametrize("make", [lambda: ZScoreClipper(warmup_steps=3), lambda: PercentileClipper(10.0, window=4)])
def test_rollback_state_restores_the_statistics_and_can_be_restored_twice(make: Any) -> None:
    clipper = make()
    for g in [1.0, 2.0, 1.5, 1.2]:
        clipper(torch.tensor(g))
    saved, then = clipper.rollback_state(), clipper.state_dict()
    for g in [9.0, 0.1, 4.0]:
        clipper(torch.tensor(g))
    assert clipper.state_dict() != then
    for _ in range(2):
        clipper.restore_rollback_state(saved)
        assert clipper.state_dict() == then
        clipper(torch.tensor(7.0))  # moves on from the restored statistics, without touching the saved copy


@pytest.mark.parametrize(
    ("make", "change"),
    [
        (lambda: ZScoreClipper(warmup_steps=3), {"mean": math.nan}),
        (lambda: ZScoreClipper(warmup_steps=3), {"var": -1.0}),
        (lambda: ZScoreClipper(warmup_steps=3), {"count": 7.0}),
        (lambda: ZScoreClipper(warmup_steps=3), {"warmup": [1.0, 2.0]}),
        (lambda: ZScoreClipper(warmup_steps=3), {"steps": -1}),
        (lambda: PercentileClipper(window=4), {"history": [1.0] * 5}),
        (lambda: PercentileClipper(window=4), {"history": [-1.0] * 4}),
    ],
)
def test_corrupt_clipper_states_are_refused_and_change_nothing(make: Any, change: dict[str, Any]) -> None:
    clipper = make()
    for g in [1.0, 2.0, 1.5, 1.2]:
        clipper(torch.tensor(g))
    state = {**clipper.state_dict(), **change}
    before = clipper.state_dict()
    with pytest.raises(ValueError, match=r"ZClip|AutoClip|`steps`"):
        clipper.load_state_dict(state)
    assert clipper.state_dict() == before
