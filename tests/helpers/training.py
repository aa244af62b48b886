"""What every callback test shares: the recording logger, the quiet Trainer and small tools (warnings, weights,
examples, a free port). DDP's extras are in :mod:`tests.helpers.ddp`.

Everything here is defined at module level so that it pickles: ``ddp_spawn`` sends the Trainer's loggers and
callbacks to its worker processes, which import this module by name (``tests.helpers.training``; the spawned
processes inherit the test process's ``sys.path``, on which pytest put the repository root).
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import warnings
from argparse import Namespace
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch import Tensor

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------------ the logger


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory: ``rows`` is a list of ``(step, metrics)``.

    Not decorated with ``rank_zero_only``, so under DDP each rank records what the callbacks logged there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def series(self, key: str) -> dict[int, float]:
        """``{step: value}`` of one metric (the last value wins when a step was logged twice)."""
        return {step: m[key] for step, m in self.rows if key in m and step is not None}

    def keys(self) -> set[str]:
        return {k for _, m in self.rows for k in m}

    def rows_with(self, key: str) -> dict[int, dict[str, float]]:
        """``{step: metrics}`` of the rows holding ``key`` (e.g. the rows one callback wrote)."""
        return rows_with(self.rows, key)

    def gradflow_rows(self) -> dict[int, dict[str, float]]:
        """The rows GradientFlowCallback wrote (those holding ``gradflow/grad_norm_total``)."""
        return self.rows_with("gradflow/grad_norm_total")

    def gate_rows(self) -> dict[int, dict[str, float]]:
        """The rows GateSurgeryCallback wrote (those holding ``gates/surgeries``)."""
        return self.rows_with("gates/surgeries")


def rows_with(rows: Iterable[tuple[int | None, dict[str, float]]], key: str) -> dict[int, dict[str, float]]:
    """``{step: metrics}`` of the recorded ``rows`` holding ``key`` (also for rows a DDP rank saved to a file)."""
    return {step: m for step, m in rows if key in m and step is not None}


# ----------------------------------------------------------------------------------------------------- the Trainer

#: The Trainer arguments of every test: CPU, one device, no progress bar, model summary, checkpointing or sanity
#: checks, and a row logged every step.
QUIET: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
}


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A Trainer with :data:`QUIET` and no logger; any argument overrides them."""
    return Trainer(**{**QUIET, "logger": False, **kwargs})


def fit_recorded(
    model: LightningModule, data: Any, callbacks: list[Callback], steps: int, **kwargs: Any
) -> RecordingLogger:
    """Trains ``model`` for exactly ``steps`` steps on the quiet Trainer and returns its recording logger.

    ``logger`` (default: a new :class:`RecordingLogger`) and ``ckpt_path`` are taken from ``kwargs``; the rest go to
    :func:`quiet_trainer`.
    """
    logger = kwargs.pop("logger", None) or RecordingLogger()
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = quiet_trainer(max_steps=steps, logger=logger, callbacks=callbacks, **kwargs)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    assert trainer.global_step == steps
    return logger


# --------------------------------------------------------------------------------------------------------- network


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------- tools


def warnings_from(
    record: Iterable[warnings.WarningMessage], source: str, contains: str = "", category: type[Warning] = Warning
) -> list[str]:
    """The messages of the recorded warnings that start with ``source`` (a callback's name), hold ``contains`` and
    are of ``category``."""
    return [
        str(w.message)
        for w in record
        if issubclass(w.category, category) and str(w.message).startswith(source) and contains in str(w.message)
    ]


def messages_with(record: Iterable[warnings.WarningMessage], text: str) -> list[str]:
    """The messages of the recorded warnings that hold ``text`` anywhere."""
    return [str(w.message) for w in record if text in str(w.message)]


def state_copy(module: torch.nn.Module) -> dict[str, Tensor]:
    """Detached clones of a module's ``state_dict()``."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Whether two name → tensor maps have the same names and bitwise equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (registered in ``sys.modules``: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", REPO / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
