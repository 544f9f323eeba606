"""The patient's page `/s/<token>` through Flask's test client, on SQLite and PostgreSQL:
what it shows, CSRF, the one page for every dead link, rate limiting, and a booking whose
confirmation text reaches the patient's phone through the dispatcher and the sandbox."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from sqlalchemy import func, select

from engine.crypto import token_hash
from engine.settings import Settings
from engine.store import models as m
from engine.web import create_app
from tests.integration.booking_fixtures import NOW, Booking, prepare
from tests.integration.conftest import Engage, SandboxHandle

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def _text(response: Any) -> str:
    """The page's HTML with CLDR's narrow no-break spaces ("9:30\u202fAM") made plain."""
    return str(response.get_data(as_text=True)).replace("\u202f", " ")


@pytest.fixture
def db(engage: Engage, settings: Settings, tmp_path: Path) -> Booking:
    return prepare(engage, settings, tmp_path)


@pytest.fixture
def client(db: Booking) -> Iterator[FlaskClient]:
    app = create_app(db.settings, clock=lambda: NOW)
    with app.test_client() as client:
        yield client


@pytest.fixture
def unlimited(db: Booking) -> FlaskClient:
    """A client of an app without the rate limit (for many requests in a row)."""
    return create_app(db.settings.with_(page_rate_per_minute=0), clock=lambda: NOW).test_client()


def _form(client: FlaskClient, token: str) -> tuple[str, Any]:
    page = client.get(f"/s/{token}")
    assert page.status_code == 200
    found = CSRF.search(page.get_data(as_text=True))
    assert found
    return found.group(1), page


def _booked_slots(db: Booking) -> int:
    with db.runtime.session_factory() as session:
        return session.scalar(select(func.count()).where(m.Slot.booked_by.is_not(None))) or 0


def test_the_page_lists_open_times_in_the_patients_zone_without_phi(
    client: FlaskClient, db: Booking
) -> None:
    token = db.token("S001")
    response = client.get(f"/s/{token}")
    html = _text(response)
    assert response.status_code == 200 and '<html lang="en">' in html
    assert "Thursday, December 10, 2026" in html and "9:30 AM" in html  # 14:30Z in New York
    assert "All times are Eastern Time." in html
    assert html.count('name="slot"') == 3
    assert "Ada" not in html and "Lovelace" not in html and "555" not in html.split("Call")[0]
    headers = response.headers
    assert headers["Referrer-Policy"] == "no-referrer"  # the token never leaves in a Referer
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none'
    assert headers["Cache-Control"] == "no-store" and headers["X-Content-Type-Options"] == "nosniff"
    with db.runtime.session_factory() as session:
        link = session.scalar(
            select(m.SchedulingLink).where(m.SchedulingLink.token_hash == token_hash(token))
        )
    assert link is not None and link.clicks == 1


def test_a_spanish_speaking_patient_gets_the_page_in_spanish(
    client: FlaskClient, db: Booking
) -> None:
    html = client.get(f"/s/{db.token('S009')}").get_data(as_text=True)
    assert '<html lang="es">' in html and "Elija una hora" in html
    assert "jueves, 10 de diciembre de 2026" in html and "Horario: hora oriental." in html


def test_booking_redirects_to_a_confirmation_without_the_token(
    client: FlaskClient, db: Booking
) -> None:
    token = db.token("S001")
    csrf, _ = _form(client, token)
    response = client.post(f"/s/{token}", data={"csrf_token": csrf, "slot": "PC-2"})
    assert response.status_code == 303 and response.headers["Location"] == "/s/booked"
    page = client.get("/s/booked")
    html = _text(page)
    assert page.status_code == 200 and "You are booked" in html
    assert "Thursday, December 10, 2026" in html and "9:30 AM" in html
    assert "We will also send you a text to confirm." in html
    assert _booked_slots(db) == 1
    again = client.get(f"/s/{token}")
    assert again.status_code == 410 and "no longer active" in again.get_data(as_text=True)


def test_every_dead_link_gets_the_same_page(client: FlaskClient, db: Booking) -> None:
    used, expired = db.token("S001"), db.mint("S003", days=-1)
    csrf, _ = _form(client, used)
    client.post(f"/s/{used}", data={"csrf_token": csrf, "slot": "PC-1"})
    pages = [client.get(f"/s/{t}") for t in (used, expired, "B" * 22)]
    assert {p.status_code for p in pages} == {410}
    assert len({p.get_data() for p in pages}) == 1  # nothing tells them apart
    for path in ("/s/not-a-token", "/s/" + "x" * 200):
        assert client.get(path).status_code == 404, path
    fresh = client.application.test_client()  # no booking in its session
    assert fresh.get("/s/booked").status_code == 404
    assert (
        client.post(f"/s/{expired}", data={"csrf_token": csrf, "slot": "PC-2"}).status_code == 410
    )
    assert _booked_slots(db) == 1


def test_a_form_without_a_valid_csrf_token_books_nothing(client: FlaskClient, db: Booking) -> None:
    token = db.token("S001")
    _form(client, token)
    for data in ({"slot": "PC-1"}, {"slot": "PC-1", "csrf_token": "forged"}):
        response = client.post(f"/s/{token}", data=data)
        assert response.status_code == 400
        assert "Please try again" in response.get_data(as_text=True)
    assert _booked_slots(db) == 0


def test_a_taken_or_missing_choice_shows_the_times_again(client: FlaskClient, db: Booking) -> None:
    first, second = db.token("S001"), db.mint("S003")
    csrf, _ = _form(client, first)
    assert client.post(f"/s/{first}", data={"csrf_token": csrf, "slot": "PC-1"}).status_code == 303
    none = client.post(f"/s/{second}", data={"csrf_token": csrf})
    assert none.status_code == 400 and "Please choose a time first." in none.get_data(as_text=True)
    taken = client.post(f"/s/{second}", data={"csrf_token": csrf, "slot": "PC-1"})
    html = taken.get_data(as_text=True)
    assert taken.status_code == 409 and "someone just booked that time" in html
    assert 'value="PC-1"' not in html and 'value="PC-2"' in html
    bogus = client.post(f"/s/{second}", data={"csrf_token": csrf, "slot": "CARD-1"})
    assert bogus.status_code == 409 and "no longer available" in bogus.get_data(as_text=True)
    assert _booked_slots(db) == 1


def test_requests_are_rate_limited_per_client(db: Booking) -> None:
    app = create_app(db.settings.with_(page_rate_per_minute=3), clock=lambda: NOW)
    client = app.test_client()
    token = db.token("S001")
    codes = [client.get(f"/s/{token}").status_code for _ in range(3)]
    limited = client.get(f"/s/{token}")
    assert codes == [200, 200, 200] and limited.status_code == 429
    assert limited.headers["Retry-After"] == "60"
    assert "Please wait a moment" in limited.get_data(as_text=True)
    other = client.get(f"/s/{token}", environ_base={"REMOTE_ADDR": "10.0.0.9"})
    assert other.status_code == 200  # another client is not held back
    assert client.get("/healthz").status_code == 200  # only the patient pages are limited


def test_a_huge_form_is_refused_before_parsing(client: FlaskClient, db: Booking) -> None:
    token = db.token("S001")
    response = client.post(f"/s/{token}", data={"slot": "x" * (1 << 20)})
    assert response.status_code == 413
    assert _booked_slots(db) == 0


def test_the_confirmation_text_reaches_the_phone(
    engage: Engage, settings: Settings, tmp_path: Path, sandbox: SandboxHandle
) -> None:
    engage.env.update(
        {
            "ENGAGE_TRANSPORT": "sandbox",
            "TWILIO_API_BASE_URL": sandbox.url,
            "ENGAGE_STATUS_CALLBACK_URL": "",
            "ENGAGE_SEND_RATE": "0",
        }
    )
    db = prepare(engage, settings, tmp_path)
    engage("dispatch", "--once", "--at", NOW.isoformat())  # the reminder with the link goes out
    later = NOW + timedelta(minutes=30)
    client = create_app(db.settings, clock=lambda: later).test_client()
    token = db.token("S001")
    csrf, _ = _form(client, token)
    client.post(f"/s/{token}", data={"csrf_token": csrf, "slot": "PC-3"})
    engage("dispatch", "--once", "--at", later.isoformat())
    with db.runtime.session_factory() as session:
        row = session.scalar(select(m.Outbox).where(m.Outbox.template_id == "booking-confirmation"))
        assert row is not None and row.status == "deferred"  # healthcare messages: 1 a day
        assert [r["rule"] for r in row.reasons] == ["hc-daily-cap"]
        assert row.send_at == NOW + timedelta(days=1)
    engage("dispatch", "--once", "--at", (NOW + timedelta(days=1)).isoformat())
    texts = [msg["body"] for msg in sandbox.messages(to="+12125550101")]
    assert len(texts) == 2 and "To reschedule: https://rh.example/s/" in texts[0]
    assert texts[1] == (
        "Riverside Health: you are booked for Dec 11 at 10:00 AM, Elm Ave Clinic. "
        "Questions: 800-555-0199. Reply STOP to opt out."
    )


def test_a_running_app_follows_the_next_sync(
    client: FlaskClient, db: Booking, definitions: Path
) -> None:
    token = db.token("S001")
    assert "Call 800-555-0199." in client.get(f"/s/{token}").get_data(as_text=True)
    program = definitions / "policies" / "program.yaml"
    text = program.read_text(encoding="utf-8").replace("800-555-0199", "800-555-0123")
    program.write_text(text, encoding="utf-8")
    db.engage("sync")
    assert "Call 800-555-0123." in client.get(f"/s/{token}").get_data(as_text=True)


_FORMS = st.dictionaries(
    st.sampled_from(["slot", "csrf_token", "patient", "slot[]", ""]) | st.text(max_size=12),
    st.text(max_size=80) | st.sampled_from(["PC-1", "CARD-1", "PC-1\x00", "' OR 1=1 --"]),
    max_size=4,
)


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
@settings_(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(form=_FORMS, raw=st.binary(max_size=64), valid_csrf=st.booleans())
def test_no_form_breaks_the_page(
    unlimited: FlaskClient, db: Booking, form: dict[str, str], raw: bytes, valid_csrf: bool
) -> None:
    """Arbitrary fields, bytes that are not UTF-8, forged tokens: a 4xx or a booking, never
    a 5xx, and a booking only of an offered slot with a valid CSRF token."""
    client = unlimited
    token = db.mint("S002")
    csrf, _ = _form(client, token)
    if valid_csrf:
        form = {**form, "csrf_token": csrf}
    response = client.post(f"/s/{token}", data=form)
    assert response.status_code < 500
    if response.status_code == 303:
        assert valid_csrf and form.get("slot", "").strip() in {"PC-1", "PC-2", "PC-3"}
    body = b"slot=" + raw + b"&csrf_token=" + csrf.encode()
    response = client.post(
        f"/s/{token}", data=body, content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code < 500
