"""TensorBoard extras shared by the callbacks: custom-scalars layouts, raw histograms, figures, intervention text.

Scalars go through every Lightning logger (see the callbacks); what is here is written only on rank zero and only to
attached :class:`~lightning.pytorch.loggers.TensorBoardLogger` instances, through their ``SummaryWriter``.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradflow.interventions import Intervention, interventions_markdown

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

# One merged layout per writer: each callback adds its category, and the whole layout is written again, since
# TensorBoard shows a run's most recent layout.
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[Any]]]] = weakref.WeakKeyDictionary()


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    """The attached TensorBoard loggers, on rank zero only (other ranks write nothing)."""
    if not trainer.is_global_zero:
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def prefixed(logger: TensorBoardLogger, tag: str) -> str:
    """The tag as the logger writes it: with ``TensorBoardLogger(prefix=...)`` Lightning prepends ``prefix-``."""
    prefix = getattr(logger, "_prefix", "")
    return f"{prefix}{logger.LOGGER_JOIN_CHAR}{tag}" if prefix else tag


def add_layout_category(logger: TensorBoardLogger, category: str, charts: dict[str, Sequence[str]]) -> None:
    """Adds (or replaces) a custom-scalars category of multiline charts and writes the merged layout.

    Args:
        logger: the TensorBoard logger to write to.
        category: the category's title (e.g. ``"gradflow"``).
        charts: chart title → tag prefixes; each becomes the regular expression ``^<prefix>`` (escaped), so a
            chart over ``"gradflow/grad_norm/"`` shows every layer as a line.
    """
    writer: SummaryWriter = logger.experiment
    layout = _LAYOUTS.setdefault(writer, {})
    layout[category] = {
        title: ["Multiline", [re.escape(prefixed(logger, tag)) + ".*" for tag in tags]]
        for title, tags in charts.items()
    }
    writer.add_custom_scalars(layout)


def add_histogram(logger: TensorBoardLogger, tag: str, raw: dict[str, Any], step: int) -> None:
    """Writes a histogram made by :func:`~lightning_gradflow.stats.tensorboard_histogram` (skipped when empty)."""
    if raw:
        logger.experiment.add_histogram_raw(prefixed(logger, tag), global_step=step, **raw)


def add_figure(logger: TensorBoardLogger, tag: str, figure: Figure, step: int) -> None:
    """Writes a matplotlib figure as an image and closes it."""
    logger.experiment.add_figure(prefixed(logger, tag), figure, global_step=step, close=True)


def add_text(logger: TensorBoardLogger, tag: str, text: str, step: int) -> None:
    """Writes Markdown text."""
    logger.experiment.add_text(prefixed(logger, tag), text, global_step=step)


def add_interventions(logger: TensorBoardLogger, family: str, records: list[Intervention], step: int) -> None:
    """Writes interventions as a Markdown table under ``<family>/interventions``."""
    add_text(logger, f"{family}/interventions", interventions_markdown(records), step)


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
