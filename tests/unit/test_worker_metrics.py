"""The worker times every tick for /metrics, failed ticks included."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import REGISTRY
from sqlalchemy.exc import OperationalError

from engine.worker import Worker


def _count(tick: str, outcome: str) -> float:
    labels = {"tick": tick, "outcome": outcome}
    return REGISTRY.get_sample_value("engage_tick_duration_seconds_count", labels) or 0.0


def _fail() -> None:
    raise OperationalError("SELECT 1", {}, Exception("database restarting"))


def test_ticks_are_timed_by_outcome() -> None:
    fake = SimpleNamespace(fields=lambda **fields: fields)
    ok, failed = _count("plan", "ok"), _count("dispatch", "failed")
    Worker.guarded(fake, "plan", lambda: None)()  # type: ignore[arg-type]
    Worker.guarded(fake, "dispatch", _fail)()  # type: ignore[arg-type]
    assert _count("plan", "ok") == ok + 1
    assert _count("dispatch", "failed") == failed + 1
