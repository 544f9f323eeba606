"""Data subjects' rights: erasure (GDPR Art. 17), access export (Art. 15) and the register
of requests with their one-month due date (Art. 12(3)).

Erasure is crypto-shredding: the patient's wrapped data key is destroyed, so every
ciphertext sealed with it (consent evidence in the append-only ledger included) can never
be opened again; what is stored in clear about the person is deleted or nulled. Kept, as
the law requires: the consent ledger (proof of consent, 47 CFR 64.1200 and GDPR Art. 7(1)),
decisions with their reasons (HIPAA documentation), the audit log, and the number's blind
index on the suppression list when the patient opted out, so that number stays unmessaged.
Nothing here commits: the caller owns the transaction.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from engine import audit, rights_export
from engine import outbox_status as status
from engine.core.inbound import KEYWORD_METHODS
from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.dispatch_gate import withdrawable
from engine.store import consent_queries, queries
from engine.store import models as m
from engine.store.codec import PatientErased, UnknownPatient

KINDS = ("access", "erasure")
STATUSES = ("open", "done", "refused")
ERASED_REASON = "erased"
# Where each kind of declared variable is stored, hence what erasing it removes.
STORED_IN = {
    "given_name": "patient names",
    "family_name": "patient names",
    "medication": "prescriptions",
    "medication_class": "prescriptions",
    "refill_due": "prescriptions",
    "appointment_date": "appointments",
    "appointment_time": "appointments",
    "appointment_kind": "appointments",
    "provider": "appointments",
    "location": "appointments",
}
# Always erased: identifiers that are not template variables.
ALWAYS_ERASED = ("phone", "birth date", "message bodies", "inbound texts", "scheduling links")

__all__ = ["PatientErased", "UnknownPatient"]


class RequestProblem(ValueError):
    """A register entry that cannot be made or changed as asked."""


def due_date(received_at: datetime) -> datetime:
    """One calendar month after receipt (GDPR Art. 12(3)); the 31st becomes the month's end."""
    year, month = divmod(received_at.month, 12)
    year, month = received_at.year + year, month + 1
    day = min(received_at.day, calendar.monthrange(year, month)[1])
    return received_at.replace(year=year, month=month, day=day)


def erasable_scopes(defs: DefinitionSet) -> list[str]:
    """What erasure removes, from policies/data.yaml: every stored kind of data holding a
    `pii` or `phi` variable, declared patient attributes, and the identifiers always erased."""
    scopes = {
        STORED_IN[name]
        for name, var in defs.variables.items()
        if name in STORED_IN and var.classification != "public"
    }
    if any(v.classification != "public" for v in defs.patient_attributes.values()):
        scopes.add("patient attributes")
    return sorted(scopes) + list(ALWAYS_ERASED)


# --- the register --------------------------------------------------------------------------


def add_request(
    *,
    session: Session,
    kind: str,
    external_id: str,
    received_at: datetime,
    actor: str,
    now: datetime,
    note: str | None = None,
) -> m.RightsRequest:
    """Register a request received at `received_at`; audited ("rights_request_added")."""
    if kind not in KINDS:
        raise RequestProblem(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    if received_at > now:
        raise RequestProblem("a request cannot be received in the future")
    queries.require_patient(session, external_id)
    row = m.RightsRequest(
        kind=kind,
        patient_external_id=external_id,
        received_at=received_at,
        due_at=due_date(received_at),
        status="open",
        note=note,
    )
    session.add(row)
    session.flush()
    audit.record(
        session=session,
        actor=actor,
        action="rights_request_added",
        subject=f"patient:{external_id}",
        details={"request": row.id, "kind": kind, "due": row.due_at.date().isoformat()},
        now=now,
    )
    return row


def list_requests(*, session: Session, status_: str | None = None) -> list[m.RightsRequest]:
    """Open requests first by due date, then the rest, newest first."""
    r = m.RightsRequest
    stmt = select(r)
    if status_ is not None:
        stmt = stmt.where(r.status == status_)
    rows = list(session.scalars(stmt.order_by(r.due_at, r.id)))
    return [x for x in rows if x.status == "open"] + sorted(
        (x for x in rows if x.status != "open"), key=lambda x: x.id, reverse=True
    )


def refuse_request(
    *, session: Session, request_id: int, reason: str, actor: str, now: datetime
) -> m.RightsRequest:
    """Close an open request without acting on it (e.g. the requester's identity could not
    be verified, GDPR Art. 12(6)); the reason is kept and the refusal audited."""
    row = session.get(m.RightsRequest, request_id, with_for_update=True)
    if row is None:
        raise RequestProblem(f"no request #{request_id}")
    if row.status != "open":
        raise RequestProblem(f"request #{request_id} is already {row.status}")
    if not reason.strip():
        raise RequestProblem("say why the request is refused (the requester must be told)")
    row.status, row.completed_at, row.handled_by = "refused", now, actor
    row.note = f"{row.note + '; ' if row.note else ''}refused: {reason.strip()}"
    session.flush()
    audit.record(
        session=session,
        actor=actor,
        action="rights_request_refused",
        subject=f"patient:{row.patient_external_id}",
        details={"request": row.id, "kind": row.kind},
        now=now,
    )
    return row


def _close_request(
    session: Session, *, kind: str, external_id: str, actor: str, now: datetime
) -> m.RightsRequest:
    """Mark the oldest open request of this kind done, or register one received now."""
    r = m.RightsRequest
    row = session.scalar(
        select(r)
        .where(r.kind == kind, r.patient_external_id == external_id, r.status == "open")
        .order_by(r.received_at, r.id)
        .limit(1)
    )
    if row is None:
        row = m.RightsRequest(
            kind=kind,
            patient_external_id=external_id,
            received_at=now,
            due_at=due_date(now),
            status="open",
        )
        session.add(row)
    row.status, row.completed_at, row.handled_by = "done", now, actor
    session.flush()
    return row


# --- erasure -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Erasure:
    external_id: str
    request_id: int
    counts: Mapping[str, int]
    suppressed: bool


def _live_patient(session: Session, external_id: str, *, lock: bool = False) -> m.Patient:
    stmt = select(m.Patient).where(m.Patient.external_id == external_id)
    if lock and session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    row = session.scalar(stmt)
    if row is None:
        raise UnknownPatient(external_id)
    if row.erased_at is not None:
        raise PatientErased(external_id)
    return row


def erase_patient(
    *,
    session: Session,
    keyring: Keyring,
    defs: DefinitionSet,
    external_id: str,
    actor: str,
    now: datetime,
) -> Erasure:
    """Erase one patient (GDPR Art. 17); UnknownPatient or PatientErased change nothing."""
    patient = _live_patient(session, external_id, lock=True)
    pid = patient.id
    suppressed = _keep_opt_out(session, keyring, patient)
    counts = {
        "cancelled": _cancel_pending(session, pid, now),
        **_delete_records(session, pid),
        **_null_ciphertexts(session, pid),
    }
    patient.given_name_enc = patient.family_name_enc = None
    patient.phone_enc = patient.birth_date_enc = patient.attributes_enc = None
    patient.phone_index, patient.timezone, patient.candidate_timezones = None, None, ""
    patient.region, patient.allow_phi_sms = None, False
    patient.erased_at = patient.updated_at = now
    session.execute(
        update(m.PatientKey)
        .where(m.PatientKey.patient_id == pid)
        .values(wrapped_key=None, destroyed_at=now)
    )
    request = _close_request(session, kind="erasure", external_id=external_id, actor=actor, now=now)
    audit.record(
        session=session,
        actor=actor,
        action="patient_erased",
        subject=f"patient:{external_id}",
        details={
            "request": request.id,
            "suppressed": suppressed,
            "erased": erasable_scopes(defs),
            **counts,
        },
        now=now,
    )
    return Erasure(external_id, request.id, counts, suppressed)


def _keep_opt_out(session: Session, keyring: Keyring, patient: m.Patient) -> bool:
    """Suppress the number (by blind index) when the patient's last word on any purpose was
    an opt-out keyword or a carrier opt-out: after erasure that number stays unmessaged
    (47 CFR 64.1200(a)(10)). True when the number is suppressed afterwards."""
    if patient.phone_index is None:
        return False
    if consent_queries.suppressed_indexes(session=session, phone_indexes=[patient.phone_index]):
        return True
    events = consent_queries.consent_events_for(
        session=session, keyring=keyring, patient_id=patient.id
    )
    latest: dict[str, Any] = {}
    for event in sorted(events, key=lambda e: e.occurred_at):
        latest[event.purpose] = event
    if not any(e.status == "revoked" and e.method in KEYWORD_METHODS for e in latest.values()):
        return False
    consent_queries.suppress_phone_index(
        session=session, phone_index=patient.phone_index, reason=ERASED_REASON
    )
    return True


def _cancel_pending(session: Session, pid: int, now: datetime) -> int:
    o = m.Outbox
    reason = {
        "rule": ERASED_REASON,
        "policy": "engage",
        "effect": "deny",
        "message": "the patient's data was erased",
        "cite": "GDPR Art. 17",
    }
    stmt = select(o).where(o.patient_id == pid, withdrawable())
    if session.get_bind().dialect.name == "postgresql":  # against the send gate's mark
        stmt = stmt.with_for_update(of=o)
    rows = list(session.scalars(stmt))
    for row in rows:
        row.status, row.decided_at = status.CANCELLED, now
        row.reasons = [*row.reasons, reason]
    return len(rows)


def _delete_records(session: Session, pid: int) -> dict[str, int]:
    """Prescriptions, appointments (medication, visit kind, provider: PHI in clear), the
    patient's scheduling links and inbound texts (the number's blind index and the text)."""
    counts = {}
    for name, model in (
        ("prescriptions", m.Prescription),
        ("appointments", m.Appointment),
        ("scheduling_links", m.SchedulingLink),
        ("inbound_messages", m.InboundMessage),
    ):
        result = session.execute(delete(model).where(model.patient_id == pid))
        counts[name] = result.rowcount or 0
    return counts


def _null_ciphertexts(session: Session, pid: int) -> dict[str, int]:
    """Message bodies (and provider errors, which may quote the number) go; the decisions and
    their reasons stay as the record of what was sent and why."""
    o = m.Outbox
    result = session.execute(
        update(o)
        .where(o.patient_id == pid, o.body_enc.is_not(None) | o.last_error.is_not(None))
        .values(body_enc=None, last_error=None)
        .execution_options(synchronize_session=False)
    )
    return {"message_bodies": result.rowcount or 0}


# --- access export -------------------------------------------------------------------------


def export_patient(
    *, session: Session, keyring: Keyring, external_id: str, actor: str, now: datetime
) -> dict[str, Any]:
    """Everything held on one patient as one JSON-able document (GDPR Art. 15); audited.

    UnknownPatient or PatientErased (nothing can be read back) write nothing."""
    patient = _live_patient(session, external_id)
    cipher = queries.cipher_for(session=session, keyring=keyring, patient=patient)
    document = rights_export.patient_document(session=session, patient=patient, cipher=cipher)
    request = _close_request(session, kind="access", external_id=external_id, actor=actor, now=now)
    document["exported_at"] = now
    document["rights_requests"] = rights_export.requests_of(
        session=session, external_id=external_id
    )
    audit.record(
        session=session,
        actor=actor,
        action="patient_exported",
        subject=f"patient:{external_id}",
        details={
            "request": request.id,
            "messages": len(document["messages"]),
            "consent_events": len(document["consent_events"]),
        },
        now=now,
    )
    return rights_export.jsonable(document)
