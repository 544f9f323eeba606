"""The provider misbehaving at chosen rates while four worker processes send: HTTP 500 and
503, 429, requests held then cut without an answer (timeouts), 200 with an HTML body
(garbage); and a text the provider accepted but whose answer never arrived.

PostgreSQL, real processes, the real twilio SDK over HTTP. Figures are printed on the
terminal and attached to the test report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.sandbox.config import FaultConfig
from tests.integration import dispatch_fixtures as fx
from tests.integration import fault_fixtures as ff
from tests.integration.conftest import SandboxHandle

now, sf, defs, ob = fx.now, fx.sf, fx.defs, fx.ob
latency, transport, sandbox = fx.latency, fx.transport, fx.sandbox
pool_factory = ff.pool_factory

TOTAL = 2_000
CAPPED = 100  # patients under the 1-a-day cap, 4 rows each
RATES = {
    "http_500_rate": 0.04,
    "http_503_rate": 0.03,
    "http_429_rate": 0.05,
    "timeout_rate": 0.03,
    "garbage_rate": 0.03,
}
ARGS = (
    "--plan-interval", "0", "--dispatch-interval", "0.2", "--batch-size", "100",
    "--concurrency", "16", "--stale-after", "5", "--reconcile-interval", "1",
    "--max-attempts", "3",
)  # fmt: skip


@pytest.mark.parametrize("db_backend", ["postgresql"])
def test_provider_errors_at_chosen_rates_never_text_twice_nor_lose_a_row(
    engine: Engine,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    sandbox_factory: Callable[..., SandboxHandle],
    pool_factory: Callable[..., ff.WorkerPool],
    now: datetime,
    request: pytest.FixtureRequest,
) -> None:
    faults = FaultConfig(**RATES, seed=7)  # type: ignore[arg-type]
    sandbox = sandbox_factory(faults=faults, hang_seconds=1.0, delivered_delay_ms=0)
    seeded = ff.seed(session_factory, keyring, now, TOTAL, capped_patients=CAPPED)
    pool = pool_factory(sandbox, *ARGS)
    started = time.monotonic()
    for n in range(4):
        pool.start(f"w{n}")
    try:
        ff.wait_for(lambda: ff.settled(session_factory), 60, "every row settled")
    except AssertionError as exc:
        pytest.fail(f"{exc}: {dict(ff.statuses(session_factory))}\n{pool.tail()}")
    elapsed = time.monotonic() - started
    assert set(pool.stop_all().values()) == {0}
    status = ff.engage_status(pool.env)
    v = ff.verdict(session_factory, sandbox, seeded, status)
    retried = ff.attempts_beyond_first(session_factory)
    figures = {
        "messages": TOTAL,
        "retries": retried,
        **v.figures(),
        "failed_by_code": status["failed_by_error_code"],
        "by_status": v.by_status,
        **{name.removesuffix("_rate"): rate for name, rate in RATES.items()},
        "elapsed_s": round(elapsed, 1),
    }
    line = ff.report(request, "provider", figures)
    assert not v.problems(), line
    assert retried > 0, line  # the faults bit


@pytest.mark.parametrize("transport", ["async"], indirect=True)
def test_text_accepted_without_an_answer_counts_against_the_daily_cap(
    ob: fx.Outbox, sandbox: SandboxHandle
) -> None:
    """The provider accepts row A but the answer is lost (A goes back to the queue for a
    retry); row B of the same patient, under the 1-a-day cap, comes due before A's retry.
    B must wait (A may be out), and A's retry must find A at the provider: one text."""
    a, b = ob.rows([fx.phone(7)], per_patient=2, legal_basis="express")
    ob.set(b, send_at=ob.now + timedelta(seconds=30))
    sandbox.set_faults({"drop_after_accept_rate": 1.0})
    assert ob.dispatch().retried == 1
    sandbox.set_faults({})
    ob.set(a, send_at=ob.now + timedelta(minutes=5))  # a backoff after a few tries
    ob.dispatch(ob.now + timedelta(seconds=30))
    ob.dispatch(ob.now + timedelta(minutes=5))
    texts = sandbox.accepted_per_to()
    assert texts == {fx.phone(7): 1}, f"texts {texts}; rows {[ob.get(r).status for r in (a, b)]}"
    assert ob.get(a).status == "sent"
