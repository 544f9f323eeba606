"""Rows whose attempt got no answer (the provider may have accepted it): until the provider
has been asked they count as sent, no opt-out or expiry closes them, and every lookup
reaches back to the first such attempt. SQLite and PostgreSQL, both twilio clients, the
sandbox over HTTP."""

from __future__ import annotations

from datetime import timedelta

from engine import outbox_status as st
from engine.inbound import InboundSms, handle_inbound
from tests.integration import dispatch_fixtures as fx
from tests.integration.conftest import SandboxHandle
from tests.integration.dispatch_fixtures import Outbox, phone

now, latency, sandbox = fx.now, fx.latency, fx.sandbox
transport, sf, defs, ob = fx.transport, fx.sf, fx.defs, fx.ob


def _unanswered(ob: Outbox, sandbox: SandboxHandle, number: str, fault: str) -> int:
    """One row whose first attempt ends without a clear answer (`fault` at rate 1)."""
    [row_id] = ob.rows([number])
    sandbox.set_faults({fault: 1.0})
    assert ob.dispatch().retried == 1
    sandbox.set_faults({})
    row = ob.get(row_id)
    assert (row.status, row.unsettled_since) == (st.QUEUED, ob.now)
    return row_id


def _stop(ob: Outbox, number: str) -> None:
    with ob.sf.begin() as session:
        message = InboundSms("SMstop" + number[-4:], number, "+15005550006", "STOP")
        handle_inbound(
            session=session, keyring=ob.keyring, defs=ob.defs, message=message, now=ob.now
        )


def _texts(sandbox: SandboxHandle, body: str) -> int:
    return sum(1 for message in sandbox.messages() if message["body"] == body)


def test_a_stop_does_not_close_a_row_whose_text_went_out_it_is_recorded_sent(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    row_id = _unanswered(ob, sandbox, phone(21), "drop_after_accept_rate")
    body = sandbox.messages()[0]["body"]
    _stop(ob, phone(21))
    assert ob.get(row_id).status == st.QUEUED  # not cancelled: it may have gone out
    report = ob.dispatch(ob.get(row_id).send_at)
    row = ob.get(row_id)
    assert (row.status, row.unsettled_since) == (st.SENT, None)
    assert row.provider_sid == sandbox.messages()[0]["sid"]
    assert report.settled == 0 and _texts(sandbox, body) == 1  # found, not sent again


def test_a_stop_after_an_attempt_that_did_not_go_out_blocks_the_row(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    row_id = _unanswered(ob, sandbox, phone(22), "http_503_rate")
    _stop(ob, phone(22))
    at = ob.get(row_id).send_at
    assert ob.dispatch(at).settled == 1  # looked up: the provider holds nothing
    row = ob.get(row_id)
    assert (row.status, row.unsettled_since, row.claimed_at) == (st.QUEUED, None, None)
    ob.dispatch(at)
    row = ob.get(row_id)
    assert row.status == st.BLOCKED and row.reasons[0]["rule"] == "suppressed"
    assert len([m for m in sandbox.messages() if m["to"] == phone(22)]) == 1  # the confirmation


def test_a_row_that_expired_after_its_text_went_out_is_recorded_sent(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    row_id = _unanswered(ob, sandbox, phone(23), "drop_after_accept_rate")
    after_expiry = ob.get(row_id).expires_at + timedelta(minutes=1)
    ob.dispatch(after_expiry)
    row = ob.get(row_id)
    assert (row.status, row.provider_sid) == (st.SENT, sandbox.messages()[0]["sid"])
    assert len(sandbox.messages()) == 1


def test_the_lookup_reaches_back_to_the_first_unanswered_attempt(
    ob: Outbox, sandbox: SandboxHandle
) -> None:
    """The second attempt's lookup fails (the provider answers nothing at all); the third,
    twenty minutes after the first, still finds the first and sends nothing."""
    row_id = _unanswered(ob, sandbox, phone(24), "drop_after_accept_rate")
    second = ob.now + timedelta(minutes=10)
    ob.set(row_id, send_at=second)
    sandbox.set_faults({"http_503_rate": 1.0, "scope": "all"})
    assert ob.dispatch(second).retried == 1
    sandbox.set_faults({})
    row = ob.get(row_id)
    assert (row.status, row.attempts, row.unsettled_since) == (st.QUEUED, 2, ob.now)
    third = ob.now + timedelta(minutes=20)
    ob.set(row_id, send_at=third)
    ob.dispatch(third)
    row = ob.get(row_id)
    assert (row.status, row.provider_sid) == (st.SENT, sandbox.messages()[0]["sid"])
    assert len(sandbox.messages()) == 1


def test_a_retry_that_gets_an_answer_settles_the_row(ob: Outbox, sandbox: SandboxHandle) -> None:
    row_id = _unanswered(ob, sandbox, phone(25), "http_503_rate")
    ob.dispatch(ob.get(row_id).send_at)
    row = ob.get(row_id)
    assert (row.status, row.unsettled_since) == (st.SENT, None)
    assert len(sandbox.messages()) == 1
