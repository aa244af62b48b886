"""What EarlyCollapseCallback reports: its metrics from the monitor's verdicts and probes, and its warning texts.

Pure: dicts and strings from verdicts, actions and floats; nothing here reads the device, decides anything or imports
Lightning. The risk model is :class:`~lightning_gradflow.collapse.CollapseMonitor`'s, the skip → cut LR → roll back →
stop ladder :class:`~lightning_gradflow.collapse.InterventionLadder`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lightning_gradflow.collapse import Action, StepVerdict
from lightning_gradflow.flow import layer_path

FAMILY = "collapse"


def collapse_metrics(
    verdict: StepVerdict,
    overflow_steps: int,
    skipped_steps: int,
    rollbacks: int,
    lr_scale: float,
    interventions: int,
) -> dict[str, float]:
    """The step metrics of one logging step, from its latest verdict and the callback's counters.

    Example::

        >>> from lightning_gradflow.collapse import StepVerdict
        >>> metrics = collapse_metrics(StepVerdict(9, loss=2.0, grad_norm=1.0, risk=0.25), 0, 1, 0, 0.5, 2)
        >>> metrics["collapse/risk"], metrics["collapse/lr_scale"], metrics["collapse/interventions"]
        (0.25, 0.5, 2.0)
    """
    return {
        f"{FAMILY}/risk": verdict.risk,
        f"{FAMILY}/loss_zscore": verdict.loss_z,
        f"{FAMILY}/grad_norm_zscore": verdict.grad_z,
        f"{FAMILY}/divergence": verdict.divergence,
        f"{FAMILY}/overflow_steps": float(overflow_steps),
        f"{FAMILY}/skipped_steps": float(skipped_steps),
        f"{FAMILY}/rollbacks": float(rollbacks),
        f"{FAMILY}/lr_scale": lr_scale,
        f"{FAMILY}/interventions": float(interventions),
    }


def representation_metrics(probe: Mapping[tuple[str, str], float]) -> dict[str, float]:
    """The probe metrics, ``collapse/<kind>/<layer path>``, from ``(kind, module name) → value``.

    Example::

        >>> representation_metrics({("dead_fraction", "encoder.0"): 0.5, ("effective_rank", "head"): 3.0})
        {'collapse/dead_fraction/encoder/0': 0.5, 'collapse/effective_rank/head': 3.0}
    """
    return {f"{FAMILY}/{kind}/{layer_path(layer)}": value for (kind, layer), value in probe.items()}


def episode_message(
    verdict: StepVerdict, actions: Iterable[Action], auto_intervene: bool, risk_threshold: float
) -> str:
    """The warning of a step that opens a warning episode, with what was (or would be) done about it.

    Args:
        verdict: the step's verdict.
        actions: the ladder's actions on it (only the recorded ones are named).
        auto_intervene: whether the actions are applied.
        risk_threshold: the risk at which the ladder acts.

    Example::

        >>> from lightning_gradflow.collapse import StepVerdict
        >>> v = StepVerdict(12, loss=9.0, grad_norm=40.0, risk=0.9, reasons=("loss spike z=8.1",))
        >>> episode_message(v, [], auto_intervene=False, risk_threshold=1.0).split(";")[0]
        'collapse risk 0.90 at step 12 (loss spike z=8.1, loss 9)'
    """
    done = [a.kind for a in actions if a.recorded]
    if auto_intervene:
        then = f"applied: {', '.join(done)}" if done else "no action yet"
        what = f"auto_intervene is on (skip → cut LR → roll back → stop, from risk {risk_threshold:g}); {then}"
    else:
        then = f"it would now: {', '.join(done)}" if done else "it would not act yet"
        what = (
            "monitoring only: with `auto_intervene=True` the callback would skip, cut the LR, roll back or stop"
            f" as listed in `interventions` (applied=False); {then}"
        )
    found = f"{', '.join(verdict.reasons)}, loss {verdict.loss:.4g}"
    return f"collapse risk {verdict.risk:.2f} at step {verdict.step} ({found}); {what}."


def resumed_after_stop_message(stop_message: str) -> str:
    """The warning of a fit resumed from a checkpoint saved after the callback had stopped the run."""
    return (
        f"the checkpoint was saved after this callback {stop_message} Training resumes from it: the intervention"
        " ladder starts a new episode (strikes and rollback budget reset). If the cause was not fixed, it"
        " will stop the run again."
    )


def unknown_module_message(callback: str, name: str, argument: str, known: Sequence[str]) -> str:
    """The error for a module path (in ``argument``) the model does not have."""
    return (
        f"{callback}(`{argument}`) names the module '{name}', which the model does not have. Known modules:"
        f" {[n for n in known if n][:20]}."
    )


def sharded_rollback_message(callback: str, strategy: str) -> str:
    """The error for rollbacks under a sharded strategy."""
    return (
        f"{callback}(auto_intervene=True, rollback=True) cannot roll back under `strategy={strategy}`: its snapshots"
        " would hold only this rank's shards of the parameters and optimizer state. Use a single device or"
        " `strategy='ddp'`, or pass `rollback=False`."
    )


def snapshot_device_message(callback: str, device: str, problem: str) -> str:
    """The error for a ``snapshot_device`` that cannot hold snapshots on this machine."""
    return (
        f"{callback}(`snapshot_device={device!r}`): {problem}. Pass `snapshot_device='cpu'` (the"
        " default) or an accelerator this machine has."
    )
