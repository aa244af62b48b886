"""TensorBoard end to end: a real ``tensorboard`` server over a log directory written by the callbacks.

A short training run with GradientFlowCallback and GateSurgeryCallback writes scalars, histograms, the gradient-flow
figure, the interventions text and the custom-scalars layout through Lightning's TensorBoardLogger. A ``tensorboard``
process is started on loopback over that directory, and its HTTP API (the routes the web UI itself calls:
``/data/plugin/<plugin>/...``) must serve every one of them with our tags.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradflow import GateSurgeryCallback, GradientFlowCallback
from tests.helpers.matrix_models import TinyLSTM, sequence_loader
from tests.helpers.training import free_port, quiet_trainer

RUN = "run"
STEPS = 8
#: How long to wait for the server to load the run (a guard against a hang, not a speed requirement).
LOAD_DEADLINE_S = 120.0


def write_logs(root: Path) -> tuple[GradientFlowCallback, GateSurgeryCallback]:
    """A short run that writes every kind of TensorBoard data the two callbacks produce, in ``root/run``."""
    seed_everything(0, verbose=False)
    logger = TensorBoardLogger(str(root), name="", version=RUN, default_hp_metric=False)
    flow = GradientFlowCallback(
        auto_intervene=True,
        clip_mode="norm",
        clip_value=1e-3,  # every step is clipped: one intervention per logging step, written as text
        log_every_n_steps=1,
        histogram_every_n_steps=2,
        figure_every_n_steps=4,
    )
    gates = GateSurgeryCallback(every_n_steps=2, auto_intervene=True)
    trainer = quiet_trainer(max_steps=STEPS, logger=logger, callbacks=[flow, gates])
    trainer.fit(TinyLSTM(), sequence_loader())
    logger.experiment.flush()
    return flow, gates


class Server:
    """A running ``tensorboard`` process and a tiny JSON client for its HTTP API."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log

    def url(self, route: str, **params: Any) -> str:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return f"http://127.0.0.1:{self.port}{route}{query}"

    def get(self, route: str, **params: Any) -> bytes:
        with urllib.request.urlopen(self.url(route, **params), timeout=30) as response:
            assert response.status == 200, (route, response.status)
            return bytes(response.read())

    def json(self, route: str, **params: Any) -> Any:
        return json.loads(self.get(route, **params))

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_server(logdir: Path, out: Path) -> Server:
    """Starts ``tensorboard`` on a free loopback port and waits until it answers (retries if the port was taken)."""
    for _ in range(3):
        port = free_port()
        log = out / f"tensorboard-{port}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tensorboard.main",
                    "--logdir",
                    str(logdir),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--load_fast=false",
                    "--reload_interval=1",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        server = Server(process, port, log)
        deadline = time.monotonic() + LOAD_DEADLINE_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                server.get("/data/runs")
                return server
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        stop_server(server)
    raise RuntimeError(f"tensorboard did not start; its output:\n{server.output()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def wait_for_tags(server: Server, route: str, expected: set[str]) -> dict[str, Any]:
    """Polls a ``.../tags`` route until the run has every expected tag (the server loads the run in a thread)."""
    deadline = time.monotonic() + LOAD_DEADLINE_S
    tags: dict[str, Any] = {}
    while time.monotonic() < deadline:
        tags = server.json(route)
        if expected <= set(tags.get(RUN, ())):
            return tags
        time.sleep(0.25)
    raise AssertionError(f"{route} never served {sorted(expected - set(tags.get(RUN, ())))}: {tags}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, GradientFlowCallback]]:
    root = tmp_path_factory.mktemp("tb")
    logdir = root / "logs"
    flow, _ = write_logs(logdir)
    running = start_server(logdir, root)
    try:
        yield running, flow
    finally:
        stop_server(running)


def test_runs_are_listed(server: tuple[Server, GradientFlowCallback]) -> None:
    srv, _ = server
    assert RUN in srv.json("/data/runs")


def test_scalars_are_served(server: tuple[Server, GradientFlowCallback]) -> None:
    srv, flow = server
    layers = flow.layers
    assert layers == ["lstm", "hidden/0", "head"]  # depth order, input side first
    expected = {"gradflow/grad_norm_total", "gradflow/clip_threshold", "gates/surgeries"}
    expected |= {f"gradflow/{m}/{layer}" for m in ("grad_norm", "grad_rms", "update_ratio") for layer in layers}
    expected |= {f"gates/{m}/lstm/l0/{g}" for m in ("saturation", "sigma_prime") for g in ("input", "forget")}
    wait_for_tags(srv, "/data/plugin/scalars/tags", expected)
    points = srv.json("/data/plugin/scalars/scalars", run=RUN, tag="gradflow/grad_norm_total")
    assert [step for _, step, _ in points] == list(range(STEPS))  # [wall_time, step, value] per logged step
    assert all(value > 0 for _, _, value in points)
    gate_points = srv.json("/data/plugin/scalars/scalars", run=RUN, tag="gates/saturation/lstm/l0/forget")
    assert [step for _, step, _ in gate_points] == list(range(0, STEPS, 2))  # probes every 2 steps
    assert all(0.0 <= value <= 1.0 for _, _, value in gate_points)


def test_histograms_are_served(server: tuple[Server, GradientFlowCallback]) -> None:
    srv, flow = server
    expected = {f"gradflow/grad_hist/{layer}" for layer in flow.layers}
    expected |= {f"gates/activation_hist/lstm/l0/{g}" for g in ("input", "forget", "cell", "output")}
    expected |= {f"gates/preact_hist/lstm/l0/{g}" for g in ("input", "forget", "cell", "output")}
    wait_for_tags(srv, "/data/plugin/histograms/tags", expected)
    data = srv.json("/data/plugin/histograms/histograms", run=RUN, tag="gradflow/grad_hist/head")
    assert [step for _, step, _ in data] == [1, 3, 5, 7]  # histogram_every_n_steps=2: (step + 1) % 2 == 0
    for _, _, buckets in data:  # [left, right, count] per bucket
        assert sum(count for _, _, count in buckets) > 0
        assert all(left <= right for left, right, _ in buckets)


def test_images_are_served(server: tuple[Server, GradientFlowCallback]) -> None:
    srv, _ = server
    wait_for_tags(srv, "/data/plugin/images/tags", {"gradflow/flow"})
    images = srv.json("/data/plugin/images/images", run=RUN, tag="gradflow/flow")
    assert [image["step"] for image in images] == [3, 7]  # figure_every_n_steps=4
    png = srv.get(f"/data/plugin/images/individualImage?{images[-1]['query']}")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_text_is_served(server: tuple[Server, GradientFlowCallback]) -> None:
    srv, flow = server
    tags = wait_for_tags(srv, "/data/plugin/text/tags", {"gradflow/interventions/text_summary"})
    assert "gradflow/interventions/text_summary" in tags[RUN]
    entries = srv.json("/data/plugin/text/text", run=RUN, tag="gradflow/interventions/text_summary")
    assert [entry["step"] for entry in entries] == list(range(STEPS))  # a clip record on every logging step
    html = entries[0]["text"]  # rendered from Markdown to an HTML table
    assert "<table>" in html and "clip" in html
    assert len(flow.interventions) == STEPS
    assert all(record.kind == "clip" for record in flow.interventions)


def test_custom_scalars_layout_is_served(server: tuple[Server, GradientFlowCallback]) -> None:
    srv, _ = server
    deadline = time.monotonic() + LOAD_DEADLINE_S
    layout: dict[str, Any] = {}
    while time.monotonic() < deadline and not layout:
        layout = srv.json("/data/plugin/custom_scalars/layout")
        time.sleep(0.25)
    categories = {category["title"]: category["chart"] for category in layout.get("category", [])}
    # both callbacks' categories, merged into the one layout TensorBoard shows
    assert set(categories) == {"gradflow", "gates"}, layout
    charts = {chart["title"]: chart["multiline"]["tag"] for chart in categories["gradflow"]}
    assert charts["gradient norm per layer"] == ["gradflow/grad_norm/.*"]
    gate_charts = {chart["title"]: chart["multiline"]["tag"] for chart in categories["gates"]}
    assert gate_charts["saturation (fraction of activations)"] == ["gates/saturation/.*"]
    # every regex of the layout matches at least one scalar tag the server has
    scalar_tags = set(srv.json("/data/plugin/scalars/tags")[RUN])
    for chart_list in categories.values():
        for chart in chart_list:
            for regex in chart["multiline"]["tag"]:
                assert any(re.match(regex, tag) for tag in scalar_tags), regex
