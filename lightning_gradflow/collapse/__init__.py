"""Collapse detection and recovery, without Lightning: the maths, the risk model and the intervention ladder.

:class:`EarlyCollapseCallback <lightning_gradflow.callbacks.early_collapse.EarlyCollapseCallback>` is the thin
Lightning shell over these; a Fabric or plain PyTorch loop can drive them directly. Where each decision lives:

* :mod:`~lightning_gradflow.collapse.config` — every threshold's default, once (:class:`MonitorConfig`,
  :class:`LadderConfig`) and the documented upper bounds;
* :mod:`~lightning_gradflow.collapse.detectors` — spike detectors (:class:`RobustZScore`, :class:`EmaZScore`), slow
  divergence (:class:`DivergenceDetector`), :func:`ramp`, :func:`spike_score`, :func:`combine_risk`;
* :mod:`~lightning_gradflow.collapse.representations` — dead/dormant units, RankMe, feature std, :class:`FeatureBuffer`;
* :mod:`~lightning_gradflow.collapse.monitor` — :class:`CollapseMonitor`: one step's loss and gradient norm (and the
  latest probe) → a :class:`StepVerdict` (risk, alarm, warning episodes);
* :mod:`~lightning_gradflow.collapse.ladder` — :class:`InterventionLadder`: a verdict → the :class:`Action` s to apply
  (skip → cut LR → roll back → stop), :class:`CollapseStopReason`;
* :mod:`~lightning_gradflow.collapse.snapshots` — copies of everything a rollback restores (:func:`take_snapshot`,
  :func:`restore_snapshot`, :class:`SnapshotRing`).

Example (a plain loop)::

    >>> monitor, ladder = CollapseMonitor(), InterventionLadder()
    >>> verdict = monitor.observe(step=0, loss=2.3, grad_norm=1.1)
    >>> ladder.decide(verdict)
    []
"""

from lightning_gradflow.collapse.config import (
    MAX_RANK_SAMPLE_SIZE,
    MAX_SNAPSHOTS,
    MAX_WINDOW,
    LadderConfig,
    MonitorConfig,
)
from lightning_gradflow.collapse.detectors import (
    MAD_TO_STD,
    DivergenceDetector,
    EmaZScore,
    RobustZScore,
    combine_risk,
    ramp,
    robust_zscore,
    robust_zscore_scale,
    spike_score,
)
from lightning_gradflow.collapse.ladder import Action, CollapseStopReason, InterventionLadder
from lightning_gradflow.collapse.monitor import GRAD_WEIGHT, REPRESENTATION_WEIGHT, CollapseMonitor, StepVerdict
from lightning_gradflow.collapse.representations import (
    FeatureBuffer,
    dead_fraction,
    effective_rank,
    feature_std,
    unit_abs_sums,
    unit_dim,
)
from lightning_gradflow.collapse.snapshots import (
    Snapshot,
    SnapshotRing,
    copy_tree,
    restore_snapshot,
    take_snapshot,
    tree_nbytes,
)

__all__ = [
    "GRAD_WEIGHT",
    "MAD_TO_STD",
    "MAX_RANK_SAMPLE_SIZE",
    "MAX_SNAPSHOTS",
    "MAX_WINDOW",
    "REPRESENTATION_WEIGHT",
    "Action",
    "CollapseMonitor",
    "CollapseStopReason",
    "DivergenceDetector",
    "EmaZScore",
    "FeatureBuffer",
    "InterventionLadder",
    "LadderConfig",
    "MonitorConfig",
    "RobustZScore",
    "Snapshot",
    "SnapshotRing",
    "StepVerdict",
    "combine_risk",
    "copy_tree",
    "dead_fraction",
    "effective_rank",
    "feature_std",
    "ramp",
    "restore_snapshot",
    "robust_zscore",
    "robust_zscore_scale",
    "spike_score",
    "take_snapshot",
    "tree_nbytes",
    "unit_abs_sums",
    "unit_dim",
]
