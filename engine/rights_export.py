"""The access export's document (GDPR Art. 15): everything the store holds on one patient,
decrypted with their data key. Reads only; engine.rights audits and registers the export."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from datetime import date, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.crypto import PatientCipher
from engine.store import codec, consent_queries
from engine.store import models as m
from engine.store.outbox_queries import body_field

FORMAT = "engage.patient-export/1"


def patient_document(
    *, session: Session, patient: m.Patient, cipher: PatientCipher
) -> dict[str, Any]:
    """Profile, prescriptions, appointments, consent events with evidence, messages with
    their decisions and bodies, inbound texts, scheduling links and bookings."""
    pid = patient.id
    suppressed = consent_queries.suppressed_patients(session=session, patient_ids=[pid])
    return {
        "format": FORMAT,
        "patient": patient.external_id,
        "profile": _profile(patient, cipher),
        "suppressed": pid in suppressed,
        "prescriptions": _prescriptions(session, pid, cipher),
        "appointments": _rows(session, m.Appointment, pid, _APPOINTMENT),
        "consent_events": _consent_events(session, pid, cipher),
        "messages": _messages(session, pid, cipher),
        "inbound_messages": _inbound(session, pid, cipher),
        "scheduling_links": _links(session, pid),
        "bookings": _bookings(session, pid),
    }


def jsonable(document: dict[str, Any]) -> dict[str, Any]:
    """Dates and times as ISO 8601 strings: what json.dumps gives back as is."""
    return json.loads(json.dumps(document, default=_json_default))  # type: ignore[no-any-return]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def _profile(patient: m.Patient, cipher: PatientCipher) -> dict[str, Any]:
    record = codec.open_patient(patient, cipher)
    p = record.patient
    return {
        "external_id": p.external_id,
        "given_name": p.given_name,
        "family_name": p.family_name,
        "phone": record.phone,
        "birth_date": p.birth_date.isoformat() if p.birth_date else None,
        "timezone": p.timezone,
        "candidate_timezones": list(p.candidate_timezones),
        "locale": p.locale,
        "country": p.country,
        "region": p.region,
        "allow_phi_sms": p.allow_phi_sms,
        "attributes": dict(p.attributes),
        "created_at": patient.created_at,
        "updated_at": patient.updated_at,
    }


_APPOINTMENT = ("appointment_id", "starts_at", "kind", "provider", "location", "status")
_MESSAGE = (
    "id", "campaign_id", "campaign_version", "template_id", "template_version", "locale",
    "purpose", "occurrence", "anchor", "outcome", "status", "reasons", "policy_set", "due_at",
    "send_at", "expires_at", "decided_at", "sent_at", "segments", "encoding", "attempts",
    "error_code", "provider_status", "created_at",
)  # fmt: skip
_LINK = ("kind", "created_at", "expires_at", "clicks", "opened_at", "used_at")


def _pick(row: Any, names: Iterable[str]) -> dict[str, Any]:
    return {name: getattr(row, name) for name in names}


def _rows(session: Session, model: Any, pid: int, names: Iterable[str]) -> list[dict[str, Any]]:
    stmt = select(model).where(model.patient_id == pid).order_by(model.id)
    return [_pick(row, names) for row in session.scalars(stmt)]


def _prescriptions(session: Session, pid: int, cipher: PatientCipher) -> list[dict[str, Any]]:
    stmt = (
        select(m.Prescription).where(m.Prescription.patient_id == pid).order_by(m.Prescription.id)
    )
    return [asdict(codec.open_prescription(row, cipher)) for row in session.scalars(stmt)]


def _consent_events(session: Session, pid: int, cipher: PatientCipher) -> list[dict[str, Any]]:
    e = m.ConsentEvent
    out = []
    for row in session.scalars(select(e).where(e.patient_id == pid).order_by(e.id)):
        item = _pick(row, ("id", "purpose", "channel", "status", "legal_basis", "method"))
        item |= _pick(row, ("notice_version", "occurred_at", "recorded_at", "recorded_by"))
        item["source"] = row.source
        item["evidence"] = cipher.decrypt_field(codec.EVIDENCE_FIELD, row.evidence_enc)
        out.append(item)
    return out


def _messages(session: Session, pid: int, cipher: PatientCipher) -> list[dict[str, Any]]:
    o = m.Outbox
    out = []
    for row in session.scalars(select(o).where(o.patient_id == pid).order_by(o.id)):
        item = _pick(row, _MESSAGE)
        item["body"] = cipher.decrypt_field(body_field(row.idempotency_key), row.body_enc)
        out.append(item)
    return out


def _inbound(session: Session, pid: int, cipher: PatientCipher) -> list[dict[str, Any]]:
    i = m.InboundMessage
    stmt = select(i).where(i.patient_id == pid).order_by(i.id)
    return [
        {
            "received_at": row.received_at,
            "classification": row.classification,
            "body": cipher.decrypt_field(f"inbound/{row.provider_sid}/body", row.body_enc),
        }
        for row in session.scalars(stmt)
    ]


def _links(session: Session, pid: int) -> list[dict[str, Any]]:
    link, slot = m.SchedulingLink, m.Slot
    stmt = (
        select(link, slot.slot_id)
        .outerjoin(slot, slot.id == link.booked_slot_id)
        .where(link.patient_id == pid)
        .order_by(link.id)
    )
    return [_pick(row, _LINK) | {"booked_slot": slot_id} for row, slot_id in session.execute(stmt)]


def _bookings(session: Session, pid: int) -> list[dict[str, Any]]:
    s = m.Slot
    stmt = select(s).where(s.booked_by == pid).order_by(s.starts_at)
    names = ("slot_id", "kind", "provider", "location", "starts_at", "duration_min", "booked_at")
    return [_pick(row, names) for row in session.scalars(stmt)]


def requests_of(*, session: Session, external_id: str) -> list[dict[str, Any]]:
    r = m.RightsRequest
    stmt = select(r).where(r.patient_external_id == external_id).order_by(r.id)
    names = ("id", "kind", "received_at", "due_at", "status", "completed_at")
    return [_pick(row, names) for row in session.scalars(stmt)]
