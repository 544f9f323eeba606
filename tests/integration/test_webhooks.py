"""Twilio webhooks through Flask's test client, with real Twilio signatures, on SQLite and
PostgreSQL: STOP/START/HELP from patients and strangers, and delivery reports."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from twilio.request_validator import RequestValidator

from engine import outbox_status as status
from engine.crypto import Keyring
from engine.settings import Settings
from engine.store import consent_queries
from engine.store import models as m
from engine.store.defqueries import active_definitions
from engine.web import create_app
from tests.conftest import add_figures
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT, SAMPLE

TOKEN = "test-auth-token-0123456789abcdef"
BASE = "http://localhost"
ADA = "+12125550101"  # S001: consented to adherence and appointment
NOW = datetime.fromisoformat(AT) - timedelta(minutes=5)
EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


class Twilio:
    """Posts to the app as Twilio does: form-encoded and signed over the full URL."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client
        self.validator = RequestValidator(TOKEN)
        self.timings: list[float] = []

    def post(self, path: str, form: dict[str, str], *, signature: str | None = None) -> Any:
        sig = self.validator.compute_signature(BASE + path, form)
        started = time.perf_counter()
        response = self.client.post(
            path, data=form, headers={"X-Twilio-Signature": sig if signature is None else signature}
        )
        self.timings.append(time.perf_counter() - started)
        return response

    def text(self, body: str, *, sid: str, from_: str = ADA, **extra: str) -> Any:
        form = {"MessageSid": sid, "AccountSid": "ACtest", "From": from_, "To": "+15005550006"}
        return self.post("/twilio/inbound", {**form, "Body": body, **extra})


@pytest.fixture
def run(engage: Engage, sandbox) -> Engage:  # type: ignore[no-untyped-def]
    engage.env.update(
        {
            "ENGAGE_TRANSPORT": "sandbox",
            "TWILIO_API_BASE_URL": sandbox.url,
            "ENGAGE_STATUS_CALLBACK_URL": "",
            "ENGAGE_SEND_RATE": "0",
        }
    )
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    engage("approve", "statin-refill", "--by", "carol")
    engage("plan", "--at", AT)
    return engage


@pytest.fixture
def twilio(run: Engage, settings: Settings) -> Iterator[Twilio]:
    app = create_app(settings.with_(twilio_auth_token=TOKEN), clock=lambda: NOW)
    with app.test_client() as client:
        yield Twilio(client)


def _rows(session: Session, external_id: str) -> list[m.Outbox]:
    patient = select(m.Patient.id).where(m.Patient.external_id == external_id)
    stmt = select(m.Outbox).where(m.Outbox.patient_id.in_(patient)).order_by(m.Outbox.id)
    return list(session.scalars(stmt))


def _counts(session: Session) -> tuple[int, ...]:
    tables = (m.ConsentEvent, m.Suppression, m.InboundMessage, m.Outbox)
    return tuple(session.scalar(select(func.count()).select_from(t)) or 0 for t in tables)


def _statuses(session: Session) -> list[tuple[int, str]]:
    return list(session.execute(select(m.Outbox.id, m.Outbox.status).order_by(m.Outbox.id)))


def test_healthz(twilio: Twilio) -> None:
    response = twilio.client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


@pytest.mark.parametrize("signature", ["", "bm90IGEgc2lnbmF0dXJl", "wrong"])
def test_a_bad_signature_is_refused_and_changes_nothing(
    twilio: Twilio, session_factory: sessionmaker[Session], signature: str
) -> None:
    with session_factory() as s:
        before, rows = _counts(s), _statuses(s)
    form = {"MessageSid": "SMbad", "From": ADA, "To": "+15005550006", "Body": "STOP"}
    assert twilio.post("/twilio/inbound", form, signature=signature).status_code == 403
    tampered = twilio.validator.compute_signature(BASE + "/twilio/inbound", {**form, "Body": "hi"})
    assert twilio.post("/twilio/inbound", form, signature=tampered).status_code == 403
    status_form = {"MessageSid": "SMx", "MessageStatus": "delivered"}
    assert twilio.post("/twilio/status", status_form, signature=signature).status_code == 403
    with session_factory() as s:
        assert (_counts(s), _statuses(s)) == (before, rows)


def test_stop_revokes_suppresses_cancels_and_confirms_once(  # type: ignore[no-untyped-def]
    twilio: Twilio, run: Engage, sandbox, session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    with session_factory() as s:
        pending = [r.id for r in _rows(s, "S001") if r.status in status.WAITING]
    assert pending, "the sample plans a message for S001"
    response = twilio.text("Stop.", sid="SM" + "1" * 32)
    assert response.status_code == 200 and response.data == EMPTY
    assert response.content_type.startswith("text/xml")
    assert twilio.text("Stop.", sid="SM" + "1" * 32).data == EMPTY  # Twilio's retry
    twilio.text("please stop texting me", sid="SM" + "2" * 32)  # already opted out: no reply
    with session_factory() as s:
        defs = active_definitions(session=s)
        assert defs is not None
        rows = _rows(s, "S001")
        assert {r.status for r in rows if r.id in pending} == {status.CANCELLED}
        replies = [r for r in rows if r.campaign_id == "program"]
        assert [(r.status, r.purpose) for r in replies] == [(status.QUEUED, "program")]
        events = consent_queries.consent_events_for(session=s, keyring=keyring, patient_id="S001")
        first = [e for e in events if e.evidence == "inbound SM" + "1" * 32]
        assert {e.purpose for e in first} == set(defs.purposes)
        assert {(e.status, e.method) for e in first} == {("revoked", "sms_keyword")}
        assert consent_queries.is_suppressed(session=s, keyring=keyring, e164=ADA)
        inbound = s.scalars(select(m.InboundMessage).order_by(m.InboundMessage.id)).all()
        assert [i.classification for i in inbound] == ["opt_out", "opt_out"]
        assert all(i.body_enc and b"stop" not in i.body_enc.lower() for i in inbound)
        stop_text = defs.program.text("stop", "en")
    run("dispatch", "--once", "--at", AT)
    run("dispatch", "--once", "--at", AT)
    assert [msg["body"] for msg in sandbox.messages(to=ADA)] == [stop_text]
    run("plan", "--at", AT)
    run("dispatch", "--once", "--at", AT)
    assert len(sandbox.messages(to=ADA)) == 1  # nothing else until an opt-in


def test_start_regrants_what_stop_revoked_and_confirms(
    twilio: Twilio, session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    twilio.text("STOP", sid="SMstop")
    assert twilio.text("Start", sid="SMstart").data == EMPTY
    with session_factory() as s:
        states = consent_queries.current_consents_for(
            session=s, keyring=keyring, patient_external_id="S001",
            purposes=["adherence", "appointment"],
        )  # fmt: skip
        assert {p: (c.active, c.legal_basis) for p, c in states.items()} == {
            "adherence": (True, "express"),
            "appointment": (True, "express"),
        }
        assert not consent_queries.is_suppressed(session=s, keyring=keyring, e164=ADA)
        replies = [r.idempotency_key for r in _rows(s, "S001") if r.campaign_id == "program"]
        assert replies == ["program/SMstop/stop", "program/SMstart/start"]


def test_help_queues_the_help_text_and_changes_no_consent(
    twilio: Twilio, run: Engage, sandbox, session_factory: sessionmaker[Session]
) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as s:
        consents = _counts(s)[0]
    twilio.text("help?", sid="SMhelp")
    with session_factory() as s:
        defs = active_definitions(session=s)
        assert defs is not None and _counts(s)[0] == consents
    run("dispatch", "--once", "--at", AT)
    bodies = [msg["body"] for msg in sandbox.messages(to=ADA)]
    assert defs.program.text("help", "en") in bodies


def test_an_unknown_number_is_suppressed_and_confirmed_inline(
    twilio: Twilio, session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    stranger = "+13125550199"
    response = twilio.text("ALTO", sid="SMunknown", from_=stranger)
    assert response.status_code == 200 and b"<Message>" in response.data
    assert twilio.text("ALTO", sid="SMunknown", from_=stranger).data == EMPTY
    with session_factory() as s:
        assert consent_queries.is_suppressed(session=s, keyring=keyring, e164=stranger)
        stored = s.scalars(select(m.InboundMessage)).one()
        assert (stored.patient_id, stored.body_enc, stored.classification) == (
            None, None, "opt_out",
        )  # fmt: skip


def test_delivery_reports_only_move_forward(
    twilio: Twilio, run: Engage, session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    run("dispatch", "--once", "--at", AT)
    with session_factory() as s:
        sent = s.scalars(select(m.Outbox).where(m.Outbox.status == status.SENT)).all()
        first, second = sent[0], sent[1]
        sids = (first.provider_sid, second.provider_sid)
    assert all(sids)

    def report(sid: str, state: str, path: str = "/twilio/status", **extra: str) -> None:
        form = {"MessageSid": sid, "AccountSid": "ACtest", "MessageStatus": state, **extra}
        assert twilio.post(path, form).data == EMPTY

    report(sids[0], "delivered")
    report(sids[0], "sent")  # late
    report(sids[0], "delivered")  # duplicate
    report("SMnot-this-row", "failed", f"/twilio/status?ref={first.id}")  # another row's sid
    report(sids[1], "undelivered", ErrorCode="21610")
    report(sids[1], "delivered")  # after a final status
    with session_factory() as s:
        one, two = s.get(m.Outbox, first.id), s.get(m.Outbox, second.id)
        assert one is not None and two is not None
        assert (one.status, two.status, two.error_code) == (
            status.DELIVERED, status.UNDELIVERED, 21610,
        )  # fmt: skip
        patient = s.get(m.Patient, two.patient_id)
        assert patient is not None and patient.phone_index
        assert consent_queries.suppressed_indexes(session=s, phone_indexes=[patient.phone_index])
        events = consent_queries.consent_events_for(
            session=s, keyring=keyring, patient_id=two.patient_id
        )
        assert [e.method for e in events if e.status == "revoked"].count("carrier_opt_out") >= 1


def test_webhook_latency(twilio: Twilio, request: pytest.FixtureRequest) -> None:
    for i in range(20):
        twilio.text("what time is my appointment?", sid=f"SMlat{i}")
    median = sorted(twilio.timings)[len(twilio.timings) // 2]
    line = f"[webhooks] inbound webhook median {median * 1000:.1f} ms over {len(twilio.timings)}"
    add_figures(request, line)
    assert median < 1.0


def test_behind_a_proxy_the_public_url_is_signed(run: Engage, settings: Settings) -> None:
    """Twilio signs https://rh.example/...; the proxy forwards to http://localhost."""
    public = "https://rh.example/twilio/inbound"
    form = {"MessageSid": "SMproxy", "From": ADA, "To": "+15005550006", "Body": "HELP"}
    signature = RequestValidator(TOKEN).compute_signature(public, form)
    headers = {
        "X-Twilio-Signature": signature,
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "rh.example",
        "X-Forwarded-For": "203.0.113.9",
    }
    for trust, expected in ((False, 403), (True, 200)):
        app = create_app(settings.with_(twilio_auth_token=TOKEN, trust_proxy=trust))
        with app.test_client() as client:
            assert (
                client.post("/twilio/inbound", data=form, headers=headers).status_code == expected
            )
