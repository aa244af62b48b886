"""Constructor fuzz (reliability audit): every argument of every callback fed wrong and extreme values.

For each argument of each callback's signature: wrong types, NaN, ±inf, negative, zero, huge ints (2**70, 10**30),
huge floats, unknown strings, a list, None and a bool. Each value is either refused at construction with a
``TypeError``/``ValueError`` whose message names the argument (in backticks), or it is legal — and then a short fit of
a tiny model with an LSTM and a ReLU layer, with that value and ``auto_intervene=True``, completes within a timeout
without an exception from any hook. Any other exception at construction fails.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import seed_everything

from lightning_gradflow import EarlyCollapseCallback, GateSurgeryCallback, GradientFlowCallback, SharpnessCallback
from tests.helpers.matrix_models import TinyLSTM, sequence_loader
from tests.helpers.training import quiet_trainer

CLASSES = [GradientFlowCallback, GateSurgeryCallback, SharpnessCallback, EarlyCollapseCallback]

VALUES: dict[str, Any] = {
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "neg": -1,
    "negf": -0.5,
    "zero": 0,
    "zerof": 0.0,
    "huge": 10**30,
    "2**70": 2**70,
    "hugef": 1e300,
    "str": "bogus",
    "list": [1],
    "none": None,
    "true": True,
    "obj": object(),
}


def _same_as_default(value: Any, default: Any) -> bool:
    if type(value) is not type(default):
        return False
    try:
        return bool(value == default)
    except Exception:
        return False


def _cases() -> list[Any]:
    cases = []
    for cls in CLASSES:
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name == "self":
                continue
            for label, value in VALUES.items():
                if _same_as_default(value, parameter.default):
                    continue
                cases.append(pytest.param(cls, name, value, id=f"{cls.__name__}-{name}-{label}"))
    return cases


def _construct(cls: type, name: str, value: Any) -> Any:
    """The callback, or None when the value was refused with an error naming the argument."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**{name: value})
    except (TypeError, ValueError) as err:
        message = str(err)
    assert f"`{name}" in message, f"{cls.__name__}({name}={value!r}) raised without naming it: {message}"
    return None


@pytest.mark.parametrize(("cls", "name", "value"), _cases())
def test_constructor_refuses_naming_the_argument_or_accepts(cls: type, name: str, value: Any) -> None:
    _construct(cls, name, value)  # any exception other than a TypeError/ValueError naming the argument fails


def _accepted_cases() -> list[Any]:
    out = []
    for case in _cases():
        cls, name, value = case.values
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(**{name: value})
        except Exception:
            continue
        out.append(case)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("cls", "name", "value"), _accepted_cases())
def test_accepted_value_trains(cls: type, name: str, value: Any, tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {name: value}
    if name != "auto_intervene":
        kwargs["auto_intervene"] = True
    try:
        callback = cls(**kwargs)
    except (TypeError, ValueError) as err:  # legal alone, refused beside auto_intervene: it must say why
        message = str(err)
        assert f"`{name}" in message or "auto_intervene" in message, message
        return
    seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_steps=3, callbacks=[callback], default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyLSTM(saturated=True), sequence_loader(n=24))
    assert trainer.global_step == 3 or trainer.should_stop
