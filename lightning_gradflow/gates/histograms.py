"""Histograms of gate activations, counted on the device.

Their TensorBoard ``add_histogram_raw`` form (:func:`histogram_raw`, :func:`gate_histograms`) lives with the rest of the
TensorBoard formatting in :mod:`lightning_gradflow.tensorboard.histograms` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gradflow.tensorboard.histograms import gate_histograms, histogram_raw

__all__ = ["_sorted_histograms", "activation_histograms", "gate_histograms", "histogram_raw"]


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
