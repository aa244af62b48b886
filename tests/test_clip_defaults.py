"""The default clip rule (``clip_mode="trend"``): healthy trending runs are left alone, spikes are clipped like ZClip.

Pure tests of :class:`~lightning_gradflow.clipping.TrendClipper` against ZClip's exact rule
(:class:`~lightning_gradflow.clipping.ZScoreClipper`) on synthetic norm series, and a fast subset of
``benchmarks/clip_efficacy.py`` (the same code, fewer models, seeds and steps) through ``GradientFlowCallback``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_gradflow import GradientFlowCallback
from lightning_gradflow.clipping import TrendClipConfig, TrendClipper, ZScoreClipper

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "clip_efficacy.py"


def _noisy_rise(steps: int, rate: float, noise: float, seed: int = 0) -> list[float]:
    """A healthy norm series: geometric growth at ``rate`` per step with log-normal noise of ``noise``."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(steps, generator=gen) * noise
    return [float(math.exp(rate * t + float(e))) for t, e in enumerate(eps)]


def _clipped(clipper: Any, norms: list[float]) -> list[int]:
    return [t for t, g in enumerate(norms) if g > float(clipper(torch.tensor(g)))]


def test_the_default_clip_mode_is_the_trend_rule() -> None:
    callback = GradientFlowCallback(auto_intervene=True)
    assert callback.clip_mode == "trend"
    assert isinstance(callback.clipper, TrendClipper)
    assert isinstance(GradientFlowCallback(auto_intervene=True, clip_mode="zscore").clipper, ZScoreClipper)


@pytest.mark.parametrize("rate", [0.02, 0.05, -0.03])
def test_a_healthy_trend_is_not_clipped_while_zclip_clips_it(rate: float) -> None:
    norms = _noisy_rise(200, rate, noise=0.05)
    assert _clipped(TrendClipper(), norms) == []
    if rate > 0:  # ZClip's flat running mean lags a rising norm: it clips healthy steps
        assert len(_clipped(ZScoreClipper(), norms)) > 5


@pytest.mark.parametrize("factor", [30.0, 100.0, 300.0])
def test_every_spike_zclip_clips_the_trend_rule_clips_too(factor: float) -> None:
    norms = _noisy_rise(160, 0.01, noise=0.2, seed=1)
    spikes = [40, 41, 42, 90, 130]
    for t in spikes:
        norms[t] *= factor
    zclip = set(_clipped(ZScoreClipper(), norms)) & set(spikes)
    trend = set(_clipped(TrendClipper(), norms)) & set(spikes)
    assert zclip and zclip <= trend == set(spikes)


def test_a_spike_is_clipped_to_a_few_times_the_trend_and_barely_moves_it() -> None:
    clipper = TrendClipper()
    for g in _noisy_rise(50, 0.0, noise=0.05):
        clipper(torch.tensor(g))
    before = (float(clipper.level), float(clipper.slope))
    threshold = float(clipper(torch.tensor(1000.0)))
    assert 1.5 < threshold < 5.0
    assert abs(float(clipper.level) - before[0]) < 0.1 and abs(float(clipper.slope) - before[1]) < 0.01


def test_an_explosion_in_the_first_steps_is_bounded_by_the_adaptive_warm_up() -> None:
    clipper = TrendClipper()
    assert math.isinf(float(clipper(torch.tensor(1.0))))  # nothing to compare the first norm with
    for _ in range(3):
        clipper(torch.tensor(1.0))
    assert float(clipper(torch.tensor(1e4))) < 20.0  # warm-up bound: 10 × the forecast


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0])
def test_non_finite_or_zero_norms_leave_the_statistics_untouched(bad: float) -> None:
    clipper = TrendClipper()
    for g in [1.0, 1.1, 0.9, 1.0]:
        clipper(torch.tensor(g))
    state = clipper.state_dict()
    threshold = float(clipper(torch.tensor(bad)))
    assert math.isfinite(threshold) and threshold > 1.0
    assert {k: v for k, v in clipper.state_dict().items() if k != "steps"} == {
        k: v for k, v in state.items() if k != "steps"
    }


def test_state_dict_and_rollback_round_trip() -> None:
    norms = _noisy_rise(30, 0.02, noise=0.1)
    a = TrendClipper()
    for g in norms:
        a(torch.tensor(g))
    b = TrendClipper()
    b.load_state_dict(a.state_dict())
    snapshot = a.rollback_state()
    later = [float(a(torch.tensor(g))) for g in [2.0, 50.0, 1.5]]
    assert [float(b(torch.tensor(g))) for g in [2.0, 50.0, 1.5]] == pytest.approx(later)
    a.restore_rollback_state(snapshot)
    assert [float(a(torch.tensor(g))) for g in [2.0, 50.0, 1.5]] == pytest.approx(later)
    fresh = TrendClipper()
    fresh.load_state_dict(TrendClipper().state_dict())
    assert fresh.count is None


@pytest.mark.parametrize(("key", "value"), [("spread", -1.0), ("level", math.nan), ("count", -2.0)])
def test_nonsense_statistics_are_refused(key: str, value: float) -> None:
    clipper = TrendClipper()
    clipper(torch.tensor(1.0))
    state = clipper.state_dict()
    state[key] = value
    with pytest.raises(ValueError, match="trend clip statistics"):
        TrendClipper().load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"trend_threshold": 0.0}, "trend_threshold"),
        ({"trend_threshold": math.inf}, "trend_threshold"),
        ({"trend_min_ratio": 1.0}, "trend_min_ratio"),
        ({"trend_min_ratio": math.nan}, "trend_min_ratio"),
    ],
)
def test_callback_refuses_bad_trend_settings(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        GradientFlowCallback(auto_intervene=True, **kwargs)
    with pytest.raises(ValueError, match=f"`{name}`"):
        TrendClipConfig(**kwargs)


def test_huge_settings_never_overflow() -> None:
    clipper = TrendClipper(threshold=1e300, min_ratio=1e300, max_norm=1e300)
    thresholds = [float(clipper(torch.tensor(g))) for g in [1.0] * 12 + [1e30]]
    assert all(not math.isnan(t) for t in thresholds) and thresholds[-1] >= 1e30


@pytest.mark.slow
def test_a_run_that_diverges_from_its_first_steps_stays_finite_with_the_default() -> None:
    from tests.test_gradient_flow import _fit_rnn  # the exploding vanilla RNN that diverges without clipping

    callback = GradientFlowCallback(auto_intervene=True)
    model, logger = _fit_rnn([callback])
    assert all(math.isfinite(loss) for loss in model.losses)
    threshold = logger.series("gradflow/clip_threshold")
    late = [t for s, t in threshold.items() if s >= 50]
    assert late and max(late) < 1e4  # the trend does not follow the divergence up
    assert {i.kind for i in callback.interventions} <= {"clip", "skip_step"}


# ------------------------------------------------------------------------- the benchmark's fast subset


@pytest.fixture(scope="module")
def bench() -> Any:
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("clip_efficacy", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["clip_efficacy"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "cnn"])
def test_healthy_rising_norm_run_is_not_harmed_by_default_clipping(bench: Any, model: str, one_thread: Any) -> None:
    none = bench.run(model, "none", seed=0, steps=80)
    trend = bench.run(model, "trend", seed=0, steps=80)
    zscore = bench.run(model, "zscore", seed=0, steps=80)
    assert trend.norms[0] * 2 < max(trend.norms[:60])  # the early phase does rise
    assert trend.clipped == [] and trend.loss <= none.loss * 1.02
    assert zscore.clipped  # ZClip clips the healthy rise (the behaviour the default replaces)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "kind"), [("cnn", "burst"), ("transformer", "lr")])
def test_real_spikes_are_clipped_at_least_where_zclip_clips(bench: Any, model: str, kind: str, one_thread: Any) -> None:
    fault = (
        bench.Fault("burst", (40, 41, 42), (30.0, 100.0, 300.0))
        if kind == "burst"
        else bench.Fault("lr", (40,), (100.0,))
    )
    trend = bench.run(model, "trend", seed=0, fault=fault, steps=80)
    zscore = bench.run(model, "zscore", seed=0, fault=fault, steps=80)
    window = {40, 41, 42} if kind == "burst" else {41}
    spikes = {s for s in window if bench.spike_ratio(trend.norms, s) >= 3.0}
    assert spikes  # the fault does make the norm spike
    assert set(zscore.clipped) & spikes <= set(trend.clipped)
    assert spikes <= set(trend.clipped)
    assert trend.loss <= zscore.loss * 1.02


def test_the_callback_defaults_are_the_pure_layer_defaults() -> None:
    import inspect

    defaults = {n: p.default for n, p in inspect.signature(GradientFlowCallback).parameters.items()}
    config = TrendClipConfig()
    assert defaults["trend_threshold"] == config.trend_threshold
    assert defaults["trend_min_ratio"] == config.trend_min_ratio
    assert defaults["clip_mode"] == "trend"
