"""Hostile, malformed and racing input to the Twilio webhooks, on SQLite and PostgreSQL.

Anyone can post to these URLs, Twilio retries and adds fields as it pleases. What must
hold: nothing changes unless Twilio signed exactly this URL and every field; no input
turns into a 5xx; a MessageSid is acted on once, even when its retries race.
"""

from __future__ import annotations

import io
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker
from twilio.request_validator import RequestValidator
from werkzeug.urls import uri_to_iri

from engine import outbox_status as status
from engine.settings import Settings
from engine.store import models as m
from engine.web import create_app, runtime_of
from engine.web.webhooks import MAX_WEBHOOK_BYTES
from tests.integration import test_webhooks as shared
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT
from tests.integration.test_webhooks import ADA, BASE, EMPTY, NOW, TOKEN, Twilio

run = shared.run  # fixtures shared with test_webhooks: the planned sample, a signing client
twilio = shared.twilio

INBOUND, STATUS = "/twilio/inbound", "/twilio/status"
TO = "+15005550006"
STRANGER = "+13125550199"
# What Twilio really posts besides the fields we read; it adds new ones without notice.
TWILIO_EXTRAS = {
    "SmsMessageSid": "SM" + "e" * 32,
    "SmsSid": "SM" + "e" * 32,
    "SmsStatus": "received",
    "NumMedia": "1",
    "NumSegments": "1",
    "MediaContentType0": "image/jpeg",
    "MediaUrl0": "https://api.twilio.com/2010-04-01/Accounts/ACtest/Messages/MM1/Media/ME1",
    "ApiVersion": "2010-04-01",
    "MessagingServiceSid": "MG" + "0" * 32,
    "FromCity": "NEW YORK",
    "FromCountry": "US",
    "ToZip": "",
    "FieldTwilioAddsNextYear": "ümlaut & = ? %",
}

State = tuple[tuple[int, ...], list[tuple[Any, ...]]]


def _sms(sid: str, body: str = "STOP", from_: str = ADA, **extra: str) -> dict[str, str]:
    form = {"MessageSid": sid, "AccountSid": "ACtest", "From": from_, "To": TO, "Body": body}
    return {**form, **extra}


def _state(session_factory: sessionmaker[Session]) -> State:
    """Row counts of the tables a webhook writes, and every outbox row's delivery state."""
    tables = (m.ConsentEvent, m.Suppression, m.InboundMessage, m.Outbox)
    o = m.Outbox
    with session_factory() as s:
        counts = tuple(s.scalar(select(func.count()).select_from(t)) or 0 for t in tables)
        rows = s.execute(
            select(o.id, o.status, o.error_code, o.provider_status, o.last_error).order_by(o.id)
        )
        return counts, [tuple(r) for r in rows]


def _sign(url: str, form: Any, token: str = TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, form)


def _post(client: FlaskClient, path: str, form: Any, signature: str | None, **kw: Any) -> Any:
    headers = {} if signature is None else {"X-Twilio-Signature": signature}
    return client.post(path, data=form, headers={**headers, **kw.pop("headers", {})}, **kw)


def _replies(session_factory: sessionmaker[Session]) -> list[str]:
    with session_factory() as s:
        o = m.Outbox
        stmt = select(o.idempotency_key).where(o.campaign_id == "program").order_by(o.id)
        return list(s.scalars(stmt))


@pytest.fixture
def sent(run: Engage, session_factory: sessionmaker[Session]) -> list[str]:
    """The provider sids of the sample's messages, dispatched to the sandbox (status sent)."""
    run("dispatch", "--once", "--at", AT)
    with session_factory() as s:
        o = m.Outbox
        stmt = select(o.provider_sid).where(o.status == status.SENT).order_by(o.id)
        sids = [sid for sid in s.scalars(stmt) if sid]
    assert len(sids) >= 2
    return sids


def test_unsigned_or_altered_requests_are_refused_and_change_nothing(
    twilio: Twilio, sent: list[str], session_factory: sessionmaker[Session]
) -> None:
    form = _sms("SM" + "a" * 32, "hello")
    good = _sign(BASE + INBOUND, form)
    delivered = {"MessageSid": sent[0], "AccountSid": "ACtest", "MessageStatus": "delivered"}
    cases: dict[str, tuple[str, dict[str, Any], str | None]] = {
        "no signature header": (INBOUND, form, None),
        "empty signature": (INBOUND, form, ""),
        "not a signature": (INBOUND, form, "bm90IGEgc2lnbmF0dXJl"),
        "another account's token": (INBOUND, form, _sign(BASE + INBOUND, form, "other-token")),
        "signed for another host": (INBOUND, form, _sign("https://evil.example" + INBOUND, form)),
        "signed for the status URL": (INBOUND, form, _sign(BASE + STATUS, form)),
        "signed with a query string": (INBOUND, form, _sign(BASE + INBOUND + "?x=1", form)),
        "field removed": (INBOUND, {k: v for k, v in form.items() if k != "To"}, good),
        "OptOutType added": (INBOUND, {**form, "OptOutType": "STOP"}, good),
        "Body repeated": (INBOUND, {**form, "Body": [form["Body"], "STOP"]}, good),
        "status changed": (
            STATUS,
            {**delivered, "MessageStatus": "undelivered", "ErrorCode": "21610"},
            _sign(BASE + STATUS, delivered),
        ),
    }
    for key in form:
        cases[f"{key} changed"] = (INBOUND, {**form, key: form[key] + "0"}, good)
    before = _state(session_factory)
    for case, (path, data, signature) in cases.items():
        response = _post(twilio.client, path, data, signature)
        assert response.status_code == 403, case
    bad_port = _post(twilio.client, INBOUND, form, good, headers={"Host": "localhost:99999"})
    assert bad_port.status_code == 403
    assert _state(session_factory) == before
    assert _post(twilio.client, INBOUND, form, good).status_code == 200  # the original is fine
    assert _state(session_factory)[0][2] == before[0][2] + 1


def test_twilio_s_extra_fields_are_signed_and_a_retry_is_acted_on_once(
    twilio: Twilio, session_factory: sessionmaker[Session]
) -> None:
    sid = "SM" + "b" * 32
    form = _sms(sid, "Stop", **TWILIO_EXTRAS)
    signature = _sign(BASE + INBOUND, form)
    without_extras = _sms(sid, "Stop")
    assert _post(twilio.client, INBOUND, without_extras, signature).status_code == 403
    responses = [_post(twilio.client, INBOUND, form, signature) for _ in range(3)]
    assert [(r.status_code, r.data) for r in responses] == [(200, EMPTY)] * 3
    with session_factory() as s:
        stored = s.scalars(select(m.InboundMessage)).all()
        assert [(i.provider_sid, i.classification) for i in stored] == [(sid, "opt_out")]
    assert _replies(session_factory) == [f"program/{sid}/stop"]


def test_missing_or_unusable_ids_are_400_after_the_signature(
    twilio: Twilio, session_factory: sessionmaker[Session]
) -> None:
    form = _sms("SM" + "c" * 32)
    inbound = [
        {k: v for k, v in form.items() if k != "MessageSid"},
        {k: v for k, v in form.items() if k != "From"},
        {**form, "MessageSid": "   "},
        {**form, "From": ""},
        {**form, "MessageSid": "SM" + "c" * 100},  # longer than any sid (and the column)
        {**form, "MessageSid": "SM" + "c" * 47},  # one more than the 48 allowed
        {**form, "MessageSid": "SM\x00" + "c" * 31},
        {**form, "MessageSid": "SM c"},
    ]
    status_forms = [{"MessageStatus": "delivered"}, {"MessageSid": "", "MessageStatus": "sent"}]
    before = _state(session_factory)
    for data in inbound:
        assert _post(twilio.client, INBOUND, data, "wrong").status_code == 403, data
        assert _post(twilio.client, INBOUND, data, _sign(BASE + INBOUND, data)).status_code == 400
    for data in status_forms:
        assert _post(twilio.client, STATUS, data, _sign(BASE + STATUS, data)).status_code == 400
    assert _state(session_factory) == before


def test_status_reports_that_mean_nothing_here_are_a_quiet_no_op(
    twilio: Twilio, sent: list[str], session_factory: sessionmaker[Session]
) -> None:
    """Answered 200: a 4xx would only make Twilio log errors and retry what it will resend."""

    def report(sid: str, state: str, query: str = "", **extra: str) -> None:
        form = {"MessageSid": sid, "AccountSid": "ACtest", "MessageStatus": state, **extra}
        path = STATUS + query
        response = _post(twilio.client, path, form, _sign(BASE + path, form))
        assert (response.status_code, response.data) == (200, EMPTY), (sid, state, query, extra)

    before = _state(session_factory)
    unknown = "SM" + "0" * 32
    report(unknown, "delivered")
    report(unknown, "undelivered", ErrorCode="21610")  # nobody's message: nobody revoked
    for ref in ("abc", "²", "-1", "1" * 30, "1" * 5000, ""):
        report(unknown, "failed", f"?ref={ref}", ErrorCode="30003")
    for state in ("accepted", "scheduled", "queued", "sending", "canceled", "receiving"):
        report(sent[0], state)
    for state in ("partially_delivered", "bogus", "", "DELIVERED\x00", "x" * 5000):
        report(sent[0], state, ErrorCode="30005")
    for code in ("30003x", "²", "99999999999", "-1", "1e3", "9" * 5000):
        report(sent[0], "sent", ErrorCode=code)
    assert _state(session_factory) == before

    report(sent[1], "undelivered", ErrorCode="not-a-code")  # the status still counts
    report(sent[1], "undelivered\x00", ErrorCode="30005")  # a final row takes a new code
    with session_factory() as s:
        row = s.scalars(select(m.Outbox).where(m.Outbox.provider_sid == sent[1])).one()
        assert (row.status, row.error_code) == (status.UNDELIVERED, 30005)
        assert row.last_error is not None and row.last_error.isprintable()
    assert _state(session_factory)[0][:2] == before[0][:2]  # no consent event, no suppression


def test_odd_text_is_never_a_server_error(
    twilio: Twilio, session_factory: sessionmaker[Session]
) -> None:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    raw = b"MessageSid=SMraw&From=%2B12125550101&To=%2B15005550006&Body=\xff\xfeSTOP"
    signed_as = _sms("SMraw", "\ufffd\ufffdSTOP")
    before = _state(session_factory)
    for signature in (None, "wrong", _sign(BASE + INBOUND, signed_as)):
        response = _post(twilio.client, INBOUND, raw, signature, headers=headers)
        assert 400 <= response.status_code < 500
    assert _state(session_factory) == before

    strange = [
        _sms("SModd1", "%FF%FE", To="%FF"),  # percent-escapes that are not UTF-8 text
        _sms("SModd2", "nul\x00 and \x1b[31mescape", To="+1500\x00555\x7f0006"),
        _sms("SModd3", "🙂" * 1600, To="+" + "9" * 200),  # the longest body Twilio sends
        _sms("SModd4", "\u202estop\u202c", OptOutType="\x00"),
        _sms("SModd5", "hi", from_="+1" + "2" * 300),
        _sms("SModd6", "STOP", from_="whatsapp:+12125550199\x00"),
        _sms("SM" + "9" * 46, "STOP"),  # the longest sid taken: it fits every column
    ]
    encoded = b"MessageSid=SModd7&From=%2B12125550101&Body=%FF%FE%C0%80"
    for form in strange:
        response = _post(twilio.client, INBOUND, form, _sign(BASE + INBOUND, form))
        assert response.status_code == 200, form["MessageSid"]
    signature = _sign(BASE + INBOUND, _sms("SModd7", "")) + "x"
    assert _post(twilio.client, INBOUND, encoded, signature, headers=headers).status_code == 403
    with session_factory() as s:
        stored = s.scalars(select(m.InboundMessage).order_by(m.InboundMessage.id)).all()
        assert [i.provider_sid for i in stored] == [f["MessageSid"] for f in strange]
        assert all(i.to_number.isprintable() and len(i.to_number) <= 32 for i in stored)


def test_only_a_form_of_sane_size_is_read(
    twilio: Twilio, session_factory: sessionmaker[Session]
) -> None:
    client = twilio.client
    before = _state(session_factory)
    huge = _sms("SMhuge", "STOP " * MAX_WEBHOOK_BYTES)
    assert _post(client, INBOUND, huge, _sign(BASE + INBOUND, huge)).status_code == 413
    assert _post(client, STATUS, huge, None).status_code == 413
    streamed = client.post(
        INBOUND,
        input_stream=io.BytesIO(b"Body=" + b"x" * (2 * MAX_WEBHOOK_BYTES)),
        content_type="application/x-www-form-urlencoded",
        headers={"Transfer-Encoding": "chunked", "X-Twilio-Signature": "x"},
        environ_overrides={"wsgi.input_terminated": True},  # what gunicorn says for chunked
    )
    assert streamed.status_code == 413
    as_json = client.post(
        INBOUND, json=_sms("SMjson"), headers={"X-Twilio-Signature": _sign(BASE + INBOUND, {})}
    )
    assert as_json.status_code == 415
    as_text = client.post(INBOUND, data="Body=STOP", content_type="text/plain")
    assert as_text.status_code == 415
    multipart = {**_sms("SMmulti"), "file": (io.BytesIO(b"x"), "x.txt")}
    assert _post(client, INBOUND, multipart, "x").status_code == 415
    for method in (client.get, client.put, client.delete, client.patch):
        assert method(INBOUND).status_code == 405
        assert method(STATUS).status_code == 405
    assert _state(session_factory) == before

    largest = _sms("SMlargest", "🙂" * 1600, **TWILIO_EXTRAS)  # about 20 KB encoded
    assert _post(client, INBOUND, largest, _sign(BASE + INBOUND, largest)).status_code == 200


# --- fuzzing: SQLite only, to keep the suite fast -------------------------------------------

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)
# isdigit() holds for "²" and "٣", int() takes only the second; Twilio sends ASCII digits.
_NUMERALS = st.integers().map(str) | st.lists(
    st.sampled_from(["²", "٣", "0", "7", "21610", "9" * 12]), min_size=1, max_size=4
).map("".join)
_STATUSES = st.sampled_from(["sent", "delivered", "undelivered", "failed", "read", "queued"])
_KEYWORDS = st.sampled_from(["STOP", "start", "HELP", "stop texting me", "ALTO"])
_FIELDS = {  # each present or not, Twilio-like or not
    "From": st.sampled_from([ADA, STRANGER]) | _TEXT,
    "To": _TEXT,
    "Body": _KEYWORDS | _TEXT,
    "OptOutType": _KEYWORDS | _TEXT,
    "MessageStatus": _STATUSES | _TEXT,
    "ErrorCode": st.just("21610") | _NUMERALS | _TEXT,
}
_FORMS = st.builds(
    lambda fields, extra: {**extra, **fields},
    st.fixed_dictionaries({}, optional=_FIELDS),
    st.dictionaries(_TEXT, _TEXT, max_size=4),
)
_SIDS = st.sampled_from(["known", "SM" + "f" * 32]) | st.from_regex(
    r"[A-Za-z0-9]{1,48}", fullmatch=True
)
_REFS = st.none() | _NUMERALS | _TEXT


@pytest.mark.parametrize("db_backend", ["sqlite"])
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(form={"MessageStatus": "sent", "ErrorCode": "²"}, sid="known", ref=None, forged="")
@example(form={"MessageStatus": "failed"}, sid="SMunknown", ref="0²", forged="x")
@given(
    form=_FORMS,
    sid=_SIDS | _TEXT,
    ref=_REFS,
    forged=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)
def test_fuzzed_forms_never_fail_and_unsigned_ones_change_nothing(
    twilio: Twilio,
    sent: list[str],
    session_factory: sessionmaker[Session],
    form: dict[str, str],
    sid: str,
    ref: str | None,
    forged: str,
) -> None:
    form = {**form, "MessageSid": sent[0] if sid == "known" else sid}
    status = STATUS if ref is None else f"{STATUS}?ref={quote(ref, safe='')}"
    for path in (INBOUND, status):
        before = _state(session_factory)
        assert _post(twilio.client, path, form, forged).status_code == 403
        assert _state(session_factory) == before
        signature = _sign(uri_to_iri(BASE + path), form)  # request.url is an IRI
        assert _post(twilio.client, path, form, signature).status_code < 500


# --- racing retries -------------------------------------------------------------------------


def _meet_at_insert(parties: int) -> Callable[..., None]:
    """A cursor hook holding the first `parties` inbound inserts until all have arrived:
    every request is inside its transaction, past its duplicate check, at the same time."""
    barrier = threading.Barrier(parties, timeout=10)
    arrivals = itertools.count()

    def meet(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        inserting = statement.lstrip().upper().startswith("INSERT INTO INBOUND_MESSAGES")
        if inserting and next(arrivals) < parties:
            barrier.wait()

    return meet


def test_racing_retries_of_one_text_are_acted_on_once(
    run: Engage, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """PostgreSQL: all requests meet at the insert. SQLite takes the write lock at BEGIN
    IMMEDIATE, so there the requests start together and queue for it."""
    app = create_app(settings.with_(twilio_auth_token=TOKEN), clock=lambda: NOW)
    engine = runtime_of(app).write_sessions.kw["bind"]
    on_postgres = engine.dialect.name == "postgresql"
    parties = 3

    def race(form: dict[str, str]) -> list[tuple[int, bytes]]:
        signature = _sign(BASE + INBOUND, form)
        start = threading.Barrier(parties, timeout=10)
        meet = _meet_at_insert(parties)
        if on_postgres:
            event.listen(engine, "before_cursor_execute", meet)

        def post(_: int) -> tuple[int, bytes]:
            with app.test_client() as client:
                start.wait()
                response = _post(client, INBOUND, form, signature)
                return response.status_code, response.data

        try:
            with ThreadPoolExecutor(parties) as pool:
                return list(pool.map(post, range(parties)))
        finally:
            if on_postgres:
                event.remove(engine, "before_cursor_execute", meet)

    patient = race(_sms("SM" + "d" * 32, "STOP"))
    assert patient == [(200, EMPTY)] * parties
    stranger = race(_sms("SM" + "e" * 32, "STOP", from_=STRANGER))
    assert sorted(code for code, _ in stranger) == [200] * parties
    assert [b"<Message>" in data for _, data in stranger].count(True) == 1
    with session_factory() as s:
        stored = s.scalars(select(m.InboundMessage.provider_sid)).all()
        assert sorted(stored) == ["SM" + "d" * 32, "SM" + "e" * 32]
        assert s.scalar(select(func.count()).select_from(m.Suppression)) == 2
    assert _replies(session_factory) == [f"program/{'SM' + 'd' * 32}/stop"]
