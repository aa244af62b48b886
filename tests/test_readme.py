"""The README's Python snippets run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_readme_has_snippets() -> None:
    assert SNIPPETS


YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_yaml_configures_the_four_callbacks_through_lightning_cli(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    import lightning_gradflow as lg

    (config,) = YAML_BLOCKS
    path = tmp_path / "config.yaml"
    path.write_text(config.replace("save_dir: runs", f"save_dir: {tmp_path / 'runs'}"))
    cli = LightningCLI(
        BoringModel, BoringDataModule, run=False, args=["--config", str(path)], save_config_callback=None
    )
    by_type = {type(cb): cb for cb in cli.trainer.callbacks}
    expected = (lg.GradientFlowCallback, lg.GateSurgeryCallback, lg.SharpnessCallback, lg.EarlyCollapseCallback)
    assert all(cls in by_type for cls in expected), list(by_type)
    assert all(by_type[cls].auto_intervene for cls in expected)
    assert by_type[lg.SharpnessCallback].every_n_steps == 500
    assert by_type[lg.EarlyCollapseCallback].max_rollbacks == 3
