"""Efficacy of the four callbacks at their defaults on the zoo of third-party models (tests/helpers/zoo.py).

Every zoo model × {healthy, broken twin} × {no callbacks, monitoring only, ``auto_intervene=True``}: the held-out
loss at the end (and its ratio to the run without callbacks), the warnings our callbacks raised ("alarms"), the
interventions they recorded (applied or, when monitoring, would-be), and the wall-time overhead over the run without
callbacks. Prints a Markdown table and writes JSON.

Usage (from the repository root, CPU)::

    PYTHONPATH=. python benchmarks/efficacy.py                  # 7 models, 100 steps, seed 0: a few minutes on one core
    PYTHONPATH=. python benchmarks/efficacy.py --seeds 0,1,2 --steps 200
    PYTHONPATH=. python benchmarks/efficacy.py --quick          # 40 steps: a smoke test (JSON: efficacy_cpu_quick.json)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common as common
import torch

from tests.helpers import zoo

MODES = ("none", "monitor", "auto")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = common.base_parser(__doc__, device=False)
    p.add_argument("--models", default=",".join(zoo.MODELS), help=f"comma-separated (default {','.join(zoo.MODELS)})")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    p.add_argument("--seeds", default="0", help="comma-separated weight seeds (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--quick", action="store_true", help="40 steps: a smoke test")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/out/efficacy_cpu[_quick].json")
    return p.parse_args(argv)


def measure(name: str, broken: bool, steps: int, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The three modes of one model and twin, over the seeds (losses: means; counts: sums; overhead: median)."""
    runs = {mode: [zoo.run(name, broken=broken, mode=mode, steps=steps, seed=s) for s in seeds] for mode in MODES}
    base_loss = statistics.fmean(r.loss for r in runs["none"])
    base_seconds = statistics.median(r.seconds for r in runs["none"])
    rows = []
    for mode, results in runs.items():
        loss = statistics.fmean(r.loss for r in results)
        kinds = sorted(
            {f"{callback.removesuffix('Callback')}:{kind}" for r in results for callback, kind, _ in r.interventions}
        )
        rows.append(
            {
                "model": name,
                "twin": zoo.BROKEN[name] if broken else "healthy",
                "mode": mode,
                "loss": loss,
                "loss_ratio": loss / base_loss if base_loss > 0 and loss < float("inf") else float("nan"),
                "losses": [r.loss for r in results],
                "alarms": sum(len(r.warnings) for r in results),
                "alarm_sources": sorted({w.split(":")[0] for r in results for w in r.warnings}),
                "alarm_messages": sorted({w[:300] for r in results for w in r.warnings}),
                "interventions": sum(len(r.interventions) for r in results),
                "intervention_kinds": kinds,
                "seconds": statistics.median(r.seconds for r in results),
                "overhead": statistics.median(r.seconds for r in results) / base_seconds - 1.0,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | run | callbacks | final loss | × no callbacks | alarms (from) | interventions (kinds) | overhead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "—" if r["mode"] == "none" else f"{r['loss_ratio']:.3f}"
        alarms = f"{r['alarms']}" + (
            f" ({', '.join(s.removesuffix('Callback') for s in r['alarm_sources'])})" if r["alarms"] else ""
        )
        done = f"{r['interventions']}" + (f" ({', '.join(r['intervention_kinds'])})" if r["interventions"] else "")
        overhead = "—" if r["mode"] == "none" else f"{100 * r['overhead']:+.0f} %"
        lines.append(
            f"| {r['model']} | {r['twin']} | {r['mode']} | {r['loss']:.4f} | {ratio} | {alarms} | {done} | {overhead} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet_lightning()
    torch.set_num_threads(args.threads)
    steps = 40 if args.quick else args.steps
    seeds = [int(s) for s in common.split_list(args.seeds)]
    models = common.split_list(args.models)
    command = common.command_line(argv, __file__)
    machine = common.machine_info(torch.device("cpu"))
    rows: list[dict[str, Any]] = []
    for name in models:
        for broken in (False, True):
            rows += measure(name, broken, steps, seeds)
            print(f"done: {name} {'broken' if broken else 'healthy'}", file=sys.stderr, flush=True)
    print(f"\n{command}\n\n{steps} steps, seeds {seeds}, defaults of all four callbacks\n")
    print(table(rows))
    path = args.json or common.OUT_DIR / f"efficacy_cpu{'_quick' if args.quick else ''}.json"
    config = {"models": list(models), "steps": steps, "seeds": seeds, "threads": args.threads}
    common.write_json(path, common.run_record(command, machine, config, rows=rows))


if __name__ == "__main__":
    main()
