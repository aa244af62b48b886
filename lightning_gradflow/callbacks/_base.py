"""What all four callbacks repeat: safe logging, warn-once, interventions, hooks, schedules, host transfer, channel.

A callback subclasses :class:`HealthCallback` and keeps only its Lightning hooks, reading tensors, asking its pure
monitor, applying actions and choosing what to log. Two schedule conventions, each in one place:

* **probes** (gates, curvature, representations) run when :func:`is_probe_step` — ``step % every == 0`` — so the
  first probe is at step 0, where saturation, dead units and vanishing gradients are most often found;
* **logging** follows Lightning's own axis, :func:`is_log_step` — ``(step + 1) % every == 0`` — so the callbacks'
  scalars land on the same steps as ``self.log(...)``.

``step`` is always ``trainer.global_step`` as read in ``on_before_optimizer_step`` (the index of the optimizer step
being taken, from 0).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_gradflow.channel import Event, StepChannel, channel_for
from lightning_gradflow.interventions import Intervention, InterventionLog

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.utils.hooks import RemovableHandle


def is_probe_step(step: int, every: int) -> bool:
    """Whether optimizer step ``step`` (from 0) runs a probe scheduled ``every`` steps (0: never); step 0 probes."""
    return every > 0 and step % every == 0


def is_log_step(step: int, every: int) -> bool:
    """Whether optimizer step ``step`` (from 0) logs, on Lightning's axis: steps ``every - 1``, ``2 every - 1``..."""
    return every > 0 and (step + 1) % every == 0


def to_host(parts: dict[str, Tensor], reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """Copies every tensor to the host in one transfer (packed into one float64 buffer, then split by name).

    Floating tensors come back as float32 (float64 stays float64), integer and bool tensors as int64.

    Args:
        parts: the tensors, by name (on any device).
        reduce: applied to the packed buffer on the device before the transfer, e.g.
            ``partial(trainer.strategy.reduce, reduce_op="sum")``: one all-reduce for every tensor of the step.

    Example::

        >>> import torch
        >>> host = to_host({"norms": torch.tensor([3.0, 4.0]), "count": torch.tensor(2)})
        >>> host["norms"].tolist(), int(host["count"])
        ([3.0, 4.0], 2)
        >>> to_host({"x": torch.tensor([1.0])}, reduce=lambda flat: flat * 2)["x"].tolist()
        [2.0]
    """
    if not parts:
        return {}
    flat = torch.cat([t.detach().reshape(-1).double() for t in parts.values()])
    if reduce is not None:
        flat = reduce(flat)
    host = flat.cpu()
    out, offset = {}, 0
    for name, t in parts.items():
        n = t.numel()
        dtype = t.dtype if t.dtype == torch.float64 else torch.float32 if t.is_floating_point() else torch.long
        out[name] = host[offset : offset + n].view(t.shape).to(dtype)
        offset += n
    return out


class HealthCallback(Callback):
    """Base of the four callbacks: the parts every one of them needs, in one place.

    Subclasses set :attr:`family` (the tag prefix) and call ``super().__init__()``. They get:

    * :meth:`_log_metrics`: logs through every attached logger with ``step``; a logger that raises is warned about
      once (naming it and the error) and training goes on: a failing logger never ends a run;
    * :meth:`_tensorboard`: runs a TensorBoard extra (histograms, figures, text) the same way;
    * :meth:`_warn_once` and :attr:`warned`: one warning per finding, kept in checkpoints by the subclass;
    * :attr:`interventions`, backed by an :class:`~lightning_gradflow.interventions.InterventionLog`;
    * :meth:`_add_hook` / :meth:`_remove_hooks`: module and tensor hooks removed at the end of a fit or on an error;
    * :meth:`channel`: the per-trainer :class:`~lightning_gradflow.channel.StepChannel`. A subclass that defines
      ``rollback_state``/``restore_rollback_state`` joins it at ``on_fit_start`` and leaves at ``on_fit_end``;
    * **per-fit state**: :meth:`_reset_fit_state` runs in ``setup(stage="fit")``, before Lightning restores callback
      state from a checkpoint, so a second ``fit()`` of a reused instance starts afresh while a resumed fit continues
      from the checkpoint;
    * **guarded restore**: subclasses implement :meth:`_load_state`; :meth:`load_state_dict` turns any failure into
      one ``ValueError`` naming the callback, the checkpoint key and what to do. A checkpoint whose entry for this
      callback is empty or not a dict (Lightning skips those silently) warns once and the callback starts fresh.
    """

    family: ClassVar[str] = "gradflow"

    def __init__(self) -> None:
        super().__init__()
        self._log = InterventionLog(type(self).__name__)
        self._warned: set[str] = set()
        self.last_metrics: dict[str, float] = {}
        self._failed_loggers: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._channel_owner: Any = None

    @property
    def name(self) -> str:
        """The class name, which starts every warning and names every intervention record."""
        return type(self).__name__

    @property
    def interventions(self) -> list[Intervention]:
        """Every action taken (or, with ``auto_intervene=False``, that would have been taken), oldest first."""
        return self._log.records

    # ------------------------------------------------------------------------------------------------- warnings

    def _warn_once(self, key: str, message: str) -> bool:
        """Warns ``"<Callback>: message"`` the first time ``key`` is seen; returns whether it warned."""
        if key in self._warned:
            return False
        self._warned.add(key)
        rank_zero_warn(f"{self.name}: {message}", category=RuntimeWarning)
        return True

    # -------------------------------------------------------------------------------------------------- logging

    def _log_metrics(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        """Logs ``metrics`` at ``step`` through every logger; a failing logger warns once and is skipped."""
        if not metrics:
            return
        self.last_metrics = dict(metrics)
        for logger in trainer.loggers:
            self._guard(logger, "log_metrics", partial(logger.log_metrics, metrics, step=step), step)

    def _tensorboard(self, trainer: pl.Trainer, what: str, write: Callable[[], None], step: int) -> None:
        """Runs ``write`` (a TensorBoard extra); an error there warns once and training goes on."""
        self._guard(trainer, what, write, step)

    def _guard(self, target: Any, what: str, call: Callable[[], Any], step: int) -> None:
        try:
            call()
        except Exception as err:  # a logger's failure must not end the run: warn once and go on
            key = f"{type(target).__name__}.{what}"
            if key not in self._failed_loggers:
                self._failed_loggers.add(key)
                rank_zero_warn(
                    f"{self.name}: {key} raised {type(err).__name__}: {err} at step {step}. Training goes on; this"
                    " callback's output for that logger may be incomplete. Fix the logger (disk, permissions,"
                    " network) to get it back.",
                    category=RuntimeWarning,
                )

    # ---------------------------------------------------------------------------------------------------- hooks

    def _add_hook(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------------------------------ per-fit state

    def _reset_fit_state(self) -> None:
        """Resets what belongs to one fit (detector windows, episodes, stop reasons); default: nothing."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Starts a new fit's state (subclasses call ``super().setup``); a checkpoint restored later overrides it."""
        if stage == "fit":
            self._reset_fit_state()

    # ---------------------------------------------------------------------------------------------- restoring

    def _load_state(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved; raise ``KeyError``/``TypeError``/``ValueError`` when it is bad."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the callback's state; a state it cannot use raises one clear ``ValueError``."""
        if not isinstance(state_dict, dict):
            raise self._state_error(TypeError(f"expected a dict, got {type(state_dict).__name__}"))
        try:
            self._load_state(state_dict)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
            raise self._state_error(err) from err

    def _state_error(self, err: BaseException) -> ValueError:
        return ValueError(
            f"{self.name} cannot restore its state from the checkpoint entry `callbacks[{self.state_key!r}]`"
            f" ({type(err).__name__}: {err}). The checkpoint was written by another version of the callback, with"
            " other arguments, or is damaged. Construct the callback with the arguments of the run that saved it, or"
            f" delete `checkpoint['callbacks'][{self.state_key!r}]` to let this callback start afresh."
        )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Warns when the checkpoint's entry for this callback is empty or not a dict (Lightning would skip it)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states and not states[self.state_key]:  # {} or None: Lightning never calls us
            self._warn_once(
                "empty_state",
                f"the checkpoint entry `callbacks[{self.state_key!r}]` is empty ({states[self.state_key]!r}): this"
                " callback starts afresh (its detectors, counters and interventions are not restored).",
            )

    # -------------------------------------------------------------------------------------------------- channel

    def channel(self, trainer: Any) -> StepChannel:
        """The channel shared by every callback of ``trainer``."""
        return channel_for(trainer)

    def _join_channel(self, trainer: Any) -> None:
        self._channel_owner = trainer
        if hasattr(self, "rollback_state") and hasattr(self, "restore_rollback_state"):
            channel_for(trainer).join(self.state_key, self)

    def _leave_channel(self) -> None:
        if self._channel_owner is not None:
            channel_for(self._channel_owner).leave(self.state_key)
            self._channel_owner = None

    def on_channel_event(self, event: Event) -> None:
        """Reacts to another callback's event (default: nothing)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Joins the trainer's channel (subclasses call ``super().on_fit_start``)."""
        self._join_channel(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Removes hooks and leaves the channel (subclasses call ``super().on_fit_end``)."""
        self._remove_hooks()
        self._leave_channel()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Removes hooks and leaves the channel when the run fails."""
        self._remove_hooks()
        self._leave_channel()
