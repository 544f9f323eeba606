"""Between rows and the domain: which columns are sealed, under which field names.

The field name is the associated data of each ciphertext (with the patient's external
id, see engine.crypto.PatientCipher), so it must never change for stored data.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any, Literal

from engine.core import domain
from engine.core.frozen import fast_init
from engine.crypto import Keyring, PatientCipher
from engine.store import models as m

EVIDENCE_FIELD = "consent/evidence"
Change = Literal["imported", "updated", "unchanged", "erased", "conflict"]
ConsentKey = tuple[int, str, str, datetime]


class UnknownPatient(LookupError):
    def __init__(self, external_id: str) -> None:
        super().__init__(f"unknown patient {external_id}")
        self.external_id = external_id


class PatientErased(LookupError):
    def __init__(self, external_id: str) -> None:
        super().__init__(f"patient {external_id} has been erased")
        self.external_id = external_id


@fast_init
@dataclass(frozen=True)
class PatientData:
    """One patient with their prescriptions and appointments, as iter_patients yields it."""

    id: int
    patient: domain.Patient
    prescriptions: tuple[domain.Prescription, ...] = ()
    appointments: tuple[domain.Appointment, ...] = ()
    cipher: PatientCipher | None = None
    """The unwrapped data key that opened them (to seal what is written for the patient)."""


@fast_init
@dataclass(frozen=True)
class PatientRecord:
    """A patient to store: the domain view plus the E.164 phone the core never sees."""

    patient: domain.Patient
    phone: str | None


@dataclass(frozen=True)
class SlotRecord:
    slot_id: str
    kind: str
    starts_at: datetime
    duration_min: int = 30
    provider: str = ""
    location: str = ""


def medication_field(rx_id: str) -> str:
    return f"prescription/{rx_id}/medication"


def seal_patient(row: m.Patient, cipher: PatientCipher, record: PatientRecord) -> None:
    """Write `record` into `row`, sealing names, phone, birth date and attributes."""
    p = record.patient
    row.given_name_enc = cipher.encrypt_field("given_name", p.given_name)
    row.family_name_enc = cipher.encrypt_field("family_name", p.family_name)
    row.phone_enc = cipher.encrypt_field("phone", record.phone)
    birth = p.birth_date.isoformat() if p.birth_date else None
    row.birth_date_enc = cipher.encrypt_field("birth_date", birth)
    attrs = json.dumps(dict(p.attributes), sort_keys=True) if p.attributes else None
    row.attributes_enc = cipher.encrypt_field("attributes", attrs)
    row.timezone = p.timezone
    row.candidate_timezones = ",".join(p.candidate_timezones)
    row.locale, row.country, row.region = p.locale, p.country, p.region
    row.allow_phi_sms = p.allow_phi_sms


def candidate_zones(stored: str | None) -> tuple[str, ...]:
    """The zones a number maps to, as stored (comma-separated)."""
    if not stored:
        return ()
    return tuple(z for z in stored.split(",") if z)


SEALED_FIELDS = frozenset({"given_name", "family_name", "birth_date", "attributes", "medication"})
"""The sealed fields a reader may ask for (the phone is asked for apart)."""


def open_patient(
    row: Any,
    cipher: PatientCipher,
    *,
    with_phone: bool = True,
    sealed: Collection[str] = SEALED_FIELDS,
) -> PatientRecord:
    """The decrypted patient from an ORM row or a Core row of the patients table; the phone
    stays sealed unless asked for, and so do the fields not in `sealed` (left empty: for a
    reader that never looks at them, as a planner whose templates use no family name)."""
    phone = cipher.decrypt_field("phone", row.phone_enc) if with_phone else None
    return PatientRecord(patient=patient_of(row, cipher, sealed=sealed), phone=phone)


def patient_of(
    row: Any, cipher: PatientCipher, *, sealed: Collection[str] = SEALED_FIELDS
) -> domain.Patient:
    """open_patient's patient alone (the phone stays sealed): what streams read."""
    open_ = cipher.decrypt_field
    birth = open_("birth_date", row.birth_date_enc) if "birth_date" in sealed else None
    attrs = open_("attributes", row.attributes_enc) if "attributes" in sealed else None
    given = open_("given_name", row.given_name_enc) if "given_name" in sealed else None
    family = open_("family_name", row.family_name_enc) if "family_name" in sealed else None
    return domain.Patient(
        external_id=row.external_id,
        timezone=row.timezone,
        candidate_timezones=candidate_zones(row.candidate_timezones),
        locale=row.locale,
        country=row.country,
        region=row.region,
        birth_date=date.fromisoformat(birth) if birth else None,
        allow_phi_sms=row.allow_phi_sms,
        given_name=given or "",
        family_name=family or "",
        attributes=json.loads(attrs) if attrs else {},
    )


def seal_prescription(row: m.Prescription, cipher: PatientCipher, rx: domain.Prescription) -> None:
    row.medication_enc = cipher.encrypt_field(medication_field(rx.rx_id), rx.medication)
    row.medication_class, row.refill_due, row.status = rx.medication_class, rx.refill_due, rx.status


def open_prescription(
    row: Any, cipher: PatientCipher, *, sealed: Collection[str] = SEALED_FIELDS
) -> domain.Prescription:
    """The prescription; its medication stays sealed (empty) unless in `sealed`."""
    medication = None
    if "medication" in sealed:
        medication = cipher.decrypt_field(medication_field(row.rx_id), row.medication_enc)
    return domain.Prescription(
        rx_id=row.rx_id,
        medication=medication or "",
        medication_class=row.medication_class,
        refill_due=row.refill_due,
        status=row.status,
    )


def set_appointment(row: m.Appointment, appt: domain.Appointment) -> None:
    row.starts_at, row.kind, row.status = appt.starts_at, appt.kind, appt.status
    row.provider, row.location = appt.provider, appt.location


def to_appointment(row: Any) -> domain.Appointment:
    return domain.Appointment(
        appointment_id=row.appointment_id,
        starts_at=row.starts_at,
        kind=row.kind,
        provider=row.provider,
        location=row.location,
        status=row.status,
    )


def set_slot(row: m.Slot, slot: SlotRecord) -> None:
    row.kind, row.starts_at, row.duration_min = slot.kind, slot.starts_at, slot.duration_min
    row.provider, row.location = slot.provider, slot.location


def to_slot(row: m.Slot) -> SlotRecord:
    return SlotRecord(
        slot_id=row.slot_id,
        kind=row.kind,
        starts_at=row.starts_at,
        duration_min=row.duration_min,
        provider=row.provider,
        location=row.location,
    )


def consent_row(
    pid: int, event: domain.ConsentEvent, cipher: PatientCipher, source: str | None
) -> m.ConsentEvent:
    return m.ConsentEvent(
        patient_id=pid,
        purpose=event.purpose,
        channel=event.channel,
        status=event.status,
        legal_basis=event.legal_basis,
        method=event.method,
        notice_version=event.notice_version,
        evidence_enc=cipher.encrypt_field(EVIDENCE_FIELD, event.evidence),
        occurred_at=event.occurred_at,
        recorded_by=event.recorded_by,
        source=source,
    )


def to_consent_event(
    row: m.ConsentEvent, external_id: str, cipher: PatientCipher | None = None
) -> domain.ConsentEvent:
    """The ledger entry; evidence is opened only when a cipher is given."""
    evidence = cipher.decrypt_field(EVIDENCE_FIELD, row.evidence_enc) if cipher else None
    return domain.ConsentEvent(
        patient=external_id,
        purpose=row.purpose,
        status=row.status,  # type: ignore[arg-type]
        occurred_at=row.occurred_at,
        channel=row.channel,
        legal_basis=row.legal_basis,
        method=row.method,
        notice_version=row.notice_version,
        evidence=evidence,
        recorded_by=row.recorded_by,
    )


def write_patient(
    row: m.Patient, cipher: PatientCipher, record: PatientRecord, keyring: Keyring
) -> None:
    seal_patient(row, cipher, record)
    row.phone_index = keyring.phone_index(record.phone) if record.phone else None


def update_patient(
    row: m.Patient, cipher: PatientCipher | None, record: PatientRecord, keyring: Keyring
) -> Change:
    if cipher is None or row.erased_at is not None:
        return "erased"
    current = open_patient(row, cipher)
    record = merge_attributes(record, current.patient.attributes)
    if record == current:
        return "unchanged"
    write_patient(row, cipher, record, keyring)
    return "updated"


def merge_attributes(record: PatientRecord, stored: Mapping[str, Any]) -> PatientRecord:
    attrs = {**stored, **record.patient.attributes}
    attrs = {k: v for k, v in attrs.items() if v is not None}
    return replace(record, patient=replace(record.patient, attributes=attrs))
