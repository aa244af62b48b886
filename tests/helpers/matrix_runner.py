"""Runs one support-matrix cell (see ``scripts/support_matrix.py``) and summarises what happened in a picklable dict.

DDP cells run several at a time in one pair of spawned processes (:func:`run_ddp_cells`): each process sets the
``torchrun`` environment variables, so Lightning's ``strategy="ddp"`` joins the existing processes instead of
launching new ones, and the process group made for the first cell serves the next ones. Each rank saves its summary
to a file, since spawned processes cannot hand objects back.
"""

from __future__ import annotations

import math
import os
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision

from scripts.support_matrix import CALLBACK_FACTORIES, Cell
from tests.helpers.matrix_models import TinyDataModule, TinyLSTM, sequence_loader
from tests.helpers.training import QUIET, RecordingLogger, free_port

MAX_STEPS = 6
#: Resume cells: the first run writes checkpoints every RESUME_AT steps and runs to RESUME_STEPS; the second run
#: starts from the step-RESUME_AT checkpoint (mid-run) and runs to RESUME_STEPS too.
RESUME_AT = 4
RESUME_STEPS = 8


class StateProbe(Callback):
    """Records each registered callback's ``state_dict()`` right after a checkpoint's restore.

    List it first: its ``on_fit_start`` then runs after the restore and before the other callbacks' ``on_fit_start``.
    """

    def __init__(self) -> None:
        self.states: dict[str, Any] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if type(callback).__name__ in CALLBACK_FACTORIES:
                self.states[type(callback).__name__] = callback.state_dict()


def make_model(cell: Cell) -> TinyLSTM:
    return TinyLSTM(optimizer=cell.optimizers, manual=cell.optimization == "manual", saturated=True)


def trainer_kwargs(cell: Cell, max_steps: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {**QUIET, "max_steps": max_steps, "accumulate_grad_batches": cell.accumulate}
    if cell.precision == "16-mixed":  # on the CPU, Lightning would silently switch to bf16 without a scaler
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    else:
        kwargs["precision"] = cell.precision
    if cell.strategy == "ddp":
        kwargs.update(strategy="ddp", devices=2)
    return kwargs


def summary(
    trainer: Trainer, model: LightningModule, recorder: RecordingLogger, probe: StateProbe | None = None
) -> dict:
    ours = [c for c in trainer.callbacks if type(c).__name__ in CALLBACK_FACTORIES]  # type: ignore[attr-defined]
    return {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "losses": list(getattr(model, "losses", [])),
        "keys": sorted(recorder.keys()),
        "interventions": {type(c).__name__: [i.to_dict() for i in getattr(c, "interventions", [])] for c in ours},
        "states": {type(c).__name__: c.state_dict() for c in ours},
        # the loss a callback judged last (EarlyCollapseCallback's verdicts), to check it is the model's loss
        "reported_loss": {
            type(c).__name__: float(c.last_verdict.loss)
            for c in ours
            if getattr(getattr(c, "last_verdict", None), "loss", None) is not None
        },
        "restored": dict(probe.states) if probe is not None else {},
        "weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "error": None,
    }


def _fit(
    cell: Cell, root: Path, names: list[str], max_steps: int, extra: list[Callback], ckpt_path: str | None = None
) -> dict:
    seed_everything(0, verbose=False)
    recorder = RecordingLogger()
    tensorboard = TensorBoardLogger(str(root), name="tb", version=0, default_hp_metric=False)
    probe = StateProbe()
    kwargs = trainer_kwargs(cell, max_steps)
    if any(isinstance(c, ModelCheckpoint) for c in extra):
        kwargs["enable_checkpointing"] = True
    trainer = Trainer(
        logger=[tensorboard, recorder], callbacks=[probe, *(CALLBACK_FACTORIES[n]() for n in names), *extra], **kwargs
    )
    model = make_model(cell)
    fitted: Any = torch.compile(model) if cell.compile else model
    trainer.fit(fitted, sequence_loader(), ckpt_path=ckpt_path)
    return summary(trainer, model, recorder, probe)


def run_cell(cell: Cell, root: Path, names: list[str] | None = None) -> dict:
    """Runs ``cell`` with the callbacks ``names`` (default: all registered); exceptions propagate.

    For resume cells, returns the resumed run, with the first run under ``"first"`` and the checkpoint it resumed
    from under ``"ckpt"``.
    """
    names = list(CALLBACK_FACTORIES) if names is None else names
    root.mkdir(parents=True, exist_ok=True)
    if cell.cli:
        return run_cli(cell, root, names)
    if not cell.resume:
        return _fit(cell, root, names, MAX_STEPS, [])
    checkpoint = ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=RESUME_AT, save_top_k=-1)
    first = _fit(cell, root / "first", names, RESUME_STEPS, [checkpoint])
    paths = sorted((root / "ckpt").glob(f"*step={RESUME_AT}.ckpt"))
    assert len(paths) == 1, sorted(p.name for p in (root / "ckpt").iterdir())
    resumed = _fit(cell, root / "resumed", names, RESUME_STEPS, [], ckpt_path=str(paths[0]))
    resumed["first"] = first
    resumed["ckpt"] = torch.load(paths[0], map_location="cpu", weights_only=False)
    return resumed


def cli_config(cell: Cell, root: Path, names: list[str]) -> dict[str, Any]:
    """The LightningCLI YAML of a cell (callbacks as ``class_path``/``init_args``)."""
    kwargs = trainer_kwargs(cell, MAX_STEPS)
    assert "plugins" not in kwargs, "CLI cells use a precision string"
    trainer = {k: v for k, v in kwargs.items() if k != "precision"} | {"precision": cell.precision}
    trainer["logger"] = [  # TensorBoard first: LightningCLI saves its config in the first logger's directory
        {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(root), "name": "tb", "version": 0, "default_hp_metric": False},
        },
        {"class_path": "tests.helpers.training.RecordingLogger"},
    ]
    specs = [CALLBACK_FACTORIES[n] for n in names]
    trainer["callbacks"] = [{"class_path": s.class_path, "init_args": dict(s.kwargs)} for s in specs]
    model = {"optimizer": cell.optimizers, "manual": cell.optimization == "manual", "saturated": True}
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": {"n": 64, "batch_size": 8}}


def run_cli(cell: Cell, root: Path, names: list[str]) -> dict:
    from lightning.pytorch.cli import LightningCLI

    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cli_config(cell, root, names), sort_keys=False))
    cli = LightningCLI(
        TinyLSTM,
        TinyDataModule,
        args=["fit", "--config", str(config)],
        save_config_kwargs={"overwrite": True},
    )
    recorder = next(lg for lg in cli.trainer.loggers if isinstance(lg, RecordingLogger))
    attached = [type(c).__name__ for c in cli.trainer.callbacks]  # type: ignore[attr-defined]
    assert all(name in attached for name in names), attached
    return summary(cli.trainer, cli.model, recorder)


def finite(losses: list[float]) -> bool:
    return bool(losses) and all(math.isfinite(v) for v in losses)


# ------------------------------------------------------------------------------------------------------- DDP


def ddp_worker(rank: int, runs: list[tuple[str, Cell, list[str]]], root: str, port: int) -> None:
    """One of two DDP processes: runs every ``(key, cell, callback names)``, saving ``<root>/<key>.rank<r>.pt``.

    An exception is caught and saved in place of the summary.
    """
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    for key, cell, names in runs:
        try:
            result = run_cell(cell, Path(root) / key, names)
        except Exception as error:  # recorded for the test process to assert on
            result = {"rank": rank, "error": (type(error).__name__, str(error), traceback.format_exc())}
        torch.save(result, Path(root) / f"{key}.rank{rank}.pt")


def run_ddp_cells(
    runs: list[tuple[str, Cell, list[str]]], root: Path, timeout_s: float = 600.0
) -> dict[str, list[dict]]:
    """Runs DDP cells, given as ``(key, cell, callback names)``, one after another in one pair of processes.

    Returns ``{key: [rank 0 summary, rank 1 summary]}``.
    """
    import time

    import torch.multiprocessing as mp

    root.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(
        ddp_worker, args=(runs, str(root), free_port()), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s  # a hang guard: a rank-divergent collective would wait forever
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the DDP processes did not finish within {timeout_s:.0f} s (a hang?)")
    results = {}
    for key, _, _ in runs:
        results[key] = [torch.load(root / f"{key}.rank{r}.pt", weights_only=False) for r in range(2)]
    return results
