"""ProbeSchedule: dense at the start and after findings, sparse when healthy, fixed when asked, resumable."""

from __future__ import annotations

import itertools

import pytest

from lightning_gradflow.schedule import ProbeSchedule


def _steps(schedule: ProbeSchedule, start: int, stop: int) -> list[int]:
    return [s for s in range(start, stop) if schedule.due(s)]


def test_dense_start_then_geometric_up_to_the_cap() -> None:
    steps = _steps(ProbeSchedule(every_n_steps=200, dense_every=2, dense_steps=10), 0, 2000)
    assert steps[:6] == [0, 2, 4, 6, 8, 10]
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert max(gaps) == 200 and gaps == sorted(gaps)  # never denser again without a finding, capped at every_n_steps
    assert len(steps) < 2000 / 200 + 15


def test_a_finding_makes_it_dense_again() -> None:
    schedule = ProbeSchedule(every_n_steps=100, dense_every=5, dense_steps=30)
    _steps(schedule, 0, 500)
    schedule.found(500)
    assert _steps(schedule, 500, 531)[:6] == [505, 510, 515, 520, 525, 530]


def test_fixed_schedule_is_the_plain_modulo() -> None:
    schedule = ProbeSchedule(every_n_steps=7, adaptive=False)
    schedule.found(3)  # findings change nothing
    assert _steps(schedule, 0, 30) == [0, 7, 14, 21, 28]


def test_zero_disables_probes() -> None:
    assert _steps(ProbeSchedule(every_n_steps=0), 0, 100) == []


def test_state_round_trip_continues_the_same_schedule() -> None:
    a = ProbeSchedule(every_n_steps=64)
    first = _steps(a, 0, 300)
    b = ProbeSchedule(every_n_steps=64)
    b.load_state_dict(a.state_dict())
    fresh = ProbeSchedule(every_n_steps=64)
    _steps(fresh, 0, 300)
    assert _steps(b, 300, 1000) == _steps(fresh, 300, 1000) and first


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": -1}, "every_n_steps"),
        ({"every_n_steps": 10, "growth": 1.0}, "growth"),
        ({"every_n_steps": 10, "dense_every": 0}, "dense_every"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        ProbeSchedule(**kwargs)


def test_bad_state_is_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        ProbeSchedule(every_n_steps=10).load_state_dict({"next_step": 3, "interval": float("nan"), "dense_until": 5})
