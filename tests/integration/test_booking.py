"""Self-scheduling links and booking (engine.booking) on SQLite and PostgreSQL: clicks, open
slots, single-use links, atomic slots, and a confirmation text decided by the policy."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from engine import booking
from engine import outbox_status as st
from engine.booking import BookingResult
from engine.crypto import token_hash
from engine.settings import Settings
from engine.store import models as m
from engine.store import queries
from engine.store.outbox_queries import body_field
from tests.integration.booking_fixtures import NOW, OFFERED, Booking, prepare
from tests.integration.conftest import Engage


@pytest.fixture
def booking_db(engage: Engage, settings: Settings, tmp_path: Path) -> Booking:
    return prepare(engage, settings, tmp_path)


def _book(db: Booking, token: str, slot_id: str, now: datetime = NOW) -> BookingResult:
    rt = db.runtime
    with rt.write_sessions.begin() as session:
        return booking.book(
            session=session,
            keyring=rt.keyring,
            defs=rt.definitions(session),
            token=token,
            slot_id=slot_id,
            now=now,
            public_url=rt.settings.public_url,
        )


def _link(db: Booking, token: str) -> m.SchedulingLink:
    with db.runtime.session_factory() as session:
        link = session.scalar(
            select(m.SchedulingLink).where(m.SchedulingLink.token_hash == token_hash(token))
        )
    assert link is not None
    return link


def _slot(db: Booking, slot_id: str) -> m.Slot:
    with db.runtime.session_factory() as session:
        slot = session.scalar(select(m.Slot).where(m.Slot.slot_id == slot_id))
    assert slot is not None
    return slot


def _count(db: Booking, table: type[m.Base]) -> int:
    with db.runtime.session_factory() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def _open(
    db: Booking, token: str, now: datetime = NOW
) -> tuple[booking.LinkView | None, list[booking.SlotView]]:
    with db.runtime.write_sessions.begin() as session:
        link = booking.open_link(session=session, token=token, now=now)
        slots = booking.open_slots(session=session, link=link, now=now) if link else []
    return link, slots


def test_opening_a_link_records_a_click_and_lists_open_slots(booking_db: Booking) -> None:
    token = booking_db.token("S001")
    link, slots = _open(booking_db, token)
    assert link is not None
    assert (link.kind, link.language, link.timezone) == ("primary-care", "en", "America/New_York")
    assert [s.slot_id for s in slots] == OFFERED  # soonest first; not too soon, far, or other kind
    _open(booking_db, token, now=NOW + timedelta(minutes=3))
    stored = _link(booking_db, token)
    assert stored.clicks == 2 and stored.opened_at == NOW


def test_without_a_known_zone_the_page_uses_the_numbers_first_zone(booking_db: Booking) -> None:
    token = booking_db.token("S001")
    with booking_db.runtime.session_factory.begin() as session:
        patient = queries.patient_by_external_id(session=session, external_id="S001")
        assert patient is not None
        patient.timezone, patient.candidate_timezones = None, "America/Chicago,America/New_York"
    link, _ = _open(booking_db, token)
    assert link is not None and link.timezone == "America/Chicago"


def test_unknown_and_malformed_tokens_open_nothing(booking_db: Booking) -> None:
    for token in ("A" * 22, "short", "x" * 300, "../../etc/passwd", ""):
        assert _open(booking_db, token)[0] is None
        assert _book(booking_db, token, "PC-1").outcome == "gone"
    assert _slot(booking_db, "PC-1").booked_by is None


def test_booking_takes_the_slot_uses_the_link_and_queues_a_confirmation(
    booking_db: Booking,
) -> None:
    token = booking_db.token("S001")
    result = _book(booking_db, token, "PC-2")
    assert result.outcome == "booked" and result.slot is not None
    assert result.slot.slot_id == "PC-2" and result.confirmation == st.QUEUED
    slot, link = _slot(booking_db, "PC-2"), _link(booking_db, token)
    assert slot.booked_by == link.patient_id and slot.booked_at == NOW
    assert link.used_at == NOW and link.booked_slot_id == slot.id
    with booking_db.runtime.session_factory() as session:
        appointments = {
            a.appointment_id: a
            for a in session.scalars(
                select(m.Appointment).where(m.Appointment.patient_id == link.patient_id)
            )
        }
        assert appointments["S001-A1"].status == "rescheduled"  # the visit the reminder was for
        new = appointments[result.appointment_id or ""]
        assert (new.status, new.kind, new.starts_at) == ("booked", "primary-care", slot.starts_at)
        row = session.scalar(
            select(m.Outbox).where(
                m.Outbox.patient_id == link.patient_id,
                m.Outbox.template_id == "booking-confirmation",
            )
        )
        assert row is not None
        assert (row.campaign_id, row.status, row.purpose) == (
            "appointment-reminder",
            "queued",
            "appointment",
        )
        assert row.outcome == "allow" and row.policy_set and row.decided_at == NOW
        patient = session.get_one(m.Patient, link.patient_id)
        cipher = queries.cipher_for(session=session, keyring=booking_db.keyring, patient=patient)
        text = cipher.decrypt_field(body_field(row.idempotency_key), row.body_enc)
    # 14:30Z is 9:30 AM in New York
    assert text is not None and "Dec 10 at 9:30 AM, Main St Clinic" in text
    assert "Reply STOP" in text


def test_rebooking_from_the_next_reminder_frees_the_first_slot(booking_db: Booking) -> None:
    assert _book(booking_db, booking_db.token("S001"), "PC-1").outcome == "booked"
    # The booked visit (Dec 10, 9:00 in New York) gets its own reminder two days before.
    booking_db.engage("plan", "--at", "2026-12-08T15:00:00Z")
    token = booking_db.token("S001", latest=True)
    assert _link(booking_db, token).expires_at > NOW + timedelta(days=1)
    result = _book(booking_db, token, "PC-3", now=NOW + timedelta(days=1))
    assert result.outcome == "booked"
    assert _slot(booking_db, "PC-1").booked_by is None  # offered to others again
    with booking_db.runtime.session_factory() as session:
        statuses = dict(
            session.execute(
                select(m.Appointment.appointment_id, m.Appointment.status).where(
                    m.Appointment.appointment_id.like("slot-%")
                )
            ).all()
        )
    pc1, pc3 = _slot(booking_db, "PC-1").id, _slot(booking_db, "PC-3").id
    assert statuses == {f"slot-{pc1}": "rescheduled", f"slot-{pc3}": "booked"}


def test_a_link_books_once(booking_db: Booking) -> None:
    token = booking_db.token("S001")
    assert _book(booking_db, token, "PC-1").outcome == "booked"
    before = _count(booking_db, m.Outbox)
    assert _book(booking_db, token, "PC-3").outcome == "gone"
    assert _open(booking_db, token)[0] is None  # used: the page says "no longer active"
    assert _slot(booking_db, "PC-3").booked_by is None
    assert _count(booking_db, m.Outbox) == before


def test_a_taken_slot_is_refused_and_the_link_stays_usable(booking_db: Booking) -> None:
    first, second = booking_db.token("S001"), booking_db.mint("S009")
    assert _book(booking_db, first, "PC-1").outcome == "booked"
    refused = _book(booking_db, second, "PC-1")
    assert refused.outcome == "taken" and refused.link is not None
    assert _link(booking_db, second).used_at is None
    assert [s.slot_id for s in _open(booking_db, second)[1]] == ["PC-2", "PC-3"]
    assert _book(booking_db, second, "PC-2").outcome == "booked"


@pytest.mark.parametrize("slot_id", ["CARD-1", "PC-SOON", "PC-FAR", "NOPE", "PC-1' OR '1'='1"])
def test_slots_the_link_does_not_offer_cannot_be_booked(booking_db: Booking, slot_id: str) -> None:
    token = booking_db.token("S001")
    assert _book(booking_db, token, slot_id).outcome == "no-slot"
    assert _link(booking_db, token).used_at is None
    with booking_db.runtime.session_factory() as session:
        assert session.scalar(select(func.count()).where(m.Slot.booked_by.is_not(None))) == 0


def test_an_expired_link_counts_the_click_but_opens_nothing(booking_db: Booking) -> None:
    token = booking_db.token("S001")
    later = _link(booking_db, token).expires_at + timedelta(seconds=1)
    assert _open(booking_db, token, now=later)[0] is None
    assert _book(booking_db, token, "PC-3", now=later).outcome == "gone"
    assert _link(booking_db, token).clicks == 1
    assert _slot(booking_db, "PC-3").booked_by is None


def test_an_erased_patients_link_opens_nothing(booking_db: Booking) -> None:
    token = booking_db.token("S001")
    with booking_db.runtime.session_factory.begin() as session:
        patient = queries.patient_by_external_id(session=session, external_id="S001")
        assert patient is not None
        patient.erased_at = NOW
    assert _open(booking_db, token)[0] is None
    assert _book(booking_db, token, "PC-1").outcome == "gone"


def test_the_confirmation_is_decided_like_any_message(booking_db: Booking) -> None:
    """At 23:30 in New York quiet hours defer it to the morning; a patient who said STOP
    gets the booking but no text."""
    night = NOW.replace(hour=4, minute=30) + timedelta(days=1)  # 23:30 EST
    result = _book(booking_db, booking_db.token("S001"), "PC-1", now=night)
    assert result.outcome == "booked" and result.confirmation == st.DEFERRED
    booking_db.engage(
        "consent",
        "revoke",
        "--patient",
        "S009",
        "--purpose",
        "appointment",
        "--method",
        "phone",
        "--by",
        "front-desk",
        "--at",
        "2026-12-01T00:00:00Z",
    )
    result = _book(booking_db, booking_db.mint("S009"), "PC-2")
    assert result.outcome == "booked" and result.confirmation == st.BLOCKED


def test_an_unapproved_confirmation_template_is_blocked_not_sent(
    engage,
    settings,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    from tests.integration.booking_fixtures import prepare

    db = prepare(engage, settings, tmp_path, approve=("appointment-reminder",))
    result = _book(db, db.token("S001"), "PC-1")
    assert result.outcome == "booked" and result.confirmation == st.BLOCKED


def test_concurrent_bookings_of_one_slot_have_one_winner(booking_db: Booking) -> None:
    """Real concurrency: eight patients, eight threads with their own connections, one slot."""
    patients = ["S001", "S002", "S003", "S004", "S005", "S006", "S007", "S008"]
    tokens = [booking_db.mint(p) for p in patients]
    results: list[str] = []
    barrier = threading.Barrier(len(tokens))

    def attempt(token: str) -> None:
        barrier.wait()
        results.append(_book(booking_db, token, "PC-3").outcome)

    threads = [threading.Thread(target=attempt, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["booked"] + ["taken"] * (len(tokens) - 1)
    with booking_db.runtime.session_factory() as session:
        used = session.scalar(select(func.count()).where(m.SchedulingLink.used_at.is_not(None)))
        booked = session.scalar(select(func.count()).where(m.Slot.booked_by.is_not(None)))
        appointments = session.scalar(
            select(func.count()).where(m.Appointment.appointment_id.like("slot-%"))
        )
    assert (used, booked, appointments) == (1, 1, 1)


def test_one_link_racing_for_two_slots_books_one(booking_db: Booking) -> None:
    token = booking_db.mint("S003")
    results: list[str] = []
    barrier = threading.Barrier(3)

    def attempt(slot_id: str) -> None:
        barrier.wait()
        results.append(_book(booking_db, token, slot_id).outcome)

    threads = [threading.Thread(target=attempt, args=(s,)) for s in OFFERED]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["booked", "gone", "gone"]
    with booking_db.runtime.session_factory() as session:
        assert session.scalar(select(func.count()).where(m.Slot.booked_by.is_not(None))) == 1
