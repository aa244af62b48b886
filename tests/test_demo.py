"""The main job (``python -m lightning_gradflow.demo``), and the engine's plain-loop example."""

import contextlib
import io
import math
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradflow import GradientFlowCallback
from lightning_gradflow.demo import SCENARIOS, main
from tests.helpers.training import RecordingLogger, quiet_trainer

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("gradflow/", "gates/", "sharpness/", "collapse/")


def _run_demo(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["--no-progress-bar", *argv])
    return code, buf.getvalue()


def _scalar_tags(run_dir: Path) -> set[str]:
    event_files = sorted(run_dir.rglob("events.out.tfevents.*"))
    assert event_files, f"no TensorBoard events under {run_dir}"
    tags: set[str] = set()
    for path in event_files:
        acc = EventAccumulator(str(path.parent), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    out = tmp_path_factory.mktemp("demo")
    code, stdout = _run_demo("--scenario", "saturated-lstm", "--steps", "60", "--output-dir", str(out))
    return code, stdout, out


def test_demo_reports_each_run_and_the_tensorboard_command(short_demo: tuple[int, str, Path]) -> None:
    code, stdout, out = short_demo
    assert code == 0
    assert "Health report" in stdout
    assert "== saturated-lstm:" in stdout
    assert "found:" in stdout and "GateSurgeryCallback: gate 'lstm/l0/input'" in stdout
    assert "done (auto_intervene=True):" in stdout and "GateSurgeryCallback.gate_surgery" in stdout
    assert "loss (    monitored)" in stdout and "loss (     repaired)" in stdout
    assert f"tensorboard --logdir {out}" in stdout


def test_demo_logs_all_four_callback_families(short_demo: tuple[int, str, Path]) -> None:
    _, _, out = short_demo
    for run in ("monitored", "repaired"):
        tags = _scalar_tags(out / "saturated-lstm" / run)
        for family in FAMILIES:
            assert any(t.startswith(family) for t in tags), (run, family, sorted(tags)[:20])


def test_no_intervene_runs_only_the_monitoring_run(tmp_path: Path) -> None:
    code, stdout = _run_demo("--scenario", "collapse", "--steps", "12", "--no-intervene", "--output-dir", str(tmp_path))
    assert code == 0
    assert (tmp_path / "collapse" / "monitored").is_dir()
    assert not (tmp_path / "collapse" / "repaired").exists()
    assert "done (auto_intervene=True)" not in stdout and "loss (     repaired)" not in stdout


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--scenario", "nope"]])
def test_bad_arguments_exit_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    assert exc.value.code == 2


def test_console_script_points_at_main() -> None:
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("gradflow-demo") == "lightning_gradflow.demo:main"


@pytest.mark.slow
def test_saturated_lstm_is_repaired(tmp_path: Path) -> None:
    """The default run: with gate surgery the LSTM learns; monitored, it stays near a unigram model."""
    code, stdout = _run_demo("--scenario", "saturated-lstm", "--output-dir", str(tmp_path))
    assert code == 0
    monitored = _loss_of(stdout, "monitored")
    repaired = _loss_of(stdout, "repaired")
    assert repaired < monitored - 0.5, stdout


@pytest.mark.slow
def test_collapse_is_recovered(tmp_path: Path) -> None:
    code, stdout = _run_demo("--scenario", "collapse", "--output-dir", str(tmp_path))
    assert code == 0
    assert "non-finite (collapsed)" in stdout.split("loss (     repaired)")[0], stdout
    assert math.isfinite(_loss_of(stdout, "repaired")), stdout
    assert "EarlyCollapseCallback.rollback" in stdout


def _loss_of(stdout: str, label: str) -> float:
    line = next(ln for ln in stdout.splitlines() if ln.strip().startswith("loss (") and f"{label})" in ln)
    value = line.split("):", 1)[1].split()[0]
    return math.nan if value == "non-finite" else float(value)


def test_every_scenario_has_a_title_and_steps() -> None:
    assert set(SCENARIOS) == {"saturated-lstm", "vanishing", "collapse"}
    assert all(s.title and s.steps > 0 for s in SCENARIOS.values())


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
    recorder = RecordingLogger()
    callback = GradientFlowCallback(log_every_n_steps=2, histogram_every_n_steps=0, figure_every_n_steps=0)
    trainer = quiet_trainer(
        max_steps=5, log_every_n_steps=2, logger=recorder, callbacks=[callback], default_root_dir=tmp_path
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
