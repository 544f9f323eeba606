"""Consent ledger and suppression list queries (keyword-only)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType

from sqlalchemy import Select, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from engine.core import domain
from engine.core.consent import current_consents, fold_latest
from engine.crypto import Keyring
from engine.store import codec
from engine.store import models as m
from engine.store.codec import ConsentKey, PatientErased
from engine.store.queries import (
    chunks,
    ciphers_for,
    existing_rows,
    id_groups,
    require_patient,
)

# --- consent ---------------------------------------------------------------------------------


def record_consent_events(
    *,
    session: Session,
    keyring: Keyring,
    items: Sequence[tuple[int, domain.ConsentEvent]],
    source: str | None = None,
) -> list[m.ConsentEvent]:
    """Append events (by patient row id) to the ledger, sealing the evidence.

    Raises PatientErased, writing nothing, when a patient's key has been destroyed.
    """
    ciphers = ciphers_for(session=session, keyring=keyring, patient_ids=(p for p, _ in items))
    missing = [event.patient for pid, event in items if pid not in ciphers]
    if missing:
        raise PatientErased(missing[0])
    rows = [codec.consent_row(pid, event, ciphers[pid], source) for pid, event in items]
    session.add_all(rows)
    session.flush()
    return rows


def record_consent_event(
    *, session: Session, keyring: Keyring, event: domain.ConsentEvent, source: str | None = None
) -> m.ConsentEvent:
    """Append one event for `event.patient` (an external id); UnknownPatient if none."""
    items = [(require_patient(session, event.patient), event)]
    return record_consent_events(session=session, keyring=keyring, items=items, source=source)[0]


def _ledger(patient_ids: Sequence[int]) -> Select[tuple[m.ConsentEvent, str]]:
    return (
        select(m.ConsentEvent, m.Patient.external_id)
        .join(m.Patient, m.Patient.id == m.ConsentEvent.patient_id)
        .where(m.ConsentEvent.patient_id.in_(patient_ids))
        .order_by(m.ConsentEvent.id)
    )


def consent_events_for(
    *, session: Session, keyring: Keyring, patient_id: int | str
) -> list[domain.ConsentEvent]:
    """The patient's ledger in recorded order; `patient_id` is a row id or an external id.

    Evidence is None once the patient's key has been destroyed.
    """
    pid = require_patient(session, patient_id) if isinstance(patient_id, str) else patient_id
    cipher = ciphers_for(session=session, keyring=keyring, patient_ids=[pid]).get(pid)
    rows = session.execute(_ledger([pid]))
    return [codec.to_consent_event(row, external_id, cipher) for row, external_id in rows]


def current_consents_for(
    *,
    session: Session,
    keyring: Keyring,
    patient_external_id: str,
    purposes: Iterable[str],
    channel: str = "sms",
) -> Mapping[str, domain.ConsentState]:
    """Current consent per purpose, derived from the ledger (engine.core.consent)."""
    events = consent_events_for(session=session, keyring=keyring, patient_id=patient_external_id)
    return current_consents(events, purposes=purposes, channel=channel)


def consent_states_for_many(
    *, session: Session, patient_ids: Sequence[int], purposes: Iterable[str], channel: str = "sms"
) -> dict[int, Mapping[str, domain.ConsentState]]:
    """Current consent for many patients (by row id), one query per group of patients.

    The database orders each ledger as engine.core.consent.fold would (patient, occurrence
    time, then ledger order) and fold_latest folds all of them in one pass. No key is
    unwrapped: states do not need the evidence. Patients without an event share one
    read-only mapping of never-granted states.
    """
    purposes = tuple(purposes)
    e = m.ConsentEvent.__table__.c  # Core columns: rows skip the ORM's loading
    columns = (e.patient_id, e.purpose, e.status, e.occurred_at, e.legal_basis, e.method)
    order = (e.patient_id, e.occurred_at, e.id)
    ledgers: list[tuple[tuple[int, str], str, datetime, str | None, str | None]] = []
    for criterion, wanted in id_groups(session, e.patient_id, patient_ids):
        stmt = select(*columns).where(criterion, e.channel == channel).order_by(*order)
        ledgers += [
            ((pid, purpose), status, at, basis, method)
            for pid, purpose, status, at, basis, method in session.execute(stmt).all()
            if pid in wanted
        ]
    never_states = {p: domain.ConsentState(p, channel) for p in purposes}
    never = MappingProxyType(never_states)
    recorded: dict[int, dict[str, domain.ConsentState]] = {}
    for (pid, purpose), fields in fold_latest(ledgers).items():
        if purpose in never_states:
            states = recorded.get(pid)
            if states is None:
                states = recorded[pid] = dict(never_states)
            states[purpose] = domain.ConsentState(purpose, channel, *fields)
    out: dict[int, Mapping[str, domain.ConsentState]] = dict.fromkeys(patient_ids, never)
    out.update(recorded)
    return out


def consent_keys_for(*, session: Session, patient_ids: Iterable[int]) -> set[ConsentKey]:
    """(patient row id, purpose, status, occurred_at) of every recorded event, for dedup."""
    e = m.ConsentEvent
    keys: set[ConsentKey] = set()
    for chunk in chunks(sorted(set(patient_ids))):
        stmt = select(e.patient_id, e.purpose, e.status, e.occurred_at)
        keys.update(session.execute(stmt.where(e.patient_id.in_(chunk))))
    return keys


# --- suppressions ----------------------------------------------------------------------------


def add_suppression(*, session: Session, keyring: Keyring, e164: str, reason: str) -> bool:
    """Never text this number again; False when it already was suppressed."""
    index = keyring.phone_index(e164)
    return suppress_phone_index(session=session, phone_index=index, reason=reason)


def suppress_phone_index(*, session: Session, phone_index: str, reason: str) -> bool:
    """Suppress by blind index (all erasure keeps); safe against concurrent inserts."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(m.Suppression)
        .values(phone_index=phone_index, reason=reason, created_at=m.utcnow())
        .on_conflict_do_nothing(index_elements=["phone_index"])
        .returning(m.Suppression.id)
    )
    return session.execute(stmt).first() is not None


def is_suppressed(*, session: Session, keyring: Keyring, e164: str) -> bool:
    index = keyring.phone_index(e164)
    return bool(suppressed_indexes(session=session, phone_indexes=[index]))


def suppressed_indexes(*, session: Session, phone_indexes: Iterable[str]) -> set[str]:
    """The suppressed ones among `phone_indexes` (a batch check for planners)."""
    rows = existing_rows(session, (m.Suppression.phone_index,), ((i,) for i in phone_indexes))
    return {key[0] for key in rows}


def suppressed_patients(*, session: Session, patient_ids: Iterable[int]) -> set[int]:
    """Patients whose phone number is on the suppression list (STOP, erasure)."""
    p, s = m.Patient.__table__, m.Suppression.__table__
    found: set[int] = set()
    for criterion, wanted in id_groups(session, p.c.id, patient_ids):
        stmt = select(p.c.id).join_from(p, s, s.c.phone_index == p.c.phone_index).where(criterion)
        found.update(pid for (pid,) in session.execute(stmt) if pid in wanted)
    return found
