"""The statistics engine in plain PyTorch (no Lightning): per-tensor gradient and update statistics.

A small tanh MLP takes a few Adam steps on a synthetic regression task. After each step the script prints one row per
parameter tensor: the gradient's norm, RMS, max |g|, zero fraction and non-finite count (``tensor_stats``), and the
weight norm and update-to-weight ratio ‖Δw‖/‖w‖ of the step (``update_stats`` against a snapshot taken before it).
Both tables stay on the device until the print, which moves them to the host in one transfer.

Run: ``python examples/engine_stats.py [--steps 3] [--device cuda]``
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import torch
from torch import nn

from lightning_gradflow.stats import TensorStats, UpdateStats, make_snapshot, tensor_stats, update_stats


def print_table(step: int, loss: float, names: list[str], grads: TensorStats, updates: UpdateStats) -> None:
    # Both tables are already on the host here; every .tolist() below is a plain CPU read.
    print(f"\nstep {step}  loss {loss:.4f}  total grad norm {float(grads.total_norm()):.4g}")
    header = f"{'tensor':<12} {'grad_norm':>10} {'grad_rms':>10} {'grad_absmax':>11} {'zero_frac':>9} {'nonfinite':>9}"
    print(f"{header} {'weight_norm':>11} {'update_ratio':>12}")
    columns = zip(
        names,
        grads.norm.tolist(),
        grads.rms.tolist(),
        grads.absmax.tolist(),
        grads.zero_fraction.tolist(),
        grads.nonfinite.tolist(),
        updates.param_norm.tolist(),
        updates.ratio.tolist(),
        strict=True,
    )
    for name, norm, rms, absmax, zeros, nonfinite, weight_norm, ratio in columns:
        print(
            f"{name:<12} {norm:>10.4g} {rms:>10.4g} {absmax:>11.4g} {zeros:>9.3f} {int(nonfinite):>9d}"
            f" {weight_norm:>11.4g} {ratio:>12.3e}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (default: 3)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    layers: dict[str, nn.Module] = {
        "fc1": nn.Linear(16, 64),
        "tanh1": nn.Tanh(),
        "fc2": nn.Linear(64, 64),
        "tanh2": nn.Tanh(),
        "fc3": nn.Linear(64, 64),
        "relu": nn.ReLU(),
        "out": nn.Linear(64, 1),
    }
    model = nn.Sequential(OrderedDict(layers)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(256, 16, device=device)
    y = torch.sin(x[:, :4].sum(1, keepdim=True))

    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    snapshot = make_snapshot(params)  # update_stats refreshes it in place, so one allocation serves every step
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        grads = tensor_stats([p.grad for p in params])  # on the device; every parameter has a gradient here
        optimizer.step()
        updates = update_stats(params, snapshot)  # ‖p − snapshot‖, ‖p‖; then snapshot ← p, ready for the next step

        # One device-to-host transfer per print: both tables (same rows) and the loss side by side.
        packed = torch.cat([grads.table, updates.table, loss.detach().expand(len(params), 1)], dim=1).cpu()
        num_stats = grads.table.shape[1]
        host_grads = TensorStats(packed[:, :num_stats])
        host_updates = UpdateStats(packed[:, num_stats:-1])
        print_table(step, float(packed[0, -1]), names, host_grads, host_updates)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
