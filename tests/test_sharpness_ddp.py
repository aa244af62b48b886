"""SharpnessCallback under DDP: two CPU processes (gloo, ``ddp_spawn``).

Each rank probes its own batch, so the local sharpness differs per rank; the data is built so that deciding on local
values would make only one rank cut its learning rate. The callback averages across ranks first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_gradflow.callbacks.sharpness import SharpnessCallback
from tests.helpers import ddp
from tests.helpers.sharpness_models import LinearRegression, LocalProbe, regression_data, top_eigenvalue
from tests.helpers.training import RecordingLogger, rows_with

PER_RANK = 32
STEPS = 6


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 1's inputs are twice rank 0's scale, so its Hessian is four times as sharp."""
    x, y = regression_data(ddp.WORLD_SIZE * PER_RANK)
    x[1 :: ddp.WORLD_SIZE] *= 2.0
    y[1 :: ddp.WORLD_SIZE] *= 2.0
    return x, y


@pytest.mark.ddp
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ranks_decide_on_the_mean_and_make_the_same_change(tmp_path: Path) -> None:
    x, y = _data()
    local = [top_eigenvalue(x[r :: ddp.WORLD_SIZE]) for r in range(ddp.WORLD_SIZE)]
    mean = sum(local) / ddp.WORLD_SIZE
    lr = 1.5 * 2 / mean  # the mean is 1.5× past the threshold: rank 0 alone (0.6×) would not act, rank 1 (2.4×) would
    assert local[0] * lr / 2 < 1.1 < local[1] * lr / 2
    callback = SharpnessCallback(
        every_n_steps=1,
        metrics=("lambda_max", "stability_ratio"),
        hvp="double_backward",
        auto_intervene=True,
        patience=1,
    )
    trainer = ddp.trainer(
        max_steps=STEPS,
        logger=RecordingLogger(),
        callbacks=[
            callback,
            LocalProbe(),
            ddp.RankReport(str(tmp_path), SharpnessCallback, ("cumulative_factor",), {"local": (LocalProbe, "local")}),
        ],
    )
    loader = DataLoader(ddp.RankStridedDataset(x, y, ddp.WORLD_SIZE), batch_size=PER_RANK, shuffle=False)
    trainer.fit(LinearRegression(lr=lr), loader)

    reports = ddp.reports(tmp_path)
    zero, one = reports
    assert [r["world_size"] for r in reports] == [ddp.WORLD_SIZE] * ddp.WORLD_SIZE
    assert zero["local"][0] == pytest.approx(local[0], rel=1e-5)  # each rank probed its own batch
    assert one["local"][0] == pytest.approx(local[1], rel=1e-5)

    rows = rows_with(zero["rows"], "sharpness/lambda_max")
    assert rows_with(one["rows"], "sharpness/lambda_max") == rows  # same numbers on every rank
    assert rows[0]["sharpness/lambda_max"] == pytest.approx(mean, rel=1e-4)
    assert rows[0]["sharpness/stability_ratio"] == pytest.approx(1.5, rel=1e-4)

    assert zero["interventions"] == one["interventions"]
    assert [(i["step"], i["applied"]) for i in zero["interventions"]] == [(0, True)]
    assert zero["cumulative_factor"] == one["cumulative_factor"] == 0.5
    assert zero["lr"] == one["lr"] == pytest.approx(lr / 2)
    for name, value in zero["weights"].items():
        assert torch.equal(value, one["weights"][name]), name
