"""lightning_gradflow in a Lightning Fabric loop: the same pure monitors as the callbacks, driven by hand.

The model, the faulty data stream and :class:`loop_health.LoopHealth` are those of ``plain_torch_loop.py``; here
Fabric sets up the model and optimizer (device, precision, strategy) and runs ``fabric.backward``. ``LoopHealth``
reads the gradients between ``backward`` and ``optimizer.step()`` exactly as it does in a plain loop.

Run: ``python examples/fabric_loop.py [--steps 200] [--accelerator cpu]``
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric import Fabric
from loop_health import LoopHealth
from plain_torch_loop import faulty_batches, final_loss, make_model, parse_args
from torch import nn


def train(args: argparse.Namespace, fabric: Fabric) -> tuple[list[float], LoopHealth]:
    model = make_model(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer = fabric.setup(model, optimizer)
    health = LoopHealth(model, optimizer)
    losses = []
    for step, (x, y) in enumerate(faulty_batches(args)):
        x, y = fabric.to_device((x, y))
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        losses.append(float(loss.detach()))
        if health.before_step(step, float(loss.detach())):
            optimizer.step()
        health.after_step(step)
        if health.stopped:
            break
    return losses, health


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser_args = argv or []
    accelerator = "cpu"
    if "--accelerator" in parser_args:
        i = parser_args.index("--accelerator")
        accelerator = parser_args[i + 1]
        parser_args = parser_args[:i] + parser_args[i + 2 :]
    args = parse_args(parser_args)
    fabric = Fabric(accelerator=accelerator, devices=1)
    losses, health = train(args, fabric)
    for record in health.log.records:
        fabric.print(f"  {record}")
    fabric.print(f"final loss with LoopHealth under Fabric: {final_loss(losses):.4g}")
    return {"health": final_loss(losses), "interventions": float(len(health.log))}


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
