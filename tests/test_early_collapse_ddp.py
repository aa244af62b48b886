"""EarlyCollapseCallback under DDP: two CPU processes (gloo, ``ddp_spawn``).

Each rank computes its own loss; the extreme batch reaches rank 1 only. The callback averages the per-step loss across
ranks before the detectors see it, so both ranks warn, cut the learning rate and roll back at the same steps, and their
weights stay identical.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from collapse_models import CollapseRankReport, ReluMLP, collapse_trainer, regression_data
from lightning.pytorch import seed_everything
from models import RankStridedDataset
from torch.utils.data import DataLoader

from lightning_gradflow.callbacks.early_collapse import EarlyCollapseCallback

WORLD_SIZE = 2
BATCH = 16
STEPS = 60
EXTREME = 30


def _loader() -> DataLoader:
    """Rank r reads samples r, r + 2, ...; at step EXTREME rank 1's inputs are × 1000, rank 0's are normal."""
    x, y = regression_data(WORLD_SIZE * BATCH * STEPS)
    rows = slice(WORLD_SIZE * BATCH * EXTREME, WORLD_SIZE * BATCH * (EXTREME + 1))
    block = x[rows]
    block[1::WORLD_SIZE] *= 1e3
    x[rows] = block
    return DataLoader(RankStridedDataset(x, y, WORLD_SIZE), batch_size=BATCH, shuffle=False)


@pytest.mark.ddp
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_every_rank_makes_the_same_decision_at_the_same_step(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    seed_everything(0, verbose=False)
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10, every_n_steps=10)
    trainer = collapse_trainer(
        strategy="ddp_spawn",
        devices=WORLD_SIZE,
        use_distributed_sampler=False,
        max_steps=STEPS,
        callbacks=[callback, CollapseRankReport(str(tmp_path))],
    )
    trainer.fit(ReluMLP(), _loader())

    reports: list[dict[str, Any]] = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    zero, one = reports
    assert [r["world_size"] for r in reports] == [WORLD_SIZE] * WORLD_SIZE
    local = {r["rank"]: dict(r["losses"]) for r in reports}
    assert local[1][EXTREME] > 1e3 * local[0][EXTREME]  # only rank 1 saw the extreme batch

    assert zero["interventions"] == one["interventions"]
    assert zero["warnings"] == one["warnings"]
    kinds = [(i["step"], i["kind"]) for i in zero["interventions"]]
    assert (EXTREME + 1, "rollback") in kinds and zero["rollbacks"] == one["rollbacks"] == 1
    for name, w in zero["weights"].items():
        assert torch.equal(w, one["weights"][name]), name
        assert torch.isfinite(w).all()
    assert all(math.isfinite(loss) for step, loss in zero["losses"] if step > EXTREME + 1)
