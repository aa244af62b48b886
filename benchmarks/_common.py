"""Helpers shared by the benchmark scripts: paths, devices, machine details, quartiles and strict JSON output.

The scripts import it as ``from _common import ...``: run as ``python benchmarks/<script>.py`` their folder is on
``sys.path``; each script also puts it there itself, for ``python -m benchmarks.<script>`` and for imports from tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "benchmarks" / "out"


# ---------------------------------------------------------------------------------------------------- command line


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, with the ``--device`` option every script takes."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
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


def import_package() -> None:
    """Lets ``python benchmarks/<script>.py`` find the package in the repository without installing it."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


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
