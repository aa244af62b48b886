from __future__ import annotations

import math

import pytest
import torch

from lightning_gradflow.clipping import (
    PercentileClipper,
    ZScoreClipper,
    agc_clip_,
    clip_coefficient,
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
