"""The Lightning callbacks: thin stateful shells over the pure functions of the package."""

from lightning_gradflow.callbacks.early_collapse import CollapseStopReason, EarlyCollapseCallback
from lightning_gradflow.callbacks.gate_surgery import GateSurgeryCallback
from lightning_gradflow.callbacks.gradient_flow import GradientFlowCallback
from lightning_gradflow.callbacks.sharpness import SharpnessCallback

__all__ = [
    "CollapseStopReason",
    "EarlyCollapseCallback",
    "GateSurgeryCallback",
    "GradientFlowCallback",
    "SharpnessCallback",
]
