"""Gradient flow across depth: layer grouping, depth order, flow ratios and the vanishing/exploding rule.

Pure functions over tensors; the callback only feeds them per-layer statistics.

**The rule.** Per layer ``l`` (in depth order, input side first) take the *active* gradient RMS ``a_l``: the RMS over
the finite, nonzero gradient entries. Nonzero, because a sparse gradient (an embedding that saw few tokens, a
masked row) is not a vanishing one; its zero fraction is reported on its own. Relative to the output layer ``L``
(closest to the loss, whose gradient does not pass through any other layer):

* *vanishing* when ``a_l < vanishing_ratio · a_L`` (the gradient shrank by more than that factor on its way back
  through the network, the exponential decay of Pascanu et al. 2013), or ``a_l < min_grad_rms`` (absolute floor),
  or the layer's gradient is all zeros;
* *exploding* when ``a_l > exploding_ratio · a_L`` (growth on the way back) or ``a_l > max_grad_rms``, or the
  gradient has non-finite entries (unless a GradScaler is in charge of them, see the callback).

A layer is *diagnosed* once its condition has held for ``patience`` consecutive optimizer steps, so a single noisy
step never raises an alarm. Everything is evaluated on the device every step; only the result is read, on logging
steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_gradflow.stats import TensorStats

ROOT_LAYER = "root"


def layer_path(module_name: str) -> str:
    """A module's dotted name as a ``/``-separated tag path (``"encoder.layers.0"`` → ``"encoder/layers/0"``)."""
    return module_name.replace(".", "/") if module_name else ROOT_LAYER


def parameter_layers(module: nn.Module, group_by: str = "module") -> dict[str, str]:
    """Maps each trainable parameter's name to its layer: the path of the module that owns it, or its own path.

    A parameter shared by several modules is named once (by its first owner), as ``named_parameters`` does.
    """
    layers = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        owner, _, _ = name.rpartition(".")
        layers[name] = layer_path(name) if group_by == "parameter" else layer_path(owner)
    return layers


def depth_order(ready_order: Iterable[str], layers: Iterable[str]) -> list[str]:
    """Layers in depth order (input side first), from the order their gradients became ready in a backward pass.

    Backward reaches the layers nearest the loss first, so the reversed first-ready order is the depth order, also for
    residual, shared and re-used modules. Layers that never received a gradient go last, in their given order.
    """
    first_seen: list[str] = []
    for layer in ready_order:
        if layer not in first_seen:
            first_seen.append(layer)
    ordered = list(reversed(first_seen))
    return ordered + [layer for layer in layers if layer not in ordered]


def active_rms(stats: TensorStats) -> Tensor:
    """RMS over the finite, nonzero entries (0 when there are none)."""
    active = (stats.finite_count - stats.zeros).clamp(min=1)
    return (stats.sumsq / active).sqrt()


def flow_ratios(rms: Tensor) -> Tensor:
    """Gradient RMS ratio of each layer to the next one in depth order (the last layer's ratio is 1).

    Below 1 the gradient shrinks as it flows back into the layer; above 1 it grows.
    """
    ratios = torch.ones_like(rms)
    ratios[:-1] = rms[:-1] / rms[1:].clamp(min=torch.finfo(rms.dtype).tiny)
    return ratios


def end_to_end_ratio(rms: Tensor) -> Tensor:
    """First layer's gradient RMS over the last layer's (0-dim)."""
    return rms[0] / rms[-1].clamp(min=torch.finfo(rms.dtype).tiny)


@dataclass(frozen=True)
class FlowRule:
    """Thresholds of the vanishing/exploding rule (see the module docstring).

    Args:
        vanishing_ratio: a layer whose active gradient RMS is below this fraction of the output layer's vanishes.
        exploding_ratio: a layer whose active gradient RMS is above this multiple of the output layer's explodes.
        min_grad_rms: absolute floor on the active gradient RMS.
        max_grad_rms: absolute ceiling on the active gradient RMS.
        patience: consecutive optimizer steps a condition must hold before it is diagnosed.
    """

    vanishing_ratio: float = 1e-3
    exploding_ratio: float = 1e3
    min_grad_rms: float = 1e-10
    max_grad_rms: float = 1e2
    patience: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.vanishing_ratio < 1:
            raise ValueError(f"Expected 0 < `vanishing_ratio` < 1, but got {self.vanishing_ratio}.")
        if not self.exploding_ratio > 1:
            raise ValueError(f"Expected `exploding_ratio` > 1, but got {self.exploding_ratio}.")
        if not 0 <= self.min_grad_rms < self.max_grad_rms:
            raise ValueError(
                f"Expected 0 <= `min_grad_rms` < `max_grad_rms`, but got {self.min_grad_rms} and {self.max_grad_rms}."
            )
        if self.patience < 1:
            raise ValueError(f"Expected `patience` >= 1, but got {self.patience}.")

    def conditions(self, stats: TensorStats, count_nonfinite: bool = True) -> tuple[Tensor, Tensor]:
        """This step's ``(vanishing, exploding)`` boolean flags per layer; ``stats`` rows are in depth order.

        Rows with no elements (layers that got no gradient this step) are never flagged; the output layer is the
        last row that has elements. Runs on the device without reading anything back.
        """
        rms = active_rms(stats)
        present = stats.numel > 0
        positions = torch.arange(len(rms), device=rms.device)
        last = torch.where(present, positions, -1).amax().clamp(min=0)
        output = rms[last].clamp(min=torch.finfo(rms.dtype).tiny)
        all_zero = (stats.finite_count > 0) & (stats.zeros >= stats.finite_count)  # not: everything overflowed
        vanishing = (rms < self.vanishing_ratio * output) | (rms < self.min_grad_rms) | all_zero
        exploding = (rms > self.exploding_ratio * output) | (rms > self.max_grad_rms)
        if count_nonfinite:
            exploding = exploding | (stats.nonfinite > 0)
        return vanishing & ~exploding & present, exploding & present


def update_streaks(streaks: Tensor, flags: Tensor) -> Tensor:
    """Consecutive steps each flag has held: ``streak + 1`` where set, 0 where not."""
    return (streaks + 1) * flags.to(streaks.dtype)
