"""Reliability audit, whole-run items: all four callbacks together under faults.

* a logger whose ``log_metrics`` raises once: the run completes, each callback warns once;
* corrupt or empty checkpoint entries: one clear error naming the callback and the key, or a warning and a fresh
  start;
* a soak (slow): 3000 tiny steps with periodic NaN and spike batches under ``auto_intervene=True`` — memory flat,
  every container bounded, the learning rate never below its floor, and the run ends healthy.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Sized
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from lightning_gradflow import EarlyCollapseCallback, GateSurgeryCallback, GradientFlowCallback, SharpnessCallback
from tests.helpers.matrix_models import INPUT_SIZE, SEQ_LEN, TinyLSTM, sequence_loader
from tests.helpers.training import RecordingLogger, quiet_trainer

FAMILIES = ("gradflow/", "gates/", "sharpness/", "collapse/")


def _all_four(auto_intervene: bool = True) -> list[Callback]:
    return [
        GradientFlowCallback(auto_intervene=auto_intervene),
        GateSurgeryCallback(auto_intervene=auto_intervene, every_n_steps=2),
        SharpnessCallback(auto_intervene=auto_intervene, every_n_steps=2),
        EarlyCollapseCallback(auto_intervene=auto_intervene, every_n_steps=2),
    ]


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    """The quiet Trainer with a recording logger, 8 steps, in ``tmp_path`` (overridable)."""
    defaults = {"max_steps": 8, "default_root_dir": str(tmp_path), "logger": RecordingLogger()}
    return quiet_trainer(callbacks=callbacks, **{**defaults, **kwargs})


class FailOnceLogger(RecordingLogger):
    """Raises on the first ``log_metrics`` call that carries one of the given families' metrics, then works."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.family = family
        self.failed = False

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.failed and any(k.startswith(self.family) for k in metrics):
            self.failed = True
            raise OSError("disk full")
        super().log_metrics(metrics, step)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_logger_failing_once_warns_once_and_training_goes_on(family: str, tmp_path: Path) -> None:
    seed_everything(0, verbose=False)
    logger = FailOnceLogger(family)
    checkpoints = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=str(checkpoints), every_n_train_steps=4, save_top_k=-1)
    trainer = _trainer(tmp_path, [*_all_four(), checkpoint], logger=logger, enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyLSTM(saturated=True), sequence_loader())
    assert logger.failed, "the logger never failed: the test would prove nothing"
    assert trainer.global_step == 8
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt"]
    about_logger = [str(w.message) for w in caught if "FailOnceLogger.log_metrics raised OSError" in str(w.message)]
    assert len(about_logger) == 1, about_logger
    assert any(k.startswith(family) for _, row in logger.rows for k in row)  # later steps were logged again


def _checkpoint_of_all_four(tmp_path: Path) -> tuple[Path, list[Callback]]:
    seed_everything(0, verbose=False)
    callbacks = _all_four()
    trainer = _trainer(tmp_path, [*callbacks], max_steps=4)
    trainer.fit(TinyLSTM(saturated=True), sequence_loader())
    path = tmp_path / "all.ckpt"
    trainer.save_checkpoint(path)
    return path, callbacks


GARBAGE: dict[str, Any] = {
    "a list": [1, 2, 3],
    "a string": "corrupt",
    "wrong values": "WRONG_VALUES",  # every value of the state replaced by a string
    "missing keys": "MISSING_KEYS",  # only the first key kept
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
@pytest.mark.parametrize("index", range(4), ids=["gradflow", "gates", "sharpness", "collapse"])
def test_corrupt_checkpoint_state_gives_one_clear_error(garbage: str, index: int, tmp_path: Path, recwarn: Any) -> None:
    path, callbacks = _checkpoint_of_all_four(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    key = callbacks[index].state_key
    state = checkpoint["callbacks"][key]
    value = GARBAGE[garbage]
    if value == "WRONG_VALUES":
        value = {k: "nonsense" for k in state}
    elif value == "MISSING_KEYS":
        value = dict(list(state.items())[:1])
    checkpoint["callbacks"][key] = value
    torch.save(checkpoint, path)
    fresh = _all_four()
    trainer = _trainer(tmp_path, [*fresh], max_steps=6)
    with pytest.raises(ValueError, match="cannot restore its state") as info:
        trainer.fit(TinyLSTM(saturated=True), sequence_loader(), ckpt_path=str(path))
    message = str(info.value)
    assert type(fresh[index]).__name__ in message and key in message and "delete" in message, message


@pytest.mark.parametrize("empty", [{}, None], ids=["empty-dict", "none"])
def test_empty_checkpoint_state_warns_and_starts_afresh(empty: Any, tmp_path: Path) -> None:
    path, callbacks = _checkpoint_of_all_four(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    for callback in callbacks:
        checkpoint["callbacks"][callback.state_key] = empty
    torch.save(checkpoint, path)
    fresh = _all_four()
    trainer = _trainer(tmp_path, [*fresh], max_steps=6)
    with pytest.warns(RuntimeWarning, match="is empty") as caught:
        trainer.fit(TinyLSTM(saturated=True), sequence_loader(), ckpt_path=str(path))
    assert trainer.global_step == 6
    warned = {str(w.message).split(":")[0] for w in caught if "is empty" in str(w.message)}
    assert warned == {type(c).__name__ for c in fresh}


# ------------------------------------------------------------------------------------------------------- soak

SOAK_STEPS = 3000
BATCH = 8
NAN_EVERY = 250  # a batch holding a NaN
SPIKE_EVERY = 400  # a batch of inputs scaled by 30


class FaultyStream(Dataset):
    """Sequences whose batch ``k`` holds a NaN when ``k % NAN_EVERY == NAN_EVERY - 1``, a ×30 spike on others."""

    def __init__(self, steps: int) -> None:
        self.n = steps * BATCH
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(self.n, SEQ_LEN, INPUT_SIZE, generator=gen)
        self.y = torch.tanh(self.x.sum(dim=(1, 2)) / math.sqrt(SEQ_LEN * INPUT_SIZE)).unsqueeze(-1)
        for k in range(steps):
            rows = slice(k * BATCH, (k + 1) * BATCH)
            if k % NAN_EVERY == NAN_EVERY - 1:
                self.x[k * BATCH, 0, 0] = float("nan")
            elif k % SPIKE_EVERY == SPIKE_EVERY - 1:
                self.x[rows] *= 30.0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * 4096 / 2**20


def _container_sizes(obj: Any, prefix: str = "", depth: int = 0) -> dict[str, int]:
    """Sizes of every list/dict/set/deque reachable through attributes (two levels deep)."""
    sizes: dict[str, int] = {}
    for name, value in vars(obj).items():
        if isinstance(value, (list, dict, set, tuple)) or type(value).__name__ == "deque":
            assert isinstance(value, Sized)
            sizes[f"{prefix}{name}"] = len(value)
        elif depth < 2 and hasattr(value, "__dict__") and type(value).__module__.startswith("lightning_gradflow"):
            sizes.update(_container_sizes(value, f"{prefix}{name}.", depth + 1))
    return sizes


class Watch(Callback):
    """Records the learning rate every step, and memory and container sizes at a few points."""

    def __init__(self, watched: list[Callback], at: tuple[int, ...]) -> None:
        self.watched = watched
        self.at = at
        self.lrs: list[float] = []
        self.rss: dict[int, float] = {}
        self.sizes: dict[int, dict[str, int]] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
        if trainer.global_step in self.at:
            gc.collect()
            self.rss[trainer.global_step] = _rss_mb()
            self.sizes[trainer.global_step] = {
                f"{type(c).__name__}.{k}": v for c in self.watched for k, v in _container_sizes(c).items()
            }


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_soak_3000_steps_with_bad_batches(tmp_path: Path) -> None:
    seed_everything(0, verbose=False)
    callbacks = [
        GradientFlowCallback(auto_intervene=True),
        GateSurgeryCallback(auto_intervene=True),
        SharpnessCallback(auto_intervene=True),
        EarlyCollapseCallback(auto_intervene=True),
    ]
    marks = (1000, 2000, SOAK_STEPS)
    watch = Watch(callbacks, marks)
    model = TinyLSTM(lr=0.01)
    lr0 = model.lr
    trainer = _trainer(tmp_path, [*callbacks, watch], max_steps=SOAK_STEPS, log_every_n_steps=50)
    loader = DataLoader(FaultyStream(SOAK_STEPS), batch_size=BATCH, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    assert trainer.global_step == SOAK_STEPS, callbacks[3].stop_message  # type: ignore[attr-defined]
    # the run ends healthy: finite weights, a finite loss well below the first
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    bad = {k for k in range(SOAK_STEPS) if k % NAN_EVERY == NAN_EVERY - 1 or k % SPIKE_EVERY == SPIKE_EVERY - 1}
    healthy = [v for i, v in enumerate(model.losses) if i not in bad]
    tail = healthy[-100:]
    assert all(math.isfinite(v) for v in tail)
    assert sum(tail) / len(tail) < 0.5 * sum(healthy[:20]) / 20
    # the learning rate never went below the product of the floors of the two callbacks that scale it
    floor = lr0 * callbacks[2].min_lr_factor * getattr(callbacks[3], "min_lr_factor", 1.0)  # type: ignore[attr-defined]
    assert min(watch.lrs) >= floor * (1 - 1e-9), (min(watch.lrs), floor)
    # memory flat and every container bounded: nothing grows between the second and the last thousand steps
    assert watch.rss[SOAK_STEPS] - watch.rss[2000] < 25.0, watch.rss
    grown = {
        k: (watch.sizes[2000].get(k), v)
        for k, v in watch.sizes[SOAK_STEPS].items()
        if v > watch.sizes[2000].get(k, 0) + 16 and v > 64
    }
    assert not grown, grown
