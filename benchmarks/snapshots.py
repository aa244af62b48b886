"""Cost of EarlyCollapseCallback's rollback snapshots: time per snapshot and restore, and memory, per model size.

A snapshot (:func:`lightning_gradflow.collapse.take_snapshot`) deep-copies the module's ``state_dict`` (parameters and
buffers), the optimizer's ``state_dict`` (Adam: two moments per parameter), the LR scheduler's and the RNG states to
``snapshot_device`` (the CPU by default). A rollback (:func:`~lightning_gradflow.collapse.restore_snapshot`) copies
them back. For each model size (an MLP of ``--depth`` square layers of each ``--widths`` value, Adam) the script
measures, interleaved round-robin so machine drift hits every part alike:

* a training step (forward, MSE, backward, Adam) on a batch of ``--batch`` rows, the unit of cost;
* ``take_snapshot`` (model + Adam + StepLR + RNG states) and ``restore_snapshot``;
* the snapshot's memory (bytes of its tensors: ≈ 3 × the parameter bytes with Adam).

The amortised overhead of ``snapshot_every_n_steps = N`` is ``snapshot / (N · step)``.

Prints a Markdown table and writes everything (raw times included) to JSON with the command line and the machine.

Usage (from the repository root)::

    python benchmarks/snapshots.py                          # CPU, about a minute
    python benchmarks/snapshots.py --quick                  # a smoke test
    python benchmarks/snapshots.py --threads 1 --widths 256,1024,2048 --reps 20
    python benchmarks/snapshots.py --device cuda            # CUDA model, snapshots on the CPU (and on the GPU)
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common as common
import torch
from torch import nn

from lightning_gradflow.collapse import restore_snapshot, take_snapshot


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = common.base_parser(__doc__, device=False)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model trains (default cpu)")
    p.add_argument("--widths", default="256,1024,2048", help="comma-separated layer widths (default 256,1024,2048)")
    p.add_argument("--depth", type=int, default=4, help="square Linear layers per model (default 4)")
    p.add_argument("--batch", type=int, default=64, help="rows per training batch (default 64)")
    p.add_argument("--reps", type=int, default=15, help="measurements per part (default 15)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="widths 64,256 and 3 reps")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/out/snapshots_<device>.json)")
    return p.parse_args(argv)


def measure(width: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 1)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000)
    x = torch.randn(args.batch, width, device=device)
    y = torch.randn(args.batch, 1, device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()

    from lightning.fabric.utilities.seed import _collect_rng_states

    snapshot_devices = ["cpu"] + (["cuda"] if device.type == "cuda" else [])
    snaps: dict[str, Any] = {}

    def snap(target: str) -> Callable[[], None]:
        def run() -> None:
            snaps[target] = take_snapshot(0, model, [opt], [sched], rng=_collect_rng_states(), device=target)

        return run

    def restore(target: str) -> Callable[[], None]:
        return lambda: restore_snapshot(snaps[target], model, [opt], [sched])

    parts: dict[str, Callable[[], None]] = {"train_step": step}
    for target in snapshot_devices:
        parts[f"snapshot_{target}"] = snap(target)
        parts[f"restore_{target}"] = restore(target)
    # 3 warm-up rounds: Adam's state exists after the first step
    times_ms = common.interleave(parts, args.reps, device, warmup=3)
    times = {name: [ms / 1e3 for ms in values] for name, values in times_ms.items()}
    params = sum(p.numel() for p in model.parameters())
    row: dict[str, Any] = {
        "width": width,
        "depth": args.depth,
        "parameters": params,
        "param_bytes": params * 4,
        "snapshot_bytes": snaps["cpu"].nbytes(),
        "median_s": {name: statistics.median(v) for name, v in times.items()},
        "raw_s": times,
    }
    return row


def table(rows: list[dict[str, Any]]) -> str:
    devices = [k.removeprefix("snapshot_") for k in rows[0]["median_s"] if k.startswith("snapshot_")]
    head = ["width × depth", "parameters", "snapshot MiB", "train step ms"]
    for d in devices:
        head += [f"snapshot→{d} ms", f"restore←{d} ms", f"snapshot→{d} / step"]
    head += ["overhead at every 50 steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["median_s"]
        cells = [
            f"{r['width']} × {r['depth']}",
            f"{r['parameters'] / 1e6:.2f} M",
            f"{r['snapshot_bytes'] / 2**20:.1f}",
            f"{1e3 * m['train_step']:.2f}",
        ]
        for d in devices:
            cells += [
                f"{1e3 * m[f'snapshot_{d}']:.2f}",
                f"{1e3 * m[f'restore_{d}']:.2f}",
                f"{m[f'snapshot_{d}'] / m['train_step']:.2f}",
            ]
        cells.append(f"{m[f'snapshot_{devices[0]}'] / (50 * m['train_step']):.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.widths, args.reps = "64,256", 3
    device = torch.device(args.device)
    widths = [int(w) for w in args.widths.split(",")]
    rows = [measure(w, args, device) for w in widths]
    command = common.command_line(argv, __file__)
    result = common.run_record(command, common.machine_info(device), common.config_dict(args), rows=rows)
    common.print_machine(command, result["machine"], ("cpu_model", "cpu_count", "torch_threads", "torch"))
    print(table(rows))
    suffix = "_quick" if args.quick else ""
    common.write_json(Path(args.out) if args.out else common.OUT_DIR / f"snapshots_{device.type}{suffix}.json", result)
    return result


if __name__ == "__main__":
    main()
