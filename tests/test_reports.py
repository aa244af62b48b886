"""The reporting layer without a Trainer: metrics dicts, warning and record texts, TensorBoard formatting.

``lightning_gradflow.reports`` says what each callback logs and warns (pure: host numbers in, dicts and strings out);
``lightning_gradflow.tensorboard`` holds every piece of TensorBoard formatting. These tests pin the keys, values and
texts the callbacks log, tie the custom-scalars layouts to the keys the callbacks document, and check that the names
moved into ``tensorboard`` are still importable from where they were.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_gradflow
from lightning_gradflow import (
    EarlyCollapseCallback,
    GateSurgeryCallback,
    GradientFlowCallback,
    SharpnessCallback,
)
from lightning_gradflow import tensorboard as tb
from lightning_gradflow.collapse import Action, StepVerdict
from lightning_gradflow.curvature import ProbePlan, SharpnessClass, StabilityRule
from lightning_gradflow.flow import LogWindow, flow_ratios
from lightning_gradflow.gates import (
    GateDecision,
    GateObservation,
    GateVerdict,
    capture_call,
    find_gated_modules,
    measure_gates,
)
from lightning_gradflow.reports import collapse as collapse_report
from lightning_gradflow.reports import flow as flow_report
from lightning_gradflow.reports import gates as gates_report
from lightning_gradflow.reports import sharpness as sharpness_report
from lightning_gradflow.stats import HistogramSpec, TensorStats, tensor_histograms, tensor_stats

PACKAGE = Path(lightning_gradflow.__file__).parent

# --------------------------------------------------------------------------------------------- gradient flow


def test_flow_layer_metrics_are_the_statistics_of_each_present_layer() -> None:
    grads = tensor_stats([torch.tensor([3.0, -4.0, 0.0, 0.0]), torch.zeros(0), torch.tensor([1.0, 1.0])])
    weight_norm, ratio = torch.tensor([2.0, 7.0, 4.0]), torch.tensor([0.1, 0.2, 0.3])
    present = flow_report.present_layers(grads)
    assert present == [0, 2]  # the empty row has no gradient this step
    flow = flow_ratios(torch.tensor([1.0, 4.0]))
    m = flow_report.flow_layer_metrics(["a", "b", "c"], grads, present, weight_norm, ratio, flow)
    assert m["gradflow/grad_norm/a"] == 5.0 and m["gradflow/grad_rms/a"] == 2.5
    assert m["gradflow/grad_absmax/a"] == 4.0 and m["gradflow/zero_fraction/a"] == 0.5
    assert m["gradflow/weight_norm/c"] == 4.0 and m["gradflow/update_ratio/c"] == pytest.approx(0.3)
    assert m["gradflow/flow_ratio/a"] == 0.25 and m["gradflow/flow_ratio/c"] == 1.0  # the last layer's ratio is 1
    assert not any(key.endswith("/b") for key in m)
    without_updates = flow_report.flow_layer_metrics(["a", "b", "c"], grads, present, weight_norm, None, flow)
    assert not any("update_ratio" in key for key in without_updates)


def test_flow_layer_metrics_leave_out_a_max_that_was_not_measured() -> None:
    grads = tensor_stats([torch.tensor([1.0, 2.0])])
    grads.table[0, 1] = math.nan  # a norms-only step measures no max |g|
    m = flow_report.flow_layer_metrics(["a"], grads, [0], torch.ones(1), None, torch.ones(1))
    assert "gradflow/grad_absmax/a" not in m and "gradflow/grad_norm/a" in m


@pytest.mark.parametrize(
    ("clip_mode", "expected"),
    [
        (None, set()),
        ("zscore", {"clip_threshold", "clip_coef"}),
        ("norm", {"clip_threshold", "clip_coef"}),
        ("agc", {"clip_coef"}),
    ],
)
def test_flow_step_metrics_log_clipping_only_when_it_is_on(clip_mode: str | None, expected: set[str]) -> None:
    window = [0.0] * 5
    window[LogWindow.NONFINITE], window[LogWindow.OVERFLOW] = 6.0, 2.0
    m = flow_report.flow_step_metrics([9.0, 4.0, 0.5], window, 1, 2, 3, 4, clip_mode)
    assert {k.split("/", 1)[1] for k in m if "clip" in k} == expected
    assert m["gradflow/grad_norm_total"] == 9.0 and m["gradflow/nonfinite_grads"] == 6.0
    assert m["gradflow/overflow_steps"] == 2.0 and m["gradflow/vanishing_layers"] == 1.0
    assert m["gradflow/exploding_layers"] == 2.0 and m["gradflow/skipped_steps"] == 3.0
    assert m["gradflow/interventions"] == 4.0
    if clip_mode is not None:
        assert m["gradflow/clip_coef"] == 0.5
    if "clip_threshold" in expected:
        assert m["gradflow/clip_threshold"] == 4.0


def test_flow_findings_name_the_layer_the_measurement_and_the_fix() -> None:
    grads = tensor_stats([torch.full((4,), 1e-6), torch.tensor([math.inf, 1.0]), torch.full((3,), 0.5)])
    found = flow_report.flow_findings(["in", "mid", "out"], grads, [0], [1, 2], step=11, patience=4)
    assert [(f.kind, f.layer, f.key) for f in found] == [
        ("vanishing", "in", "vanishing:in"),
        ("exploding", "mid", "exploding:mid"),
        ("exploding", "out", "exploding:out"),
    ]
    vanishing, nonfinite, output = (f.message for f in found)
    assert vanishing.startswith("vanishing gradients in layer 'in' at step 11: active gradient RMS 1e-06, 2e-06×")
    assert "for 4+ consecutive steps" in vanishing and flow_report.VANISHING_FIX in vanishing
    assert "1 non-finite gradient values" in nonfinite and flow_report.EXPLODING_FIX in nonfinite
    assert "× the output layer's" not in output  # the output layer is not compared with itself
    assert found[0].rms == pytest.approx(1e-6)
    assert flow_report.flow_findings(["in"], grads, [], [], step=0, patience=1) == []


def test_flow_window_texts() -> None:
    reason, before, after = flow_report.clip_record("percentile", 3.0, 50, 12.0, 4.0)
    assert reason.startswith("3 of the last 50 steps") and "percentile threshold" in reason
    assert (before, after) == (12.0, 4.0)
    reason, before, after = flow_report.clip_record("agc", 3.0, 50, 12.0, 4.0)
    assert reason == "AGC clipped units on 3 of the last 50 steps" and math.isnan(before) and math.isnan(after)
    message = flow_report.nonfinite_message(7.0, 3, 9)
    assert message.startswith("7 non-finite gradient values from step 3 (counted up to step 9).")
    assert "`auto_intervene=True`" in message
    assert flow_report.would_clip_reason("zscore") == "exploding gradients; would clip with clip_mode='zscore'"


def test_a_flow_step_packs_what_its_report_reads() -> None:
    stats = tensor_stats([torch.ones(3), torch.full((2,), 2.0)])
    step = flow_report.FlowStep(4, True, False, False, [], stats, stats.total_norm())
    window = (torch.arange(5.0), torch.tensor(2), 3)
    parts = step.device_parts(("weights", stats.table), torch.zeros(2, 2), window)
    assert list(parts) == ["layers", "weights", "streaks", "window", "first_nonfinite", "scalars"]
    assert parts["scalars"].tolist() == [pytest.approx(math.sqrt(11)), 0.0, 1.0]  # no clip: threshold 0, coef 1
    step.threshold, step.coef, step.abs_sums = torch.tensor(5.0), torch.tensor(0.5), torch.ones(2)
    step.histograms = tensor_histograms([torch.ones(3)])
    parts = step.device_parts(("updates", stats.table), None, None)
    assert list(parts) == ["layers", "updates", "scalars", "histograms", "abs_sums"]
    assert parts["scalars"].tolist()[1:] == [5.0, 0.5]


# ------------------------------------------------------------------------------------------------------ gates


def _lstm_probe() -> tuple[object, object]:
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    (gated,) = find_gated_modules(nn.ModuleDict({"rnn": lstm}))
    x = torch.randn(2, 5, 3)
    capture = capture_call(gated, (x,), {}, lstm(x), probe_size=2)
    return gated, measure_gates(gated, [capture]).stats


def test_gate_metrics_are_the_gate_scalars_of_every_probed_module() -> None:
    gated, stats = _lstm_probe()
    metrics = gates_report.gate_metrics([gated], {"rnn": stats}, 0.95, surgeries=2)
    assert metrics["gates/surgeries"] == 2.0
    for gate, g in (("input", 0), ("forget", 1), ("cell", 2), ("output", 3)):
        assert metrics[f"gates/saturation/rnn/l0/{gate}"] == float(stats.saturation[0, g])
        assert metrics[f"gates/mean/rnn/l0/{gate}"] == float(stats.mean[0, g])
        assert metrics[f"gates/sigma_prime/rnn/l0/{gate}"] == float(stats.sigma_prime[0, g])
        assert f"gates/saturated_units/rnn/l0/{gate}" in metrics
    assert gates_report.gate_metrics([gated], {}, 0.95, surgeries=0) == {"gates/surgeries": 0.0}
    assert "probe/surgeries" in gates_report.gate_metrics([gated], {}, 0.95, 0, family="probe")


def _report() -> gates_report.GateReport:
    return gates_report.GateReport(unit_threshold=0.9, patience=2, target_std=1.0, forget_bias=1.0, max_surgeries=3)


def test_gate_report_texts_say_what_was_found_and_what_is_done() -> None:
    gated, _ = _lstm_probe()
    obs = GateObservation("rnn/l0/forget", "forget", saturation=0.5, units=(1,), weight_rms=(0.5,))
    report = _report()
    assert report.finding(obs, gated, 8) == (
        "gate 'rnn/l0/forget' is saturated at step 8: 50.0% of its activations, and 1 of 4 units on ≥90% of the"
        " probe positions, for 2 probe(s) in a row."
    )
    assert report.plan(obs, gated) == (
        "set the bias (b_ih + b_hh) of 1 unit(s) to 1, keep their W_ih/W_hh rows (weight RMS already ≤ 1) and reset"
        " their optimizer state"
    )
    scaled = GateObservation("rnn/l0/input", "input", saturation=0.5, units=(0, 2), weight_rms=(4.0, 4.0))
    assert report.scaling(scaled, gated) == "scale their W_ih/W_hh rows by 0.25 (weight RMS ≤ 1)"
    assert report.scaling(scaled, gated, done=True) == "W_ih/W_hh rows scaled by 0.25 (weight RMS ≤ 1)"
    how = report.done(scaled, gated, ["exp_avg", "exp_avg_sq"])
    assert (
        how
        == "bias set to 0, W_ih/W_hh rows scaled by 0.25 (weight RMS ≤ 1), optimizer state reset: exp_avg, exp_avg_sq"
    )
    assert report.done(scaled, gated, []).endswith("no optimizer state yet")
    assert report.reason(scaled, gated, how) == f"2/4 units saturated on ≥90% of probe positions for 2 probe(s); {how}"
    assert report.repaired(scaled, gated, 8, how, 0.125).endswith(f"({how}): saturation 50.0% → 12.5% on the probe.")


@pytest.mark.parametrize(
    ("verdict", "key", "says"),
    [
        (GateVerdict.REPORT_ONLY, "found:rnn/l0/input", "It is only reported: its gate is not in `repair_gates`."),
        (GateVerdict.MONITOR, "found:rnn/l0/input", "With `auto_intervene=True` it would set the bias"),
        (GateVerdict.BUDGET, "max_surgeries", "`max_surgeries=3` surgeries are in effect"),
        (GateVerdict.GIVEN_UP, "given_up:rnn/l0/input", "Rollbacks undid its surgery 2 times"),
    ],
)
def test_gate_verdicts_that_only_report_warn_once_under_their_key(verdict: GateVerdict, key: str, says: str) -> None:
    gated, _ = _lstm_probe()
    obs = GateObservation("rnn/l0/input", "input", saturation=0.5, units=(1,), weight_rms=(0.5,))
    warning = _report().warning(GateDecision(obs, verdict, 2), gated, 6, {"rnn/l0/input": 2})
    assert warning is not None
    assert warning[0] == key and warning[1].startswith(_report().finding(obs, gated, 6)) and says in warning[1]


def test_gate_verdicts_that_act_or_wait_have_no_warning() -> None:
    gated, _ = _lstm_probe()
    obs = GateObservation("rnn/l0/input", "input", saturation=0.5, units=(1,), weight_rms=(0.5,), repairable=False)
    for verdict in (GateVerdict.REPAIR, GateVerdict.COOLDOWN, GateVerdict.FLAGGED, GateVerdict.HEALTHY):
        assert _report().warning(GateDecision(obs, verdict, 1), gated, 6, {}) is None
    warning = _report().warning(GateDecision(obs, GateVerdict.REPORT_ONLY, 2), gated, 6, {})
    assert warning is not None and warning[1].endswith("It is only reported: its module has no rows to repair.")


def test_gate_rollback_texts() -> None:
    assert gates_report.undone_reason(4, "EarlyCollapseCallback", "rollback", 2) == (
        "the surgery of step 4 was undone by EarlyCollapseCallback's rollback to step 2; the gate is repaired again"
        " if it is diagnosed again"
    )
    one = gates_report.undone_message("X", "rollback", 9, 5, ["a/l0/input"])
    two = gates_report.undone_message("X", "rollback", 9, 5, ["a/l0/input", "a/l0/output"])
    assert one.startswith("X's rollback at step 9 (to step 5) undid 1 gate surgery (a/l0/input);")
    assert "undid 2 gate surgeries (a/l0/input, a/l0/output)" in two


# -------------------------------------------------------------------------------------------------- sharpness


def test_sharpness_metrics_log_each_requested_quantity_once() -> None:
    rule = StabilityRule("gd", threshold=20.0, lr=0.1)
    plan = ProbePlan(("lambda_max", "random", "stability_ratio"), quantity="batch_sharpness")
    values = {"lambda_max": 30.0, "batch_sharpness": 10.0, "random_score": 0.7, "random/0.01": 0.2}
    m = sharpness_report.sharpness_metrics(values, plan.metrics, rule, plan)
    assert m["sharpness/lambda_max"] == 30.0
    assert m["sharpness/batch_sharpness"] == 10.0  # measured for the ratio only: logged once, through it
    assert m["sharpness/stability_ratio"] == 0.5 and m["sharpness/threshold"] == 20.0
    assert m["sharpness/class"] == sharpness_report.CLASS_INDEX[SharpnessClass.SHARP] == 2.0
    assert m["sharpness/random/0.01"] == 0.2 and "sharpness/random_score" not in m
    nan = sharpness_report.sharpness_metrics({"random_score": math.nan}, ("random",), rule, plan)
    assert math.isnan(nan["sharpness/class"]) and "sharpness/stability_ratio" not in nan


def test_sharpness_metrics_of_a_preconditioned_or_unknown_rule() -> None:
    adam = StabilityRule("adam", threshold=38.0, preconditioned=True, lr=1.0)
    plan = ProbePlan(("stability_ratio",), quantity="batch_sharpness", preconditioned=True)
    values = {"preconditioned_batch_sharpness": 19.0, "batch_sharpness": 5.0}
    m = sharpness_report.sharpness_metrics(values, plan.metrics, adam, plan)
    assert m["sharpness/stability_ratio"] == 0.5 and m["sharpness/preconditioned_batch_sharpness"] == 19.0
    assert "sharpness/batch_sharpness" not in m  # not the compared quantity: not requested, not logged
    unknown = StabilityRule("unknown", math.nan, reason="2 optimizers")
    m = sharpness_report.sharpness_metrics(
        {"batch_sharpness": 5.0}, ("stability_ratio",), unknown, ProbePlan(("stability_ratio",))
    )
    assert math.isnan(m["sharpness/stability_ratio"]) and m["sharpness/batch_sharpness"] == 5.0
    assert sharpness_report.stability_detail(values, adam, plan) == (
        "preconditioned batch_sharpness 19 vs threshold 38 (adam, lr 1)"
    )


def test_sharpness_texts() -> None:
    assert sharpness_report.unknown_rule_message("2 optimizers").startswith("2 optimizers, so `sharpness/stability")
    failed = sharpness_report.probe_failed_message(3, RuntimeError("boom"), "double_backward")
    assert failed.startswith("the probe at step 3 failed (RuntimeError: boom); logging NaN. With `hvp='double_")
    assert "already avoid double backward" in sharpness_report.probe_failed_message(
        3, ValueError(), "finite_difference"
    )
    assert "2-3 significant digits" in sharpness_report.half_precision_message(torch.float16, "double_backward")
    assert "finite differences are coarse" in sharpness_report.half_precision_message(
        torch.bfloat16, "finite_difference"
    )
    assert "`min_lr_factor=0.01`" in sharpness_report.at_floor_message(5, "ratio 2 > 1.1", 0.01)
    would = sharpness_report.would_scale_message(5, "ratio 2 > 1.1", "SharpnessCallback", 0.5)
    assert "SharpnessCallback would multiply the learning rate by 0.5" in would
    assert "(cumulative 0.25)" in sharpness_report.scaled_message(5, "ratio 2 > 1.1", 0.5, 0.25)


def test_sharpness_settings_read_the_controller() -> None:
    callback = SharpnessCallback(margin=1.3, patience=4, lr_factor=0.7, increase_below=0.4, min_lr_factor=0.2)
    settings = ("margin", "patience", "lr_factor", "allow_increase", "increase_below", "min_lr_factor")
    assert [getattr(callback, name) for name in settings] == [1.3, 4, 0.7, False, 0.4, 0.2]
    assert [getattr(callback.controller, name) for name in settings] == [1.3, 4, 0.7, False, 0.4, 0.2]
    with pytest.raises(AttributeError):
        callback.margin = 2.0  # type: ignore[misc]  # read-only: the controller owns the setting


# --------------------------------------------------------------------------------------------------- collapse


def test_collapse_metrics_and_representations() -> None:
    v = StepVerdict(3, loss=1.0, grad_norm=2.0, loss_z=1.5, grad_z=-0.5, divergence=0.1, risk=0.4)
    m = collapse_report.collapse_metrics(v, 1, 2, 3, 0.25, 6)
    assert m == {
        "collapse/risk": 0.4,
        "collapse/loss_zscore": 1.5,
        "collapse/grad_norm_zscore": -0.5,
        "collapse/divergence": 0.1,
        "collapse/overflow_steps": 1.0,
        "collapse/skipped_steps": 2.0,
        "collapse/rollbacks": 3.0,
        "collapse/lr_scale": 0.25,
        "collapse/interventions": 6.0,
    }
    probe = {("dead_fraction", "net.1"): 0.5, ("feature_std", "net.2"): 0.1}
    assert collapse_report.representation_metrics(probe) == {
        "collapse/dead_fraction/net/1": 0.5,
        "collapse/feature_std/net/2": 0.1,
    }


def test_episode_messages_say_what_was_or_would_be_done() -> None:
    v = StepVerdict(7, loss=12.5, grad_norm=9.0, risk=1.25, reasons=("loss spike", "grad spike"))
    actions = [Action("skip_step", "all", "spike"), Action("skip_step", "all", "after rollback", recorded=False)]
    applied = collapse_report.episode_message(v, actions, auto_intervene=True, risk_threshold=1.0)
    assert applied == (
        "collapse risk 1.25 at step 7 (loss spike, grad spike, loss 12.5); auto_intervene is on (skip → cut LR →"
        " roll back → stop, from risk 1); applied: skip_step."
    )
    assert collapse_report.episode_message(v, [], True, 1.0).endswith("; no action yet.")
    dry = collapse_report.episode_message(v, actions, auto_intervene=False, risk_threshold=1.0)
    assert "monitoring only" in dry and dry.endswith("(applied=False); it would now: skip_step.")
    assert collapse_report.episode_message(v, [], False, 1.0).endswith("it would not act yet.")
    message = collapse_report.unknown_module_message("X", "head", "representation_layers", ["", "body", "tail"])
    assert (
        message == "X(`representation_layers`) names the module 'head', which the model does not have. Known"
        " modules: ['body', 'tail']."
    )
    assert collapse_report.resumed_after_stop_message("stopped at step 4.").startswith(
        "the checkpoint was saved after this callback stopped at step 4. Training resumes"
    )


# ------------------------------------------------------------------------------------------------ TensorBoard


@pytest.mark.parametrize(
    ("callback", "charts"),
    [
        (GradientFlowCallback, tb.GRADFLOW_CHARTS),
        (GateSurgeryCallback, tb.GATES_CHARTS),
        (SharpnessCallback, tb.SHARPNESS_CHARTS),
        (EarlyCollapseCallback, tb.COLLAPSE_CHARTS),
    ],
)
def test_every_chart_draws_keys_the_callback_documents(callback: type, charts: dict[str, tuple[str, ...]]) -> None:
    doc = callback.__doc__
    assert doc is not None
    for title, tags in tb.family_charts(callback.family, charts).items():
        for tag in tags:
            assert f"``{tag}" in doc, f"{callback.__name__}: chart {title!r} draws {tag!r}, which it never logs"


def test_layout_category_is_a_multiline_chart_per_title() -> None:
    charts = tb.family_charts("gates", tb.GATES_CHARTS)
    assert charts["surgeries"] == ["gates/surgeries"]
    layout = tb.layout_category(charts, lambda tag: f"run-{tag}")
    assert layout["saturation (fraction of activations)"] == ["Multiline", ["run\\-gates/saturation/.*"]]
    assert list(layout) == list(tb.GATES_CHARTS)


def test_layer_histograms_are_each_rows_tensorboard_histogram() -> None:
    grads = [torch.tensor([0.5, -2.0, 0.0]), torch.tensor([3.0, 1e-3]), torch.tensor([0.25])]
    spec = HistogramSpec(min_exp=-12, max_exp=4, bins_per_octave=2)
    rows = torch.tensor([0, 1, 1])
    counts = tensor_histograms(grads, spec=spec).reduce_rows(rows, 2).counts
    stats = tensor_stats(grads).reduce_rows(rows, 2)
    out = tb.layer_histograms(["a", "b"], [0, 1], counts, stats, spec)
    assert list(out) == ["grad_hist/a", "grad_hist/b"]
    for i, layer in enumerate(["a", "b"]):
        assert out[f"grad_hist/{layer}"] == tb.tensorboard_histogram(
            counts[i], spec, TensorStats(stats.table[i : i + 1])
        )
    assert out["grad_hist/b"]["num"] == 3 and out["grad_hist/b"]["max"] == 3.0  # exact max |g| from the statistics
    assert tb.layer_histograms(["a", "b"], [1], counts, stats, spec).keys() == {"grad_hist/b"}


def test_layer_flow_figure_draws_mean_and_max_per_present_layer() -> None:
    stats = tensor_stats([torch.tensor([1.0, -3.0]), torch.zeros(0), torch.tensor([0.5])])
    figure = tb.layer_flow_figure(["a", "b", "c"], [0, 2], torch.tensor([4.0, 0.0, 0.5]), stats, {2}, {0}, step=5)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "c"]
    assert [t.get_color() for t in ax.get_xticklabels()] == ["#cb181d", "#2171b5"]  # exploding red, vanishing blue
    max_bars, mean_bars = ax.containers
    assert [bar.get_height() for bar in max_bars] == [3.0, 0.5]
    assert [bar.get_height() for bar in mean_bars] == [2.0, 0.5]  # Σ|g| / elements
    assert ax.get_title().startswith("gradient flow at step 5")


def test_moved_tensorboard_names_are_importable_from_where_they_were() -> None:
    import lightning_gradflow.gates as gates
    import lightning_gradflow.gates.histograms as gate_histograms
    import lightning_gradflow.stats as stats
    import lightning_gradflow.stats.histogram as stats_histogram

    assert stats.tensorboard_histogram is stats_histogram.tensorboard_histogram is tb.tensorboard_histogram
    assert gates.histogram_raw is gate_histograms.histogram_raw is tb.histogram_raw
    assert gates.gate_histograms is gate_histograms.gate_histograms is tb.gate_histograms
    for name in (
        "tensorboard_loggers",
        "prefixed",
        "add_layout_category",
        "add_histogram",
        "add_figure",
        "add_text",
        "add_interventions",
        "gradient_flow_figure",
    ):
        assert callable(getattr(tb, name)), name


def test_the_reporting_modules_are_pure() -> None:
    for path in sorted((PACKAGE / "reports").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = [n.name for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names]
        imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not [m for m in imported if m.split(".")[0] in ("lightning", "pytorch_lightning")], path.name
        assert "lightning_gradflow.callbacks" not in imported, path.name
