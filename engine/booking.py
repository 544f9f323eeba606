"""Self-scheduling: a patient opens the link a reminder carried, sees the open slots of the
link's appointment kind and books one.

Nothing here commits: the web layer runs each call in one transaction. A token is looked up
only by its hash. Unknown, expired and used links, and links of erased patients, all read
as `None`: callers answer them alike, so a response never tells whether a token existed.

Booking is atomic on both databases: the slot is taken (`booked_by IS NULL`) and the link
claimed (`used_at IS NULL`) by conditional UPDATEs inside a savepoint; the loser of a race
for either sees zero rows updated and the savepoint is rolled back, changing nothing.
The confirmation text is planned like any campaign message: rendered from the campaign's
`link.confirmation` template and decided by the whole policy set (consent, quiet hours,
caps, approval), then sent by the dispatcher, which decides it again.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from engine.core.domain import Appointment, Occurrence
from engine.core.schedule import anchor_key, idempotency_key
from engine.crypto import Keyring, token_hash
from engine.definitions import DefinitionSet, locale_language
from engine.planner_rows import Pending, PlannedRow, RowContext, planned_row
from engine.store import codec, consent_queries, outbox_queries, queries
from engine.store import models as m
from engine.store.defqueries import approved_versions

log = logging.getLogger("engine.booking")

# secrets.token_urlsafe(16) gives 22 characters; anything else was never issued.
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{22}")
# Slots offered: from an hour ahead (time to get there) to two months out.
MIN_LEAD = timedelta(hours=1)
HORIZON = timedelta(days=60)
MAX_SLOTS = 60
BOOKING_LABEL = "booking"

Outcome = Literal["booked", "taken", "gone", "no-slot"]


@dataclass(frozen=True)
class LinkView:
    """A live link, as the page needs it: no token, no PHI."""

    link_id: int
    patient_id: int
    kind: str
    locale: str
    language: str
    timezone: str
    expires_at: datetime


@dataclass(frozen=True)
class SlotView:
    slot_id: str
    starts_at: datetime
    duration_min: int
    provider: str
    location: str


@dataclass(frozen=True)
class BookingResult:
    """`booked` with the slot and the confirmation's outbox status (None when the campaign
    has no confirmation template); `taken`, `no-slot` and `gone` changed nothing."""

    outcome: Outcome
    link: LinkView | None = None
    slot: SlotView | None = None
    appointment_id: str | None = None
    confirmation: str | None = None


def well_formed(token: str) -> bool:
    return TOKEN_RE.fullmatch(token) is not None


def open_link(*, session: Session, token: str, now: datetime) -> LinkView | None:
    """The live link for `token`, after recording the click; None when there is none.

    Every opening of an issued link counts as a click (an expired one too: the funnel
    shows patients who came too late); `opened_at` keeps the first.
    """
    if not well_formed(token):
        return None
    row = session.execute(_link_query(token)).one_or_none()
    if row is None:
        return None
    link, patient = row
    session.execute(
        update(m.SchedulingLink)
        .where(m.SchedulingLink.id == link.id)
        .values(
            clicks=m.SchedulingLink.clicks + 1,
            opened_at=func.coalesce(m.SchedulingLink.opened_at, now),
        )
    )
    return _live(link, patient, now)


def open_slots(
    *, session: Session, link: LinkView, now: datetime, limit: int = MAX_SLOTS
) -> list[SlotView]:
    """Unbooked slots of the link's kind from an hour ahead, soonest first."""
    s = m.Slot
    stmt = (
        select(s)
        .where(s.kind == link.kind, s.booked_by.is_(None))
        .where(s.starts_at >= now + MIN_LEAD, s.starts_at < now + HORIZON)
        .order_by(s.starts_at, s.slot_id)
        .limit(limit)
    )
    return [_slot_view(slot) for slot in session.scalars(stmt)]


def book(
    *,
    session: Session,
    keyring: Keyring,
    defs: DefinitionSet,
    token: str,
    slot_id: str,
    now: datetime,
    public_url: str = "",
) -> BookingResult:
    """Book `slot_id` with the link `token`: one booking per link, one patient per slot."""
    if not well_formed(token):
        return BookingResult("gone")
    row = session.execute(_link_query(token)).one_or_none()
    view = _live(*row, now) if row is not None else None
    if view is None:
        return BookingResult("gone")
    slot = session.scalar(select(m.Slot).where(m.Slot.slot_id == slot_id))
    if slot is None or slot.kind != view.kind or not _offerable(slot.starts_at, now):
        return BookingResult("no-slot", view)
    with session.begin_nested() as savepoint:
        outcome = _claim(session, view, slot, now)
        if outcome != "booked":
            savepoint.rollback()
            return BookingResult(outcome, view if outcome != "gone" else None)
    session.refresh(slot)
    appointment = _record_appointment(session, view, slot, link_outbox=row[0].outbox_id)
    confirmation = _plan_confirmation(
        session, keyring, defs, view, appointment, row[0].outbox_id, now, public_url
    )
    return BookingResult(
        "booked",
        view,
        _slot_view(slot),
        appointment.appointment_id,
        confirmation.status if confirmation else None,
    )


# --- internals -----------------------------------------------------------------------------


def _link_query(token: str):  # type: ignore[no-untyped-def]
    return (
        select(m.SchedulingLink, m.Patient)
        .join(m.Patient, m.Patient.id == m.SchedulingLink.patient_id)
        .where(m.SchedulingLink.token_hash == token_hash(token))
    )


def _live(link: m.SchedulingLink, patient: m.Patient, now: datetime) -> LinkView | None:
    if link.used_at is not None or link.expires_at <= now or patient.erased_at is not None:
        return None
    # The patient's first zone, as the planner uses it (engine.core.domain.Patient.zones).
    zones = (
        (patient.timezone,)
        if patient.timezone
        else codec.candidate_zones(patient.candidate_timezones)
    )
    return LinkView(
        link_id=link.id,
        patient_id=patient.id,
        kind=link.kind,
        locale=patient.locale,
        language=locale_language(patient.locale),
        timezone=zones[0] if zones else "UTC",
        expires_at=link.expires_at,
    )


def _offerable(starts_at: datetime, now: datetime) -> bool:
    return now + MIN_LEAD <= starts_at < now + HORIZON


def _slot_view(slot: m.Slot) -> SlotView:
    return SlotView(slot.slot_id, slot.starts_at, slot.duration_min, slot.provider, slot.location)


def _claim(session: Session, view: LinkView, slot: m.Slot, now: datetime) -> Outcome:
    """Take the slot, then claim the link. PostgreSQL's row locks make a concurrent claimer
    wait and then see the winner's values; SQLite's single writer serializes them outright."""
    taken = session.execute(
        update(m.Slot)
        .where(m.Slot.id == slot.id, m.Slot.booked_by.is_(None))
        .values(booked_by=view.patient_id, booked_at=now)
        .execution_options(synchronize_session=False)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        return "taken"
    link = m.SchedulingLink
    claimed = session.execute(
        update(link)
        .where(link.id == view.link_id, link.used_at.is_(None), link.expires_at > now)
        .values(used_at=now, booked_slot_id=slot.id)
        .execution_options(synchronize_session=False)
    )
    return "booked" if claimed.rowcount == 1 else "gone"  # type: ignore[attr-defined]


def _record_appointment(
    session: Session, view: LinkView, slot: m.Slot, *, link_outbox: int | None
) -> m.Appointment:
    """The booked visit as an appointment; the visit the link was sent about, if any, is
    marked `rescheduled` (its reminders' audiences ask for `booked`) and, if it was booked
    here, its slot is offered again."""
    original = _original_appointment(session, view.patient_id, link_outbox)
    if original is not None and original.status == "booked":
        original.status = "rescheduled"
        _release_slot(session, original)
    appointment = m.Appointment(
        patient_id=view.patient_id,
        appointment_id=f"slot-{slot.id}",
        starts_at=slot.starts_at,
        kind=slot.kind,
        provider=slot.provider,
        location=slot.location,
        status="booked",
    )
    session.add(appointment)
    session.flush()
    return appointment


def _release_slot(session: Session, appointment: m.Appointment) -> None:
    """A visit booked here earlier (`slot-<id>`) gives its slot back to others."""
    prefix = "slot-"
    if not appointment.appointment_id.startswith(prefix):
        return
    slot_id = appointment.appointment_id[len(prefix) :]
    if not slot_id.isdigit():
        return
    session.execute(
        update(m.Slot)
        .where(m.Slot.id == int(slot_id), m.Slot.booked_by == appointment.patient_id)
        .values(booked_by=None, booked_at=None)
        .execution_options(synchronize_session=False)
    )


def _original_appointment(
    session: Session, patient_id: int, outbox_id: int | None
) -> m.Appointment | None:
    if outbox_id is None:
        return None
    anchor = session.scalar(select(m.Outbox.anchor).where(m.Outbox.id == outbox_id))
    prefix = "appointment:"
    if not anchor or not anchor.startswith(prefix):
        return None
    return session.scalar(
        select(m.Appointment).where(
            m.Appointment.patient_id == patient_id,
            m.Appointment.appointment_id == anchor[len(prefix) :],
        )
    )


def _plan_confirmation(
    session: Session,
    keyring: Keyring,
    defs: DefinitionSet,
    view: LinkView,
    appointment: m.Appointment,
    outbox_id: int | None,
    now: datetime,
    public_url: str,
) -> PlannedRow | None:
    """Decide and queue the confirmation text of the link's campaign, if it has one."""
    campaign_id = (
        session.scalar(select(m.Outbox.campaign_id).where(m.Outbox.id == outbox_id))
        if outbox_id is not None
        else None
    )
    campaign = defs.campaigns.get(campaign_id or "")
    if campaign is None or campaign.link is None or campaign.link.confirmation is None:
        log.info("booking without confirmation text", extra={"campaign": campaign_id})
        return None
    pid = view.patient_id
    cipher = queries.ciphers_for(session=session, keyring=keyring, patient_ids=[pid])[pid]
    patient_row = session.get_one(m.Patient, pid)
    patient = codec.open_patient(patient_row, cipher, with_phone=False).patient
    anchor: Appointment = codec.to_appointment(appointment)
    key_anchor = anchor_key(anchor)
    occurrence = Occurrence(
        campaign=campaign.id,
        patient=patient.external_id,
        anchor=key_anchor,
        label=BOOKING_LABEL,
        due_at=now,
        expires_at=appointment.starts_at,  # useful until the visit, wherever rules defer it
        idempotency_key=idempotency_key(campaign.id, patient.external_id, key_anchor, "booking"),
    )
    confirming = replace(campaign, template=campaign.link.confirmation, link=None)
    planned = planned_row(
        RowContext(defs, now, approved_versions(session=session), public_url),
        item=Pending(pid, patient, confirming, anchor, occurrence),
        consents=consent_queries.consent_states_for_many(
            session=session, patient_ids=[pid], purposes=list(defs.purposes)
        )[pid],
        history=outbox_queries.histories_for(session=session, patient_ids=[pid], now=now)[pid],
        suppressed=bool(consent_queries.suppressed_patients(session=session, patient_ids=[pid])),
        cipher=cipher,
    )
    session.add(m.Outbox(**planned.values))
    session.flush()
    return planned
