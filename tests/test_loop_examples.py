"""The pure monitors driving loops without a Trainer: ``examples/plain_torch_loop.py`` and ``examples/fabric_loop.py``.

Both scripts train a ReLU MLP on a stream with a NaN batch and a burst of ×300 inputs. Without the monitors the run
ends NaN; with ``LoopHealth`` (flow statistics, ZClip, the collapse risk model and ladder, snapshots) the NaN step is
skipped, the burst is answered (LR cut, rollback) and the run ends finite and low.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600, check=True
    )
    return out.stdout


def _loss(text: str, label: str) -> float:
    match = re.search(rf"{re.escape(label)}\s*(\S+)", text)
    assert match, text
    return float(match.group(1))


@pytest.mark.parametrize("seed", ["0", "3"])
def test_plain_loop_skips_the_nan_and_recovers_from_the_burst(seed: str) -> None:
    text = _run("plain_torch_loop.py", "--steps", "160", "--nan-step", "30", "--burst-step", "90", "--seed", seed)
    assert math.isnan(_loss(text, "final loss without monitors:")), text
    assert "step 30: LoopHealth skip_step" in text, text
    assert re.search(r"step 9[0-3]: LoopHealth (lr_scale|rollback)", text), text
    healthy = _loss(text, "final loss with LoopHealth:")
    assert math.isfinite(healthy) and healthy < 0.05, text


def test_fabric_loop_gives_the_same_protection() -> None:
    text = _run("fabric_loop.py", "--steps", "160", "--nan-step", "30", "--burst-step", "90")
    assert "step 30: LoopHealth skip_step" in text, text
    assert re.search(r"step 9[0-3]: LoopHealth (lr_scale|rollback)", text), text
    healthy = _loss(text, "final loss with LoopHealth under Fabric:")
    assert math.isfinite(healthy) and healthy < 0.05, text
