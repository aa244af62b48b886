"""The harness every benchmark script shares: command line, devices, machine details, timing and interleaving,
Lightning step clocks, a shared transformer block, quartiles and strict JSON output.

The scripts run from the repository root as ``python benchmarks/<script>.py``: their folder is then on ``sys.path``,
so they ``import _common as common``; the package comes from the installed checkout (``pip install -e .``, as
``scripts/setup.sh`` does). To measure another checkout, put it first: ``PYTHONPATH=<checkout> python ...``.

Interleaving: every script times its parts (or variants) round-robin in one process, so machine drift hits all of
them alike: :func:`interleave` (functions, ``warmup + rounds`` rounds, optionally from a rotating start:
:func:`rotated`) and, for whole Lightning runs, :class:`StepClock` (one ``on_train_batch_start`` to the next) with
:class:`TurnTaker` (threads taking turns every step).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

try:
    import resource
except ImportError:  # not POSIX
    resource = None  # type: ignore[assignment]

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "benchmarks" / "out"


# ---------------------------------------------------------------------------------------------------- command line


def base_parser(doc: str | None, device: bool = True) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, with the ``--device auto|cpu|cuda`` option (unless
    ``device=False``: a script with another default adds its own)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    if device:
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    return p


def split_list(text: str) -> tuple[str, ...]:
    """The non-empty items of a comma-separated list, stripped."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch.cuda.is_available() is False.")
    return torch.device(name)


def command_line(argv: Sequence[str] | None, script: str) -> str:
    """The command that runs ``script`` with ``argv`` (``None``: this process's own command line)."""
    return shlex.join([sys.executable, *(sys.argv if argv is None else [script, *argv])])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- machine


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    # The load of a shared machine explains much of the noise; the scripts record it at the start and the end.
    if not hasattr(os, "getloadavg"):
        return None
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_quiet(cmd: list[str]) -> str | None:
    """The stripped standard output of ``cmd``, or ``None`` if it cannot run, fails or takes over 20 s."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def nvidia_smi() -> dict[str, str] | None:
    fields = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,pstate"
    out = run_quiet(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
    if not out:
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values, strict=False))


def cuda_info(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu_name": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "cuda_runtime": torch.version.cuda,
        "nvidia_smi": nvidia_smi(),
    }


def git_revision() -> str | None:
    rev = run_quiet(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    dirty = run_quiet(["git", "-C", str(REPO_ROOT), "status", "--porcelain"])
    if rev is None:
        return None
    return rev + ("-dirty" if dirty else "")


def machine_info(
    device: torch.device, load_key: str = "load_average", extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """CPU, load average (under ``load_key``), versions, git revision, ``extra``, the device and, on CUDA, the GPU."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        load_key: load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "lightning": package_version("lightning"),
        "git": git_revision(),
        **(extra or {}),
        "device": str(device),
    }
    if device.type == "cuda":
        info.update(cuda_info(device))
    return info


def print_machine(command: str, machine: dict[str, Any], keys: Sequence[str]) -> None:
    """The command line, the machine details under ``keys``, and on CUDA the GPU and its nvidia-smi readings."""
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={machine.get(k)}" for k in keys))
    if "gpu_name" in machine:
        print(f"gpu: {machine.get('gpu_name')}, nvidia-smi: {machine.get('nvidia_smi')}")


# ---------------------------------------------------------------------------------------------------- timing


def timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call of ``fn`` in ms, between two device synchronisations (so queued work is counted)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def rotated(items: Sequence[T], start: int) -> list[T]:
    """``items`` from position ``start`` (modulo their number) round to the one before it.

    Round ``r`` of a round-robin starts at ``r``, so no part always runs right after the same other one.
    """
    if not items:
        return []
    shift = start % len(items)
    return [*items[shift:], *items[:shift]]


def interleave(
    parts: dict[str, Callable[[], Any]],
    rounds: int,
    device: torch.device,
    *,
    warmup: int = 0,
    rotate: bool = False,
    before_round: Callable[[int], None] | None = None,
    after_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Times every part once per round, round-robin, for ``warmup`` untimed then ``rounds`` timed rounds.

    Args:
        parts: name → function; each round calls them in this order (from a rotating start with ``rotate``).
        rounds: timed rounds.
        device: synchronised around every call (:func:`timed_ms`).
        warmup: rounds first whose times are dropped.
        rotate: start round ``r`` at part ``r`` (:func:`rotated`).
        before_round: called with the round index (warm-up rounds included) before its parts, untimed.
        after_round: called with the round index after its parts, untimed.

    Returns:
        name → the ms of each timed round's call.
    """
    names = list(parts)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        if before_round is not None:
            before_round(r)
        for name in rotated(names, r) if rotate else names:
            ms = timed_ms(parts[name], device)
            if r >= warmup:
                times[name].append(ms)
        if after_round is not None:
            after_round(r)
    return times


# ---------------------------------------------------------------------------------------------------- Lightning


@dataclass
class BlockTimes:
    """The measured steps of one block (a round of one variant): step indices, device and host ms, hook ms, faults."""

    round: int
    steps: list[int]
    ms: list[float]
    host_ms: list[float]
    hook_ms: list[float]
    hook_host_ms: list[float]
    minor_faults: list[int] = field(default_factory=list)


def minor_faults() -> int:
    """Minor page faults of the calling thread so far (0 where ``RUSAGE_THREAD`` does not exist)."""
    who = getattr(resource, "RUSAGE_THREAD", None) if resource is not None else None
    return 0 if who is None else resource.getrusage(who).ru_minflt


class TurnTaker:
    """Lets one thread at a time run: the turn goes round a ring of names, in a new random order every lap."""

    def __init__(self, names: Sequence[str], seed: int) -> None:
        self.cond = threading.Condition()
        self.ring = list(names)
        self.turn: str | None = self.ring[0] if self.ring else None
        self.rng = random.Random(seed)

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)

    def pass_on(self, name: str) -> None:
        with self.cond:
            i = self.ring.index(name)
            if i + 1 < len(self.ring):
                self.turn = self.ring[i + 1]
            else:  # a lap is over: shuffle, so no variant always follows the same one (nor runs twice in a row)
                self.ring = self.rng.sample(self.ring, len(self.ring))
                if len(self.ring) > 1 and self.ring[0] == name:
                    self.ring[0], self.ring[1] = self.ring[1], self.ring[0]
                self.turn = self.ring[0]
            self.cond.notify_all()

    def leave(self, name: str) -> None:
        with self.cond:
            i = self.ring.index(name)
            self.ring.pop(i)
            if self.turn == name:
                self.turn = self.ring[i % len(self.ring)] if self.ring else None
            self.cond.notify_all()


class StepClock:
    """Times every step from one ``on_train_batch_start`` to the next (and the arm's hooks within it).

    Block mode: a step ends where the next one starts. Step mode (``turns`` given): at each ``on_train_batch_start``
    the step before ends (after a CUDA synchronisation), the turn passes to the next variant, and the new step starts
    when the turn comes back. A ``Callback`` is made in :func:`clock_callback`; this holds the logic.
    """

    def __init__(self, device: torch.device, name: str, turns: TurnTaker | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.name = name
        self.turns = turns
        self.step = -1
        # [step, host start, event start, faults at start, host end, event end, faults at end]
        self.records: list[list[Any]] = []
        self.hooks: dict[int, list[Any]] = {}

    def _now(self) -> tuple[float, Any]:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return time.perf_counter(), event

    def mark(self, step: int) -> None:
        now, event = self._now()
        faults = minor_faults()
        if self.records and self.records[-1][4] is None:
            if self.turns is not None and self.cuda:
                torch.cuda.synchronize()
                now = time.perf_counter()
            self.records[-1][4:] = [now, event, faults]
            if self.turns is not None:
                self.turns.pass_on(self.name)
                self.turns.wait(self.name)
                now, event = self._now()
        self.records.append([step, now, event, faults, None, None, None])
        self.step = step

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, adding its time (host; CUDA events on CUDA) to the current step's hook time."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = end = None
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                host = (time.perf_counter() - t0) * 1e3
                if end is not None:
                    end.record()
                self.hooks.setdefault(self.step, []).append((host, start, end))

        return timed

    def take(self, round_of: Callable[[int], int | None]) -> list[BlockTimes]:
        """The finished steps, grouped into blocks by ``round_of(step)`` (``None``: not measured), and resets."""
        if self.cuda:
            torch.cuda.synchronize()
        blocks: dict[int, BlockTimes] = {}
        for step, t0, e0, f0, t1, e1, f1 in self.records:
            r = round_of(step)
            if t1 is None or r is None:
                continue
            out = blocks.setdefault(r, BlockTimes(r, [], [], [], [], []))
            host = (t1 - t0) * 1e3
            out.steps.append(step)
            out.host_ms.append(host)
            out.ms.append(e0.elapsed_time(e1) if self.cuda else host)
            hooks = self.hooks.get(step, [])
            out.hook_host_ms.append(sum(h for h, _, _ in hooks))
            out.hook_ms.append(sum(s.elapsed_time(e) for _, s, e in hooks) if self.cuda else out.hook_host_ms[-1])
            out.minor_faults.append(f1 - f0)
        self.records.clear()
        self.hooks.clear()
        return [blocks[r] for r in sorted(blocks)]


def quiet_trainer(device: torch.device, **kwargs: Any) -> Any:
    """A Lightning ``Trainer`` on one ``device`` without progress bar, model summary, checkpointing or sanity checks
    (``kwargs`` add to these or override them)."""
    from lightning.pytorch import Trainer

    defaults: dict[str, Any] = {
        "accelerator": "gpu" if device.type == "cuda" else "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**{**defaults, **kwargs})


def clock_callback(device: torch.device, name: str, turns: TurnTaker | None = None) -> Any:
    """A Lightning ``Callback`` whose ``clock`` (a :class:`StepClock`) marks every ``on_train_batch_start``; list it
    first, so a step's time covers the other callbacks' hooks."""
    from lightning.pytorch import Callback

    class ClockCallback(Callback):
        def __init__(self) -> None:
            self.clock = StepClock(device, name, turns)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.clock.mark(trainer.global_step)

    return ClockCallback()


def quiet_lightning() -> None:
    """Silences Lightning's start-up chatter and the warnings that the benchmarks' set-ups trigger on purpose."""
    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import: import first, then override)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        r".*does not have many workers.*",
        r".*isinstance\(treespec, LeafSpec\).*",
        r".*`max_epochs` was not set.*",
        r".*Total length of `DataLoader` across ranks is zero.*",
        r".*You defined a `validation_step`.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


# ---------------------------------------------------------------------------------------------------- models


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP.

    Args:
        d_model: width.
        heads: attention heads.
        explicit_attention: softmax attention written out (masked scores) instead of
            ``scaled_dot_product_attention``: PyTorch's fused CPU attention has no double backward, which
            Hessian-vector products need.
    """

    def __init__(self, d_model: int, heads: int, explicit_attention: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.explicit_attention = explicit_attention
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_proj = nn.Linear(4 * d_model, d_model)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if not self.explicit_attention:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t = q.shape[-2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


# ---------------------------------------------------------------------------------------------------- statistics


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# ---------------------------------------------------------------------------------------------------- output


def config_dict(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass or an ``argparse.Namespace``, with devices and paths as strings."""
    return {k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(config).items()}


def run_record(command: str, machine: dict[str, Any], config: dict[str, Any], **results: Any) -> dict[str, Any]:
    """The JSON payload of a run: how and where it ran, then ``results`` in their order."""
    return {
        "command": command,
        "cwd": os.getcwd(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": config,
        **results,
    }


def jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False))
    print(f"\nwrote {path}")
