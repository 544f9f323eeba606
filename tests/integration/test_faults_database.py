"""PostgreSQL restarted twice in the middle of dispatch (a clean fast shutdown, then an
immediate one, as a crash) while four worker processes send.

The cluster is the test's own (fault_fixtures.private_postgres), never the machine's shared
server. Figures are printed on the terminal and attached to the test report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.sandbox.config import FaultConfig
from tests.integration import dispatch_fixtures as fx
from tests.integration import fault_fixtures as ff
from tests.integration.conftest import SandboxHandle

now, sf, defs = fx.now, fx.sf, fx.defs
pool_factory, private_postgres = ff.pool_factory, ff.private_postgres

TOTAL = 3_000
CAPPED = 100
ARGS = (
    "--plan-interval", "0", "--dispatch-interval", "0.2", "--batch-size", "100",
    "--concurrency", "16", "--stale-after", "5", "--reconcile-interval", "1",
    "--max-attempts", "4", "--rate", "150",
)  # fmt: skip
RESTARTS = ((0.25, "fast"), (0.6, "immediate"))  # (share of the rows sent, shutdown mode)
DOWN_SECONDS = 1.0


@pytest.fixture
def db_url(private_postgres: ff.PrivateCluster) -> str:
    """The database on the private cluster (replaces conftest's, for every fixture)."""
    return private_postgres.create_database()


def sent_share(session_factory: sessionmaker[Session], total: int) -> float:
    """Rows sent so far, as a share of `total`; 0 while the database is down."""
    try:
        return ff.statuses(session_factory)["sent"] / total
    except OperationalError:
        return 0.0


def settled(session_factory: sessionmaker[Session]) -> bool:
    try:
        return ff.settled(session_factory)
    except OperationalError:
        return False


def test_postgres_restarted_mid_dispatch_never_texts_twice_nor_loses_a_row(
    engine: Engine,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    sandbox_factory: Callable[..., SandboxHandle],
    pool_factory: Callable[..., ff.WorkerPool],
    private_postgres: ff.PrivateCluster,
    now: datetime,
    request: pytest.FixtureRequest,
) -> None:
    sandbox = sandbox_factory(faults=FaultConfig(latency_ms=(2.0, 8.0)), delivered_delay_ms=0)
    seeded = ff.seed(session_factory, keyring, now, TOTAL, capped_patients=CAPPED)
    pool = pool_factory(sandbox, *ARGS)
    started = time.monotonic()
    for n in range(4):
        pool.start(f"w{n}")
    downtime, at_share = 0.0, []
    try:
        for share, mode in RESTARTS:
            ff.wait_for(lambda s=share: sent_share(session_factory, TOTAL) >= s, 60, f"{share}")
            at_share.append(round(sent_share(session_factory, TOTAL), 2))
            down = time.monotonic()
            private_postgres.stop(mode)
            time.sleep(DOWN_SECONDS)  # the database is away: workers' ticks fail meanwhile
            private_postgres.start()
            downtime += time.monotonic() - down
        ff.wait_for(lambda: settled(session_factory), 60, "every row settled")
    except AssertionError as exc:
        pytest.fail(f"{exc}\n{pool.tail()}")
    elapsed = time.monotonic() - started
    alive = sorted(pool.procs)
    assert not pool.reap(), pool.tail()  # no worker died of the outages
    codes = pool.stop_all()
    v = ff.verdict(session_factory, sandbox, seeded, ff.engage_status(pool.env))
    figures = {
        "messages": TOTAL,
        **v.figures(),
        "restarts": len(RESTARTS),
        "restarted_at_sent_share": at_share,
        "downtime_s": round(downtime, 1),
        "failed_ticks": pool.log_events("worker.tick_failed"),
        "gate_failures": pool.log_events("dispatch.gate_failed"),
        "reconciled": pool.log_events("dispatch.reconciled"),
        "by_status": v.by_status,
        "elapsed_s": round(elapsed, 1),
    }
    line = ff.report(request, "postgres-restart", figures)
    assert len(alive) == 4 and set(codes.values()) == {0}, (codes, line)
    assert not v.problems(), line
    assert all(0 < s < 1 for s in at_share), line  # both restarts hit a dispatch under way
