"""Probe cost of ``GateSurgeryCallback`` in training-step equivalents, on the LSTM of ``examples/saturated_lstm.py``.

A probe step costs the callback three things on top of the training step: the forward hooks copying the first
``probe_size`` sequences of each gated module's input and output (*capture*), recomputing every gate for all time
steps and reducing them to per-unit statistics and histograms, packed into one buffer and copied to the host once
(*measure*), and, only on the rare steps with a surgery, a second measurement with every layer re-run (*re-probe*).
Steps without a probe cost nothing: no hooks exist then.

Two measurements, for each LSTM size (``--layers``) and probe size (``--probe-sizes``):

* **isolated** (plain PyTorch, interleaved round-robin so machine drift hits every part alike): the median time of a
  training step (forward, cross-entropy, backward, Adam) of the example's character LSTM, of a forward with and
  without the capture hooks, of ``measure_gates`` with and without histograms plus the host copy, and of the
  re-probe. The probe cost in step equivalents is ``(capture + measure) / training step``.
* **end to end** (``lightning.Trainer``, per-step time between ``on_train_batch_start`` marks: wall time, CUDA
  events on CUDA; the arms alternating round by round): no callback against ``GateSurgeryCallback(every_n_steps=1)``,
  a probe on every step.
  The difference is the cost of a probe step as Lightning runs it; divided by ``every_n_steps`` (default 100) it is
  the amortised overhead.

Prints a table and writes everything (raw times included) to JSON with the command line and the machine details.

Usage (from the repository root)::

    python benchmarks/gates.py                    # CPU: about 1-2 minutes
    python benchmarks/gates.py --quick            # a smoke test (JSON: gates_<device>_quick.json)
    python benchmarks/gates.py --threads 1 --layers 1,2 --probe-sizes 8,16,32 --reps 30
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common as common
import torch
from torch import Tensor, nn

DEFAULT_EVERY_N_STEPS = 100


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = common.base_parser(__doc__)
    p.add_argument("--layers", default="1,2", help="comma-separated LSTM depths (default 1,2)")
    p.add_argument("--probe-sizes", default="8,16,32", help="comma-separated probe sizes (default 8,16,32)")
    p.add_argument("--hidden", type=int, default=128, help="LSTM hidden size (default 128, as the example)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=96, help="characters in the vocabulary (default 96)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions of each part (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--fit-steps", type=int, default=30, help="steps per end-to-end round and arm (default 30)")
    p.add_argument("--fit-rounds", type=int, default=3, help="end-to-end rounds (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="few reps and steps: a smoke test")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/out/gates_<device>[_quick].json")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.fit_steps, args.fit_rounds = 3, 1, 8, 1
    return args


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _import_example() -> Any:
    """``examples/saturated_lstm.py`` as a module (not a package: loaded from its path)."""
    path = common.REPO_ROOT / "examples" / "saturated_lstm.py"
    spec = importlib.util.spec_from_file_location("saturated_lstm_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------- isolated


def isolated(example: Any, layers: int, probe_size: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Median ms of a training step and of each part of a probe, timed round-robin."""
    from lightning_gradflow.gates import capture_call, find_gated_modules, measure_gates
    from lightning_gradflow.stats import HistogramSpec

    torch.manual_seed(0)
    model = example.CharLSTM(args.vocab, args.hidden, layers, 3e-3).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), device=device)
    (gated,) = find_gated_modules(model)
    captures: list[Any] = []

    def hook(module: nn.Module, a: tuple[Any, ...], kw: dict[str, Any], out: Any) -> None:
        captures.append(capture_call(gated, a, kw, out, probe_size))

    def train_step() -> None:
        optimizer.zero_grad()
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), batch[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()

    def forward() -> None:
        with torch.no_grad():
            model(batch[:, :-1])

    def forward_with_capture() -> None:
        captures.clear()
        handle = gated.module.register_forward_hook(hook, with_kwargs=True)
        forward()
        handle.remove()

    def measure(histograms: bool, use_captured_output: bool = True) -> Callable[[], Tensor]:
        def run() -> Tensor:
            m = measure_gates(
                gated,
                captures,
                use_captured_output=use_captured_output,
                device=device,
                activation_bins=20 if histograms else 0,
                preact_spec=HistogramSpec(min_exp=-10, max_exp=7, bins_per_octave=2) if histograms else None,
            )
            return torch.cat([t.reshape(-1).double() for t in m.tensors()]).cpu()  # the one host copy

        return run

    forward_with_capture()
    parts: dict[str, Callable[[], Any]] = {
        "train_step": train_step,
        "forward": forward,
        "forward_with_capture": forward_with_capture,
        "measure": measure(histograms=True),
        "measure_no_histograms": measure(histograms=False),
        "reprobe": measure(histograms=False, use_captured_output=False),
    }
    times = common.interleave(parts, args.reps, device, warmup=args.warmup)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    capture = max(0.0, med["forward_with_capture"] - med["forward"])
    return {
        "layers": layers,
        "probe_size": probe_size,
        "median_ms": med,
        "capture_ms": capture,
        "probe_ms": capture + med["measure"],
        "probe_step_equivalents": (capture + med["measure"]) / med["train_step"],
        "probe_no_histograms_step_equivalents": (capture + med["measure_no_histograms"]) / med["train_step"],
        "reprobe_step_equivalents": med["reprobe"] / med["train_step"],
        "times_ms": times,
    }


# --------------------------------------------------------------------------------------------------- end to end


def end_to_end(example: Any, layers: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Median Lightning step time without the callback and with a probe on every step (rounds alternate)."""
    from lightning.pytorch import Callback, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gradflow.callbacks.gate_surgery import GateSurgeryCallback

    steps = args.fit_steps
    data = torch.randint(0, args.vocab, (steps * args.batch_size, args.seq_len + 1))
    loader = DataLoader(TensorDataset(data), batch_size=args.batch_size, shuffle=False)
    arms = {"baseline": None, "probe_every_step": DEFAULT_EVERY_N_STEPS}
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.fit_rounds):
        for arm in arms:
            seed_everything(0, verbose=False)
            model = example.CharLSTM(args.vocab, args.hidden, layers, 3e-3)
            clock = common.clock_callback(device, arm)
            callbacks: list[Callback] = [clock]
            if arm == "probe_every_step":
                callbacks.append(GateSurgeryCallback(every_n_steps=1))
            trainer = common.quiet_trainer(device, max_steps=steps, logger=False, callbacks=callbacks)
            trainer.fit(model, loader)
            blocks = clock.clock.take(lambda step: 0 if step >= 2 else None)  # the first steps warm caches up
            times[arm] += [ms for block in blocks for ms in block.ms]
    base, probe = statistics.median(times["baseline"]), statistics.median(times["probe_every_step"])
    per_probe = (probe - base) / base
    return {
        "layers": layers,
        "median_step_ms": {"baseline": base, "probe_every_step": probe},
        "probe_step_equivalents": per_probe,
        "amortised_overhead_at_default_every_n_steps": per_probe / DEFAULT_EVERY_N_STEPS,
        "times_ms": times,
    }


# ---------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    example = _import_example()
    command = common.command_line(argv, __file__)
    machine = common.machine_info(device)
    keys = ("cpu_model", "cpu_count", "torch_threads", "load_average", "platform", "python", "torch", "lightning")
    common.print_machine(command, machine, (*keys, "device"))
    print(
        f"char LSTM: vocab {args.vocab}, embedding 32, hidden {args.hidden}, batch {args.batch_size} x"
        f" {args.seq_len} characters; Adam; reps={args.reps} warmup={args.warmup} (medians)"
    )
    started = time.perf_counter()
    rows = []
    print("\n== isolated (plain PyTorch) ==")
    print("layers probe  train step  capture  measure  measure(no hist)  re-probe   probe/step  no-hist/step")
    for layers in _ints(args.layers):
        for probe_size in _ints(args.probe_sizes):
            r = isolated(example, layers, probe_size, args, device)
            rows.append(r)
            m = r["median_ms"]
            print(
                f"{layers:6d} {probe_size:5d} {m['train_step']:8.2f} ms {r['capture_ms']:6.2f}  {m['measure']:7.2f}"
                f"  {m['measure_no_histograms']:16.2f}  {m['reprobe']:8.2f}   {r['probe_step_equivalents']:9.3f}"
                f"  {r['probe_no_histograms_step_equivalents']:12.3f}"
            )
    print("(ms; probe/step = (capture + measure) / train step: the probe's cost in training-step equivalents)")
    fits = []
    print(f"\n== end to end (lightning.Trainer, probe_size=16, {args.fit_rounds} rounds x {args.fit_steps} steps) ==")
    print("layers  baseline step  probe every step  probe/step  amortised at every_n_steps=100")
    common.quiet_lightning()  # no per-fit banners between the rows
    for layers in _ints(args.layers):
        f = end_to_end(example, layers, args, device)
        fits.append(f)
        s = f["median_step_ms"]
        print(
            f"{layers:6d}  {s['baseline']:10.2f} ms  {s['probe_every_step']:13.2f} ms  "
            f"{f['probe_step_equivalents']:10.3f}  {f['amortised_overhead_at_default_every_n_steps']:+.2%}"
        )
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s")
    path = args.json or common.OUT_DIR / f"gates_{device.type}{'_quick' if args.quick else ''}.json"
    payload = common.run_record(
        command, machine, common.config_dict(args), isolated=rows, end_to_end=fits, elapsed_s=elapsed
    )
    common.write_json(path, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
