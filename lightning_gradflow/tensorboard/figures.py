"""Figures for TensorBoard's image dashboard (matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from lightning_gradflow.tensorboard.loggers import prefixed

if TYPE_CHECKING:
    from lightning.pytorch.loggers import TensorBoardLogger
    from matplotlib.figure import Figure
    from torch import Tensor

    from lightning_gradflow.stats import TensorStats


def gradient_flow_figure(
    layers: Sequence[str],
    mean_abs: Sequence[float],
    max_abs: Sequence[float],
    vanishing: Sequence[bool],
    exploding: Sequence[bool],
    title: str = "gradient flow",
) -> Figure:
    """The classic gradient-flow chart: mean and max |grad| per layer in depth order, on a log scale.

    Vanishing layers are marked blue and exploding ones red on the axis.

    Args:
        layers: layer names, input side first.
        mean_abs: mean |grad| per layer.
        max_abs: max |grad| per layer.
        vanishing: per layer, whether it is diagnosed vanishing.
        exploding: per layer, whether it is diagnosed exploding.
        title: the axes title.
    """
    from matplotlib.figure import Figure

    n = len(layers)
    fig = Figure(figsize=(max(6.0, 0.35 * n + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    xs = range(n)
    floor = 1e-30
    ax.bar(xs, [max(v, floor) for v in max_abs], color="#9ecae1", label="max |grad|")
    ax.bar(xs, [max(v, floor) for v in mean_abs], color="#08519c", width=0.5, label="mean |grad|")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), list(layers), rotation=90, fontsize=7)
    for tick, v, e in zip(ax.get_xticklabels(), vanishing, exploding, strict=True):
        if e:
            tick.set_color("#cb181d")
        elif v:
            tick.set_color("#2171b5")
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("|grad|")
    ax.set_title(title + "  (labels: blue = vanishing, red = exploding)")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def layer_flow_figure(
    layers: Sequence[str],
    present: Sequence[int],
    abs_sums: Tensor,
    stats: TensorStats,
    vanishing: Collection[int],
    exploding: Collection[int],
    step: int,
) -> Figure:
    """:func:`gradient_flow_figure` of one step from per-layer host statistics.

    Args:
        layers: the layer names, by row (depth order).
        present: the rows to draw (layers with gradients this step).
        abs_sums: ``Σ|g|`` per row; divided by the row's element count for the mean ``|g|``.
        stats: the rows' gradient statistics (element counts, max ``|g|``).
        vanishing: rows diagnosed vanishing.
        exploding: rows diagnosed exploding.
        step: the optimizer step, for the title.
    """
    numel, absmax = stats.numel, stats.absmax
    return gradient_flow_figure(
        [layers[i] for i in present],
        [float(abs_sums[i] / max(float(numel[i]), 1.0)) for i in present],
        [float(absmax[i]) for i in present],
        [i in vanishing for i in present],
        [i in exploding for i in present],
        title=f"gradient flow at step {step}",
    )


def add_figure(logger: TensorBoardLogger, tag: str, figure: Figure, step: int) -> None:
    """Writes a matplotlib figure as an image and closes it."""
    logger.experiment.add_figure(prefixed(logger, tag), figure, global_step=step, close=True)
