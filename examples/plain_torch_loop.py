"""lightning_gradflow without Lightning: the pure monitors inside a hand-written PyTorch training loop.

A ReLU MLP learns a regression on random data with Adam. The data stream is faulty on purpose: batch ``--nan-step``
holds a NaN, and ``--burst`` batches starting at ``--burst-step`` are scaled by ``--burst-scale``. Without help the NaN
poisons Adam's moments and the run is lost; with :class:`loop_health.LoopHealth` (what the callbacks do, driven by
hand) the NaN step is skipped, the burst is clipped (ZClip) and judged by the collapse risk model, which cuts the
learning rate and rolls back to a calm snapshot if the loss keeps spiking. The script trains both ways from the same
seed and prints the interventions and the final losses.

Run: ``python examples/plain_torch_loop.py [--steps 200] [--nan-step 40] [--burst-step 100]``
"""

from __future__ import annotations

import argparse
import math

import torch
from loop_health import LoopHealth
from torch import Tensor, nn

DIM = 16


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def faulty_batches(args: argparse.Namespace) -> list[tuple[Tensor, Tensor]]:
    """The same stream for every run: random inputs, a smooth target, one NaN batch and a burst of scaled inputs."""
    gen = torch.Generator().manual_seed(args.seed)
    w = torch.randn(DIM, 1, generator=gen) / math.sqrt(DIM)
    batches = []
    for step in range(args.steps):
        x = torch.randn(32, DIM, generator=gen)
        y = torch.tanh(x @ w)
        if step == args.nan_step:
            x = x.clone()
            x[0, 0] = math.nan
        if args.burst_step <= step < args.burst_step + args.burst:
            x = x * args.burst_scale
        batches.append((x, y))
    return batches


def train(args: argparse.Namespace, with_health: bool) -> tuple[list[float], LoopHealth | None]:
    model = make_model(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    health = LoopHealth(model, optimizer) if with_health else None
    losses = []
    for step, (x, y) in enumerate(faulty_batches(args)):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        if health is None or health.before_step(step, float(loss.detach())):
            optimizer.step()
        if health is not None:
            health.after_step(step)
            if health.stopped:
                break
    return losses, health


def final_loss(losses: list[float]) -> float:
    tail = losses[-20:]
    return sum(tail) / len(tail)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--nan-step", type=int, default=40)
    p.add_argument("--burst-step", type=int, default=100)
    p.add_argument("--burst", type=int, default=3)
    p.add_argument("--burst-scale", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    plain, _ = train(args, with_health=False)
    healthy, health = train(args, with_health=True)
    assert health is not None
    print("interventions:")
    for record in health.log.records:
        print(f"  {record}")
    print(f"final loss without monitors: {final_loss(plain):.4g}")
    print(f"final loss with LoopHealth:  {final_loss(healthy):.4g}")
    print(f"flow diagnosis: {health.diagnosis()}")
    return {"plain": final_loss(plain), "health": final_loss(healthy)}


if __name__ == "__main__":
    main()
