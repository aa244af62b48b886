from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_gradflow.stats import tensor_stats

WORLD_SIZE = 2


def _all_reduce_worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(1001, generator=gen), torch.randn(64, generator=gen) * 100]
        full[0][7] = float("nan")
        full[1][:10] = 0.0
        shards = [t.tensor_split(WORLD_SIZE)[rank] for t in full]  # e.g. FSDP-style flat shards
        reduced = tensor_stats(shards).all_reduce()
        expected = tensor_stats(full, backend="reference").table
        torch.testing.assert_close(reduced.table, expected, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_all_reduce_combines_shards_across_ranks(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_all_reduce_worker, args=(str(tmp_path / "init"),), nprocs=WORLD_SIZE, join=True)


def test_all_reduce_without_process_group_is_identity() -> None:
    s = tensor_stats([torch.ones(3)])
    assert s.all_reduce() is s
