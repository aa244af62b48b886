"""Custom-scalars layouts: each callback's charts (pure definitions) and writing the merged layout.

A chart is a title and the tag prefixes it draws, relative to the callback's family (``"grad_norm/"`` in the
``gradflow`` family draws every ``gradflow/grad_norm/<layer>`` as one line); :func:`family_charts` makes them
absolute and :func:`layout_category` turns them into TensorBoard's ``add_custom_scalars`` form.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_gradflow.tensorboard.loggers import prefixed

if TYPE_CHECKING:
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter

Charts = Mapping[str, Sequence[str]]

#: GradientFlowCallback's charts (tag prefixes relative to ``gradflow/``).
GRADFLOW_CHARTS: dict[str, tuple[str, ...]] = {
    "gradient norm per layer": ("grad_norm/",),
    "gradient RMS per layer": ("grad_rms/",),
    "update/weight ratio per layer": ("update_ratio/",),
    "flow ratio per layer (RMS here / RMS of the next layer)": ("flow_ratio/",),
    "global gradient norm and clipping": ("grad_norm_total", "clip_threshold"),
    "diagnosis": ("vanishing_layers", "exploding_layers", "nonfinite_grads", "overflow_steps"),
}

#: GateSurgeryCallback's charts (relative to ``gates/``).
GATES_CHARTS: dict[str, tuple[str, ...]] = {
    "saturation (fraction of activations)": ("saturation/",),
    "saturated units (fraction of units)": ("saturated_units/",),
    "mean activation": ("mean/",),
    "mean σ′ (gradient through the gate)": ("sigma_prime/",),
    "surgeries": ("surgeries",),
}

#: SharpnessCallback's charts (relative to ``sharpness/``).
SHARPNESS_CHARTS: dict[str, tuple[str, ...]] = {
    "edge of stability: sharpness vs threshold": ("lambda_max", "batch_sharpness", "preconditioned", "threshold"),
    "stability ratio (measured / threshold)": ("stability_ratio",),
    "smallest eigenvalue": ("lambda_min",),
    "trace (± stderr)": ("trace",),
    "SAM sharpness": ("sam",),
    "random-perturbation sharpness": ("random/", "class"),
    "learning-rate factor": ("lr_factor", "interventions"),
}

#: EarlyCollapseCallback's charts (relative to ``collapse/``).
COLLAPSE_CHARTS: dict[str, tuple[str, ...]] = {
    "collapse risk": ("risk",),
    "spike z-scores": ("loss_zscore", "grad_norm_zscore"),
    "divergence (log of smoothed loss over its best)": ("divergence",),
    "dead units (fraction)": ("dead_fraction/",),
    "effective rank (RankMe)": ("effective_rank/",),
    "feature std (L2-normalised)": ("feature_std/",),
    "interventions": ("rollbacks", "lr_scale", "skipped_steps"),
}

# One merged layout per writer: each callback adds its category, and the whole layout is written again, since
# TensorBoard shows a run's most recent layout.
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[Any]]]] = weakref.WeakKeyDictionary()


def family_charts(family: str, charts: Charts) -> dict[str, list[str]]:
    """Charts with their tag prefixes made absolute: ``"<family>/<prefix>"``.

    Example::

        >>> family_charts("gates", {"surgeries": ("surgeries",)})
        {'surgeries': ['gates/surgeries']}
    """
    return {title: [f"{family}/{tag}" for tag in tags] for title, tags in charts.items()}


def layout_category(charts: Charts, tag: Callable[[str], str] = str) -> dict[str, list[Any]]:
    """One custom-scalars category: each chart a ``Multiline`` over the regular expressions ``^<prefix>.*``.

    Args:
        charts: chart title → absolute tag prefixes.
        tag: the tag as the logger writes it (e.g. with its prefix); default: unchanged.

    Example::

        >>> layout_category({"norms": ["gradflow/grad_norm/"]})
        {'norms': ['Multiline', ['gradflow/grad_norm/.*']]}
    """
    return {title: ["Multiline", [re.escape(tag(t)) + ".*" for t in tags]] for title, tags in charts.items()}


def add_layout_category(logger: TensorBoardLogger, category: str, charts: Charts) -> None:
    """Adds (or replaces) a custom-scalars category of multiline charts and writes the merged layout.

    Args:
        logger: the TensorBoard logger to write to.
        category: the category's title (e.g. ``"gradflow"``).
        charts: chart title → tag prefixes; each becomes the regular expression ``^<prefix>`` (escaped), so a
            chart over ``"gradflow/grad_norm/"`` shows every layer as a line.
    """
    writer: SummaryWriter = logger.experiment
    layout = _LAYOUTS.setdefault(writer, {})
    layout[category] = layout_category(charts, lambda tag: prefixed(logger, tag))
    writer.add_custom_scalars(layout)
