"""The collapse risk model: from one step's loss and gradient norm (and the latest probe) to a :class:`StepVerdict`.

:class:`CollapseMonitor` owns every detector and turns their readings into one risk per step:

* **spikes**: robust (or EMA) z-scores of ``log(x + scale_floor · x₀)`` for the loss and the gradient norm (x₀: the
  run's first value); a loss spike scores ``ramp(z, z_threshold/2, z_threshold)``, a gradient-norm spike
  :data:`GRAD_WEIGHT` times that: gradient norms are heavy-tailed near convergence, so their spikes warn early but
  alarm only together with the loss;
* **divergence**: a running median of the loss over its best (see
  :class:`~lightning_gradflow.collapse.detectors.DivergenceDetector`);
* **non-finite** loss or gradients score 1 — except fp16 GradScaler overflow steps, which are normal: they are
  counted and leave every detector untouched; only ``overflow_patience`` consecutive ones count as non-finite;
* **representations** (dead units, RankMe), scored on probe steps by :meth:`CollapseMonitor.score_representations`
  and weighted :data:`REPRESENTATION_WEIGHT`: these slow signals warn per layer and raise the risk, but cannot
  make an alarm alone. A *collapse* is a fall: a layer's effective rank is only scored once some probe measured it
  at ``2 · min_effective_rank`` or more, so features that have not spread yet (a random initialisation whose
  outputs barely depend on the input: RankMe ≈ 1 at step 0) are no finding.

``risk = 1 - Π(1 - s_i)``. The **step risk** leaves the representation signal out: it opens a warning episode when it
reaches ``warn_threshold`` (or on a non-finite step) and closes it when it falls below half of it, so a standing
representation finding neither opens nor holds an episode. A step is an **alarm** when ``risk >= risk_threshold`` or
it is non-finite; alarm steps never enter the detector windows, so a spike cannot mask the next one. A step is
**calm** when it is no alarm, no overflow, and its step risk is below ``warn_threshold``.

Example::

    >>> monitor = CollapseMonitor(MonitorConfig(min_history=5))
    >>> for step in range(20):
    ...     v = monitor.observe(step, loss=1.0 + 0.01 * (step % 3), grad_norm=2.0)
    >>> v.alarm, v.calm
    (False, True)
    >>> spike = monitor.observe(20, loss=50.0, grad_norm=80.0)
    >>> spike.alarm, spike.opens_episode, round(spike.risk, 2)
    (True, True, 1.0)
    >>> monitor.observe(21, loss=float("nan"), grad_norm=2.0).nonfinite
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_gradflow.checks import check_bool, check_count, check_finite
from lightning_gradflow.collapse.config import MonitorConfig
from lightning_gradflow.collapse.detectors import (
    DivergenceDetector,
    EmaZScore,
    RobustZScore,
    combine_risk,
    ramp,
    spike_score,
)

REPRESENTATION_WEIGHT = 0.5  # dead units / rank collapse alone raise the risk to 0.5: they warn, never alarm
GRAD_WEIGHT = 0.5  # a gradient-norm spike alone warns (heavy-tailed near convergence); with a loss spike it alarms
_REPRESENTATIONS = "collapsed representations"


@dataclass
class StepVerdict:
    """What the detectors made of one optimizer step (host values, identical on every rank).

    Attributes:
        step: the optimizer step (``trainer.global_step`` before it).
        loss: the step's loss (NaN when none was seen).
        grad_norm: the global gradient norm (NaN when a gradient was non-finite).
        loss_z: robust z-score of the loss.
        grad_z: robust z-score of the gradient norm.
        divergence: log of the smoothed loss over its best, beyond noise.
        risk: the combined risk, representations included.
        step_risk: the risk of the step signals alone (spikes, divergence, non-finite values).
        nonfinite: the loss or a gradient was non-finite (and it was no tolerated fp16 overflow).
        overflow: an fp16 GradScaler overflow step (normal: the scaler skips it).
        alarm: ``nonfinite`` or ``risk >= risk_threshold``.
        calm: no alarm, no overflow, and ``step_risk < warn_threshold``.
        opens_episode: this step opened a warning episode.
        reasons: the signals that scored, in words.
    """

    step: int
    loss: float
    grad_norm: float
    loss_z: float = 0.0
    grad_z: float = 0.0
    divergence: float = 0.0
    risk: float = 0.0
    step_risk: float = 0.0
    nonfinite: bool = False
    overflow: bool = False
    alarm: bool = False
    calm: bool = False
    opens_episode: bool = False
    reasons: tuple[str, ...] = ()


class CollapseMonitor:
    """The risk model of collapse detection: detectors, signal weights, representation scores, warning episodes.

    No Lightning, no tensors: it takes host floats, so a Lightning callback, a Fabric loop or a plain PyTorch loop
    can feed it (see the module for the model).

    Args:
        config: the thresholds (defaults: :class:`~lightning_gradflow.collapse.config.MonitorConfig`).
    """

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        self.reset()

    def reset(self) -> None:
        """Forgets everything: a new run (or a new ``fit``) starts here."""
        c = self.config
        self.loss_detector = self._spike_detector()
        self.grad_detector = self._spike_detector()
        self.divergence = DivergenceDetector(c.divergence_smoothing, c.divergence_ratio, c.min_history, window=c.window)
        self.use_log_loss = c.log_scale
        self.first: list[float | None] = [None, None]  # the first positive loss and gradient norm
        self.overflow_steps = 0
        self.overflow_streak = 0
        self.episode = False  # a warning episode is open
        self.repr_score = 0.0
        self.repr_warned: set[tuple[str, str]] = set()  # (kind, layer) findings already warned about
        self.rank_peak: dict[str, float] = {}  # per layer: the highest effective rank any probe measured

    def _spike_detector(self) -> RobustZScore | EmaZScore:
        c = self.config
        if c.spike_detector == "mad":
            return RobustZScore(c.window, c.min_history, c.min_scale)
        return EmaZScore(c.ema_alpha, c.min_history, c.min_scale)

    # ------------------------------------------------------------------------------------------------- a step

    def observe(
        self, step: int, loss: float, grad_norm: float, scaler_active: bool = False, has_loss: bool = True
    ) -> StepVerdict:
        """Scores one optimizer step.

        Args:
            step: the optimizer step.
            loss: its loss (the mean over accumulated micro-batches).
            grad_norm: its global gradient norm (NaN when a gradient was non-finite).
            scaler_active: an fp16 GradScaler is at work (a non-finite step may be one of its overflow steps).
            has_loss: False when no loss was seen (manual optimization calling ``backward`` directly): only the
                gradient norm is judged.
        """
        c = self.config
        v = StepVerdict(step, loss, grad_norm)
        v.nonfinite = not ((math.isfinite(loss) or not has_loss) and math.isfinite(grad_norm))
        if v.nonfinite and scaler_active:
            self.overflow_streak += 1
            if self.overflow_streak <= c.overflow_patience:
                v.overflow, v.nonfinite = True, False
                self.overflow_steps += 1
                v.risk = combine_risk([self.repr_score])
                return v
        elif not v.nonfinite:
            self.overflow_streak = 0
        if self.use_log_loss and math.isfinite(loss) and loss <= 0:  # log scale impossible: start again, raw
            self.use_log_loss = False
            self.loss_detector = self._spike_detector()
        x_loss = self._offset_log(0, loss) if self.use_log_loss and math.isfinite(loss) else loss
        x_grad = self._offset_log(1, grad_norm) if c.log_scale and math.isfinite(grad_norm) else grad_norm
        v.loss_z = self.loss_detector.score(x_loss) if math.isfinite(loss) else (math.nan if has_loss else 0.0)
        v.grad_z = self.grad_detector.score(x_grad) if math.isfinite(x_grad) else 0.0
        if not math.isfinite(grad_norm):
            v.grad_z = math.nan
        self.divergence.update(math.exp(x_loss) if self.use_log_loss and math.isfinite(x_loss) else loss)
        v.divergence = self.divergence.excess()
        scores = {
            "non-finite loss or gradients": 1.0 if v.nonfinite else 0.0,
            f"loss z-score {v.loss_z:.3g}": 0.0 if v.nonfinite else spike_score(v.loss_z, c.loss_z_threshold),
            f"gradient-norm z-score {v.grad_z:.3g}": 0.0
            if v.nonfinite
            else GRAD_WEIGHT * spike_score(v.grad_z, c.grad_z_threshold),
            f"smoothed loss {math.exp(v.divergence):.3g}× its best": self.divergence.score(),
        }
        v.step_risk = combine_risk(list(scores.values()))
        scores[_REPRESENTATIONS] = self.repr_score
        v.risk = combine_risk(list(scores.values()))
        v.alarm = v.nonfinite or v.risk >= c.risk_threshold
        v.reasons = tuple(k for k, s in scores.items() if s > 0)
        if not v.alarm:
            self.loss_detector.update(x_loss)
            if math.isfinite(x_grad):
                self.grad_detector.update(x_grad)
        if v.nonfinite or v.step_risk >= c.warn_threshold:
            v.opens_episode = not self.episode
            self.episode = True
        elif v.step_risk < c.warn_threshold / 2:
            self.episode = False
        v.calm = not v.alarm and v.step_risk < c.warn_threshold
        return v

    def _offset_log(self, which: int, x: float) -> float:
        """``log(x + scale_floor · x₀)`` (x₀: the first positive value seen); NaN when that is not positive."""
        if self.first[which] is None and x > 0:
            self.first[which] = x
        offset = self.config.scale_floor * (self.first[which] or 0.0)
        return math.log(x + offset) if x + offset > 0 else math.nan

    # --------------------------------------------------------------------------------------- representations

    def score_representations(self, step: int, measured: dict[tuple[str, str], float]) -> list[str]:
        """Scores one probe and returns the messages of new findings (each ``(kind, layer)`` warns once).

        Args:
            step: the probe's step.
            measured: ``{(kind, layer): value}`` with kinds ``"dead_fraction"``, ``"effective_rank"`` and
                ``"feature_std"`` (logged, not scored).
        """
        c = self.config
        scores, messages = [0.0], []
        for (kind, layer), value in measured.items():
            if kind == "dead_fraction":
                s = ramp(value, c.max_dead_fraction / 2, c.max_dead_fraction)
                what = f"{value:.0%} of the units of '{layer}' are {'dormant' if c.dormant_threshold else 'dead'}"
                fix = "lower the learning rate, use LeakyReLU/GELU, or re-initialise the dead units (ReDo)"
            elif kind == "effective_rank":
                if math.isfinite(value):
                    self.rank_peak[layer] = max(self.rank_peak.get(layer, 0.0), value)
                if self.rank_peak.get(layer, 0.0) < 2 * c.min_effective_rank:
                    continue  # the features never spread yet (random initialisation): a low rank is no collapse
                s = ramp(-value, -2 * c.min_effective_rank, -c.min_effective_rank)
                what = f"the features entering '{layer}' collapsed to an effective rank of {value:.3g}"
                fix = "check for representation collapse: lower the learning rate, add normalisation or weight decay"
            else:
                continue
            scores.append(s)
            if s >= 1.0 and (kind, layer) not in self.repr_warned:
                self.repr_warned.add((kind, layer))
                messages.append(f"{what} at step {step}. Suggested fix: {fix}.")
        self.repr_score = REPRESENTATION_WEIGHT * max(scores)
        return messages

    # ------------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything, as plain data (the detectors' windows included)."""
        return {
            "spike_detector": self.config.spike_detector,
            "loss": self.loss_detector.state_dict(),
            "grad": self.grad_detector.state_dict(),
            "divergence": self.divergence.state_dict(),
            "use_log_loss": self.use_log_loss,
            "first": list(self.first),
            "overflow_steps": self.overflow_steps,
            "overflow_streak": self.overflow_streak,
            "episode": self.episode,
            "repr_score": self.repr_score,
            "repr_warned": sorted([kind, layer] for kind, layer in self.repr_warned),
            "rank_peak": dict(self.rank_peak),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; raises ``ValueError``/``TypeError``/``KeyError`` for a state it cannot use.

        A state saved with the other ``spike_detector`` is refused: its windows mean something else.
        """
        self._load_detectors(state)
        self.overflow_steps = check_count("overflow_steps", state["overflow_steps"])
        self.overflow_streak = check_count("overflow_streak", state["overflow_streak"])
        self.episode = check_bool("episode", state["episode"])
        repr_score = check_finite("repr_score", state["repr_score"])
        if not 0.0 <= repr_score <= 1.0:
            raise ValueError(f"`repr_score` must lie in [0, 1], got {repr_score}")
        self.repr_score = repr_score
        self.repr_warned = {(str(kind), str(layer)) for kind, layer in state["repr_warned"]}
        peaks = state.get("rank_peak", {})  # absent from checkpoints of older versions
        if not isinstance(peaks, dict):
            raise TypeError(f"`rank_peak` must be a dict of layer -> rank, got {type(peaks).__name__}")
        self.rank_peak = {str(layer): check_finite("rank_peak", rank) for layer, rank in peaks.items()}

    def rewind(self, state: dict[str, Any]) -> None:
        """Returns the detectors to a :meth:`state_dict` taken at a snapshot (after a rollback to it).

        Counters and representation findings are kept; the episode closes, so a new collapse warns again.
        """
        self._load_detectors(state)
        self.episode = False
        self.overflow_streak = 0

    def _load_detectors(self, state: dict[str, Any]) -> None:
        saved = state["spike_detector"]
        if saved != self.config.spike_detector:
            raise ValueError(
                f"the state was saved with `spike_detector={saved!r}`, this monitor uses"
                f" `spike_detector={self.config.spike_detector!r}`: their windows cannot be converted"
            )
        loss, grad = self._spike_detector(), self._spike_detector()
        loss.load_state_dict(state["loss"])
        grad.load_state_dict(state["grad"])
        c = self.config
        divergence = DivergenceDetector(c.divergence_smoothing, c.divergence_ratio, c.min_history, window=c.window)
        divergence.load_state_dict(state["divergence"])
        first = [check_finite("first", x, allow_none=True) for x in state["first"]]
        if len(first) != 2:
            raise ValueError(f"`first` must hold 2 values, got {len(first)}")
        self.loss_detector, self.grad_detector, self.divergence = loss, grad, divergence
        self.use_log_loss = check_bool("use_log_loss", state["use_log_loss"])
        self.first = first
