"""lightning_gradflow: training-health callbacks for PyTorch Lightning, built on a fused statistics engine."""

from lightning_gradflow.__about__ import __version__

__all__ = ["__version__"]
