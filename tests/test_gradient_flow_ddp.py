"""GradientFlowCallback under DDP: two CPU processes (gloo, ``ddp_spawn``).

After DDP's backward every rank holds the same all-reduced gradients, so the logged norms must be those of the
all-reduced gradients, and every decision (clip, skip) must come out the same on both ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from lightning_gradflow import GradientFlowCallback
from tests.helpers import ddp
from tests.helpers.models import GradNormProbe, SmallMLP
from tests.helpers.training import RecordingLogger, rows_with

BATCH = 8
STEPS = 6
NAN_STEP = 4  # a NaN sample in rank 1's batch at this step, none in rank 0's


def _ddp_loader() -> DataLoader:
    """Unshuffled data; rank r reads the samples r, r + 2, r + 4, ... (see ddp.RankStridedDataset)."""
    gen = torch.Generator().manual_seed(0)
    n = ddp.WORLD_SIZE * BATCH * STEPS
    x = torch.randn(n, 8, generator=gen)
    y = torch.tanh(x[:, :1] - x[:, 1:2])
    x[ddp.WORLD_SIZE * NAN_STEP * BATCH + 1, 0] = float("nan")  # the first sample of rank 1's batch NAN_STEP
    return DataLoader(ddp.RankStridedDataset(x, y, ddp.WORLD_SIZE), batch_size=BATCH, shuffle=False)


@pytest.mark.ddp
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_logs_all_reduced_norms_and_decides_alike_on_every_rank(tmp_path: Path) -> None:
    seed_everything(0, verbose=False)
    callback = GradientFlowCallback(auto_intervene=True, clip_mode="zscore", warmup_steps=2, z_threshold=0.5)
    trainer = ddp.trainer(
        max_steps=STEPS,
        logger=RecordingLogger(),
        # the probe runs before the callback, so it sees the gradients the callback measures (before any clipping)
        callbacks=[
            GradNormProbe(),
            callback,
            ddp.RankReport(str(tmp_path), GradientFlowCallback, ("layers",), {"probe": (GradNormProbe, "norms")}),
        ],
    )
    trainer.fit(SmallMLP(lr=0.01, optimizer="adam"), _ddp_loader())

    reports = ddp.reports(tmp_path)
    assert [r["world_size"] for r in reports] == [ddp.WORLD_SIZE] * ddp.WORLD_SIZE
    zero, one = reports

    # the ranks trained on different data (rank 1 alone saw the NaN) ...
    assert math.isfinite(zero["losses"][NAN_STEP]) and not math.isfinite(one["losses"][NAN_STEP])
    assert zero["losses"][0] != one["losses"][0]

    # ... yet rank 0 logs the norms of the all-reduced gradients, and rank 1 computes exactly the same numbers
    rows, rows_one = (rows_with(report["rows"], "gradflow/grad_norm_total") for report in (zero, one))
    assert sorted(rows) == sorted(rows_one) == list(range(STEPS))
    # DDP's all-reduce: the same gradients on both ranks (all NaN at NAN_STEP, where rank 1's batch had a NaN)
    assert {s: n for s, n in zero["probe"].items() if s != NAN_STEP} == {
        s: n for s, n in one["probe"].items() if s != NAN_STEP
    }
    assert all(math.isnan(v) for report in reports for v in report["probe"][NAN_STEP].values())
    layers = ("encoder/0", "body/mid", "head")
    # computed from this step's (identical) gradients; the window counters are checked by
    # test_gradient_flow.py::test_callback_copies_sent_to_spawned_ranks_share_no_state
    per_step = ["gradflow/grad_norm_total", "gradflow/clip_coef", "gradflow/clip_threshold"]
    per_step += [f"gradflow/{name}/{layer}" for name in ("grad_norm", "grad_rms", "weight_norm") for layer in layers]
    for step, row in rows.items():
        assert {k: row[k] for k in per_step} == {k: rows_one[step][k] for k in per_step}, step
        if step == NAN_STEP:
            continue  # the probe's get_total_norm is NaN there; the callback's norm counts finite values only
        reference = zero["probe"][step]
        assert row["gradflow/grad_norm_total"] == pytest.approx(reference["__total__"], rel=1e-5)
        for layer in layers:
            assert row[f"gradflow/grad_norm/{layer}"] == pytest.approx(reference[layer], rel=1e-5)

    # identical decisions: the same steps skipped and clipped, and bitwise identical weights at the end
    for report in reports:
        skips = [i["step"] for i in report["interventions"] if i["kind"] == "skip_step"]
        assert skips == [NAN_STEP]
    assert any(r["gradflow/clip_coef"] < 0.95 for r in rows.values())  # it did clip
    assert zero["layers"] == one["layers"] == list(layers)
    assert zero["weights"].keys() == one["weights"].keys()
    for name, value in zero["weights"].items():
        assert bool(torch.isfinite(value).all()), name  # the NaN step never reached the weights
        assert torch.equal(value, one["weights"][name]), name
