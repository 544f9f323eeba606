"""A planner tick asked to stop (the worker's SIGTERM) ends after the batch in hand, in one
process or several, and the next tick plans exactly the rest (SQLite and PostgreSQL)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

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


def test_a_range_process_whose_parent_died_stops_and_exits(tmp_path: Path) -> None:
    """The parent of a split tick is killed (SIGKILL: no stop is passed on): its range
    process, which ignores group signals, sees it gone, stops after the batch in hand and
    exits instead of planning the rest of its range unseen, or idling forever."""
    marker = tmp_path / "child"
    context = multiprocessing.get_context("spawn")
    parent = context.Process(target=_parent_of_a_range_process, args=(str(marker),))
    parent.start()
    child = int(_wait_for(marker, "started").split()[1])
    os.kill(parent.pid, signal.SIGKILL)  # type: ignore[arg-type]
    parent.join()
    assert _wait_for(marker, "stopped").startswith("stopped")
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the orphaned range process kept running"


def _parent_of_a_range_process(marker: str) -> None:
    """A planning parent as plan_ranges starts one: the pool's initializer installs the
    children's stop; then it waits, never setting that stop, until it is killed."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    with ProcessPoolExecutor(
        max_workers=1, mp_context=context, initializer=planner_parallel._child, initargs=(stop,)
    ) as pool:
        pool.submit(_plan_until_stopped, marker)
        time.sleep(120)


def _plan_until_stopped(marker: str) -> None:
    """Stands in for plan_range: batches until the stop shows, then what it does after."""
    Path(marker).write_text(f"started {os.getpid()}")
    deadline = time.monotonic() + 60
    while not planner_parallel._stop.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)
    Path(marker).write_text("stopped" if planner_parallel._stop.is_set() else "timed out")
    planner_parallel.exit_if_orphaned()


def _wait_for(marker: Path, prefix: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = marker.read_text() if marker.exists() else ""
        if text.startswith(prefix) or text == "timed out":
            return text
        time.sleep(0.02)
    raise AssertionError(f"{marker} never said {prefix!r}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
