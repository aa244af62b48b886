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

**State machines** (``state_dict``/``load_state_dict`` with validation, device copies for rollbacks, no Lightning):
:class:`FlowMonitor` keeps the rule's per-layer streaks, :class:`LogWindow` what one logging interval saw (non-finite
values, overflow and clipped steps, the worst clip, the first non-finite step). Flow ratios share one zero rule,
:func:`rms_ratio`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradflow.checks import check_float, check_int
from lightning_gradflow.stats import TensorStats

ROOT_LAYER = "root"
#: Upper bound of ``patience``: streaks are counted in float32 on the device, exact up to 2**24 steps.
MAX_PATIENCE = 2**24


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


def rms_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` of gradient RMS values, and 0 where the denominator is 0.

    The one zero rule of every flow ratio: a layer whose gradient is all zeros passes no gradient on, so there is no
    flow to compare with (0, not a huge or infinite ratio).

    Example::

        >>> rms_ratio(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.0])).tolist()
        [0.25, 0.0]
    """
    return torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator, 1), 0)


def flow_ratios(rms: Tensor) -> Tensor:
    """Gradient RMS ratio of each layer to the next one in depth order (the last layer's ratio is 1).

    Below 1 the gradient shrinks as it flows back into the layer; above 1 it grows. 0 where the next layer's RMS is 0
    (see :func:`rms_ratio`).
    """
    ratios = torch.ones_like(rms)
    ratios[:-1] = rms_ratio(rms[:-1], rms[1:])
    return ratios


def end_to_end_ratio(rms: Tensor) -> Tensor:
    """First layer's gradient RMS over the last layer's (0-dim); 0 when the last layer's is 0 (:func:`rms_ratio`)."""
    return rms_ratio(rms[0], rms[-1])


@dataclass(frozen=True)
class FlowRule:
    """Thresholds of the vanishing/exploding rule (see the module docstring).

    Each default is declared, and validated, here only; the callback takes the same names as flat arguments.

    Args:
        vanishing_ratio: a layer whose active gradient RMS is below this fraction of the output layer's vanishes;
            in (0, 1).
        exploding_ratio: a layer whose active gradient RMS is above this multiple of the output layer's explodes;
            any finite number > 1 (a huge one turns the relative test off).
        min_grad_rms: absolute floor on the active gradient RMS, finite, >= 0.
        max_grad_rms: absolute ceiling on the active gradient RMS, finite, > ``min_grad_rms``.
        patience: consecutive optimizer steps a condition must hold before it is diagnosed, from 1 to
            :data:`MAX_PATIENCE`.

    Raises:
        TypeError: for a value of the wrong type.
        ValueError: for a value out of its bounds.

    Example::

        >>> FlowRule(exploding_ratio=10**30).exploding_ratio
        1e+30
        >>> FlowRule(patience=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected `patience` ..., but got 0.
    """

    vanishing_ratio: float = 1e-5  # 1e-3 flagged the query/key projections of healthy attention at init (zoo)
    exploding_ratio: float = 1e3
    min_grad_rms: float = 1e-10
    max_grad_rms: float = 1e2
    patience: int = 20

    def __post_init__(self) -> None:
        numbers = {
            "vanishing_ratio": check_float("vanishing_ratio", self.vanishing_ratio, 0.0, 1.0),
            "exploding_ratio": check_float("exploding_ratio", self.exploding_ratio, 1.0),
            "min_grad_rms": check_float("min_grad_rms", self.min_grad_rms, closed_low=True),
            "max_grad_rms": check_float("max_grad_rms", self.max_grad_rms),
        }
        for name, number in numbers.items():  # stored as floats: a huge int never reaches a tensor operation
            object.__setattr__(self, name, number)
        check_int("patience", self.patience, high=MAX_PATIENCE)
        if not self.min_grad_rms < self.max_grad_rms:
            raise ValueError(
                f"Expected `min_grad_rms` < `max_grad_rms`, but got {self.min_grad_rms} and {self.max_grad_rms}."
            )

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


class FlowMonitor:
    """The rule's per-layer streaks, advanced on the device every optimizer step and read on logging steps.

    A layer is diagnosed once its condition has held for ``rule.patience`` consecutive steps. Steps marked
    ``frozen`` (a GradScaler overflow: the scaler skips them, their gradients say nothing) leave the streaks as they
    are. Nothing here reads a value back to the host.

    Args:
        rule: the thresholds.

    Example::

        >>> monitor = FlowMonitor(FlowRule(patience=2))
        >>> stats = TensorStats(torch.tensor([[0.0, 0.0, 0.0, 0.0, 4.0, 4.0], [4.0, 1.0, 4.0, 0.0, 0.0, 4.0]]))
        >>> for _ in range(2):
        ...     monitor.update(stats)
        >>> monitor.diagnosed(monitor.streaks, present=[0, 1])  # layer 0 is all zeros: vanishing
        ([0], [])
    """

    def __init__(self, rule: FlowRule) -> None:
        self.rule = rule
        self.streaks: Tensor | None = None  # (2, num_layers): vanishing, exploding

    def reset(self) -> None:
        """Forgets every streak (a new fit, or a new layer layout)."""
        self.streaks = None

    def update(self, layer_stats: TensorStats, count_nonfinite: bool = True, frozen: Tensor | None = None) -> None:
        """Advances the streaks with this step's per-layer statistics (rows in depth order)."""
        vanishing, exploding = self.rule.conditions(layer_stats, count_nonfinite=count_nonfinite)
        if self.streaks is None or self.streaks.shape[1] != len(layer_stats):
            self.streaks = torch.zeros((2, len(layer_stats)), device=layer_stats.table.device)
        advanced = update_streaks(self.streaks, torch.stack([vanishing, exploding]))
        self.streaks = advanced if frozen is None else torch.where(frozen, self.streaks, advanced)

    def diagnosed(self, streaks: Tensor, present: list[int]) -> tuple[list[int], list[int]]:
        """The ``(vanishing, exploding)`` layers among ``present`` in host copies of the streaks."""
        vanishing = [i for i in present if streaks[0, i] >= self.rule.patience]
        exploding = [i for i in present if streaks[1, i] >= self.rule.patience]
        return vanishing, exploding

    def to(self, device: torch.device) -> None:
        """Moves the streaks to ``device``."""
        if self.streaks is not None:
            self.streaks = self.streaks.to(device)

    def state_dict(self) -> list[list[float]] | None:
        """The streaks as nested lists (read at checkpoint time only)."""
        return None if self.streaks is None else self.streaks.cpu().tolist()

    def load_state_dict(self, state: list[list[float]] | None, num_layers: int) -> None:
        """Restores :meth:`state_dict` output for ``num_layers`` layers.

        Raises:
            ValueError: for streaks of another shape, or negative or non-finite ones.
        """
        if state is None:
            self.streaks = None
            return
        streaks = torch.tensor(state, dtype=torch.float32)
        if tuple(streaks.shape) != (2, num_layers) or not bool((torch.isfinite(streaks) & (streaks >= 0)).all()):
            raise ValueError(f"flow streaks must be 2 × {num_layers} counts >= 0, got {state!r:.200}")
        self.streaks = streaks

    def rollback_state(self) -> Tensor | None:
        """A device copy of the streaks (no host sync)."""
        return None if self.streaks is None else self.streaks.clone()

    def restore_rollback_state(self, state: Tensor | None) -> None:
        """Returns to the streaks of :meth:`rollback_state`."""
        self.streaks = None if state is None else state.clone()


class LogWindow:
    """What happened since the last log, counted on the device: the record of one logging interval.

    The window holds the non-finite gradient values, the GradScaler overflow steps, the clipped steps, the largest
    clipped global norm and what it was clipped to, and the first step that had a non-finite value (so a finding is
    recorded at the step it happened, not at the step it was logged). :meth:`close` hands the counts over and starts
    a new window. Nothing here reads a value back to the host.

    Example::

        >>> window = LogWindow()
        >>> window.observe(3, nonfinite=torch.tensor(2.0), overflow=torch.tensor(False))
        >>> window.observe(4, nonfinite=torch.tensor(5.0), overflow=torch.tensor(False))
        >>> counts, first, steps = window.close()
        >>> counts.tolist()[:3], int(first), steps
        ([7.0, 0.0, 0.0], 3, 2)
    """

    #: Positions in :attr:`counts`.
    NONFINITE, OVERFLOW, CLIPPED, WORST_BEFORE, WORST_AFTER = range(5)

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.counts = torch.zeros(5, device=device)
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)
        self.steps = 0  # host counter: steps observed in the window

    def reset(self, device: torch.device | str | None = None) -> None:
        """Starts a new window (made afresh, never shared with a closed one)."""
        device = self.counts.device if device is None else device
        self.counts = torch.zeros(5, device=device)
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)
        self.steps = 0

    def to(self, device: torch.device) -> None:
        """Moves the counts to ``device``."""
        self.counts = self.counts.to(device)
        self.first_nonfinite = self.first_nonfinite.to(device)

    def observe(self, step: int, nonfinite: Tensor, overflow: Tensor) -> None:
        """Counts one optimizer step: its non-finite gradient values and whether it was a GradScaler overflow."""
        self.counts[self.NONFINITE] += nonfinite.to(self.counts.dtype)
        self.counts[self.OVERFLOW] += overflow.to(self.counts.dtype)
        first = (nonfinite > 0) & (self.first_nonfinite < 0)
        self.first_nonfinite = torch.where(first, step, self.first_nonfinite)
        self.steps += 1

    def clipped(self, norm: Tensor, threshold: Tensor, coef: Tensor) -> None:
        """Counts a global-norm clip of ``norm`` above ``threshold`` (scaled by ``coef``), keeping the largest."""
        clipped = torch.isfinite(norm) & (norm > threshold)
        self.counts[self.CLIPPED] += clipped.to(self.counts.dtype)
        worse = clipped & (norm > self.counts[self.WORST_BEFORE])
        worst = torch.stack([norm, norm * coef]).to(self.counts.dtype)
        self.counts[self.WORST_BEFORE :] = torch.where(worse, worst, self.counts[self.WORST_BEFORE :])

    def units_clipped(self, clipped: Tensor) -> None:
        """Counts a step on which unit-wise clipping (AGC) clipped some units (``clipped``: a bool tensor)."""
        self.counts[self.CLIPPED] += clipped.to(self.counts.dtype)

    def close(self) -> tuple[Tensor, Tensor, int]:
        """``(counts, first non-finite step or -1, steps)`` of this window; a new window starts."""
        closed = (self.counts, self.first_nonfinite, self.steps)
        self.reset()
        return closed

    def state_dict(self) -> dict[str, Any]:
        """Host copies of the counts (read at checkpoint time only)."""
        counts = self.counts.cpu().tolist()
        return {
            "nonfinite": counts[self.NONFINITE],
            "overflow": counts[self.OVERFLOW],
            "clipped": counts[self.CLIPPED],
            "worst": counts[self.WORST_BEFORE :],
            "steps": self.steps,
            "first_nonfinite": int(self.first_nonfinite),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output (windows saved before ``first_nonfinite`` existed load too).

        Raises:
            ValueError: for negative or non-finite counts.
        """
        worst = [float(v) for v in state["worst"]]
        counts = [float(state["nonfinite"]), float(state["overflow"]), float(state["clipped"]), *worst]
        steps, first = state["steps"], state.get("first_nonfinite", -1)
        valid = len(counts) == 5 and all(math.isfinite(v) and v >= 0 for v in counts)
        if not valid or not isinstance(steps, int) or steps < 0 or not isinstance(first, int) or first < -1:
            raise ValueError(f"logging window must hold finite counts >= 0, got {state!r:.200}")
        self.counts = torch.tensor(counts, dtype=torch.float32, device=self.counts.device)
        self.first_nonfinite = torch.tensor(first, dtype=torch.long, device=self.counts.device)
        self.steps = steps
