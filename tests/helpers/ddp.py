"""What the DDP tests share: two CPU processes (gloo, ``ddp_spawn``), a dataset that tells each rank its samples, and
the per-rank report the test process reads back (spawned processes cannot hand objects back).

Use it as ``from tests.helpers import ddp``: ``ddp.trainer(...)``, ``ddp.RankReport(...)``, ``ddp.reports(tmp_path)``.
Defined at module level, so it pickles: the spawned workers import this module by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from tests.helpers.training import RecordingLogger, quiet_trainer

#: The processes of every DDP test.
WORLD_SIZE = 2


class RankStridedDataset(torch.utils.data.Dataset):
    """Rank ``r`` of ``w`` reads samples ``r, r + w, r + 2w, ...`` (rank read lazily, in the worker process).

    Use with :func:`trainer` (``use_distributed_sampler=False``) and an unshuffled DataLoader: which sample lands in
    which rank's batch is then known in advance (Lightning's own DistributedSampler always shuffles training data).
    """

    def __init__(self, x: Tensor, y: Tensor, world_size: int) -> None:
        self.x, self.y, self.world_size = x, y, world_size

    def __len__(self) -> int:
        return len(self.x) // self.world_size

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        j = i * self.world_size + rank
        return self.x[j], self.y[j]


class RankReport(Callback):
    """Under DDP, writes what each rank saw to ``<out_dir>/rank<r>.pt`` when training ends (``ddp_spawn`` workers
    cannot hand objects back to the test process).

    The file holds ``rank``, ``world_size``, the module's ``losses``, the final ``weights``, the first optimizer's
    state (``optimizer``) and learning rate (``lr``), the ``rows`` a :class:`RecordingLogger` got on that rank, and,
    of the one callback of type ``watched``, its ``interventions`` and each attribute named in ``attributes``;
    ``probes`` maps further keys to ``(callback type, attribute)`` of other callbacks (e.g. reference probes).

    Args:
        out_dir: where the files go.
        watched: the type of the callback under test.
        attributes: attributes of the watched callback to report (under their own names).
        probes: report key → ``(callback type, attribute name)``.
    """

    def __init__(
        self,
        out_dir: str,
        watched: type[Callback],
        attributes: tuple[str, ...] = (),
        probes: dict[str, tuple[type[Callback], str]] | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.watched = watched
        self.attributes = attributes
        self.probes = probes or {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        def find(cls: type[Callback]) -> Any:
            return next(c for c in trainer.callbacks if isinstance(c, cls))  # type: ignore[attr-defined]

        watched = find(self.watched)
        recording = next((lg for lg in trainer.loggers if isinstance(lg, RecordingLogger)), None)
        optimizer = trainer.optimizers[0]
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "losses": list(getattr(pl_module, "losses", [])),
            "weights": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "lr": optimizer.param_groups[0]["lr"],
            "rows": list(recording.rows) if recording is not None else [],
            "interventions": [i.to_dict() for i in watched.interventions],
            **{name: getattr(watched, name) for name in self.attributes},
            **{key: getattr(find(cls), name) for key, (cls, name) in self.probes.items()},
        }
        torch.save(report, f"{self.out_dir}/rank{trainer.global_rank}.pt")


def trainer(**kwargs: Any) -> Trainer:
    """The quiet Trainer on :data:`WORLD_SIZE` CPU processes (gloo, ``ddp_spawn``), without Lightning's
    DistributedSampler (use :class:`RankStridedDataset`); one OpenMP thread per process unless set."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return quiet_trainer(strategy="ddp_spawn", devices=WORLD_SIZE, use_distributed_sampler=False, **kwargs)


def reports(out_dir: Path) -> list[dict[str, Any]]:
    """The reports :class:`RankReport` wrote, rank 0 first."""
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
