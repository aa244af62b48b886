"""Runs every cell of the support matrix (``scripts/support_matrix.py``) with every registered callback attached.

A cell that passes must train to ``max_steps`` with finite losses and weights, every callback must log its tag
family, no exception may escape, and on clean data no callback may skip steps, roll back or stop. Resume cells
also check that every callback's state is restored from the checkpoint and that no intervention is repeated or
lost; DDP cells, that both ranks made the same interventions and kept the same weights. Error cells must raise the
documented error; callbacks that refuse a set-up (``REFUSALS``) must raise theirs at set-up, and the cell then runs
with the others. A callback with a known bug in a cell (``KNOWN_BUGS``) is left out of that cell's run and checked
in an ``xfail(strict=True)`` test of its own. The DDP cells run one after another in one pair of spawned processes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from scripts import support_table
from scripts.support_matrix import CALLBACK_FACTORIES, CELLS, Cell, attached, known_bugs, refusals
from tests.helpers.matrix_runner import MAX_STEPS, RESUME_AT, RESUME_STEPS, finite, run_cell, run_ddp_cells

ROOT = Path(__file__).resolve().parents[1]
SINGLE = [c for c in CELLS if c.strategy == "single"]
DDP = [c for c in CELLS if c.strategy == "ddp"]
#: (cell, callback) pairs with a known bug: each runs as an xfail(strict=True) test with the callback attached.
BUGGY = [(c, name, reason) for c in CELLS for name, reason in known_bugs(c).items()]
#: State entries that are reported but by design not restored: EarlyCollapseCallback's rollback snapshots live in
#: memory only (its state lists their steps).
NOT_RESTORED = {"EarlyCollapseCallback": {"snapshot_steps"}}
#: Interventions that must never happen on this clean data (finite inputs, a healthy model).
_EMERGENCY = {"skip_step", "rollback", "stop"}


def _param(cell: Cell) -> Any:
    marks: list[Any] = []
    if cell.slow:
        marks.append(pytest.mark.slow)
    if cell.strategy == "ddp":
        marks.append(pytest.mark.ddp)
    if cell.xfail:
        marks.append(pytest.mark.xfail(reason=cell.xfail, strict=True))
    return pytest.param(cell, id=cell.id, marks=marks)


def _diff(a: Any, b: Any, path: str = "") -> str | None:
    """Where ``a`` and ``b`` first differ (deep; NaN equals NaN; tensors exactly), or ``None`` when they are equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        return None if same else f"{path}: {a!r} != {b!r}"
    if isinstance(a, float) and isinstance(b, float):
        return None if a == b or (math.isnan(a) and math.isnan(b)) else f"{path}: {a!r} != {b!r}"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        return next((d for k in a if (d := _diff(a[k], b[k], f"{path}.{k}")) is not None), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        pairs = enumerate(zip(a, b, strict=True))
        return next((d for i, (x, y) in pairs if (d := _diff(x, y, f"{path}[{i}]")) is not None), None)
    return None if a == b else f"{path}: {a!r} != {b!r}"


def _same(a: Any, b: Any) -> bool:
    return _diff(a, b) is None


def check_passes(cell: Cell, result: dict[str, Any], names: list[str], steps: int) -> None:
    assert result["error"] is None, result["error"]
    assert result["global_step"] == steps
    assert finite(result["losses"]), result["losses"]
    assert all(bool(torch.isfinite(w).all()) for w in result["weights"].values() if w.is_floating_point())
    if result["rank"] == 0:  # each callback logged its own tag family
        for name in names:
            family = CALLBACK_FACTORIES[name].family
            assert any(key.startswith(f"{family}/") for key in result["keys"]), (name, sorted(result["keys"]))
    assert sorted(result["interventions"]) == sorted(n for n in names if n in result["interventions"])
    for name, loss in result["reported_loss"].items():  # the model's loss (unscaled, ≈ a micro-batch mean)
        # NaN: no loss seen for that optimizer step (a second optimizer in manual optimization)
        assert math.isnan(loss) or 0 <= loss <= 4 * max(result["losses"]), (name, loss, result["losses"])
    for records in result["interventions"].values():
        for record in records:
            assert 0 <= record["step"] < steps, record
            assert record["kind"] not in _EMERGENCY, record  # the data is clean: nothing to skip or roll back
            counted = re.search(r"(\d+) of the last (\d+) steps", record["reason"])
            if counted:  # a window's count cannot exceed the steps in it
                assert int(counted[1]) <= int(counted[2]), record


def _state_for(states: dict[str, Any], name: str) -> Any:
    keys = [k for k in states if k == name or k.startswith(f"{name}{{")]
    assert len(keys) == 1, (name, list(states))
    return states[keys[0]]


def check_resume(result: dict[str, Any], names: list[str]) -> None:
    first, ckpt = result["first"], result["ckpt"]
    assert first["global_step"] == RESUME_STEPS and finite(first["losses"])
    assert ckpt["global_step"] == RESUME_AT
    for name in names:
        skip = NOT_RESTORED.get(name, set())
        saved = {k: v for k, v in _state_for(ckpt["callbacks"], name).items() if k not in skip}
        restored = {k: v for k, v in result["restored"][name].items() if k not in skip}
        # restored: the callback's state right after the restore equals what the checkpoint holds
        assert _diff(restored, saved) is None, (name, _diff(restored, saved))
        before = [r for r in first["interventions"][name] if r["step"] < RESUME_AT]
        after = result["interventions"][name]
        # nothing lost, nothing repeated: the restored records come first, new ones only from the resume step on,
        # and the resumed run's records are those of the uninterrupted run (same steps, kinds, targets)
        assert _same(after[: len(before)], before), name
        assert all(r["step"] >= RESUME_AT for r in after[len(before) :]), (name, after)
        keys = [(r["step"], r["kind"], r["target"]) for r in after]
        assert len(keys) == len(set(keys)), (name, keys)
        assert keys == [(r["step"], r["kind"], r["target"]) for r in first["interventions"][name]], name


def check_error(error: BaseException, outcome: Any) -> None:
    assert type(error).__name__ == outcome.error, repr(error)
    assert re.search(outcome.match, str(error)), str(error)


@pytest.mark.parametrize("cell", [_param(c) for c in SINGLE])
def test_cell(cell: Cell, tmp_path: Path) -> None:
    if not cell.outcome.passes:
        with pytest.raises(Exception) as info:  # noqa: PT011 - the type is checked by name below
            run_cell(cell, tmp_path)
        check_error(info.value, cell.outcome)
        return
    for name, outcome in refusals(cell).items():  # a refusing callback raises its documented error at set-up
        with pytest.raises(Exception) as info:  # noqa: PT011
            run_cell(cell, tmp_path / f"refused-{name}", [name])
        check_error(info.value, outcome)
    names = attached(cell)
    result = run_cell(cell, tmp_path / "run", names)
    check_passes(cell, result, names, RESUME_STEPS if cell.resume else MAX_STEPS)
    if cell.resume:
        check_resume(result, names)


def _bug_param(cell: Cell, name: str, reason: str) -> Any:
    marks: list[Any] = [
        pytest.mark.xfail(reason=f"{name}: {reason}", raises=(AssertionError, RuntimeError), strict=True)
    ]
    if cell.slow:
        marks.append(pytest.mark.slow)
    if cell.strategy == "ddp":
        marks.append(pytest.mark.ddp)
    return pytest.param(cell, name, id=f"{cell.id}-{name}", marks=marks)


@pytest.mark.parametrize(("cell", "name"), [_bug_param(*b) for b in BUGGY if b[0].strategy == "single"])
def test_known_bug(cell: Cell, name: str, tmp_path: Path) -> None:
    names = [*attached(cell), name]
    check_passes(cell, run_cell(cell, tmp_path, names), names, RESUME_STEPS if cell.resume else MAX_STEPS)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    runs = [(c.id, c, attached(c)) for c in DDP]
    runs += [(f"{c.id}-{name}", c, [*attached(c), name]) for c, name, _ in BUGGY if c.strategy == "ddp"]
    return run_ddp_cells(runs, tmp_path_factory.mktemp("ddp"))


def check_ddp(cell: Cell, results: list[dict[str, Any]], names: list[str]) -> None:
    zero, one = results
    for result in (zero, one):
        assert result["error"] is None, result["error"][2] if result["error"] else None
    for result in (zero, one):
        check_passes(cell, result, names, MAX_STEPS)
    # every rank made the same decisions at the same steps, and the weights stayed in sync
    for name in names:
        ranks = [[(r["step"], r["kind"], r["target"]) for r in res["interventions"][name]] for res in (zero, one)]
        assert ranks[0] == ranks[1], name
    assert _same(zero["weights"], one["weights"])


@pytest.mark.parametrize("cell", [_param(c) for c in DDP])
def test_ddp_cell(cell: Cell, ddp_results: dict[str, list[dict[str, Any]]]) -> None:
    check_ddp(cell, ddp_results[cell.id], attached(cell))


@pytest.mark.parametrize(("cell", "name"), [_bug_param(*b) for b in BUGGY if b[0].strategy == "ddp"])
def test_ddp_known_bug(cell: Cell, name: str, ddp_results: dict[str, list[dict[str, Any]]]) -> None:
    check_ddp(cell, ddp_results[f"{cell.id}-{name}"], [*attached(cell), name])


# ------------------------------------------------------------------------------------------- the README table


def test_readme_table_is_generated_from_the_matrix() -> None:
    table = support_table.support_table_markdown()
    assert table.count("\n| ") == len(CELLS)  # one row per cell (after the header)
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = support_table.START_MARKER, support_table.END_MARKER
    if start not in text or end not in text:
        pytest.skip("README has no support-matrix markers yet")
    inside = text.split(start, 1)[1].split(end, 1)[0]
    assert inside.strip() == table.strip(), (
        "README's support table is stale: run `python -m scripts.support_table --write`"
    )
