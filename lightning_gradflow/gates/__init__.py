r"""Gates of recurrent networks: find them, recompute their activations on a probe, measure saturation, repair them.

Pure functions and state machines over modules and tensors (no Lightning imports);
:class:`~lightning_gradflow.GateSurgeryCallback` is the thin Lightning shell around them. One module per concept:

* :mod:`~lightning_gradflow.gates.discovery`: which modules have gates (:func:`find_gated_modules`), their gate
  order and parameters;
* :mod:`~lightning_gradflow.gates.capture`: what a probe keeps of one forward call (:func:`capture_call`);
* :mod:`~lightning_gradflow.gates.recompute`: the gates' pre-activations for all time steps from a capture
  (:func:`recompute_gates`);
* :mod:`~lightning_gradflow.gates.stats`: saturation, mean, σ′ and weight spread per unit (:class:`GateStats`,
  :func:`measure_gates`), and the definition of a saturated gate;
* :mod:`~lightning_gradflow.gates.histograms`: activation histograms and their TensorBoard form;
* :mod:`~lightning_gradflow.gates.diagnosis`: when a gate is diagnosed and which units a surgery may touch
  (:class:`GateDiagnosis`: patience, cooldown, the surgery budget, rollbacks);
* :mod:`~lightning_gradflow.gates.surgery`: the surgery on weights and optimizer state (:func:`repair_gate_units_`,
  :func:`reset_optimizer_rows_`).

Every name is importable from ``lightning_gradflow.gates`` as before the split.
"""

from lightning_gradflow.gates.capture import GateCapture, capture_call
from lightning_gradflow.gates.diagnosis import (
    GateDecision,
    GateDiagnosis,
    GateObservation,
    GateVerdict,
    gate_observations,
)
from lightning_gradflow.gates.discovery import (
    ALL_GATES,
    EXTRA_GATE_KINDS,
    GRU_GATES,
    LSTM_GATES,
    MEMORY_GATES,
    SIGMOID_GATES,
    TANH_GATES,
    GatedModule,
    GateFamily,
    find_gated_modules,
    gate_key,
    layer_parameters,
)
from lightning_gradflow.gates.histograms import (
    _sorted_histograms,
    activation_histograms,
    gate_histograms,
    histogram_raw,
)
from lightning_gradflow.gates.recompute import LayerGates, compute_dtype, recompute_gates
from lightning_gradflow.gates.stats import (
    EPSILON_MIN,
    NUM_GATE_STATS,
    GateMeasurement,
    GateStat,
    GateStats,
    empty_stats,
    gate_activations,
    gate_counts,
    gate_scalars,
    measure_gates,
    saturation_margins,
)
from lightning_gradflow.gates.surgery import (
    FORGET_BIAS_LIMIT,
    TouchedRows,
    healthy_bias,
    repair_gate_units_,
    reset_optimizer_rows_,
    row_scales,
)

__all__ = [
    "ALL_GATES",
    "EPSILON_MIN",
    "EXTRA_GATE_KINDS",
    "FORGET_BIAS_LIMIT",
    "GRU_GATES",
    "LSTM_GATES",
    "MEMORY_GATES",
    "NUM_GATE_STATS",
    "SIGMOID_GATES",
    "TANH_GATES",
    "GateCapture",
    "GateDecision",
    "GateDiagnosis",
    "GateFamily",
    "GateMeasurement",
    "GateObservation",
    "GateStat",
    "GateStats",
    "GateVerdict",
    "GatedModule",
    "LayerGates",
    "TouchedRows",
    "_sorted_histograms",
    "activation_histograms",
    "capture_call",
    "compute_dtype",
    "empty_stats",
    "find_gated_modules",
    "gate_activations",
    "gate_counts",
    "gate_histograms",
    "gate_key",
    "gate_observations",
    "gate_scalars",
    "healthy_bias",
    "histogram_raw",
    "layer_parameters",
    "measure_gates",
    "recompute_gates",
    "repair_gate_units_",
    "reset_optimizer_rows_",
    "row_scales",
    "saturation_margins",
]
