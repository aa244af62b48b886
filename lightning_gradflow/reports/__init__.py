"""What each callback reports: metrics dicts, warning and record texts, from numbers already on the host.

Pure (no Lightning import, no device reads, no decisions): the callbacks ask their monitors *what to do* and these
modules *how to say it*, so every logged key and every message is defined once and tested without a Trainer.
TensorBoard's own formatting (layouts, histograms, figures, text) is :mod:`lightning_gradflow.tensorboard`'s.

* :mod:`~lightning_gradflow.reports.flow` — GradientFlowCallback (``gradflow/...``): :func:`~.flow.flow_step_metrics`,
  :func:`~.flow.flow_layer_metrics`, :func:`~.flow.flow_findings`, the clip and non-finite texts, and
  :class:`~.flow.FlowStep` (what a step leaves on the device for its one host transfer);
* :mod:`~lightning_gradflow.reports.gates` — GateSurgeryCallback (``gates/...``): :func:`~.gates.gate_metrics` and
  :class:`~.gates.GateReport` (findings, plans, surgery records, verdict warnings), rollback texts;
* :mod:`~lightning_gradflow.reports.sharpness` — SharpnessCallback (``sharpness/...``):
  :func:`~.sharpness.sharpness_metrics`, :func:`~.sharpness.stability_detail`, the probe and control warnings;
* :mod:`~lightning_gradflow.reports.collapse` — EarlyCollapseCallback (``collapse/...``):
  :func:`~.collapse.collapse_metrics`, :func:`~.collapse.representation_metrics`, :func:`~.collapse.episode_message`.
"""
