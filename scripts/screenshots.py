"""Takes the README's TensorBoard screenshots: a real ``tensorboard`` server, a headless Chromium, PNGs in docs/images.

    python -m scripts.screenshots                      # run the demo (short), then shoot its logs
    python -m scripts.screenshots --logdir runs/demo   # shoot existing logs
    python -m scripts.screenshots --source builtin     # a short run of the support matrix's model instead of the demo

(from the repository root: ``--source builtin`` imports ``scripts.support_matrix`` and ``tests.helpers``).

Needs Chromium (``apt-get install -y chromium``; ``--chromium`` for another binary). Each view is one URL of
TensorBoard's own UI (``#custom_scalars``, ``#scalars&tagFilter=...``, ...), rendered with
``chromium --headless --screenshot``; the pages are JavaScript apps, so Chromium is given a virtual-time budget to
fetch and draw the data before the shot. Re-run it whenever the demo or the callbacks change what they log.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
MAX_BYTES = 400_000


@dataclass(frozen=True)
class View:
    """One screenshot.

    Args:
        name: the PNG is ``tensorboard_<name>.png``.
        fragment: TensorBoard's URL fragment (dashboard and its settings).
        about: what it shows (printed).
        runs: a run regex (the demo's run names); applied only when some run matches it.
        size: the browser window, ``width,height``.
    """

    name: str
    fragment: str
    about: str
    runs: str | None = None
    size: str = "1400,900"


VIEWS = [
    View(
        "custom_scalars",
        "#custom_scalars",
        "the custom-scalars layout: per-layer charts, one category per callback",
        runs="saturated-lstm/repaired",
        size="1400,1250",
    ),
    View(
        "scalars_gradflow",
        "#scalars&tagFilter=gradflow%2Fgrad_rms%2F&_smoothingWeight=0",
        "per-layer gradient RMS: vanishing gradients (plain deep net) against the net fixed by hand",
        runs="vanishing/(monitored|fixed-by-hand)",
    ),
    View(
        "histograms",
        "#histograms&tagFilter=gradflow%2Fgrad_hist",
        "per-layer gradient histograms, binned on the device",
        runs="vanishing/(monitored|fixed-by-hand)",
    ),
    View(
        "images",
        "#images&tagFilter=gradflow%2Fflow",
        "the gradient-flow bar chart (mean and max |grad| per layer, input to output)",
        runs="(vanishing|saturated-lstm)/monitored",
    ),
    View(
        "text",
        "#text&tagFilter=interventions",
        "the interventions, as text",
        runs="saturated-lstm/repaired",
    ),
]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(logdir: Path, steps: int) -> None:
    """The demo (``python -m lightning_gradflow.demo``), short."""
    command = [sys.executable, "-m", "lightning_gradflow.demo", "--output-dir", str(logdir), "--steps", str(steps)]
    subprocess.run([*command, "--no-progress-bar"], check=True, cwd=ROOT)


def run_builtin(logdir: Path, steps: int) -> None:
    """A self-contained short run: a small LSTM with a ReLU layer, every callback that imports, TensorBoard logs."""
    import torch
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from scripts.support_matrix import CALLBACK_FACTORIES
    from tests.helpers.matrix_models import TinyLSTM, sequence_loader

    seed_everything(0, verbose=False)
    callbacks = []
    for spec in CALLBACK_FACTORIES.values():
        kwargs = dict(spec.kwargs)
        if spec.name == "GradientFlowCallback":  # adaptive clipping, as a user would run it
            kwargs.update(clip_mode="zscore", clip_value=None, warmup_steps=10, histogram_every_n_steps=10)
            kwargs.update(figure_every_n_steps=25)
        if spec.name == "GateSurgeryCallback":
            kwargs.update(every_n_steps=5)
        callbacks.append(spec.cls(**kwargs))
    logger = TensorBoardLogger(str(logdir), name="builtin", default_hp_metric=False)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    torch.set_num_threads(1)
    trainer.fit(TinyLSTM(saturated=True, lr=0.05), sequence_loader(n=256, batch_size=16))


def start_tensorboard(logdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Starts ``tensorboard`` over ``logdir`` on loopback; returns the process and its URL once it serves scalars."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--load_fast=false"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=10) as response:
                if response.read() not in (b"{}", b""):
                    time.sleep(2)  # let the first load finish every run
                    return process, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError("tensorboard did not serve the logs")


def shoot(chromium: str, url: str, png: Path, budget_ms: int, size: str) -> None:
    """Renders ``url`` in headless Chromium and saves the window as ``png``."""
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={size}",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={png}",
        url,
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)


def shrink(png: Path) -> None:
    """Re-encodes a PNG over the size limit with a palette (matplotlib's Pillow does it; no other dependency)."""
    if png.stat().st_size <= MAX_BYTES:
        return
    from PIL import Image

    with Image.open(png) as image:
        image.convert("RGB").quantize(colors=128).save(png, optimize=True)


def main(argv: list[str] | None = None) -> int:
    """Runs (or reads) a training's logs, serves them with tensorboard and saves one PNG per view."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, help="existing TensorBoard logs (default: run a training first)")
    parser.add_argument("--source", choices=("demo", "builtin"), default="demo", help="what to run without --logdir")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of that run (default: 150)")
    parser.add_argument("--out", type=Path, default=OUT, help="where the PNGs go (default: docs/images)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="the Chromium binary")
    parser.add_argument("--budget-ms", type=int, default=15000, help="Chromium's virtual-time budget per page")
    parser.add_argument("--window-size", default=None, help="the browser window, e.g. 1400,900 (default: per view)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        logdir = args.logdir
        if logdir is None:
            logdir = Path(tmp) / "logs"
            (run_demo if args.source == "demo" else run_builtin)(logdir, args.steps)
        process, url = start_tensorboard(logdir)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url + "data/runs", timeout=30) as response:
                runs = json.loads(response.read())
            for view in VIEWS:
                png = args.out / f"tensorboard_{view.name}.png"
                fragment = view.fragment
                if view.runs and any(re.fullmatch(view.runs, run) for run in runs):
                    fragment += "&regexInput=" + urllib.parse.quote(view.runs, safe="")
                shoot(args.chromium, url + fragment, png, args.budget_ms, args.window_size or view.size)
                shrink(png)
                print(f"{png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}: {view.about}")
        finally:
            process.terminate()
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
