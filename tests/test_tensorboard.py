"""The TensorBoard helpers (``lightning_gradflow.tensorboard``): tag prefixes, custom-scalars layout, figures,
text and raw histograms written through Lightning's TensorBoardLogger, and nothing off rank zero."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradflow import tensorboard as tb


def _events(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"tensors": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_tensorboard_helpers_write_everything(tmp_path: Path) -> None:
    trainer = pl.Trainer(logger=[TensorBoardLogger(tmp_path, prefix="run"), CSVLogger(tmp_path)], max_steps=1)
    loggers = tb.tensorboard_loggers(trainer)
    assert len(loggers) == 1  # the CSV logger gets scalars only
    logger = loggers[0]
    assert tb.prefixed(logger, "gradflow/x") == "run-gradflow/x"
    tb.add_layout_category(logger, "gradflow", {"norms": ["gradflow/grad_norm/"]})
    tb.add_layout_category(logger, "gates", {"saturation": ["gates/saturation/"]})
    fig = tb.gradient_flow_figure(["a", "b", "c"], [1e-3, 0.0, 1.0], [1e-2, 0.0, 3.0], [False, True, False], [0, 0, 1])
    tb.add_figure(logger, "gradflow/flow", fig, step=3)
    tb.add_text(logger, "gradflow/interventions", "| a |", step=3)
    raw = {
        "min": -1.0,
        "max": 1.0,
        "num": 2,
        "sum": 0.0,
        "sum_squares": 2.0,
        "bucket_limits": [-1.0, 1.0],
        "bucket_counts": [1, 1],
    }
    tb.add_histogram(logger, "gradflow/grad_hist/a", raw, step=3)
    tb.add_histogram(logger, "gradflow/grad_hist/empty", {}, step=3)
    logger.experiment.flush()
    acc = _events(Path(logger.log_dir))
    tags = acc.Tags()
    assert "run-gradflow/flow" in tags["images"]
    assert "run-gradflow/grad_hist/a" in tags["histograms"] and "run-gradflow/grad_hist/empty" not in tags["histograms"]
    assert "run-gradflow/interventions/text_summary" in tags["tensors"]
    from tensorboard.plugins.custom_scalar import layout_pb2

    layouts = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(layouts[-1].tensor_proto.string_val[0])
    titles = {c.title: [ch.multiline.tag for ch in c.chart] for c in layout.category}
    assert titles == {"gradflow": [["run\\-gradflow/grad_norm/.*"]], "gates": [["run\\-gates/saturation/.*"]]}


def test_no_tensorboard_extras_off_rank_zero(monkeypatch: object, tmp_path: Path) -> None:
    trainer = pl.Trainer(logger=TensorBoardLogger(tmp_path), max_steps=1)
    monkeypatch.setattr(type(trainer), "is_global_zero", property(lambda self: False))  # type: ignore[attr-defined]
    assert tb.tensorboard_loggers(trainer) == []


def test_figure_marks_layers() -> None:
    fig = tb.gradient_flow_figure(["x", "y"], [1.0, 1e-9], [2.0, 1e-8], [False, True], [True, False])
    labels = fig.axes[0].get_xticklabels()
    assert [label.get_text() for label in labels] == ["x", "y"]
    assert labels[0].get_color() == "#cb181d" and labels[1].get_color() == "#2171b5"
    assert torch.tensor(1.0) is not None
