"""The send gate: an opt-out acknowledged between a row's claim and its provider call wins,
on SQLite and PostgreSQL, through the real twilio SDK against the sandbox."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from engine import dispatcher
from engine import outbox_status as st
from engine.core.domain import ConsentEvent
from engine.dispatch_claim import Claimed
from engine.dispatch_gate import (
    REVOCATION_MARGIN,
    GateUnavailable,
    SendGate,
    start_sends,
    wait_for_sends,
)
from engine.dispatch_record import WITHHELD_REASON, RecordContext, record_outcomes
from engine.dispatch_send import Lanes, SendOutcome, send_batch_async, send_claimed
from engine.dispatcher import RateLimiter, reconcile_stale
from engine.inbound import InboundSms, handle_inbound
from engine.store import consent_queries
from engine.store import models as m
from engine.store.db import make_engine, make_session_factory
from engine.transports.base import is_async
from engine.transports.console import ConsoleTransport
from tests.integration import dispatch_fixtures as fx
from tests.integration.conftest import SandboxHandle
from tests.integration.dispatch_fixtures import Outbox, phone

now, latency, sandbox = fx.now, fx.latency, fx.sandbox
transport, sf, defs, ob = fx.transport, fx.sf, fx.defs, fx.ob


def _claim(ob: Outbox, row_id: int, *, worker: str = "w1", at: datetime | None = None) -> None:
    ob.set(row_id, status=st.SENDING, claimed_by=worker, claimed_at=at or ob.now)


def _start(ob: Outbox, row_ids: list[int], *, worker: str = "w1") -> set[int]:
    with ob.sf.begin() as session:
        return start_sends(
            session=session, worker_id=worker, claimed_at=ob.now, outbox_ids=row_ids, now=ob.now
        )


def _stop(ob: Outbox, number: str, sid: str) -> tuple[int, ...]:
    """The inbound STOP use case, committed, as the webhook runs it."""
    with ob.sf.begin() as session:
        message = InboundSms(sid, number, "+15005550006", "STOP")
        result = handle_inbound(
            session=session, keyring=ob.keyring, defs=ob.defs, message=message, now=ob.now
        )
    return result.opted_out


def _revoke(session: Session, ob: Outbox, patient_id: int, purpose: str) -> None:
    external = session.get(m.Patient, patient_id).external_id  # type: ignore[union-attr]
    event = ConsentEvent(external, purpose, "revoked", ob.now, method="admin")
    consent_queries.record_consent_events(
        session=session, keyring=ob.keyring, items=[(patient_id, event)]
    )


def test_stop_while_a_claimed_batch_waits_for_its_rate_slot_withholds_that_text(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    first, second = ob.rows([phone(1), phone(3)])
    results = []
    worker = threading.Thread(  # at 0.5/s the second row's slot comes 2 s after the first
        target=lambda: results.append(ob.dispatch(limiter=RateLimiter(0.5), concurrency=2))
    )
    worker.start()
    deadline = time.monotonic() + 5
    while ob.get(second).status != st.SENDING:  # claimed: decided before the STOP
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert _stop(ob, phone(3), "SM" + "3" * 32)  # acknowledged while it waits
    worker.join()

    [report] = results
    assert (report.claimed, report.sent, report.withheld) == (2, 1, 1)
    assert [m["to"] for m in sandbox.messages()] == [phone(1)]
    row = ob.get(second)
    assert (row.status, row.send_started_at, row.claimed_by) == (st.CANCELLED, None, "w1")
    assert row.reasons[-1]["rule"] == "opted-out"
    assert ob.get(first).send_started_at is not None


def test_a_suppression_the_stop_did_not_cancel_still_withholds_and_requeues(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    [row_id] = ob.rows([phone(10)])
    pid = ob.get(row_id).patient_id
    with ob.sf.begin() as session:  # as if the STOP committed after the claim read consent
        index = session.get(m.Patient, pid).phone_index  # type: ignore[union-attr]
        consent_queries.suppress_phone_index(session=session, phone_index=index, reason="t")
    _claim(ob, row_id)
    assert _start(ob, [row_id]) == set()
    ob.set(row_id, status=st.QUEUED, claimed_by=None, claimed_at=None)

    report = ob.dispatch()  # the claim itself sees the suppression
    assert (report.blocked, report.withheld) == (1, 0)
    assert sandbox.create_requests_per_to() == {}


def test_only_the_revoked_purpose_and_recent_revocations_hold_a_row_back(
    ob: Outbox,
) -> None:
    other, old, recent = ob.rows([phone(30), phone(31), phone(32)])
    other_pid, recent_pid = ob.get(other).patient_id, ob.get(recent).patient_id
    with ob.sf.begin() as session:
        _revoke(session, ob, other_pid, "appointment")
        _revoke(session, ob, recent_pid, "adherence")
    for row_id in (other, old, recent):
        _claim(ob, row_id)
    assert _start(ob, [other, old, recent]) == {other, old}
    later = ob.now + REVOCATION_MARGIN + timedelta(minutes=5)
    ob.set(recent, claimed_at=later)  # a claim well after the revocation: the claim decided
    with ob.sf.begin() as session:
        started = start_sends(
            session=session, worker_id="w1", claimed_at=later, outbox_ids=[recent], now=later
        )
    assert started == {recent}


def test_the_gate_admits_a_row_once_and_only_for_its_own_claim(ob: Outbox) -> None:
    mine, other_worker, other_claim = ob.rows([phone(40), phone(41), phone(42)])
    _claim(ob, mine)
    _claim(ob, other_worker, worker="w2")
    _claim(ob, other_claim, at=ob.now - timedelta(seconds=1))
    assert _start(ob, [mine, other_worker, other_claim]) == {mine}
    assert _start(ob, [mine]) == set()  # started already
    queued = ob.rows([phone(43)])
    assert _start(ob, queued) == set()  # not claimed


def test_program_replies_pass_the_gate_to_a_suppressed_number(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    [row_id] = ob.rows([phone(50)])
    assert _stop(ob, phone(50), "SM" + "5" * 32)
    assert ob.get(row_id).status == st.CANCELLED
    report = ob.dispatch()
    assert (report.sent, report.withheld) == (1, 0)
    [confirmation] = sandbox.messages(to=phone(50))
    assert confirmation["body"] == ob.defs.program.text("stop", "en")
    with ob.sf() as session:  # its marker survives the claim, which decides it afresh
        reply = session.scalars(select(m.Outbox).where(m.Outbox.campaign_id == "program")).one()
    assert reply.status == st.SENT and reply.reasons[-1]["rule"] == "program-reply"


def test_an_erased_patient_claimed_row_is_cancelled_and_never_passes(ob: Outbox) -> None:
    [row_id] = ob.rows([phone(60)])
    _claim(ob, row_id)
    ob.set(row_id, send_started_at=None)
    pid = ob.get(row_id).patient_id
    with ob.sf.begin() as session:
        session.execute(
            m.Patient.__table__.update().where(m.Patient.id == pid).values(erased_at=ob.now)
        )
    assert _start(ob, [row_id]) == set()


def test_the_opt_out_answer_waits_for_a_send_already_started(ob: Outbox) -> None:
    [row_id] = ob.rows([phone(70)])
    _claim(ob, row_id)
    assert _start(ob, [row_id]) == {row_id}
    pid = ob.get(row_id).patient_id
    assert _stop(ob, phone(70), "SM" + "7" * 32) == (pid,)
    assert ob.get(row_id).status == st.SENDING  # on its way: not withdrawable any more

    def settle() -> None:
        time.sleep(0.3)
        ob.set(row_id, status=st.SENT)

    threading.Thread(target=settle).start()
    started = time.perf_counter()
    assert wait_for_sends(session_factory=ob.sf, patient_ids=[pid]) == 0
    assert time.perf_counter() - started >= 0.25
    _claim(ob, row_id)  # a worker that died mid-send: the wait gives up, and says so
    assert wait_for_sends(session_factory=ob.sf, patient_ids=[pid], timeout=0.2) == 1


def test_a_stale_claim_that_never_started_is_requeued_without_asking(ob: Outbox) -> None:
    never, started = ob.rows([phone(80), phone(81)])
    _claim(ob, never, worker="dead")
    _claim(ob, started, worker="dead")
    ob.set(started, send_started_at=ob.now)
    report = reconcile_stale(
        session_factory=ob.sf,
        keyring=ob.keyring,
        transport=ConsoleTransport(),  # cannot list sent messages
        now=ob.now + timedelta(minutes=3),
    )
    assert (report.requeued, report.unknown) == (1, 1)
    assert ob.get(never).status == st.QUEUED
    assert "never handed to the provider" in (ob.get(never).last_error or "")
    assert ob.get(started).status == st.UNKNOWN


def test_withheld_outcome_requeues_with_a_reason(ob: Outbox) -> None:
    held, cancelled = ob.rows([phone(90), phone(91)])
    _claim(ob, held)
    ob.set(cancelled, status=st.CANCELLED)
    outcomes = [
        SendOutcome(Claimed(row_id, 0, "+1", "text", 0, ob.now), withheld=True)
        for row_id in (held, cancelled)
    ]
    with ob.sf.begin() as session:
        ctx = RecordContext("w1", ob.now, ob.defs, ob.keyring)
        counts = record_outcomes(session=session, outcomes=outcomes, ctx=ctx)
    assert counts == {"withheld": 2}
    row = ob.get(held)
    assert (row.status, row.claimed_by, row.send_at) == (
        st.QUEUED,
        None,
        ob.now + REVOCATION_MARGIN,
    )
    assert row.reasons[-1] == WITHHELD_REASON
    assert ob.get(cancelled).status == st.CANCELLED
    with ob.sf() as session:
        assert session.scalar(select(m.Outbox.status).where(m.Outbox.id == held)) == st.QUEUED


def test_a_gate_that_cannot_write_its_mark_releases_rows_and_sends_nothing(
    tmp_path: Path, sandbox: SandboxHandle, transport: Any
) -> None:
    broken = make_engine(f"sqlite:///{tmp_path / 'missing' / 'engage.db'}", sqlite_immediate=True)
    gate = SendGate(make_session_factory(broken), "w1", lambda: datetime.now(UTC))
    claimed = Claimed(1, 1, phone(99), "text", 0, datetime.now(UTC))
    try:
        with pytest.raises(GateUnavailable):
            gate.admit(claimed)
        if is_async(transport):
            outcome = _send_async(claimed, transport, gate)
        else:
            stop = threading.Event()
            limiter = RateLimiter(None)
            outcome = send_claimed(claimed, transport=transport, limiter=limiter, stop=stop,
                                   gate=gate)  # fmt: skip
    finally:
        gate.close()
        broken.dispose()
    assert outcome.released and not outcome.withheld
    assert sandbox.create_requests_per_to() == {}


def _send_async(claimed: Claimed, transport: Any, gate: SendGate) -> SendOutcome:
    future: Future[SendOutcome] = Future()
    batch = send_batch_async([claimed], [future], transport=transport, limiter=RateLimiter(None),
                             stop=threading.Event(), lanes=Lanes(4), gate=gate)  # fmt: skip
    transport.submit(batch).result(timeout=10)
    return future.result(timeout=10)


def test_under_a_rate_limit_rows_pass_the_gate_a_horizon_at_a_time(
    ob: Outbox, sandbox: SandboxHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 40 messages/s the slots of 16 rows span 0.4 s: the rows whose slots come within
    the gate's 0.2 s horizon are marked together, a few statements, not one per row."""
    gates: list[SendGate] = []

    class CountedGate(SendGate):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            gates.append(self)

    monkeypatch.setattr(dispatcher, "SendGate", CountedGate)
    row_ids = ob.rows([phone(800 + n) for n in range(16)])

    report = ob.dispatch(limiter=RateLimiter(40), concurrency=16)

    assert report.sent == 16 and len(sandbox.messages()) == 16
    started = [ob.get(row_id).send_started_at for row_id in row_ids]
    assert all(started)
    [gate] = gates
    if is_async(ob.transport):  # a thread pool's senders each ask for their own row
        assert gate.statements <= 4


def test_a_sender_whose_loop_closed_does_not_end_the_gate_for_the_others(
    ob: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async sender gives up (its loop closes) while its group is being marked: the
    answer cannot reach it, and the gate still answers every later sender, thread or
    coroutine, instead of leaving them waiting forever."""
    import asyncio

    from engine import dispatch_gate

    first, second = ob.rows([phone(60), phone(61)])
    _claim(ob, first)
    _claim(ob, second)
    marking, release = threading.Event(), threading.Event()
    real_start_sends = dispatch_gate.start_sends

    def held_start_sends(**kwargs: Any) -> set[int]:
        if not release.is_set():
            marking.set()
            release.wait(10)
        return real_start_sends(**kwargs)

    monkeypatch.setattr(dispatch_gate, "start_sends", held_start_sends)
    gate = SendGate(ob.sf, "w1", lambda: ob.now)
    row = ob.get(first)
    claimed = Claimed(first, row.patient_id, phone(60), "text", 0, ob.now)

    async def give_up() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(gate.admit_group_async([claimed]), timeout=0.2)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(give_up())
    loop.close()
    assert marking.wait(5)
    release.set()

    later = Claimed(second, ob.get(second).patient_id, phone(61), "text", 0, ob.now)
    answers: list[bool] = []
    asker = threading.Thread(target=lambda: answers.append(gate.admit(later)), daemon=True)
    asker.start()
    asker.join(10)
    gate.close()
    assert answers == [True]
    assert ob.get(second).send_started_at is not None
    assert ob.get(first).send_started_at is not None  # marked: its sender is gone, not sent
