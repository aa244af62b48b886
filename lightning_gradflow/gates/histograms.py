"""Histograms of gate activations, counted on the device, and their TensorBoard ``add_histogram_raw`` form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradflow.gates.discovery import GatedModule, gate_key
from lightning_gradflow.stats import HistogramSpec, tensorboard_histogram


def activation_histograms(act: Tensor, tanh_mask: Sequence[bool], bins: int) -> Tensor:
    """Counts of each gate's activations over ``bins`` equal buckets of ``[0, 1]`` (tanh gates: ``[−1, 1]``).

    ``act`` is ``(gates, positions, units)``; returns ``(gates, bins)`` int64. Buckets are ``[left, right)``, the
    last one closed. Counted with ``torch.bincount``, or, where that is not deterministic (CUDA with
    ``torch.use_deterministic_algorithms(True)``), with a sort and a binary search.
    """
    if act.is_cuda and torch.are_deterministic_algorithms_enabled():
        return _sorted_histograms(act, tanh_mask, bins)
    num_gates = act.shape[0]
    low = torch.tensor([-1.0 if t else 0.0 for t in tanh_mask], dtype=act.dtype, device=act.device).view(-1, 1, 1)
    bucket = ((act - low) / (1 - low) * bins).long().clamp_(0, bins - 1)
    bucket += torch.arange(num_gates, device=act.device).view(-1, 1, 1) * bins
    return torch.bincount(bucket.reshape(-1), minlength=num_gates * bins).view(num_gates, bins)


def _sorted_histograms(act: Tensor, tanh_mask: Sequence[bool], bins: int) -> Tensor:
    num_gates = act.shape[0]
    low = torch.tensor([-1.0 if t else 0.0 for t in tanh_mask], dtype=act.dtype, device=act.device)
    fractions = torch.arange(1, bins, dtype=act.dtype, device=act.device) / bins
    edges = low.unsqueeze(1) + (1 - low).unsqueeze(1) * fractions.unsqueeze(0)  # inner edges, (gates, bins - 1)
    values = act.reshape(num_gates, -1).sort(dim=1).values
    below = torch.searchsorted(values, edges.contiguous(), right=False)
    bounds = torch.cat([torch.zeros_like(below[:, :1]), below, torch.full_like(below[:, :1], values.shape[1])], dim=1)
    return bounds.diff(dim=1)


def histogram_raw(counts: Sequence[int], low: float, high: float) -> dict[str, Any]:
    """Arguments for ``SummaryWriter.add_histogram_raw`` from equal-width bucket counts over ``[low, high]``.

    ``sum`` and ``sum_squares`` are estimated from bucket midpoints. Returns an empty dict when all counts are 0.
    """
    bins = len(counts)
    width = (high - low) / bins
    limits = [low + width * (i + 1) for i in range(bins)]
    mids = [low + width * (i + 0.5) for i in range(bins)]
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return {}
    first, last = nonzero[0], nonzero[-1]
    kept = range(first, last + 1)
    return {
        "min": low + width * first,
        "max": limits[last],
        "num": int(sum(counts)),
        "sum": float(sum(counts[i] * mids[i] for i in kept)),
        "sum_squares": float(sum(counts[i] * mids[i] * mids[i] for i in kept)),
        "bucket_limits": [limits[i] for i in kept],
        "bucket_counts": [int(counts[i]) for i in kept],
    }


def gate_histograms(
    gated: GatedModule, activation_counts: Tensor, preact_counts: Tensor, preact_spec: HistogramSpec
) -> dict[str, dict[str, Any]]:
    """``add_histogram_raw`` arguments of one module's probe by tag: ``activation_hist/<key>``, ``preact_hist/<key>``.

    Args:
        gated: the module.
        activation_counts: ``(rows, gates, bins)`` counts from :func:`activation_histograms` (summed over calls).
        preact_counts: ``(rows · gates, preact_spec.num_bins)`` counts of the pre-activations.
        preact_spec: their bucket layout.
    """
    out = {}
    for row, row_name in enumerate(gated.row_names()):
        for g, gate in enumerate(gated.gates):
            key = gate_key(gated.name, row_name, gate)
            low = -1.0 if gated.tanh_mask[g] else 0.0
            counts = [int(c) for c in activation_counts[row, g].tolist()]
            out[f"activation_hist/{key}"] = histogram_raw(counts, low, 1.0)
            out[f"preact_hist/{key}"] = tensorboard_histogram(
                preact_counts[row * len(gated.gates) + g].long(), preact_spec
            )
    return out
