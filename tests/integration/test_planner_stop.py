"""A planner tick asked to stop (the worker's SIGTERM) ends after the batch in hand, in one
process or several, and the next tick plans exactly the rest (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import pytest

from engine import planner_parallel
from engine.definitions import DefinitionSet
from tests.integration import test_planner as tp
from tests.integration.test_planner import SAMPLE_STATIN, Planner, summary

planner, sample, defs_dir = tp.planner, tp.sample, tp.defs_dir


class StopAfter:
    """A stop signal that turns on after `checks` looks: the tick is asked to stop while
    it is under way, at a batch boundary chosen by the test."""

    def __init__(self, checks: int) -> None:
        self.left = checks

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_a_stopped_tick_ends_after_its_batch_and_the_next_plans_the_rest(
    planner: Planner, sample: DefinitionSet
) -> None:
    stopped = planner(sample, batch_size=3, stop=StopAfter(1))
    assert stopped.stopped and stopped.patients_seen == 3
    assert stopped.as_json()["stopped"] is True
    rest = planner(sample, batch_size=3)
    assert not rest.stopped and rest.patients_seen == 10
    assert rest.already_present == stopped.inserted
    rows = sum(len(r) for r in planner.rows().values())
    assert stopped.inserted + rest.inserted == rows  # every occurrence once, none twice
    assert summary(planner.rows("statin-refill")) == SAMPLE_STATIN


def test_a_stop_reaches_the_processes_of_a_split_tick(
    planner: Planner, sample: DefinitionSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(planner_parallel, "MIN_PATIENTS_PER_PROCESS", 3)
    stop = threading.Event()
    stop.set()
    stopped = planner(sample, processes=3, stop=stop)
    assert stopped.processes == 3 and stopped.stopped
    assert stopped.inserted == 0 and stopped.patients_seen == 0
    rest = planner(sample, processes=3)
    assert not rest.stopped and rest.inserted == sum(len(r) for r in planner.rows().values())
    assert summary(planner.rows("statin-refill")) == SAMPLE_STATIN
