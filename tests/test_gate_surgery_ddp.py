"""GateSurgeryCallback under DDP: two CPU processes (gloo, ``ddp_spawn``).

Gate activations come from each rank's own batch, so the statistics differ per rank. The callback sums the per-unit
counts across ranks before deciding; the data is built so that deciding on local statistics would make the ranks
repair different rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from lightning_gradflow.callbacks.gate_surgery import GateSurgeryCallback
from tests.helpers import ddp
from tests.helpers.gate_models import INPUT_SIZE, RecurrentRegressor, saturate_
from tests.helpers.training import RecordingLogger, rows_with

BATCH = 8
STEPS = 4
HIDDEN = 8
HOT_FEATURE = 3  # large on rank 1's samples only


def _loader() -> DataLoader:
    """Rank r reads samples r, r + 2, ...; feature 3 is 20 on rank 1's samples and 0 on rank 0's."""
    gen = torch.Generator().manual_seed(0)
    n = ddp.WORLD_SIZE * BATCH * STEPS
    x = torch.randn(n, 10, INPUT_SIZE, generator=gen)
    x[0 :: ddp.WORLD_SIZE, :, HOT_FEATURE] = 0.0
    x[1 :: ddp.WORLD_SIZE, :, HOT_FEATURE] = 20.0
    y = torch.tanh(x[..., :1].cumsum(1) / 10**0.5)
    return DataLoader(ddp.RankStridedDataset(x, y, ddp.WORLD_SIZE), batch_size=BATCH, shuffle=False)


def _model() -> RecurrentRegressor:
    """Input gate saturated everywhere; forget units 0-3 saturated only where feature 3 is large (rank 1)."""
    seed_everything(0, verbose=False)
    model = RecurrentRegressor(hidden=HIDDEN, lr=1e-3)
    saturate_(model.rnn, {0: -8.0})
    with torch.no_grad():
        model.rnn.weight_ih_l0[:, HOT_FEATURE] = 0.0
        model.rnn.weight_ih_l0[HIDDEN : HIDDEN + 4, HOT_FEATURE] = 5.0
    return model


@pytest.mark.ddp
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ranks_decide_on_reduced_statistics_and_change_the_same_rows(tmp_path: Path) -> None:
    callback = GateSurgeryCallback(every_n_steps=1, patience=2, auto_intervene=True)
    t = ddp.trainer(
        max_steps=STEPS,
        logger=RecordingLogger(),
        callbacks=[callback, ddp.RankReport(str(tmp_path), GateSurgeryCallback)],
    )
    t.fit(_model(), _loader())

    reports = ddp.reports(tmp_path)
    zero, one = reports
    assert [r["world_size"] for r in reports] == [ddp.WORLD_SIZE] * ddp.WORLD_SIZE
    assert zero["losses"][0] != one["losses"][0]  # different data on each rank

    # rank 1 alone would have found 4 forget units saturated on all of its positions; summed over both ranks they
    # are saturated on half the positions, below the 95% unit threshold, so no rank touches them
    rows = rows_with(zero["rows"], "gates/surgeries")
    assert rows_with(one["rows"], "gates/surgeries") == rows
    assert rows[0]["gates/saturation/rnn/l0/forget"] == pytest.approx(0.25, abs=0.01)
    assert rows[0]["gates/saturated_units/rnn/l0/forget"] == 0.0

    assert zero["interventions"] == one["interventions"]
    assert [(i["step"], i["target"], i["applied"]) for i in zero["interventions"]] == [(1, "rnn/l0/input", True)]
    assert zero["interventions"][0]["after"] < 0.05
    for name, value in zero["weights"].items():
        assert torch.equal(value, one["weights"][name]), name
    for key, state in zero["optimizer"]["state"].items():
        for entry, value in state.items():
            assert torch.equal(value, one["optimizer"]["state"][key][entry]), (key, entry)
