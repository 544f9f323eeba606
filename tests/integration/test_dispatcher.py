"""The dispatcher against the sandbox, through the real twilio SDK, on SQLite and PostgreSQL.

Time is passed in: `now` is the wall clock at the start of the test (the sandbox stamps
messages with real time, which reconciliation compares with claim times), patients live
where it is about noon, and later moments are `now + ...`. Nothing sleeps.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from engine import outbox_status as st
from engine.dispatcher import RateLimiter, reconcile_stale
from engine.settings import Settings
from engine.store import consent_queries, outbox_queries
from engine.store.defqueries import record_review
from engine.transports.base import OutboundMessage
from engine.transports.console import ConsoleTransport
from engine.transports.twilio import TwilioTransport
from tests.integration import dispatch_fixtures as fx
from tests.integration import outbox_builders as b
from tests.integration.conftest import SandboxHandle
from tests.integration.dispatch_fixtures import Outbox, phone

# Fixtures shared with test_workers.py, bound here so that pytest finds them.
now, latency, sandbox = fx.now, fx.latency, fx.sandbox
transport, sf, defs, ob = fx.transport, fx.sf, fx.defs, fx.ob

OPTED_OUT_NUMBER = "+15005550004"  # the sandbox answers 21610, as Twilio's test numbers do
INVALID_NUMBER = "+15005550001"  # 21211


# --- sending -------------------------------------------------------------------------------


def test_allowed_row_is_sent_with_the_sandbox_sid(ob: Outbox, sandbox: SandboxHandle) -> None:
    [row_id] = ob.rows([phone(1)])
    report = ob.dispatch()
    assert (report.claimed, report.sent) == (1, 1)
    row = ob.get(row_id)
    [message] = sandbox.messages()
    assert row.status == st.SENT and row.provider_sid == message["sid"]
    assert (message["to"], message["body"]) == (phone(1), b.body_text(0))
    assert row.sent_at == ob.now and row.attempts == 1 and row.claimed_by == "w1"
    assert ob.dispatch(ob.now + timedelta(hours=1)).examined == 0


def test_consent_revoked_after_planning_blocks_at_dispatch(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    [row_id] = ob.rows([phone(2)])
    with ob.sf.begin() as session:
        b.revoke(session, ob.keyring, "T0-00000", ob.now - timedelta(seconds=10))
    report = ob.dispatch()
    row = ob.get(row_id)
    assert (report.blocked, report.claimed) == (1, 0)
    assert row.status == st.BLOCKED and row.outcome == "deny"
    assert [r["rule"] for r in row.reasons] == ["consent-required"]
    assert sandbox.create_requests_per_to() == {}


def test_carrier_opt_out_fails_revokes_consent_and_suppresses(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    first, second = ob.rows([OPTED_OUT_NUMBER], per_patient=2)
    report = ob.dispatch(limit=1)
    assert report.opted_out == 1
    row = ob.get(first)
    assert (row.status, row.error_code) == (st.FAILED, 21610)
    assert OPTED_OUT_NUMBER not in (row.last_error or "")
    with ob.sf() as session:
        pid = row.patient_id
        states = consent_queries.consent_states_for_many(
            session=session, patient_ids=[pid], purposes=list(ob.defs.purposes)
        )[pid]
        assert consent_queries.suppressed_patients(session=session, patient_ids=[pid]) == {pid}
    assert all(not s.active and s.method == "carrier_opt_out" for s in states.values())
    ob.dispatch()
    blocked = ob.get(second)
    assert blocked.status == st.BLOCKED
    assert {r["rule"] for r in blocked.reasons} >= {"suppressed"}
    assert sandbox.create_requests_per_to() == {OPTED_OUT_NUMBER: 1}


@pytest.mark.parametrize(
    ("faults", "number", "code"),
    [({}, INVALID_NUMBER, 21211), ({"error_codes": {30007: 1.0}}, phone(3), 30007)],
    ids=["invalid-21211", "filtered-30007"],
)
def test_final_provider_errors_fail_without_retry(
    ob: Outbox, sandbox: SandboxHandle, faults: dict[str, Any], number: str, code: int
) -> None:
    sandbox.set_faults(faults)
    [row_id] = ob.rows([number])
    assert ob.dispatch().failed == 1
    row = ob.get(row_id)
    assert (row.status, row.error_code, row.attempts) == (st.FAILED, code, 1)
    assert ob.dispatch(ob.now + timedelta(hours=1)).examined == 0
    assert sandbox.accepted_per_to() == {}


@pytest.mark.parametrize(
    "faults",
    [
        {"http_500_rate": 1.0},
        {"http_429_rate": 1.0},
        {"timeout_rate": 1.0},
        {"garbage_rate": 1.0},
        {"drop_after_accept_rate": 1.0},
    ],
    ids=["500", "429", "timeout", "garbage", "drop-after-accept"],
)
def test_transient_errors_retry_with_backoff_then_send_once(
    ob: Outbox, sandbox: SandboxHandle, faults: dict[str, Any]
) -> None:
    [row_id] = ob.rows([phone(4)])
    sandbox.set_faults(faults)
    assert ob.dispatch(rng=random.Random(7)).retried == 1
    row = ob.get(row_id)
    assert (row.status, row.attempts, row.claimed_by) == (st.QUEUED, 1, None)
    assert ob.now < row.send_at <= ob.now + timedelta(seconds=2)  # full jitter under 2 s * 2**0
    assert phone(4) not in (row.last_error or "")
    assert ob.dispatch().examined == 0  # not due before its backoff
    sandbox.set_faults({})
    assert ob.dispatch(row.send_at).claimed == 1
    row = ob.get(row_id)
    [message] = sandbox.messages()  # drop-after-accept: the first try is found, not resent
    assert (row.status, row.provider_sid) == (st.SENT, message["sid"])


def test_transient_errors_give_up_after_max_attempts(ob: Outbox, sandbox: SandboxHandle) -> None:
    [row_id] = ob.rows([phone(5)])
    sandbox.set_faults({"http_503_rate": 1.0})
    at, delays = ob.now, []
    for _ in range(6):
        ob.dispatch(at, rng=random.Random(3))
        row = ob.get(row_id)
        if row.status != st.QUEUED:
            break
        delays.append(row.send_at - at)
        at = row.send_at
    assert (row.status, row.attempts, row.error_code) == (st.FAILED, 6, 20503)
    assert "gave up after 6 attempts" in (row.last_error or "")
    ceilings = [timedelta(seconds=2 * 2**n) for n in range(5)]
    assert all(timedelta(0) <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert sandbox.messages() == []


def test_giving_up_after_attempts_without_an_answer_is_unknown_not_failed(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    """A last attempt that got no answer may have gone out: the row says so and waits for
    a person (engage status lists it), instead of claiming the text failed."""
    [row_id] = ob.rows([phone(6)])
    sandbox.set_faults({"garbage_rate": 1.0})  # 200 with a body that is not Twilio's
    at = ob.now
    for _ in range(6):
        ob.dispatch(at, rng=random.Random(3))
        row = ob.get(row_id)
        if row.status != st.QUEUED:
            break
        at = row.send_at
    assert (row.status, row.attempts) == (st.UNKNOWN, 6)
    assert "the last got no answer, so the text may have gone out" in (row.last_error or "")


# --- re-checks, pause, caps ------------------------------------------------------------------


def test_quiet_hours_at_dispatch_defer_to_the_window(ob: Outbox, sandbox: SandboxHandle) -> None:
    [row_id] = ob.rows([phone(6)], expires_at=ob.now + timedelta(days=2))
    night = ob.now + timedelta(hours=11)  # 23:00 where the patient lives
    assert ob.dispatch(night).deferred == 1
    row = ob.get(row_id)
    assert row.status == st.DEFERRED and row.reasons[0]["rule"] == "tcpa-quiet-hours"
    local = night.astimezone(ZoneInfo(ob.zone))
    assert local.hour == 23
    assert row.send_at == (local + timedelta(days=1)).replace(hour=8, minute=0, second=0)
    assert sandbox.create_requests_per_to() == {}


def test_expired_and_unapproved_rows_are_not_sent(ob: Outbox, sandbox: SandboxHandle) -> None:
    late, unapproved = ob.rows([phone(7), phone(8)], expires_at=ob.now + timedelta(hours=1))
    with ob.sf.begin() as session:
        t = ob.defs.templates[b.TEMPLATE]
        record_review(
            session=session,
            template_id=t.id,
            locale=t.locale,
            version=t.version,
            decision="reject",
            by="carol",
            now=ob.now,
        )
    planned = [{"rule": "tcpa-quiet-hours", "policy": "tcpa", "effect": "defer",
                "message": "deferred at planning", "cite": None}]  # fmt: skip
    ob.set(late, expires_at=ob.now - timedelta(seconds=1), reasons=planned)
    report = ob.dispatch()
    assert (report.expired, report.blocked) == (1, 1)
    expired = ob.get(late)
    assert expired.status == st.EXPIRED and expired.decided_at == ob.now
    assert expired.reasons[:-1] == planned and expired.reasons[-1]["rule"] == "expired"
    assert ob.get(unapproved).reasons[-1]["rule"] == "template-approval"
    assert sandbox.create_requests_per_to() == {}


def test_pause_stops_dispatch_at_once_and_resume_sends(ob: Outbox, sandbox: SandboxHandle) -> None:
    row_ids = ob.rows([phone(9), phone(10)])
    with ob.sf.begin() as session:
        outbox_queries.set_paused(
            session=session, campaign_id=b.CAMPAIGN, paused=True, by="op", now=ob.now
        )
    assert ob.dispatch().examined == 0
    assert {ob.get(i).status for i in row_ids} == {st.QUEUED}  # waiting, not cancelled
    with ob.sf.begin() as session:
        outbox_queries.set_paused(
            session=session, campaign_id=b.CAMPAIGN, paused=False, by="op", now=ob.now
        )
    assert ob.dispatch().sent == 2
    assert len(sandbox.messages()) == 2


def test_frequency_cap_holds_within_one_batch(ob: Outbox, sandbox: SandboxHandle) -> None:
    """Express consent: FCC healthcare exemption, one text a day (hc-daily-cap, defer)."""
    row_ids = ob.rows(
        [phone(11)], per_patient=3, legal_basis="express", expires_at=ob.now + timedelta(days=3)
    )
    report = ob.dispatch()
    assert (report.sent, report.deferred) == (1, 2)
    deferred = [r for r in b.outbox(ob.sf, row_ids) if r.status == st.DEFERRED]
    assert {r.reasons[0]["rule"] for r in deferred} == {"hc-daily-cap"}
    assert {r.send_at for r in deferred} == {ob.now + timedelta(days=1)}
    assert sandbox.accepted_per_to() == {phone(11): 1}


def test_rows_released_when_the_worker_stops_before_sending(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    row_ids = ob.rows([phone(12), phone(13)])
    stop = threading.Event()
    stop.set()
    report = ob.dispatch(stop=stop)
    assert (report.claimed, report.released) == (2, 2)
    rows = b.outbox(ob.sf, row_ids)
    assert {(r.status, r.claimed_by, r.attempts) for r in rows} == {(st.QUEUED, None, 0)}
    assert sandbox.create_requests_per_to() == {}
    assert ob.dispatch().sent == 2


# --- rate limit ------------------------------------------------------------------------------


def test_rate_limiter_spaces_acquisitions_on_an_injected_clock() -> None:
    clock = [100.0]
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(round(seconds, 6))
        return False

    limiter = RateLimiter(10, clock=lambda: clock[0], wait=wait)
    assert all(limiter.acquire() for _ in range(4))
    assert waits == [0.1, 0.2, 0.3]
    clock[0] += 5  # idle for a while: no burst credit is saved up beyond one slot
    waits.clear()
    assert limiter.acquire() and limiter.acquire() and waits == [0.1]
    stopping = RateLimiter(1, clock=lambda: clock[0], wait=lambda s: True)
    assert stopping.acquire() and not stopping.acquire()


def test_dispatch_respects_the_rate_limit(ob: Outbox, sandbox: SandboxHandle) -> None:
    ob.rows([phone(20 + n) for n in range(12)])
    started = time.perf_counter()
    report = ob.dispatch(limiter=RateLimiter(40), concurrency=8)
    elapsed = time.perf_counter() - started
    assert report.sent == 12
    assert elapsed >= 11 / 40 * 0.9  # 12 sends at 40/s span at least 11 intervals
    assert len(sandbox.messages()) == 12


# --- crash recovery --------------------------------------------------------------------------


def test_stale_sending_row_the_sandbox_holds_is_reconciled_as_sent(
    ob: Outbox, sandbox: SandboxHandle, transport: TwilioTransport
) -> None:
    [row_id] = ob.rows([phone(30)])
    # A worker claimed it, the sandbox accepted it, then the worker died before recording.
    result = transport.send(OutboundMessage(phone(30), b.body_text(0), str(row_id)))
    ob.set(row_id, status=st.SENDING, claimed_by="dead", claimed_at=ob.now, send_started_at=ob.now)
    fresh = reconcile_stale(
        session_factory=ob.sf,
        keyring=ob.keyring,
        transport=transport,
        now=ob.now + timedelta(seconds=60),
    )
    assert fresh.examined == 0  # younger than stale_after: its worker may still be sending
    report = reconcile_stale(
        session_factory=ob.sf,
        keyring=ob.keyring,
        transport=transport,
        now=ob.now + timedelta(minutes=3),
    )
    assert (report.examined, report.sent) == (1, 1)
    row = ob.get(row_id)
    assert (row.status, row.provider_sid) == (st.SENT, result.provider_sid)
    assert ob.dispatch(ob.now + timedelta(minutes=3)).examined == 0
    assert sandbox.create_requests_per_to() == {phone(30): 1}


def test_stale_sending_row_the_sandbox_lacks_is_requeued_and_sent_once(
    ob: Outbox, sandbox: SandboxHandle, transport: TwilioTransport
) -> None:
    [row_id] = ob.rows([phone(31)])
    ob.set(row_id, status=st.SENDING, claimed_by="dead", claimed_at=ob.now, send_started_at=ob.now)
    later = ob.now + timedelta(minutes=3)
    report = reconcile_stale(
        session_factory=ob.sf, keyring=ob.keyring, transport=transport, now=later
    )
    assert report.requeued == 1
    assert (ob.get(row_id).status, ob.get(row_id).send_at) == (st.QUEUED, later)
    assert ob.dispatch(later).sent == 1
    assert sandbox.accepted_per_to() == {phone(31): 1}


def test_stale_sending_row_on_a_transport_that_cannot_tell_becomes_unknown(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    [row_id] = ob.rows([phone(32)])
    ob.set(row_id, status=st.SENDING, claimed_by="dead", claimed_at=ob.now, send_started_at=ob.now)
    report = reconcile_stale(
        session_factory=ob.sf,
        keyring=ob.keyring,
        transport=ConsoleTransport(),
        now=ob.now + timedelta(minutes=3),
    )
    assert report.unknown == 1
    row = ob.get(row_id)
    assert row.status == st.UNKNOWN and "cannot list sent messages" in (row.last_error or "")
    assert ob.dispatch(ob.now + timedelta(minutes=5)).examined == 0  # never resent
    with ob.sf() as session:  # what `engage status` shows
        [unknown] = outbox_queries.outbox_status(session=session).unknown
    assert unknown.id == row_id and "not resent" in (unknown.last_error or "")
    assert sandbox.create_requests_per_to() == {}


# --- command line ----------------------------------------------------------------------------


def test_engage_dispatch_once(
    ob: Outbox,
    sandbox: SandboxHandle,
    settings: Settings,
    db_url: str,
) -> None:
    from engine.cli import main

    ob.rows([phone(40), phone(41), INVALID_NUMBER])
    env = {
        "DATABASE_URL": db_url,
        "ENGAGE_VAR_DIR": str(settings.var_dir),
        "ENGAGE_TRANSPORT": "sandbox",
        "TWILIO_API_BASE_URL": sandbox.url,
        "ENGAGE_STATUS_CALLBACK_URL": "",
        "ENGAGE_SEND_RATE": "0",
        "ENGAGE_WORKER_NICE": "0",  # in-process: would lower the test run's priority
    }
    at = (ob.now + timedelta(seconds=5)).isoformat()
    result = CliRunner().invoke(main, ["dispatch", "--once", "--at", at], env=env)
    assert result.exit_code == 0, result.output
    summary = result.stdout.strip().splitlines()[-1]
    assert '"sent": 2' in summary and '"failed": 1' in summary
    assert len(sandbox.messages()) == 2
