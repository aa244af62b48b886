"""What GradientFlowCallback reports: its metrics from a logging step's host statistics, and its warning texts.

Pure: dicts and strings from tensors already on the host and from floats; nothing here reads the device, decides
anything or imports Lightning. The decisions (the vanishing/exploding rule, the logging window) are
:mod:`lightning_gradflow.flow`'s; the clipping is :mod:`lightning_gradflow.clipping`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from lightning_gradflow.flow import LogWindow, active_rms

if TYPE_CHECKING:
    from lightning_gradflow.stats import TensorHistograms, TensorStats

FAMILY = "gradflow"

#: The fixes a vanishing / an exploding diagnosis suggests.
VANISHING_FIX = (
    "residual connections, normalisation layers (LayerNorm/BatchNorm), ReLU-family activations instead of"
    " sigmoid/tanh, or a variance-preserving initialisation (Kaiming/orthogonal)"
)
EXPLODING_FIX = (
    "gradient clipping (GradientFlowCallback(auto_intervene=True) clips adaptively), a lower learning rate,"
    " normalisation layers, or smaller recurrent/initial weights"
)


@dataclass
class FlowStep:
    """What one optimizer step left on the device for its report (no host copies yet), and their packing.

    :meth:`device_parts` names every tensor the report reads, for the one device-to-host transfer of a logging step
    (:func:`~lightning_gradflow.callbacks._base.to_host`).
    """

    step: int
    log: bool
    histogram: bool
    figure: bool
    params: list[Tensor]
    layer_stats: TensorStats
    total_norm: Tensor
    threshold: Tensor | None = None
    coef: Tensor | None = None
    histograms: TensorHistograms | None = None
    abs_sums: Tensor | None = None
    skipped: bool = False
    snapshotted: bool = False
    tensor_zeros: Tensor | None = None  # per-gradient zero counts of a reporting step
    # the logging window closed at this step (see LogWindow.close): counts, first non-finite step, steps
    window: tuple[Tensor, Tensor, int] | None = None

    def device_parts(
        self, weights: tuple[str, Tensor], streaks: Tensor | None, window: tuple[Tensor, Tensor, int] | None
    ) -> dict[str, Tensor]:
        """The report's tensors by name, on the device.

        Args:
            weights: ``("updates", per-layer UpdateStats table)`` or ``("weights", per-layer TensorStats table)``.
            streaks: the flow monitor's streaks, if any.
            window: the logging window to report, if any.
        """
        device = self.total_norm.device
        parts: dict[str, Tensor] = {"layers": self.layer_stats.table, weights[0]: weights[1]}
        if streaks is not None:
            parts["streaks"] = streaks
        if window is not None:
            parts["window"], parts["first_nonfinite"] = window[0], window[1]
        threshold = torch.zeros((), device=device) if self.threshold is None else self.threshold
        coef = torch.ones((), device=device) if self.coef is None else self.coef
        parts["scalars"] = torch.stack([t.float().reshape(()) for t in (self.total_norm, threshold, coef)])
        if self.histograms is not None:
            parts["histograms"] = self.histograms.counts
        if self.tensor_zeros is not None:
            parts["tensor_zeros"] = self.tensor_zeros
        if self.abs_sums is not None:
            parts["abs_sums"] = self.abs_sums
        return parts


NO_LOGGER_MESSAGE = (
    "no logger to write to: diagnoses, warnings and interventions still work, but attach a logger"
    " (e.g. `Trainer(logger=TensorBoardLogger('runs'))`) to see the per-layer statistics."
)


def present_layers(grads: TensorStats) -> list[int]:
    """The rows of a per-layer table that hold gradient values this step (element count > 0)."""
    return [i for i in range(len(grads)) if float(grads.numel[i]) > 0]


def flow_step_metrics(
    scalars: Sequence[float],
    window: Sequence[float],
    num_vanishing: int,
    num_exploding: int,
    skipped_steps: int,
    interventions: int,
    clip_mode: str | None,
) -> dict[str, float]:
    """The whole-model metrics of one logging step, by key (see :class:`~lightning_gradflow.GradientFlowCallback`).

    Args:
        scalars: the global gradient norm, the clip threshold and the clip coefficient.
        window: the closed :class:`~lightning_gradflow.flow.LogWindow`'s counts.
        num_vanishing: layers diagnosed vanishing.
        num_exploding: layers diagnosed exploding.
        skipped_steps: steps skipped in this fit.
        interventions: intervention records so far.
        clip_mode: the clipping mode when clipping is on (``auto_intervene``), else None: ``clip_threshold`` and
            ``clip_coef`` are logged (``"agc"``: only ``clip_coef``, the fraction of units left unclipped).

    Example::

        >>> m = flow_step_metrics([3.0, 2.0, 0.5], [0.0, 0.0, 1.0, 3.0, 2.0], 0, 1, 0, 1, clip_mode="zscore")
        >>> m["gradflow/grad_norm_total"], m["gradflow/exploding_layers"], m["gradflow/clip_coef"]
        (3.0, 1.0, 0.5)
        >>> "gradflow/clip_threshold" in flow_step_metrics([3.0, 0.0, 1.0], [0.0] * 5, 0, 0, 0, 0, clip_mode="agc")
        False
    """
    total_norm, threshold, coef = scalars
    metrics = {
        f"{FAMILY}/grad_norm_total": total_norm,
        f"{FAMILY}/vanishing_layers": float(num_vanishing),
        f"{FAMILY}/exploding_layers": float(num_exploding),
        f"{FAMILY}/nonfinite_grads": window[LogWindow.NONFINITE],
        f"{FAMILY}/overflow_steps": window[LogWindow.OVERFLOW],
        f"{FAMILY}/skipped_steps": float(skipped_steps),
        f"{FAMILY}/interventions": float(interventions),
    }
    if clip_mode is not None and clip_mode != "agc":
        metrics[f"{FAMILY}/clip_threshold"] = threshold
        metrics[f"{FAMILY}/clip_coef"] = coef
    elif clip_mode is not None:
        metrics[f"{FAMILY}/clip_coef"] = coef  # the fraction of units left unclipped
    return metrics


def flow_layer_metrics(
    layers: Sequence[str],
    grads: TensorStats,
    present: Sequence[int],
    weight_norm: Tensor,
    update_ratio: Tensor | None,
    flow: Tensor,
) -> dict[str, float]:
    """The per-layer metrics of one logging step, by key ``gradflow/<metric>/<layer>``.

    Args:
        layers: the layer names, by row, in depth order.
        grads: the per-layer gradient statistics (host).
        present: the rows with gradients this step (:func:`present_layers`).
        weight_norm: ‖w‖ per row.
        update_ratio: ‖Δw‖/‖w‖ per row, or None when the step kept no snapshot.
        flow: the flow ratio of each present row, in the order of ``present``
            (:func:`~lightning_gradflow.flow.flow_ratios`).

    Example::

        >>> import torch
        >>> from lightning_gradflow.flow import flow_ratios
        >>> from lightning_gradflow.stats import tensor_stats
        >>> grads = tensor_stats([torch.full((4,), 0.5), torch.full((2,), 2.0)])
        >>> m = flow_layer_metrics(["embed", "head"], grads, [0, 1], torch.ones(2), None, flow_ratios(grads.rms))
        >>> m["gradflow/grad_norm/head"], m["gradflow/flow_ratio/embed"], "gradflow/update_ratio/head" in m
        (2.8284270763397217, 0.25, False)
    """
    metrics = {}
    norm, rms, absmax, zero_fraction = grads.norm, grads.rms, grads.absmax, grads.zero_fraction
    for k, i in enumerate(present):
        layer = layers[i]
        metrics[f"{FAMILY}/grad_norm/{layer}"] = float(norm[i])
        metrics[f"{FAMILY}/grad_rms/{layer}"] = float(rms[i])
        if math.isfinite(float(absmax[i])):  # a final partial window may come from a norms-only step
            metrics[f"{FAMILY}/grad_absmax/{layer}"] = float(absmax[i])
        metrics[f"{FAMILY}/zero_fraction/{layer}"] = float(zero_fraction[i])
        metrics[f"{FAMILY}/weight_norm/{layer}"] = float(weight_norm[i])
        metrics[f"{FAMILY}/flow_ratio/{layer}"] = float(flow[k])
        if update_ratio is not None:
            metrics[f"{FAMILY}/update_ratio/{layer}"] = float(update_ratio[i])
    return metrics


class FlowFinding(NamedTuple):
    """One new vanishing/exploding diagnosis: what to warn, and the layer's active gradient RMS."""

    kind: str  # "vanishing" or "exploding"
    layer: str
    rms: float
    message: str

    @property
    def key(self) -> str:
        """The warn-once key: ``"<kind>:<layer>"``."""
        return f"{self.kind}:{self.layer}"


def flow_findings(
    layers: Sequence[str],
    grads: TensorStats,
    vanishing: Sequence[int],
    exploding: Sequence[int],
    step: int,
    patience: int,
) -> list[FlowFinding]:
    """The warnings of the layers diagnosed at ``step``, each with its measurement and the suggested fix.

    Args:
        layers: the layer names, by row, in depth order.
        grads: the per-layer gradient statistics (host).
        vanishing: rows diagnosed vanishing.
        exploding: rows diagnosed exploding.
        step: the optimizer step.
        patience: the rule's patience (for the text).

    Example::

        >>> import torch
        >>> from lightning_gradflow.stats import tensor_stats
        >>> grads = tensor_stats([torch.full((4,), 1e-9), torch.ones(2)])
        >>> (finding,) = flow_findings(["embed", "head"], grads, vanishing=[0], exploding=[], step=7, patience=3)
        >>> finding.key, finding.message.split(":")[0]
        ('vanishing:embed', "vanishing gradients in layer 'embed' at step 7")
    """
    if not vanishing and not exploding:
        return []
    rms = active_rms(grads)
    last = max(present_layers(grads))
    output = float(rms[last])
    found = []
    for kind, rows, fix in [("vanishing", vanishing, VANISHING_FIX), ("exploding", exploding, EXPLODING_FIX)]:
        for i in rows:
            value = float(rms[i])
            bad = int(grads.nonfinite[i])
            if bad:
                measured = f"{bad} non-finite gradient values"
            else:
                relative = f", {value / output:.2g}× the output layer's" if output > 0 and i != last else ""
                measured = f"active gradient RMS {value:.3g}{relative}"
            message = (
                f"{kind} gradients in layer '{layers[i]}' at step {step}: {measured}, for {patience}+ consecutive"
                f" steps. Suggested fix: {fix}."
            )
            found.append(FlowFinding(kind, layers[i], value, message))
    return found


def would_clip_reason(clip_mode: str) -> str:
    """The reason of the ``applied=False`` clip record of an exploding diagnosis in a monitoring-only run."""
    return f"exploding gradients; would clip with clip_mode={clip_mode!r}"


def clip_record(
    clip_mode: str, clipped: float, steps: int, worst_before: float, worst_after: float
) -> tuple[str, float, float]:
    """``(reason, before, after)`` of the one clip record of a logging window that clipped ``clipped`` steps.

    Example::

        >>> clip_record("zscore", 2.0, 10, 9.5, 3.0)
        ('2 of the last 10 steps had a global gradient norm above the zscore threshold; the largest is shown', 9.5, 3.0)
        >>> clip_record("agc", 4.0, 10, 0.0, 0.0)[0]
        'AGC clipped units on 4 of the last 10 steps'
    """
    if clip_mode == "agc":
        return f"AGC clipped units on {int(clipped)} of the last {steps} steps", math.nan, math.nan
    reason = (
        f"{int(clipped)} of the last {steps} steps had a global gradient norm above the {clip_mode} threshold;"
        " the largest is shown"
    )
    return reason, worst_before, worst_after


def nonfinite_message(count: float, first_step: int, step: int) -> str:
    """The warning of non-finite gradient values seen from ``first_step`` in a monitoring-only run.

    Example::

        >>> nonfinite_message(3.0, 5, 9).split(".")[0]
        '3 non-finite gradient values from step 5 (counted up to step 9)'
    """
    return (
        f"{int(count)} non-finite gradient values from step {first_step} (counted up to step {step}). With"
        " `auto_intervene=True` such steps are skipped before they reach the weights."
    )
