"""SharpnessCallback under DDP: two CPU processes (gloo, ``ddp_spawn``).

Each rank probes its own batch, so the local sharpness differs per rank; the data is built so that deciding on local
values would make only one rank cut its learning rate. The callback averages across ranks first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from models import RankStridedDataset, RecordingLogger, quiet_trainer
from sharpness_models import LinearRegression, LocalProbe, SharpnessRankReport, regression_data
from torch.utils.data import DataLoader

from lightning_gradflow.callbacks.sharpness import SharpnessCallback

WORLD_SIZE = 2
PER_RANK = 32
STEPS = 6


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 1's inputs are twice rank 0's scale, so its Hessian is four times as sharp."""
    x, y = regression_data(WORLD_SIZE * PER_RANK)
    x[1::WORLD_SIZE] *= 2.0
    y[1::WORLD_SIZE] *= 2.0
    return x, y


@pytest.mark.ddp
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ranks_decide_on_the_mean_and_make_the_same_change(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    x, y = _data()
    from sharpness_models import exact_hessian

    local = [float(torch.linalg.eigvalsh(exact_hessian(x[r::WORLD_SIZE]))[-1]) for r in range(WORLD_SIZE)]
    mean = sum(local) / WORLD_SIZE
    lr = 1.5 * 2 / mean  # the mean is 1.5× past the threshold: rank 0 alone (0.6×) would not act, rank 1 (2.4×) would
    assert local[0] * lr / 2 < 1.1 < local[1] * lr / 2
    callback = SharpnessCallback(
        every_n_steps=1,
        metrics=("lambda_max", "stability_ratio"),
        hvp="double_backward",
        auto_intervene=True,
        patience=1,
    )
    trainer = quiet_trainer(
        strategy="ddp_spawn",
        devices=WORLD_SIZE,
        use_distributed_sampler=False,
        max_steps=STEPS,
        logger=RecordingLogger(),
        callbacks=[callback, LocalProbe(), SharpnessRankReport(str(tmp_path))],
    )
    loader = DataLoader(RankStridedDataset(x, y, WORLD_SIZE), batch_size=PER_RANK, shuffle=False)
    trainer.fit(LinearRegression(lr=lr), loader)

    reports: list[dict[str, Any]] = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    zero, one = reports
    assert [r["world_size"] for r in reports] == [WORLD_SIZE] * WORLD_SIZE
    assert zero["local"][0] == pytest.approx(local[0], rel=1e-5)  # each rank probed its own batch
    assert one["local"][0] == pytest.approx(local[1], rel=1e-5)

    rows = {step: m for step, m in zero["rows"] if "sharpness/lambda_max" in m}
    assert {step: m for step, m in one["rows"] if "sharpness/lambda_max" in m} == rows  # same numbers on every rank
    assert rows[0]["sharpness/lambda_max"] == pytest.approx(mean, rel=1e-4)
    assert rows[0]["sharpness/stability_ratio"] == pytest.approx(1.5, rel=1e-4)

    assert zero["interventions"] == one["interventions"]
    assert [(i["step"], i["applied"]) for i in zero["interventions"]] == [(0, True)]
    assert zero["factor"] == one["factor"] == 0.5
    assert zero["lr"] == one["lr"] == pytest.approx(lr / 2)
    for name, value in zero["weights"].items():
        assert torch.equal(value, one["weights"][name]), name
