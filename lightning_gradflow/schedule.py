"""When an expensive probe runs: dense at the start of training, sparse once it is healthy, dense again after a finding.

Saturated gates, dead units and vanishing gradients are most often there from initialisation, and problems cluster
after a finding or an intervention; a fixed ``every_n_steps`` either pays for probes all run long or finds them late.
:class:`ProbeSchedule` runs a probe every ``dense_every`` steps during the first ``dense_steps`` optimizer steps and
for ``dense_steps`` steps after each finding (:meth:`ProbeSchedule.found`); outside those windows the interval grows by
``growth`` after each probe up to ``every_n_steps``. With ``adaptive=False`` it is the plain ``step % every_n_steps ==
0`` schedule (step 0 included).

It is deterministic given the steps and the findings, so when findings are decided from rank-reduced statistics every
DDP rank probes at the same steps; its state is plain integers (``state_dict``), so a resumed run continues the same
schedule.

Example::

    >>> schedule = ProbeSchedule(every_n_steps=100, dense_every=5, dense_steps=20)
    >>> [s for s in range(200) if schedule.due(s)]
    [0, 5, 10, 15, 20, 30, 50, 90, 170]
    >>> schedule.found(170)  # a finding: dense again
    >>> [s for s in range(170, 260) if schedule.due(s)]
    [175, 180, 185, 190, 200, 220]
"""

from __future__ import annotations

from typing import Any

from lightning_gradflow.checks import check_bool, check_count, check_float, check_int


class ProbeSchedule:
    """Dense → sparse probe steps, dense again after a finding (see the module).

    Args:
        every_n_steps: the largest interval between probes (the steady state); 0 disables the probes.
        dense_every: the interval during the dense windows, from 1 to ``every_n_steps``.
        dense_steps: length of the dense window at the start and after each finding (0: none).
        growth: factor by which the interval grows after each probe outside a dense window, > 1.
        adaptive: False for the fixed schedule ``step % every_n_steps == 0``.
    """

    def __init__(
        self,
        every_n_steps: int,
        dense_every: int = 5,
        dense_steps: int = 50,
        growth: float = 2.0,
        adaptive: bool = True,
    ) -> None:
        self.every_n_steps = check_int("every_n_steps", every_n_steps, low=0)
        self.adaptive = check_bool("adaptive", adaptive)
        self.dense_every = min(check_int("dense_every", dense_every), max(self.every_n_steps, 1))
        self.dense_steps = check_int("dense_steps", dense_steps, low=0)
        self.growth = check_float("growth", growth, 1.0, 1e3)
        self.reset()

    def reset(self) -> None:
        """Back to the start of training (a new fit)."""
        self.next_step = 0
        self.interval = float(self.dense_every)
        self.dense_until = self.dense_steps

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` runs a probe; advances the schedule when it does (call once per step)."""
        if self.every_n_steps == 0:
            return False
        if not self.adaptive:
            return step % self.every_n_steps == 0
        if step < self.next_step:
            return False
        if step >= self.dense_until:
            self.interval = min(self.interval * self.growth, float(self.every_n_steps))
        else:
            self.interval = float(self.dense_every)
        self.next_step = step + max(1, round(self.interval))
        return True

    def found(self, step: int) -> None:
        """A finding or an intervention at ``step``: probe densely for the next ``dense_steps`` steps."""
        if not self.adaptive or self.every_n_steps == 0:
            return
        self.dense_until = step + self.dense_steps
        self.interval = float(self.dense_every)
        self.next_step = min(self.next_step, step + self.dense_every)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position, as plain numbers."""
        return {"next_step": self.next_step, "interval": self.interval, "dense_until": self.dense_until}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (validated before anything changes)."""
        next_step = check_count("next_step", state["next_step"])
        interval = check_float("interval", state["interval"], closed_low=True)
        dense_until = check_int("dense_until", state["dense_until"], low=-(2**62))
        self.next_step, self.interval, self.dense_until = next_step, interval, dense_until
