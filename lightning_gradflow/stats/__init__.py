"""Pure functions over lists of tensors: the fused statistics engine (no Lightning imports).

Three operations share one layout of backends — ``"triton"`` (one fused multi-tensor kernel, CUDA), ``"torch"``
(CPU and the GPU fallback) and ``"reference"`` (float64 loop, the test oracle):

* :func:`tensor_stats` — sum of squares, max ``|x|``, sum, non-finite count, zero count, size, per tensor (dense or
  sparse, real or complex: see :class:`Stat`);
* :func:`update_stats` — ‖p − snapshot‖ and ‖p‖ per tensor, refreshing the snapshot;
* :func:`tensor_histograms` — bucket counts over fixed log-spaced ``|x|`` buckets, for TensorBoard.
* :func:`l1_norms` — ``Σ|x|`` per tensor (the gradient-flow figure's mean ``|g|``).
"""

from lightning_gradflow.stats._common import Backend, Stat, UpdateStat
from lightning_gradflow.stats.histogram import HistogramSpec, TensorHistograms, tensor_histograms, tensorboard_histogram
from lightning_gradflow.stats.tensor_stats import TensorStats, l1_norms, tensor_stats
from lightning_gradflow.stats.update import UpdateStats, make_snapshot, update_stats

__all__ = [
    "Backend",
    "HistogramSpec",
    "Stat",
    "TensorHistograms",
    "TensorStats",
    "UpdateStat",
    "UpdateStats",
    "l1_norms",
    "make_snapshot",
    "tensor_histograms",
    "tensor_stats",
    "tensorboard_histogram",
    "update_stats",
]
