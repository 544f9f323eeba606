"""Workers SIGKILLed at 20 named points of the sending path, and at random moments, while
four of them send 10,000 texts through a sandbox that also fails now and then.

PostgreSQL only (several worker processes need it); real processes, real HTTP, the real
twilio SDK. Figures are printed on the terminal and attached to the test report.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.sandbox.config import FaultConfig
from tests.integration import dispatch_fixtures as fx
from tests.integration import fault_fixtures as ff
from tests.integration.conftest import SandboxHandle

now, sf, defs = fx.now, fx.sf, fx.defs
pool_factory = ff.pool_factory

# Each point, and the pass through it (in one process) at which the process dies. Per
# message points die later than per batch ones, so that killed workers get work done.
FAILPOINTS: dict[str, int] = {
    "worker.reconcile_tick": 3,  # a reconcile tick starting (one runs at start-up)
    "worker.dispatch_tick": 2,  # a dispatch tick starting
    "worker.dispatch_idle": 1,  # a dispatch tick ending: nothing due
    "claim.before_commit": 4,  # rows decided and marked sending, not committed
    "claim.after_commit": 6,  # rows sending, committed, none at the gate yet
    "gate.before_mark": 9,  # a group about to be marked started
    "gate.after_mark": 12,  # marked started, not yet handed to the provider
    "send.group_admitted": 15,  # a group passed the gate, calls about to start
    "send.before_call": 120,  # one row about to be handed to the provider
    "send.after_call": 250,  # the provider accepted it; not recorded
    "send.after_error": 2,  # the provider refused or did not answer; not recorded
    "send.before_lookup": 1,  # a retry about to ask whether the last try went out
    "send.after_lookup": 1,  # the provider answered that question; not acted on
    "record.before_accepted": 5,  # record transaction open, rows locked, nothing written
    "record.after_accepted": 8,  # accepted rows updated, not committed
    "record.after_others": 2,  # retries and releases written, not committed
    "reconcile.after_select": 1,  # stale rows read, the provider not asked yet
    "reconcile.after_ask": 1,  # the provider asked, verdicts not written
    "reconcile.before_commit": 1,  # verdicts written, not committed
    "reconcile.after_commit": 1,  # verdicts committed
}
SLOTS = ("w0", "w1", "w2", "w3")
RANDOM_KILLS = 4
TOTAL = 10_000
CAPPED = 250  # patients under the 1-a-day cap, 4 rows each
FAULTS = FaultConfig(
    http_500_rate=0.01,
    http_503_rate=0.005,
    http_429_rate=0.015,
    timeout_rate=0.004,
    garbage_rate=0.006,
    scope="all",
    seed=20,
)
ARGS = (
    "--plan-interval", "0", "--dispatch-interval", "0.2", "--batch-size", "100",
    "--concurrency", "16", "--stale-after", "5", "--reconcile-interval", "1",
    "--max-attempts", "3",
)  # fmt: skip
DEADLINE = 150.0


class Killer:
    """Deals the failpoints not fired yet to the slots, one share per process, restarts
    every process that dies, and kills at random moments."""

    def __init__(self, pool: ff.WorkerPool, rng: random.Random) -> None:
        self.pool, self.rng = pool, rng
        self.fired: Counter[str] = Counter()
        self.armed: dict[str, list[str]] = {}
        self.random_kills = 0

    def arm(self, slot: str, share: list[str] | None = None) -> None:
        """Start `slot` armed with `share`, by default every point neither fired yet nor
        armed in another live process."""
        if share is None:
            taken = {p for s, points in self.armed.items() if s != slot for p in points}
            share = [p for p in FAILPOINTS if p not in self.fired and p not in taken]
        self.armed[slot] = share
        spec = ",".join(f"{p}:{FAILPOINTS[p]}" for p in share)
        self.pool.start(slot, failpoints=spec)

    def tend(self) -> None:
        for death in self.pool.reap():
            self.armed.pop(death.slot, None)
            if death.code != -9:
                raise AssertionError(f"{death.slot} exited {death.code}\n{self.pool.tail()}")
            if death.failpoint:
                self.fired[death.failpoint] += 1
            self.arm(death.slot)

    def kill_one(self) -> None:
        slot = self.rng.choice(sorted(self.pool.procs))
        self.pool.kill(slot)
        self.random_kills += 1


@pytest.mark.parametrize("db_backend", ["postgresql"])
def test_sigkill_at_twenty_points_never_texts_twice_nor_loses_a_row(
    engine: Engine,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    sandbox_factory: Callable[..., SandboxHandle],
    pool_factory: Callable[..., ff.WorkerPool],
    now: datetime,
    request: pytest.FixtureRequest,
) -> None:
    sandbox = sandbox_factory(faults=FAULTS, hang_seconds=1.0, delivered_delay_ms=0)
    seeded = ff.seed(session_factory, keyring, now, TOTAL, capped_patients=CAPPED)
    pool = pool_factory(sandbox, *ARGS)
    killer = Killer(pool, random.Random(20))
    started = time.monotonic()
    for k, slot in enumerate(SLOTS):
        killer.arm(slot, list(FAILPOINTS)[k :: len(SLOTS)])
    moments = ff.random_moments(20, RANDOM_KILLS, 2.0, 20.0)
    try:
        while len(killer.fired) < len(FAILPOINTS) or not ff.settled(session_factory):
            elapsed = time.monotonic() - started
            if elapsed > DEADLINE:
                missing = sorted(set(FAILPOINTS) - set(killer.fired))
                raise AssertionError(
                    f"not done after {DEADLINE} s: points not fired {missing}; "
                    f"outbox {dict(ff.statuses(session_factory))}\n{pool.tail()}"
                )
            if moments and elapsed >= moments[0] and pool.procs:
                moments.pop(0)
                killer.kill_one()
            killer.tend()
            time.sleep(0.05)
    finally:
        codes = pool.stop_all()
    elapsed = time.monotonic() - started
    assert set(codes.values()) <= {0}, codes
    env = pool.env
    v = ff.verdict(session_factory, sandbox, seeded, ff.engage_status(env))
    kills = sum(killer.fired.values()) + killer.random_kills
    figures = {
        "messages": TOTAL,
        **v.figures(),
        "points": len(killer.fired),
        "kills": kills,
        "random_kills": killer.random_kills,
        "restarts": sum(pool.starts.values()) - len(SLOTS),
        "reconciled": pool.log_events("dispatch.reconciled"),
        "by_status": v.by_status,
        "elapsed_s": round(elapsed, 1),
    }
    line = ff.report(request, "sigkill", figures)
    assert not v.problems(), line
    assert len(killer.fired) == len(FAILPOINTS), line
