"""The per-trainer channel: what one step measured and what one callback did, shared without sibling imports.

Callbacks (or the monitors of a Fabric / plain PyTorch loop) never import each other and never depend on their order
in a callback list. They meet here:

* **Measurements** of the current optimizer step: whoever computes a shared quantity first (the global gradient norm,
  a non-finite flag) publishes it with :meth:`StepChannel.publish`; everyone else reads it with
  :meth:`StepChannel.read` and computes it only when nobody did. Values are kept for one step only.
* **Participants** whose own view of "what is applied" lives outside the model (a cumulative LR factor, which gate
  units were repaired, clip statistics) :meth:`~StepChannel.join` the channel. A callback that snapshots the training
  state asks every participant for its state (:meth:`~StepChannel.participant_states`) and, when it rolls back,
  hands each its snapshot-time state again (:meth:`~StepChannel.restore_participants`), so after a rollback every
  callback's view matches the restored weights and optimizer.
* **Events** (a rollback, an LR change) are broadcast to every participant with :meth:`~StepChannel.emit`.

Example::

    >>> class Run: ...
    >>> owner = Run()  # a Trainer, a Fabric object, or anything that lives as long as the run (weakly referenced)
    >>> channel = channel_for(owner)
    >>> channel.publish(3, "grad_norm", 1.5)
    >>> channel.read(3, "grad_norm"), channel.read(4, "grad_norm")
    (1.5, None)
    >>> class Factor:
    ...     value = 1.0
    ...     def rollback_state(self): return {"value": self.value}
    ...     def restore_rollback_state(self, state, event): self.value = state["value"]
    ...     def on_channel_event(self, event): pass
    >>> lr = Factor(); channel.join("lr", lr)
    >>> saved = channel.participant_states(); lr.value = 0.25
    >>> channel.restore_participants(saved, Event("rollback", step=9, source="demo", data={"to_step": 4}))
    >>> lr.value
    1.0
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Event:
    """Something one callback did that others must react to.

    Args:
        kind: ``"rollback"``, ``"lr_scale"``, ...
        step: the optimizer step it happened at.
        source: the name of the callback (or monitor) that did it.
        data: details, e.g. ``{"to_step": 40}`` for a rollback.
    """

    kind: str
    step: int
    source: str
    data: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Participant(Protocol):
    """What a callback implements to keep its view of applied interventions right across rollbacks."""

    def rollback_state(self) -> Any:
        """The state to keep with a snapshot: plain values or tensors, as copies (the caller keeps them as given)."""

    def restore_rollback_state(self, state: Any, event: Event) -> None:
        """Returns to the state kept with the snapshot being restored (``state`` is None if it joined later)."""

    def on_channel_event(self, event: Event) -> None:
        """Reacts to another participant's event."""


class StepChannel:
    """Shared measurements of the current optimizer step, participants and events of one run (see the module)."""

    def __init__(self) -> None:
        self._step: int | None = None
        self._values: dict[str, Any] = {}
        self._participants: dict[str, Participant] = {}

    # --------------------------------------------------------------------------------------------- measurements

    def publish(self, step: int, key: str, value: Any) -> None:
        """Publishes ``value`` as the step's ``key``; values of earlier steps are dropped."""
        if step != self._step:
            self._step = step
            self._values = {}
        self._values[key] = value

    def read(self, step: int, key: str) -> Any:
        """The value published as ``key`` at ``step``, or None."""
        return self._values.get(key) if step == self._step else None

    # --------------------------------------------------------------------------------------------- participants

    def join(self, key: str, participant: Participant) -> None:
        """Registers (or replaces) a participant under ``key`` (e.g. the callback's ``state_key``)."""
        self._participants[key] = participant

    def leave(self, key: str) -> None:
        """Removes a participant (at the end of a fit)."""
        self._participants.pop(key, None)

    @property
    def participants(self) -> dict[str, Participant]:
        """The registered participants by key."""
        return dict(self._participants)

    def participant_states(self, exclude: str | None = None) -> dict[str, Any]:
        """Every participant's :meth:`~Participant.rollback_state`, by key (``exclude``: the caller's own key)."""
        return {key: p.rollback_state() for key, p in self._participants.items() if key != exclude}

    def restore_participants(self, states: dict[str, Any], event: Event, exclude: str | None = None) -> None:
        """Hands each participant its state from ``states`` (None if it had none), then broadcasts ``event``."""
        for key, participant in self._participants.items():
            if key != exclude:
                participant.restore_rollback_state(states.get(key), event)
        self.emit(event, exclude=exclude)

    def emit(self, event: Event, exclude: str | None = None) -> None:
        """Broadcasts ``event`` to every participant but ``exclude``."""
        for key, participant in self._participants.items():
            if key != exclude:
                participant.on_channel_event(event)


_CHANNELS: weakref.WeakKeyDictionary[Any, StepChannel] = weakref.WeakKeyDictionary()


def channel_for(owner: Any) -> StepChannel:
    """The channel of ``owner`` (a Trainer, a Fabric object, ...), made on first use and dropped with the owner."""
    channel = _CHANNELS.get(owner)
    if channel is None:
        channel = _CHANNELS[owner] = StepChannel()
    return channel
