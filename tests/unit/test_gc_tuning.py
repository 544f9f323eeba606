"""bulk_collector: the collector's thresholds raised inside, put back after, cycles still
collected."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator

import pytest

from engine import planner
from engine.gc_tuning import BULK_THRESHOLDS, bulk_collector


@pytest.fixture(autouse=True)
def default_thresholds() -> Iterator[None]:
    before, enabled = gc.get_threshold(), gc.isenabled()
    gc.enable()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)
    if not enabled:
        gc.disable()


def test_thresholds_are_raised_inside_and_put_back_after() -> None:
    with bulk_collector():
        assert gc.get_threshold() == BULK_THRESHOLDS
    assert gc.get_threshold() == (700, 10, 10)


def test_nested_and_failing_work_puts_back_the_first_thresholds() -> None:
    with pytest.raises(RuntimeError), bulk_collector():
        with bulk_collector():
            pass
        assert gc.get_threshold() == BULK_THRESHOLDS  # the outer one still holds
        raise RuntimeError("the tick failed")
    assert gc.get_threshold() == (700, 10, 10)


def test_higher_thresholds_of_the_process_are_kept() -> None:
    gc.set_threshold(50_000, 5, 20)
    with bulk_collector():
        assert gc.get_threshold() == (50_000, 10, 20)
    assert gc.get_threshold() == (50_000, 5, 20)


def test_overlapping_threads_put_back_the_thresholds_once_the_last_leaves() -> None:
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[int, int, int]] = []

    def first() -> None:
        with bulk_collector():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with bulk_collector():
            second_in.set()
            first_out.wait(5)
            seen.append(gc.get_threshold())  # the first one left: still raised

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [BULK_THRESHOLDS]
    assert gc.get_threshold() == (700, 10, 10)


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_cycles_made_inside_are_still_collected_without_asking() -> None:
    gc.collect()
    with bulk_collector():
        first = weakref.ref(Node())
        assert first() is not None
        for _ in range(20 * BULK_THRESHOLDS[0]):
            Node()
        assert first() is None


def test_a_planner_tick_runs_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int, int]] = []

    class Stop:
        def is_set(self) -> bool:
            seen.append(gc.get_threshold())
            return True

    class Tick:
        rows = type("Rows", (), {"defs": None})()
        campaigns = ()
        session_factory = staticmethod(lambda: _NoSession())
        keyring = None
        report = planner.PlanReport(now=None, horizon=None)  # type: ignore[arg-type]
        stop = Stop()

    monkeypatch.setattr(planner, "sealed_fields", lambda defs, campaigns: frozenset())
    monkeypatch.setattr(planner, "_candidates", lambda *args: iter(()))
    monkeypatch.setattr(planner, "write_after_rows", lambda sessions, batch_size: batch_size)
    planner.plan_patients(Tick(), 10)  # type: ignore[arg-type]
    assert seen == [BULK_THRESHOLDS]
    assert gc.get_threshold() == (700, 10, 10)


class _NoSession:
    def __enter__(self) -> _NoSession:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
