"""dispatch_until_idle's pipeline: the next batch is claimed while the previous one's sends
are in flight. Through the real twilio SDK (blocking and async clients) to the sandbox, on
SQLite and PostgreSQL."""

from __future__ import annotations

import threading

from sqlalchemy import select

from engine import outbox_status as st
from engine.dispatch_claim import Claimed
from engine.dispatch_record import RecordContext, record_outcomes
from engine.dispatch_send import RateLimiter, SendOutcome
from engine.dispatcher import claim_size, dispatch_until_idle
from engine.store import models as m
from engine.transports.base import SendResult
from tests.integration import dispatch_fixtures as fx
from tests.integration import outbox_builders as b
from tests.integration.conftest import SandboxHandle
from tests.integration.dispatch_fixtures import Outbox, phone

now, latency, sandbox = fx.now, fx.latency, fx.sandbox
transport, sf, defs, ob = fx.transport, fx.sf, fx.defs, fx.ob


def drain(ob: Outbox, **kwargs: object) -> fx.DispatchReport:
    return dispatch_until_idle(
        clock=lambda: ob.now, session_factory=ob.sf, keyring=ob.keyring, defs=ob.defs,
        transport=ob.transport, worker_id="w1", **kwargs,
    )  # fmt: skip


def audited_batches(ob: Outbox) -> list[dict]:
    with ob.sf() as session:
        stmt = select(m.AuditEntry.details).where(m.AuditEntry.action == "dispatch_batch")
        return list(session.scalars(stmt))


def test_batches_overlap_and_every_row_is_sent_once(ob: Outbox, sandbox: SandboxHandle) -> None:
    numbers = [phone(100 + n) for n in range(60)]
    row_ids = ob.rows(numbers)

    report = drain(ob, limit=7, concurrency=4)

    assert (report.claimed, report.sent, report.stranded) == (60, 60, 0)
    assert report.batches == 10  # nine of at most 7 rows, then one that finds nothing
    assert {r.status for r in b.outbox(ob.sf, row_ids)} == {st.SENT}
    assert sandbox.accepted_per_to() == dict.fromkeys(numbers, 1)
    audits = audited_batches(ob)
    assert len(audits) == 9 and sum(a["sent"] for a in audits) == 60


def test_max_batches_stops_claiming_but_records_what_was_sent(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    row_ids = ob.rows([phone(200 + n) for n in range(20)])

    report = drain(ob, limit=5, concurrency=2, max_batches=2)

    assert (report.batches, report.claimed, report.sent) == (2, 10, 10)
    statuses = [r.status for r in b.outbox(ob.sf, row_ids)]
    assert statuses.count(st.SENT) == 10 and statuses.count(st.QUEUED) == 10
    assert len(sandbox.messages()) == 10


def test_a_stop_during_the_run_releases_what_was_not_sent(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    row_ids = ob.rows([phone(300 + n) for n in range(30)])
    stop = threading.Event()
    sent_before_stop = []

    def clock():  # stops the run at its second claim
        sent_before_stop.append(len(sandbox.messages()))
        if len(sent_before_stop) == 2:
            stop.set()
        return ob.now

    report = dispatch_until_idle(
        clock=clock, session_factory=ob.sf, keyring=ob.keyring, defs=ob.defs,
        transport=ob.transport, worker_id="w1", limit=10, concurrency=2, stop=stop,
    )  # fmt: skip

    rows = b.outbox(ob.sf, row_ids)
    assert {r.status for r in rows} <= {st.SENT, st.QUEUED}
    assert report.sent + report.released == report.claimed
    assert report.sent == sum(r.status == st.SENT for r in rows) == len(sandbox.messages())
    assert all(r.claimed_by is None for r in rows if r.status == st.QUEUED)


def test_accepted_sends_are_recorded_only_on_rows_still_claimed_by_this_worker(
    ob: Outbox,
) -> None:
    mine, taken = ob.rows([phone(400), phone(401)])
    for row_id, worker in ((mine, "w1"), (taken, "reconciler")):
        ob.set(row_id, status=st.SENDING, claimed_by=worker, claimed_at=ob.now)
    outcomes = [
        SendOutcome(Claimed(row_id, 0, "+1", "text", 0, ob.now), result=SendResult(sid, "queued"))
        for row_id, sid in ((mine, "SM" + "1" * 32), (taken, "SM" + "2" * 32))
    ]
    ctx = RecordContext("w1", ob.now, ob.defs, ob.keyring)

    with ob.sf.begin() as session:
        counts = record_outcomes(session=session, outcomes=outcomes, ctx=ctx)

    assert counts == {"sent": 1, "claim_lost": 1}
    sent, untouched = b.outbox(ob.sf, [mine, taken])
    assert (sent.status, sent.provider_sid, sent.attempts) == (st.SENT, "SM" + "1" * 32, 1)
    assert sent.sent_at == ob.now and sent.provider_status == "queued"
    assert (untouched.status, untouched.claimed_by, untouched.provider_sid) == (
        st.SENDING,
        "reconciler",
        None,
    )


def test_under_a_rate_limit_a_claim_takes_what_the_rate_sends_in_the_claim_horizon(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    row_ids = ob.rows([phone(500 + n) for n in range(10)])

    # 4 messages/s over the 2 s horizon: 8 rows a claim, not the 100 asked for
    report = drain(ob, limit=100, concurrency=2, limiter=RateLimiter(4))

    assert (report.claimed, report.sent, report.batches) == (10, 10, 3)
    assert [a["claimed"] for a in audited_batches(ob)] == [8, 2]
    assert {r.status for r in b.outbox(ob.sf, row_ids)} == {st.SENT}
    assert sandbox.accepted_per_to() == {phone(500 + n): 1 for n in range(10)}
    assert claim_size(500, concurrency=16, rate=None) == 500
    assert claim_size(500, concurrency=16, rate=50) == 100
    assert claim_size(500, concurrency=16, rate=1) == 16
