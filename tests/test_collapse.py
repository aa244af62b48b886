"""The pure maths of collapse detection, against plain float64 references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from lightning_gradflow.collapse import (
    GRAD_WEIGHT,
    REPRESENTATION_WEIGHT,
    CollapseMonitor,
    CollapseStopReason,
    DivergenceDetector,
    EmaZScore,
    FeatureBuffer,
    InterventionLadder,
    LadderConfig,
    MonitorConfig,
    RobustZScore,
    Snapshot,
    SnapshotRing,
    StepVerdict,
    combine_risk,
    copy_tree,
    dead_fraction,
    effective_rank,
    feature_std,
    ramp,
    restore_snapshot,
    robust_zscore,
    spike_score,
    take_snapshot,
    unit_abs_sums,
)

# ------------------------------------------------------------------------------------------------ spike detectors


def _reference_z(history: list[float], x: float, floor: float) -> float:
    median = statistics.median(history)
    mad = statistics.median([abs(v - median) for v in history])
    return (x - median) / max(1.4826 * mad, floor)


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_robust_zscore_matches_the_median_mad_formula(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    history = torch.randn(n, generator=gen, dtype=torch.float64).tolist()
    for x in (-3.0, 0.1, 5.0):
        assert robust_zscore(history, x, 1e-3) == pytest.approx(_reference_z(history, x, 1e-3), rel=1e-12)


def test_robust_zscore_ignores_outliers_in_the_history() -> None:
    clean = [1.0, 1.1, 0.9, 1.05, 0.95] * 4
    dirty = [*clean, 1e6, -1e6]
    assert robust_zscore(dirty, 2.0) == pytest.approx(robust_zscore(clean, 2.0), rel=0.5)
    assert robust_zscore(dirty, 2.0) > 6


def test_robust_detector_warms_up_keeps_a_window_and_ignores_nonfinite() -> None:
    det = RobustZScore(window=5, min_history=3, min_scale=0.0)
    det.update(1.0)
    det.update(2.0)
    assert det.score(100.0) == 0.0  # warm-up
    det.update(math.nan)
    det.update(math.inf)
    assert len(det.values) == 2
    for v in [3.0, 4.0, 5.0, 6.0]:
        det.update(v)
    assert list(det.values) == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert det.score(7.0) == pytest.approx(_reference_z([2, 3, 4, 5, 6], 7.0, 0.0))
    assert math.isnan(det.score(math.nan))
    restored = RobustZScore(window=5, min_history=3)
    restored.load_state_dict(det.state_dict())
    assert list(restored.values) == list(det.values)


def test_ema_detector_matches_a_plain_loop() -> None:
    # ZClip's estimator, the one EMA of the package (shared with ZScoreClipper): variance around the new mean
    alpha, values = 0.9, [1.0, 1.2, 0.8, 1.1, 0.9, 1.0]
    det = EmaZScore(alpha=alpha, min_history=2, min_scale=1e-9)
    mean, var = values[0], 0.0
    det.update(values[0])
    for v in values[1:]:
        det.update(v)
        mean = alpha * mean + (1 - alpha) * v
        var = alpha * var + (1 - alpha) * (v - mean) ** 2
    assert det.mean == pytest.approx(mean) and det.var == pytest.approx(var)
    assert det.score(2.0) == pytest.approx((2.0 - mean) / math.sqrt(var))
    restored = EmaZScore(alpha=alpha, min_history=2, min_scale=1e-9)
    restored.load_state_dict(det.state_dict())
    assert restored.score(2.0) == det.score(2.0)


def test_divergence_detector_fires_on_a_slow_rise_and_not_on_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    noisy = DivergenceDetector()
    for i in range(500):  # a flat loss with ±35 % log-noise per step
        noisy.update(math.exp(0.35 * float(torch.randn((), generator=gen))))
        if i > 20:
            assert noisy.score() < 0.5
    rising = DivergenceDetector()
    log_losses = [-0.1 * i for i in range(30)] + [-3.0 + 0.02 * i for i in range(1, 200)]  # falls, then creeps up
    alarm = next(i for i, x in enumerate(log_losses) if (rising.update(math.exp(x)), rising.score())[1] >= 0.5)
    doubled = 30 + 35  # 0.02 per step on the log scale: the loss doubles 35 steps after its best
    assert 30 < alarm < doubled
    restored = DivergenceDetector()
    restored.load_state_dict(rising.state_dict())
    assert restored.excess() == rising.excess()


def test_ramp_spike_score_and_risk() -> None:
    assert ramp(5.0, 0.0, 10.0) == 0.5 and ramp(-1.0, 0.0, 1.0) == 0.0 and ramp(2.0, 0.0, 1.0) == 1.0
    assert spike_score(3.0, 6.0) == 0.0 and spike_score(4.5, 6.0) == 0.5 and spike_score(6.0, 6.0) == 1.0
    assert spike_score(-100.0, 6.0) == 0.0 and spike_score(math.nan, 6.0) == 1.0
    assert combine_risk([0.5, 0.5, 0.0]) == pytest.approx(0.75)
    assert combine_risk([1.0, 0.3]) == 1.0 and combine_risk([0.0]) == 0.0
    assert combine_risk([2.0, -1.0]) == 1.0  # clamped


# ------------------------------------------------------------------------------------------------- dead units


def test_dead_fraction_of_a_relu_layer_pushed_dead_by_a_negative_bias() -> None:
    torch.manual_seed(0)
    layer, relu = nn.Linear(8, 32), nn.ReLU()
    with torch.no_grad():
        layer.bias[:24] -= 1e3  # 24 of 32 units can never fire on normal inputs
    sums, count = unit_abs_sums(relu(layer(torch.randn(256, 8))))
    assert count == 256
    assert float(dead_fraction(sums, count)) == pytest.approx(24 / 32)


def test_unit_dimension_is_channels_for_conv_maps_and_last_otherwise() -> None:
    h = torch.rand(4, 6, 5, 5)
    h[:, 2] = 0.0
    sums, count = unit_abs_sums(h)
    assert sums.shape == (6,) and count == 4 * 5 * 5
    assert float(dead_fraction(sums)) == pytest.approx(1 / 6)
    seq = torch.rand(3, 7, 10)  # (batch, time, features)
    seq[..., :5] = 0
    assert float(dead_fraction(unit_abs_sums(seq)[0])) == 0.5


def test_tau_dormant_matches_a_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    h = torch.rand(64, 20, generator=gen) * torch.linspace(0, 2, 20)
    sums, count = unit_abs_sums(h)
    mean_abs = [float(h[:, i].abs().mean()) for i in range(20)]
    overall = sum(mean_abs) / 20
    for tau in (0.05, 0.1, 0.5):
        expected = sum(m / overall <= tau for m in mean_abs) / 20
        assert float(dead_fraction(sums, count, tau=tau)) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------- representations


def _rankme_reference(singular_values: list[float], eps: float = 1e-7) -> float:
    total = sum(singular_values)
    p = [s / total + eps for s in singular_values]
    return math.exp(-sum(q * math.log(q) for q in p))


@pytest.mark.parametrize("spectrum", [[3.0, 2.0, 1.0], [1.0], [5.0, 5.0, 5.0, 5.0], [10.0, 1.0, 0.1, 0.01]])
def test_rankme_equals_its_formula_on_a_constructed_low_rank_feature_set(spectrum: list[float]) -> None:
    gen = torch.Generator().manual_seed(0)
    n, d = 200, 16
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    k = len(spectrum)
    features = u[:, :k] @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ v[:, :k].T
    # the zero singular values count too: p_k = 0 + eps for each of them
    expected = _rankme_reference([*spectrum, *[0.0] * (d - k)])
    assert float(effective_rank(features)) == pytest.approx(expected, rel=1e-6)
    if k == len(set(spectrum)) == 1 or len(set(spectrum)) == 1:
        assert float(effective_rank(features)) == pytest.approx(k, rel=1e-4)  # a flat spectrum: exactly its rank


def test_rankme_skips_nonfinite_rows() -> None:
    x = torch.randn(50, 4)
    y = torch.cat([x, torch.full((1, 4), math.nan)])
    assert float(effective_rank(y)) == pytest.approx(float(effective_rank(x)), rel=1e-6)
    assert math.isnan(float(effective_rank(torch.full((3, 4), math.inf))))


def test_feature_std_of_normalised_features() -> None:
    x = torch.randn(4000, 16, dtype=torch.float64)
    z = x / x.norm(dim=1, keepdim=True)
    assert float(feature_std(x)) == pytest.approx(float(z.std(dim=0).mean()), rel=1e-12)
    assert float(feature_std(x)) == pytest.approx(1 / math.sqrt(16), rel=0.05)  # spread out: ≈ 1/√d
    collapsed = torch.randn(1, 16).repeat(100, 1) * torch.rand(100, 1)  # one direction, any length
    assert float(feature_std(collapsed)) == pytest.approx(0.0, abs=1e-6)


def test_feature_buffer_keeps_the_most_recent_rows() -> None:
    buf = FeatureBuffer(5)
    rows = torch.arange(24.0).reshape(12, 2)
    buf.add(rows[:3])
    buf.add(rows[3:7])
    buf.add(rows[7:12])
    kept = {tuple(r) for r in buf.features().tolist()}
    assert len(buf) == 5 and kept == {tuple(r) for r in rows[7:12].tolist()}
    big = FeatureBuffer(3)
    big.add(rows)
    assert {tuple(r) for r in big.features().tolist()} == {tuple(r) for r in rows[-3:].tolist()}


# ---------------------------------------------------------------------------------------------------- snapshots


def _trained() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        _step(net, opt, sched)
    return net, opt, sched


def _step(net: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    x = torch.randn(16, 4)
    opt.zero_grad()
    net(x).pow(2).mean().backward()
    opt.step()
    sched.step()


def _state(net: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> list[object]:
    return [copy_tree(net.state_dict()), copy_tree(opt.state_dict()), copy_tree(sched.state_dict())]


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        same_length = isinstance(b, (list, tuple)) and len(a) == len(b)
        return same_length and all(_equal(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b


def test_snapshot_restores_parameters_buffers_optimizer_and_scheduler_and_stays_intact() -> None:
    net, opt, sched = _trained()
    before = _state(net, opt, sched)
    params = list(net.parameters())
    snap = take_snapshot(3, net, [opt], [sched])
    assert snap.nbytes() > 0 and all(t.device.type == "cpu" for t in snap.model.values())
    for _ in range(3):
        _step(net, opt, sched)
    assert not _equal(_state(net, opt, sched), before)

    restore_snapshot(snap, net, [opt], [sched])
    assert _equal(_state(net, opt, sched), before)
    assert list(net.parameters()) == params  # same tensors: the optimizer still points at them

    torch.manual_seed(5)
    _step(net, opt, sched)  # the optimizer mutates its state in place: the snapshot must not follow
    after_one = _state(net, opt, sched)
    restore_snapshot(snap, net, [opt], [sched])
    assert _equal(_state(net, opt, sched), before)
    torch.manual_seed(5)
    _step(net, opt, sched)
    assert _equal(_state(net, opt, sched), after_one)  # bitwise the same continuation


def test_snapshot_refuses_a_different_number_of_optimizers() -> None:
    net, opt, sched = _trained()
    snap = take_snapshot(0, net, [opt], [sched])
    with pytest.raises(RuntimeError, match="cannot be restored"):
        restore_snapshot(snap, net, [opt, opt], [sched])


def test_snapshot_ring() -> None:
    ring = SnapshotRing(3)
    assert ring.latest() is None and ring.pop_latest() is None
    for step in range(5):
        ring.push(Snapshot(step, {"w": torch.zeros(4)}, [], []))
    assert ring.steps() == [2, 3, 4] and len(ring) == 3 and ring.nbytes() == 3 * 16
    assert ring.pop_latest().step == 4  # type: ignore[union-attr]
    assert ring.latest().step == 3  # type: ignore[union-attr]
    ring.clear()
    assert len(ring) == 0


def test_snapshot_of_sparse_and_complex_state_round_trips() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    opt.step()
    w = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    copt = torch.optim.Adam([w], lr=0.1)
    (w.abs() ** 2).sum().backward()
    copt.step()
    holder = nn.Module()
    holder.emb, holder.w = emb, w  # type: ignore[assignment]
    before = [copy_tree(holder.state_dict()), copy_tree(opt.state_dict()), copy_tree(copt.state_dict())]
    snap = take_snapshot(1, holder, [opt, copt])
    emb(torch.tensor([3])).sum().backward()
    opt.step()
    (w.abs() ** 2).sum().backward()
    copt.step()
    restore_snapshot(snap, holder, [opt, copt])
    assert _equal([holder.state_dict(), opt.state_dict(), copt.state_dict()], before)
    assert w.dtype == torch.complex64


# ------------------------------------------------------------------------------------------ the collapse monitor


def _warm(monitor: CollapseMonitor, steps: int = 30, start: int = 0) -> None:
    for step in range(start, start + steps):
        monitor.observe(step, loss=1.0 + 0.02 * (step % 5), grad_norm=2.0 + 0.04 * (step % 3))


def test_monitor_scores_a_loss_spike_as_an_alarm_and_keeps_it_out_of_the_window() -> None:
    monitor = CollapseMonitor(MonitorConfig(min_history=10))
    _warm(monitor)
    window = list(monitor.loss_detector.values)  # type: ignore[union-attr]
    spike = monitor.observe(30, loss=40.0, grad_norm=60.0)
    assert spike.alarm and spike.opens_episode and not spike.calm and spike.risk == 1.0
    assert list(monitor.loss_detector.values) == window  # type: ignore[union-attr]
    again = monitor.observe(31, loss=40.0, grad_norm=60.0)
    assert again.alarm and not again.opens_episode  # one warning per episode
    calm = monitor.observe(32, loss=1.0, grad_norm=2.0)
    assert calm.calm and not monitor.episode


def test_monitor_a_gradient_spike_alone_warns_but_is_no_alarm() -> None:
    monitor = CollapseMonitor(MonitorConfig(min_history=10))
    _warm(monitor)
    v = monitor.observe(30, loss=1.0, grad_norm=200.0)
    assert v.risk == pytest.approx(GRAD_WEIGHT) and not v.alarm and v.opens_episode and not v.calm
    assert InterventionLadder().decide(v) == []  # nothing for the ladder to do: no "would" record either


def test_monitor_a_standing_representation_finding_neither_opens_nor_holds_an_episode() -> None:
    monitor = CollapseMonitor(MonitorConfig(min_history=10))
    messages = monitor.score_representations(0, {("dead_fraction", "act1"): 0.6})
    assert messages and "60% of the units of 'act1' are dead" in messages[0]
    assert monitor.score_representations(5, {("dead_fraction", "act1"): 0.6}) == []  # warned once
    assert monitor.repr_score == REPRESENTATION_WEIGHT
    v = monitor.observe(0, loss=1.0, grad_norm=1.0)
    assert v.risk == pytest.approx(REPRESENTATION_WEIGHT) and not v.opens_episode and v.calm
    nan = monitor.observe(1, loss=math.nan, grad_norm=1.0)
    assert nan.nonfinite and nan.opens_episode
    assert monitor.observe(2, loss=1.0, grad_norm=1.0).calm and not monitor.episode  # closed despite the finding


def test_monitor_fp16_overflow_steps_are_counted_not_judged() -> None:
    monitor = CollapseMonitor(MonitorConfig(min_history=10, overflow_patience=2))
    _warm(monitor)
    for step in (30, 31):
        v = monitor.observe(step, loss=1.0, grad_norm=math.inf, scaler_active=True)
        assert v.overflow and not v.alarm and not v.nonfinite
    assert monitor.observe(32, loss=1.0, grad_norm=math.inf, scaler_active=True).nonfinite  # patience exhausted
    assert monitor.overflow_steps == 2


def test_monitor_state_round_trips_and_refuses_another_detector_or_nonsense() -> None:
    monitor = CollapseMonitor(MonitorConfig(min_history=10))
    _warm(monitor)
    state = monitor.state_dict()
    fresh = CollapseMonitor(MonitorConfig(min_history=10))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.observe(30, 1.5, 2.0) == monitor.observe(30, 1.5, 2.0)
    with pytest.raises(ValueError, match="spike_detector='mad'"):
        CollapseMonitor(MonitorConfig(spike_detector="ema")).load_state_dict(state)
    for key, value in [("overflow_steps", -3), ("repr_score", math.nan), ("episode", "yes")]:
        with pytest.raises((ValueError, TypeError), match=key):
            CollapseMonitor().load_state_dict({**state, key: value})


def test_monitor_rewind_returns_the_detectors_and_closes_the_episode() -> None:
    monitor = CollapseMonitor(MonitorConfig(min_history=10))
    _warm(monitor)
    saved = monitor.state_dict()
    monitor.observe(30, loss=math.nan, grad_norm=2.0)
    _warm(monitor, 10, start=31)
    monitor.observe(41, loss=40.0, grad_norm=60.0)
    assert monitor.episode
    monitor.rewind(saved)
    assert monitor.state_dict()["loss"] == saved["loss"] and not monitor.episode


def test_the_defaults_are_declared_once() -> None:
    import inspect

    from lightning_gradflow import EarlyCollapseCallback

    signature = inspect.signature(EarlyCollapseCallback.__init__).parameters
    for config in (MonitorConfig(), LadderConfig()):
        for name, value in vars(config).items():
            assert signature[name].default == value, name
    assert RobustZScore().min_scale == EmaZScore().min_scale == MonitorConfig().min_scale


# -------------------------------------------------------------------------------------- the intervention ladder


def _alarm(step: int, nonfinite: bool = False) -> StepVerdict:
    loss = math.nan if nonfinite else 50.0
    return StepVerdict(step, loss, 9.0, risk=1.0, nonfinite=nonfinite, alarm=True, reasons=("loss z-score 20",))


def _calm(step: int) -> StepVerdict:
    return StepVerdict(step, 1.0, 1.0, calm=True)


def test_ladder_skip_cut_rollback_stop() -> None:
    ladder = InterventionLadder(LadderConfig(max_rollbacks=1))
    ladder.keep(0, "snapshot 0")
    assert [a.kind for a in ladder.decide(_alarm(5))] == ["lr_scale"]
    (rollback,) = ladder.decide(_alarm(6))
    assert (rollback.kind, rollback.after, rollback.snapshot) == ("rollback", 0, "snapshot 0")
    assert ladder.lr_scale == 1.0 and ladder.rollbacks == 1 and not ladder.may_snapshot()
    ladder.decide(_alarm(7))
    kinds = [a.kind for a in ladder.decide(_alarm(8))]  # rollback due, budget spent
    assert kinds == ["stop"] and ladder.stopped_reason is CollapseStopReason.MAX_ROLLBACKS
    (skip,) = ladder.decide(_calm(9))  # stopped: every further step is skipped, silently
    assert skip.drops_gradients and not skip.recorded


def test_ladder_an_isolated_skipped_nonfinite_batch_cuts_nothing() -> None:
    ladder = InterventionLadder(LadderConfig(rollback=False))
    assert [a.kind for a in ladder.decide(_alarm(3, nonfinite=True))] == ["skip_step"]
    ladder.decide(_calm(4))
    assert [a.kind for a in ladder.decide(_alarm(5, nonfinite=True))] == ["skip_step"]
    assert [a.kind for a in ladder.decide(_alarm(6, nonfinite=True))] == ["skip_step", "lr_scale"]  # not isolated
    assert ladder.lr_scale == 0.5 and ladder.skipped_steps == 3


def test_ladder_lr_cuts_have_a_floor_and_recover_when_calm() -> None:
    config = LadderConfig(rollback=False, stop_on_failure=False, min_lr_factor=0.1, lr_recovery_steps=20)
    ladder = InterventionLadder(config)
    scales = []
    for step in range(2000):
        spike = step < 1200 and step % 10 == 0  # a spike every 10 steps: cuts come faster than recoveries
        ladder.decide(_alarm(step) if spike else _calm(step))
        scales.append(ladder.lr_scale)
    assert min(scales) == pytest.approx(0.1) and min(scales) >= 0.1
    assert scales[1199] == pytest.approx(0.1) and scales[-1] == 1.0  # at the floor, then all the way back


def test_ladder_goes_one_snapshot_further_back_when_the_newest_led_straight_back() -> None:
    ladder = InterventionLadder(LadderConfig(rollback_patience=1, num_snapshots=3))
    for step in (10, 20):
        ladder.keep(step, step)
    assert ladder.decide(_alarm(25))[0].snapshot == 20
    assert ladder.decide(_alarm(26))[0].snapshot == 10  # no new snapshot since: 20 is dropped
    assert ladder.snapshot_steps() == [10]


def test_ladder_snapshots_continue_after_calm_steps() -> None:
    ladder = InterventionLadder()
    ladder.decide(_alarm(3, nonfinite=True))
    assert not ladder.may_snapshot()
    ladder.decide(StepVerdict(4, 1.0, 1.0, risk=0.4, calm=True))
    assert ladder.may_snapshot()


def test_ladder_dry_run_decides_the_same_then_waits_for_the_run_to_settle() -> None:
    acting, dry = InterventionLadder(), InterventionLadder(dry_run=True)
    for ladder in (acting, dry):
        ladder.keep(0)
    steps = [_alarm(5), _alarm(6), _alarm(7, nonfinite=True), _alarm(8)]
    decided = {id(lad): [[a.kind for a in lad.decide(v)] for v in steps] for lad in (acting, dry)}
    assert decided[id(acting)][:2] == decided[id(dry)][:2] == [["lr_scale"], ["rollback"]]
    assert decided[id(dry)][2:] == [[], []]  # after the would-be rollback, auto mode would be elsewhere
    assert dry.stopped_reason is CollapseStopReason.NOT_STOPPED
    dry.decide(_calm(9))
    assert [a.kind for a in dry.decide(_alarm(10))] == ["lr_scale"]


def test_ladder_state_round_trips_and_refuses_nonsense() -> None:
    ladder = InterventionLadder()
    ladder.decide(_alarm(1))
    state = ladder.state_dict()
    fresh = InterventionLadder()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state and fresh.lr_scale == 0.5
    for key, value in [("lr_scale", math.nan), ("lr_scale", -5.0), ("strikes", -1), ("stopped_reason", "BAD")]:
        with pytest.raises((ValueError, TypeError, KeyError)):
            InterventionLadder().load_state_dict({**state, key: value})
    watched = InterventionLadder(dry_run=True)
    watched.load_state_dict(state)  # what an acting ladder applied means nothing to a dry run
    assert watched.lr_scale == 1.0


def test_monitor_a_low_rank_before_the_features_spread_is_no_collapse() -> None:
    """A random initialisation whose outputs barely depend on the input has RankMe ≈ 1 at step 0 (the demo warned
    "effective rank of 1.03 at step 0" on healthy runs): a collapse is a *fall* from features that had spread."""
    monitor = CollapseMonitor(MonitorConfig(min_effective_rank=1.5))
    assert monitor.score_representations(0, {("effective_rank", "head"): 1.03}) == []
    assert monitor.repr_score == 0.0
    assert monitor.score_representations(5, {("effective_rank", "head"): 2.5}) == []  # spreading, not yet 2 × 1.5
    assert monitor.score_representations(10, {("effective_rank", "head"): 1.2}) == []
    assert monitor.score_representations(15, {("effective_rank", "head"): 6.0}) == []  # spread: peak 6
    messages = monitor.score_representations(20, {("effective_rank", "head"): 1.2})  # fell back: a collapse
    assert len(messages) == 1 and "effective rank of 1.2 at step 20" in messages[0]
    assert monitor.repr_score == REPRESENTATION_WEIGHT
    assert monitor.score_representations(25, {("effective_rank", "other"): 1.0}) == []  # per layer


def test_monitor_rank_peak_survives_state_dict_and_old_checkpoints_load() -> None:
    monitor = CollapseMonitor()
    monitor.score_representations(0, {("effective_rank", "head"): 8.0})
    state = monitor.state_dict()
    fresh = CollapseMonitor()
    fresh.load_state_dict(state)
    assert fresh.rank_peak == {"head": 8.0}
    assert fresh.score_representations(5, {("effective_rank", "head"): 1.0})  # the resumed run still knows the peak
    old = {k: v for k, v in state.items() if k != "rank_peak"}  # a checkpoint written before the peak existed
    older = CollapseMonitor()
    older.load_state_dict(old)
    assert older.rank_peak == {}
    with pytest.raises(ValueError, match="rank_peak"):
        CollapseMonitor().load_state_dict({**state, "rank_peak": {"head": math.nan}})
