"""lightning_gradflow: training-health callbacks for PyTorch Lightning, built on a fused statistics engine."""

from lightning_gradflow.__about__ import __version__
from lightning_gradflow.callbacks import (
    CollapseStopReason,
    EarlyCollapseCallback,
    GateSurgeryCallback,
    GradientFlowCallback,
    SharpnessCallback,
)
from lightning_gradflow.interventions import Intervention

__all__ = [
    "CollapseStopReason",
    "EarlyCollapseCallback",
    "GateSurgeryCallback",
    "GradientFlowCallback",
    "Intervention",
    "SharpnessCallback",
    "__version__",
]
