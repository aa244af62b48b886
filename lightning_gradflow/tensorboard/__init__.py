"""TensorBoard: every piece of TensorBoard formatting and writing in the package, in one place.

Scalars go through every Lightning logger (see the callbacks); what is here is written only on rank zero and only to
attached :class:`~lightning.pytorch.loggers.TensorBoardLogger` instances, through their ``SummaryWriter``:

* :mod:`~lightning_gradflow.tensorboard.loggers`: which loggers get the extras (:func:`tensorboard_loggers`), and
  tags as they write them (:func:`prefixed`);
* :mod:`~lightning_gradflow.tensorboard.layout`: each callback's custom-scalars charts and the merged layout
  (:func:`add_layout_category`);
* :mod:`~lightning_gradflow.tensorboard.histograms`: ``add_histogram_raw`` arguments from device-made bucket counts
  (:func:`tensorboard_histogram`, :func:`histogram_raw`, :func:`layer_histograms`, :func:`gate_histograms`);
* :mod:`~lightning_gradflow.tensorboard.figures`: the gradient-flow figure (:func:`gradient_flow_figure`);
* :mod:`~lightning_gradflow.tensorboard.text`: Markdown text and the interventions table (:func:`add_interventions`).

Every name is importable from ``lightning_gradflow.tensorboard`` as before the split.
"""

from lightning_gradflow.tensorboard.figures import add_figure, gradient_flow_figure, layer_flow_figure
from lightning_gradflow.tensorboard.histograms import (
    add_histogram,
    gate_histograms,
    histogram_raw,
    layer_histograms,
    tensorboard_histogram,
)
from lightning_gradflow.tensorboard.layout import (
    _LAYOUTS,
    COLLAPSE_CHARTS,
    GATES_CHARTS,
    GRADFLOW_CHARTS,
    SHARPNESS_CHARTS,
    add_layout_category,
    family_charts,
    layout_category,
)
from lightning_gradflow.tensorboard.loggers import prefixed, tensorboard_loggers
from lightning_gradflow.tensorboard.text import add_interventions, add_text

__all__ = [
    "COLLAPSE_CHARTS",
    "GATES_CHARTS",
    "GRADFLOW_CHARTS",
    "SHARPNESS_CHARTS",
    "_LAYOUTS",
    "add_figure",
    "add_histogram",
    "add_interventions",
    "add_layout_category",
    "add_text",
    "family_charts",
    "gate_histograms",
    "gradient_flow_figure",
    "histogram_raw",
    "layer_flow_figure",
    "layer_histograms",
    "layout_category",
    "prefixed",
    "tensorboard_histogram",
    "tensorboard_loggers",
]
