import contextlib
import io
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradflow import GradientFlowCallback
from lightning_gradflow.demo import main

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("embed", "lstm/0", "lstm/1", "head")
PER_LAYER = ("grad_norm", "grad_rms", "grad_absmax", "zero_fraction", "weight_norm", "update_ratio", "flow_ratio")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    out = tmp_path_factory.mktemp("demo")
    argv = ["--steps", "25", "--log-every-n-steps", "10", "--histogram-every-n-steps", "10", "--batch-size", "16"]
    argv += ["--seq-len", "32", "--hidden-size", "32", "--accelerator", "cpu", "--output-dir", str(out)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, out, buf.getvalue()


def _accumulator(out: Path) -> EventAccumulator:
    event_files = sorted(out.rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    acc = EventAccumulator(str(event_files[0].parent), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_demo_exits_zero_and_reports(demo_run: tuple[int, Path, str]) -> None:
    code, out, stdout = demo_run
    assert code == 0
    assert "Trained 25 steps" in stdout
    assert "Training loss:" in stdout
    assert "smallest" in stdout
    assert "largest" in stdout
    assert f"tensorboard --logdir {out}" in stdout


def test_demo_logs_engine_scalars_for_every_layer(demo_run: tuple[int, Path, str]) -> None:
    _, out, _ = demo_run
    acc = _accumulator(out)
    scalars = set(acc.Tags()["scalars"])
    expected = {f"gradflow/{name}/{layer}" for name in PER_LAYER for layer in LAYERS}
    expected |= {"gradflow/grad_norm_total", "gradflow/nonfinite_grads"}
    assert expected <= scalars, sorted(expected - scalars)

    for tag in expected:
        events = acc.Scalars(tag)
        # logging steps, then the final partial window (no update ratio there: no snapshot was taken before it)
        assert [e.step for e in events] == ([9, 19] if "update_ratio" in tag else [9, 19, 24]), tag
        assert all(math.isfinite(e.value) for e in events), tag
    for layer in LAYERS:
        assert all(0 <= e.value <= 1 for e in acc.Scalars(f"gradflow/zero_fraction/{layer}")), layer
    assert all(e.value == 0 for e in acc.Scalars("gradflow/nonfinite_grads"))
    assert all(e.value > 0 for layer in LAYERS for e in acc.Scalars(f"gradflow/update_ratio/{layer}"))

    for i, total in enumerate(acc.Scalars("gradflow/grad_norm_total")):
        per_layer = [acc.Scalars(f"gradflow/grad_norm/{layer}")[i].value for layer in LAYERS]
        assert total.value == pytest.approx(math.sqrt(sum(v * v for v in per_layer)), rel=1e-4)


def test_demo_writes_gradient_histograms(demo_run: tuple[int, Path, str]) -> None:
    _, out, _ = demo_run
    acc = _accumulator(out)
    histograms = set(acc.Tags()["histograms"])
    assert {f"gradflow/grad_hist/{layer}" for layer in LAYERS} <= histograms
    for layer in LAYERS:
        events = acc.Histograms(f"gradflow/grad_hist/{layer}")
        assert [e.step for e in events] == [9, 19]
        h = events[0].histogram_value
        assert h.num > 0
        assert sum(h.bucket) == h.num
        assert h.min <= h.max


class _RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        assert step is not None
        self.rows.append((step, dict(metrics)))


class _PartlyUnusedModel(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)  # never in the graph: its gradients stay None
        self.frozen = nn.Linear(4, 1)
        self.frozen.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.frozen(self.used(batch[0])).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_layers_without_gradients_are_skipped(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(16, 4))
    recorder = _RecordingLogger()
    callback = GradientFlowCallback(log_every_n_steps=2, histogram_every_n_steps=0, figure_every_n_steps=0)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=5,
        log_every_n_steps=2,
        logger=recorder,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_PartlyUnusedModel(), torch.utils.data.DataLoader(data, batch_size=4))

    rows = [(step, m) for step, m in recorder.rows if any(k.startswith("gradflow/") for k in m)]
    assert [step for step, _ in rows] == [1, 3, 4]  # 4: the final, partial window
    assert callback.layers == ["used", "unused"]  # frozen parameters are not tracked; unused ones go last
    for step, metrics in rows:
        assert "gradflow/grad_norm/used" in metrics
        assert not any(k.endswith("/unused") for k in metrics)
        assert metrics["gradflow/update_ratio/used"] > 0 if step < 4 else "gradflow/update_ratio/used" not in metrics
        assert metrics["gradflow/grad_norm_total"] == pytest.approx(metrics["gradflow/grad_norm/used"], rel=1e-6)


def test_engine_stats_example_runs() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "engine_stats.py"), "--steps", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "update_ratio" in result.stdout
    assert "fc1.weight" in result.stdout
    assert result.stdout.count("step ") == 2
