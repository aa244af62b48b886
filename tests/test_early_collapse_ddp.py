"""EarlyCollapseCallback under DDP: two CPU processes (gloo, ``ddp_spawn``).

Each rank computes its own loss; the extreme batch reaches rank 1 only. The callback averages the per-step loss across
ranks before the detectors see it, so both ranks warn, cut the learning rate and roll back at the same steps, and their
weights stay identical.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from lightning_gradflow.callbacks.early_collapse import EarlyCollapseCallback
from tests.helpers import ddp
from tests.helpers.collapse_models import ReluMLP, regression_data

BATCH = 16
STEPS = 60
EXTREME = 30


def _loader() -> DataLoader:
    """Rank r reads samples r, r + 2, ...; at step EXTREME rank 1's inputs are × 1000, rank 0's are normal."""
    x, y = regression_data(ddp.WORLD_SIZE * BATCH * STEPS)
    rows = slice(ddp.WORLD_SIZE * BATCH * EXTREME, ddp.WORLD_SIZE * BATCH * (EXTREME + 1))
    block = x[rows]
    block[1 :: ddp.WORLD_SIZE] *= 1e3
    x[rows] = block
    return DataLoader(ddp.RankStridedDataset(x, y, ddp.WORLD_SIZE), batch_size=BATCH, shuffle=False)


@pytest.mark.ddp
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_every_rank_makes_the_same_decision_at_the_same_step(tmp_path: Path) -> None:
    seed_everything(0, verbose=False)
    callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=10, every_n_steps=10)
    trainer = ddp.trainer(
        max_epochs=1,
        max_steps=STEPS,
        callbacks=[callback, ddp.RankReport(str(tmp_path), EarlyCollapseCallback, ("warnings", "rollbacks"))],
    )
    trainer.fit(ReluMLP(), _loader())

    reports = ddp.reports(tmp_path)
    zero, one = reports
    assert [r["world_size"] for r in reports] == [ddp.WORLD_SIZE] * ddp.WORLD_SIZE
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
