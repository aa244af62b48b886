"""Bad input: wrong constructor arguments, a model with nothing to train, no logger, a batch holding a NaN.

Every callback must answer with a clear error naming the argument, or with one warning, and never crash inside a
hook; training set-ups that can go on must finish, with nothing lost (interventions recorded, checkpoints written).
The callbacks still being written (SharpnessCallback, EarlyCollapseCallback) are covered as soon as they import.
"""

from __future__ import annotations

import importlib
import math
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_gradflow import GateSurgeryCallback, GradientFlowCallback
from scripts.support_matrix import CALLBACK_FACTORIES
from tests.helpers.matrix_models import TinyLSTM, sequence_loader
from tests.helpers.training import RecordingLogger, quiet_trainer


def _optional(module: str, name: str) -> type | None:
    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        return None


SharpnessCallback = _optional("lightning_gradflow.callbacks.sharpness", "SharpnessCallback")
EarlyCollapseCallback = _optional("lightning_gradflow.callbacks.early_collapse", "EarlyCollapseCallback")
CLASSES: dict[str, type | None] = {
    "GradientFlowCallback": GradientFlowCallback,
    "GateSurgeryCallback": GateSurgeryCallback,
    "SharpnessCallback": SharpnessCallback,
    "EarlyCollapseCallback": EarlyCollapseCallback,
}

# ------------------------------------------------------------------------------------ wrong arguments, by hand

#: (callback, keyword arguments, error type, the argument the message must name)
BAD_ARGUMENTS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("GradientFlowCallback", {"log_every_n_steps": "10"}, TypeError, "log_every_n_steps"),
    ("GradientFlowCallback", {"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
    ("GradientFlowCallback", {"histogram_every_n_steps": -1}, ValueError, "histogram_every_n_steps"),
    ("GradientFlowCallback", {"group_by": "layer"}, ValueError, "group_by"),
    ("GradientFlowCallback", {"clip_mode": "l2"}, ValueError, "clip_mode"),
    ("GradientFlowCallback", {"clip_mode": "norm"}, ValueError, "clip_value"),  # a fixed clip needs its threshold
    ("GradientFlowCallback", {"clip_mode": "agc", "clip_value": 1.0}, ValueError, "clip_value"),
    ("GradientFlowCallback", {"clip_value": float("nan")}, ValueError, "clip_value"),
    ("GradientFlowCallback", {"vanishing_ratio": 2.0}, ValueError, "vanishing_ratio"),
    ("GradientFlowCallback", {"ema_alpha": 1.0}, ValueError, "ema_alpha"),
    ("GradientFlowCallback", {"percentile": 0}, ValueError, "percentile"),
    ("GradientFlowCallback", {"patience": 1.5}, TypeError, "patience"),
    ("GradientFlowCallback", {"min_grad_rms": True}, TypeError, "min_grad_rms"),
    ("GradientFlowCallback", {"auto_intervene": "yes"}, TypeError, "auto_intervene"),
    ("GradientFlowCallback", {"backend": "cuda"}, ValueError, "backend"),
    ("GateSurgeryCallback", {"every_n_steps": 0}, ValueError, "every_n_steps"),
    ("GateSurgeryCallback", {"probe_size": "16"}, TypeError, "probe_size"),
    ("GateSurgeryCallback", {"epsilon": 0.5}, ValueError, "epsilon"),
    ("GateSurgeryCallback", {"unit_threshold": 1.5}, ValueError, "unit_threshold"),
    ("GateSurgeryCallback", {"saturation_threshold": 1.0}, ValueError, "saturation_threshold"),
    ("GateSurgeryCallback", {"cooldown": -1}, ValueError, "cooldown"),
    ("GateSurgeryCallback", {"target_std": 0.0}, ValueError, "target_std"),
    ("GateSurgeryCallback", {"forget_bias": "1"}, TypeError, "forget_bias"),
    ("GateSurgeryCallback", {"extra_gates": {"head": "relu"}}, ValueError, "extra_gates"),
    ("GateSurgeryCallback", {"extra_gates": ["head"]}, TypeError, "extra_gates"),
    ("GateSurgeryCallback", {"exclude": "lstm"}, TypeError, "exclude"),
    ("GateSurgeryCallback", {"repair_gates": ["bogus"]}, ValueError, "repair_gates"),
    ("GateSurgeryCallback", {"repair_gates": []}, ValueError, "repair_gates"),
    ("SharpnessCallback", {"every_n_steps": 0}, ValueError, "every_n_steps"),
    ("SharpnessCallback", {"metrics": ("bogus",)}, ValueError, "metrics"),
    ("SharpnessCallback", {"metrics": "lambda_max"}, TypeError, "metrics"),
    ("SharpnessCallback", {"probe": "random"}, ValueError, "probe"),
    ("SharpnessCallback", {"hvp": "exact"}, ValueError, "hvp"),
    ("SharpnessCallback", {"trace_hvps": 2}, ValueError, "trace_hvps"),
    ("SharpnessCallback", {"sam_rho": -0.1}, ValueError, "sam_rho"),
    ("SharpnessCallback", {"lr_factor": 1.0}, ValueError, "lr_factor"),
    ("SharpnessCallback", {"seed": "0"}, TypeError, "seed"),
    ("SharpnessCallback", {"auto_intervene": 1}, TypeError, "auto_intervene"),
    ("EarlyCollapseCallback", {"window": 0}, ValueError, "window"),
    ("EarlyCollapseCallback", {"spike_detector": "iqr"}, ValueError, "spike_detector"),
    ("EarlyCollapseCallback", {"divergence_ratio": 1.0}, ValueError, "divergence_ratio"),
    ("EarlyCollapseCallback", {"lr_cut_factor": 1.5}, ValueError, "lr_cut_factor"),
    ("EarlyCollapseCallback", {"representation_layers": "hidden"}, TypeError, "representation_layers"),
    ("EarlyCollapseCallback", {"snapshot_device": 3}, TypeError, "snapshot_device"),
    ("EarlyCollapseCallback", {"auto_intervene": "yes"}, TypeError, "auto_intervene"),
    ("EarlyCollapseCallback", {"loss_z_threshold": 0}, ValueError, "loss_z_threshold"),
]


def _present(name: str) -> Any:
    return pytest.mark.skipif(CLASSES[name] is None, reason=f"{name} is not written yet")


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "argument"),
    [
        pytest.param(*case, id=f"{case[0]}-{case[3]}-{case[1][case[3]]!r}"[:80], marks=_present(case[0]))
        for case in BAD_ARGUMENTS
        if case[3] in case[1]
    ]
    + [
        pytest.param(*case, id=f"{case[0]}-{case[3]}-missing", marks=_present(case[0]))
        for case in BAD_ARGUMENTS
        if case[3] not in case[1]
    ],
)
def test_wrong_argument_raises_naming_it(
    name: str, kwargs: dict[str, Any], error: type[Exception], argument: str
) -> None:
    cls = CLASSES[name]
    assert cls is not None
    with pytest.raises(error, match=f"`{argument}"):
        cls(**kwargs)


# -------------------------------------------------------------------- wrong argument types, from the signatures


def _wrong_value(annotation: Any) -> tuple[Any, tuple[type[Exception], ...]] | None:
    """A value of the wrong type for ``annotation`` and the errors that may answer it (None: nothing to try)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _wrong_value(inner[0]) if len(inner) == 1 else None
    if origin is typing.Literal:
        return "__not_a_choice__", (ValueError,)
    if annotation is bool:
        return "yes", (TypeError,)
    if annotation is int:
        return "3", (TypeError,)
    if annotation is float:
        return "0.5", (TypeError,)
    if annotation is str:
        return 3, (TypeError,)
    if origin in (list, dict, tuple) or str(origin) in ("<class 'collections.abc.Sequence'>",):
        return 3, (TypeError,)
    return None


def _signature_cases() -> list[Any]:
    cases = []
    for name, cls in CLASSES.items():
        if cls is None:
            continue
        hints = typing.get_type_hints(cls.__init__)
        for argument, annotation in hints.items():
            if argument == "return":
                continue
            wrong = _wrong_value(annotation)
            if wrong is not None:
                cases.append(pytest.param(cls, argument, *wrong, id=f"{name}-{argument}"))
    return cases


#: Arguments whose type is not checked yet (known gaps, reported): ``xfail(strict=True)``.
UNCHECKED: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize(("cls", "argument", "value", "errors"), _signature_cases())
def test_wrong_type_from_signature_raises_naming_it(
    cls: type, argument: str, value: Any, errors: tuple[type[Exception], ...], request: pytest.FixtureRequest
) -> None:
    reason = UNCHECKED.get((cls.__name__, argument))
    if reason:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    with pytest.raises(errors) as info:
        cls(**{argument: value})
    assert f"`{argument}" in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------------- training set-ups


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    """The quiet Trainer with a recording logger, 6 steps, in ``tmp_path`` (overridable)."""
    defaults = {"max_steps": 6, "default_root_dir": str(tmp_path), "logger": RecordingLogger()}
    return quiet_trainer(callbacks=callbacks, **{**defaults, **kwargs})


def _ours(record: warnings.WarningMessage) -> str | None:
    """The callback a warning comes from (its message starts with the callback's name), or None."""
    text = str(record.message)
    return next((name for name in CALLBACK_FACTORIES if text.startswith(name)), None)


def _by_callback(records: list[warnings.WarningMessage]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for record in records:
        name = _ours(record)
        if name is not None:
            found.setdefault(name, []).append(str(record.message))
    return found


class FrozenLSTM(TinyLSTM):
    """Nothing to train: every parameter frozen; ``training_step`` returns no loss (Lightning skips the step)."""

    def __init__(self) -> None:
        super().__init__(frozen=True)

    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        self.losses.append(float(self._loss(batch)))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass


#: Callbacks that crash on the frozen model (known bugs, reported): ``xfail(strict=True)``.
@pytest.mark.parametrize("name", list(CALLBACK_FACTORIES))
def test_model_without_trainable_parameters_warns_once_and_trains(name: str, tmp_path: Path, recwarn: Any) -> None:
    seed_everything(0, verbose=False)
    callback = CALLBACK_FACTORIES[name]()
    model = FrozenLSTM()
    assert not any(p.requires_grad for p in model.parameters())
    _trainer(tmp_path, [callback]).fit(model, sequence_loader())  # no exception from any hook
    assert len(model.losses) == 6  # every batch ran (and returned no loss); no probe ran on a frozen model
    messages = _by_callback(recwarn.list).get(name, [])
    assert len(messages) <= 1, messages  # at most one clear warning, never one per step
    if name in ("GradientFlowCallback", "SharpnessCallback"):
        assert len(messages) == 1 and "no trainable parameters" in messages[0], messages
    assert not callback.interventions  # type: ignore[attr-defined]


def test_no_logger_warns_once_and_trains(tmp_path: Path, recwarn: Any) -> None:
    seed_everything(0, verbose=False)
    callbacks = [spec() for spec in CALLBACK_FACTORIES.values()]
    model = TinyLSTM(saturated=True)
    trainer = _trainer(tmp_path, callbacks, logger=False)
    trainer.fit(model, sequence_loader())
    assert trainer.global_step == 6 and all(math.isfinite(v) for v in model.losses)
    logger_warnings = {
        name: [m for m in messages if "logger" in m] for name, messages in _by_callback(recwarn.list).items()
    }
    assert len(logger_warnings.get("GradientFlowCallback", [])) == 1, logger_warnings
    for name, messages in logger_warnings.items():
        assert len(messages) <= 1, (name, messages)
    # nothing lost: the interventions are still made and recorded without a logger
    by_name = {type(c).__name__: c for c in callbacks}
    assert len(by_name["GradientFlowCallback"].interventions) == 6  # type: ignore[attr-defined]
    assert [r.kind for r in by_name["GateSurgeryCallback"].interventions] == ["gate_surgery"]  # type: ignore[attr-defined]


NAN_BATCH = 2


@pytest.mark.parametrize("auto_intervene", [True, False], ids=["intervene", "observe"])
def test_nan_batch_never_crashes_a_hook_and_checkpoints_are_written(
    tmp_path: Path, recwarn: Any, auto_intervene: bool
) -> None:
    seed_everything(0, verbose=False)
    callbacks = [spec.cls(**{**spec.kwargs, "auto_intervene": auto_intervene}) for spec in CALLBACK_FACTORIES.values()]
    checkpoints = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=str(checkpoints), every_n_train_steps=2, save_top_k=-1)
    model = TinyLSTM()
    trainer = _trainer(tmp_path, [*callbacks, checkpoint], enable_checkpointing=True)
    trainer.fit(model, sequence_loader(nan_batch=NAN_BATCH))  # an exception from any hook fails the test
    assert trainer.global_step == 6
    assert not math.isfinite(model.losses[NAN_BATCH])
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"epoch=0-step={s}.ckpt" for s in (2, 4, 6)]
    restored = torch.load(checkpoints / "epoch=0-step=6.ckpt", weights_only=False)
    assert {type(c).__name__ for c in callbacks} <= {key.split("{")[0] for key in restored["callbacks"]}
    weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    skips = [r for c in callbacks for r in c.interventions if r.kind == "skip_step"]  # type: ignore[attr-defined]
    if auto_intervene:
        # the NaN step was skipped before it reached the weights, and training went on from clean weights
        assert weights_finite
        assert skips and {r.step for r in skips} == {NAN_BATCH}, skips
        assert all(math.isfinite(v) for i, v in enumerate(model.losses) if i != NAN_BATCH)
    else:
        assert all(not r.applied for r in skips)  # observing only: recorded as what would have been done
    for name, messages in _by_callback(recwarn.list).items():  # a finding warns once, not once per step
        assert len(messages) == len(set(messages)), (name, messages)
