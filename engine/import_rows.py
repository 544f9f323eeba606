"""Each kind of import row: validate it into domain records, write batches of them.

A row is a CSV line or a FHIR entry mapped to the same columns. Every check that fails
adds a precise reason quoting the offending value; a row with any reason is rejected
whole. Writers return one outcome per record: a change, or why it was refused.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any, TypeVar
from zoneinfo import available_timezones

import phonenumbers
from phonenumbers import timezone as phone_timezones
from sqlalchemy.orm import Session

from engine.core import domain
from engine.crypto import Keyring
from engine.store import consent_queries, queries
from engine.store.queries import PatientRecord, SlotRecord

T = TypeVar("T")
MAX_ID = 64
MAX_TEXT = 128
TRUE = ("true", "yes", "1")
FALSE = ("false", "no", "0", "")
LOCALE = re.compile(r"^([a-zA-Z]{2,3})(?:[-_]([a-zA-Z]{2}|\d{3}))?$")
REGION = re.compile(r"^[A-Z0-9]{1,3}$")
PRESCRIPTION_STATUSES = ("active", "on-hold", "cancelled", "completed", "entered-in-error")
PRESCRIPTION_STATUSES += ("stopped", "draft", "unknown")
APPOINTMENT_STATUSES = ("proposed", "pending", "booked", "arrived", "fulfilled", "cancelled")
APPOINTMENT_STATUSES += ("noshow", "entered-in-error", "checked-in", "waitlist")


class RowError(ValueError):
    """One thing wrong with one value."""


@lru_cache(maxsize=1)
def iana_zones() -> frozenset[str]:
    return frozenset(available_timezones())


@dataclass
class Fields:
    """The row's values, stripped, collecting every problem rather than the first only."""

    values: Mapping[str, str]
    errors: list[str] = field(default_factory=list)

    def raw(self, name: str) -> str:
        return (self.values.get(name) or "").strip()

    def take(self, name: str, parse: Callable[[str, str], T]) -> T | None:
        raw = self.raw(name)
        if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in raw):
            self.errors.append(f"{name} contains a control character")
            return None
        try:
            return parse(name, raw)
        except RowError as exc:
            self.errors.append(str(exc))
            return None

    def done(self) -> None:
        if self.errors:
            raise RowError("; ".join(self.errors))


def identifier(name: str, raw: str) -> str:
    if not raw:
        raise RowError(f"{name} is empty")
    if len(raw) > MAX_ID:
        raise RowError(f"{name} '{raw[:20]}...' is longer than {MAX_ID} characters")
    return raw


def text(name: str, raw: str) -> str:
    if len(raw) > MAX_TEXT:
        raise RowError(f"{name} is longer than {MAX_TEXT} characters")
    return raw


def required_text(name: str, raw: str) -> str:
    if not raw:
        raise RowError(f"{name} is empty")
    return text(name, raw)


def iso_date(name: str, raw: str) -> date | None:
    if not raw:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError as exc:
        raise RowError(f"{name} '{raw}' is not an ISO date (YYYY-MM-DD)") from exc


def required_date(name: str, raw: str) -> date:
    value = iso_date(name, raw)
    if value is None:
        raise RowError(f"{name} is empty")
    return value


def instant(name: str, raw: str) -> datetime:
    """An ISO 8601 date-time with a UTC offset: a naive time is ambiguous, so refused."""
    if not raw:
        raise RowError(f"{name} is empty")
    try:
        value = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise RowError(f"{name} '{raw}' is not an ISO 8601 date-time") from exc
    if value.tzinfo is None:
        raise RowError(f"{name} '{raw}' has no UTC offset (write e.g. {raw}Z or {raw}-05:00)")
    return value


def boolean(name: str, raw: str) -> bool:
    if raw.lower() in TRUE + FALSE:
        return raw.lower() in TRUE
    raise RowError(f"{name} '{raw}' is not one of true, false, yes, no, 1, 0")


def one_of(choices: Collection[str], default: str | None = None) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if not raw and default is not None:
            return default
        if raw not in choices:
            raise RowError(f"{name} '{raw}' is not one of {', '.join(choices)}")
        return raw

    return parse


def locale(name: str, raw: str) -> str:
    match = LOCALE.match(raw or "en")
    if not match:
        raise RowError(f"{name} '{raw}' is not a language tag like en, es or en-US")
    language, territory = match.groups()
    return language.lower() + (f"-{territory.upper()}" if territory else "")


def region(name: str, raw: str) -> str | None:
    if raw and not REGION.match(raw.upper()):
        raise RowError(f"{name} '{raw}' is not a state or province code like FL or ON")
    return raw.upper() or None


def country(raw: str, phone: str) -> str:
    """ISO 3166-1 alpha-2; when empty, the country of an international (+) number."""
    code = raw.upper()
    if not code and phone.startswith("+"):
        try:
            code = phonenumbers.region_code_for_number(phonenumbers.parse(phone)) or ""
        except phonenumbers.NumberParseException:
            code = ""
    if not code:
        raise RowError("country is empty (give an ISO 3166-1 alpha-2 code such as US)")
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise RowError(f"country '{raw}' is not an ISO 3166-1 alpha-2 country code")
    return code


def phone_number(raw: str, region_code: str) -> phonenumbers.PhoneNumber:
    if not raw:
        raise RowError("phone is empty")
    try:
        number = phonenumbers.parse(raw, region_code)
    except phonenumbers.NumberParseException as exc:
        raise RowError(f"phone '{raw}' is not a valid number for {region_code}") from exc
    if not phonenumbers.is_valid_number(number):
        raise RowError(f"phone '{raw}' is not a valid number for {region_code}")
    return number


def zones(raw: str, number: phonenumbers.PhoneNumber | None) -> tuple[str | None, tuple[str, ...]]:
    """(timezone, candidate zones): the given IANA zone, else the number's zone(s)."""
    if raw:
        if raw not in iana_zones():
            raise RowError(f"timezone '{raw}' is not an IANA time zone name")
        return raw, ()
    if number is None:
        return None, ()
    found = sorted(set(phone_timezones.time_zones_for_number(number)) & iana_zones())
    return (found[0], ()) if len(found) == 1 else (None, tuple(found))


def parse_patient(values: Mapping[str, str], attributes: Collection[str]) -> PatientRecord:
    row = Fields(values)
    external_id = row.take("external_id", identifier)
    code = row.take("country", lambda _n, raw: country(raw, row.raw("phone")))
    number = row.take("phone", lambda _n, raw: phone_number(raw, code)) if code else None
    tz = row.take("timezone", lambda _n, raw: zones(raw, number))
    patient = domain.Patient(
        external_id=external_id or "",
        given_name=row.take("given_name", text) or "",
        family_name=row.take("family_name", text) or "",
        locale=row.take("locale", locale) or "en",
        region=row.take("region", region),
        birth_date=row.take("birth_date", iso_date),
        allow_phi_sms=bool(row.take("allow_phi_sms", boolean)),
        country=code or "",
        timezone=tz[0] if tz else None,
        candidate_timezones=tz[1] if tz else (),
        attributes={name: row.raw(name) or None for name in attributes if name in values},
    )
    row.done()
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return PatientRecord(patient=patient, phone=e164)


def parse_prescription(values: Mapping[str, str]) -> tuple[str, domain.Prescription]:
    row = Fields(values)
    external_id = row.take("external_id", identifier)
    rx = domain.Prescription(
        rx_id=row.take("rx_id", identifier) or "",
        medication=row.take("medication", required_text) or "",
        medication_class=row.take("medication_class", identifier) or "",
        refill_due=row.take("refill_due", required_date) or date.min,
        status=row.take("status", one_of(PRESCRIPTION_STATUSES, "active")) or "",
    )
    row.done()
    return external_id or "", rx


def parse_appointment(values: Mapping[str, str]) -> tuple[str, domain.Appointment]:
    row = Fields(values)
    external_id = row.take("external_id", identifier)
    appt = domain.Appointment(
        appointment_id=row.take("appointment_id", identifier) or "",
        starts_at=row.take("starts_at", instant) or datetime.min,
        kind=row.take("kind", identifier) or "",
        provider=row.take("provider", text) or "",
        location=row.take("location", text) or "",
        status=row.take("status", one_of(APPOINTMENT_STATUSES, "booked")) or "",
    )
    row.done()
    return external_id or "", appt


def parse_consent(
    values: Mapping[str, str], purposes: Collection[str] | None, actor: str
) -> domain.ConsentEvent:
    row = Fields(values)
    event = domain.ConsentEvent(
        patient=row.take("external_id", identifier) or "",
        purpose=row.take("purpose", lambda n, raw: purpose(n, raw, purposes)) or "",
        status=row.take("status", one_of(("granted", "revoked"))) or "granted",  # type: ignore[arg-type]
        legal_basis=row.take("legal_basis", one_of(domain.LEGAL_BASES, "")) or None,
        method=row.take("method", text) or None,
        notice_version=row.take("notice_version", text) or None,
        occurred_at=row.take("occurred_at", instant) or datetime.min,
        recorded_by=actor,
    )
    if event.status == "granted" and not row.raw("legal_basis"):
        row.errors.append("legal_basis is empty (a grant needs one of express, written, ...)")
    row.done()
    return event


def purpose(name: str, raw: str, purposes: Collection[str] | None) -> str:
    if not raw:
        raise RowError(f"{name} is empty")
    if purposes is not None and raw not in purposes:
        raise RowError(f"{name} '{raw}' is not a known purpose ({', '.join(sorted(purposes))})")
    return raw


def positive_int(name: str, raw: str) -> int:
    if not raw:
        return 30
    if not (raw.isascii() and raw.isdigit()) or int(raw) == 0:
        raise RowError(f"{name} '{raw}' is not a positive whole number of minutes")
    return int(raw)


def parse_slot(values: Mapping[str, str]) -> SlotRecord:
    row = Fields(values)
    slot = SlotRecord(
        slot_id=row.take("slot_id", identifier) or "",
        kind=row.take("kind", identifier) or "",
        starts_at=row.take("starts_at", instant) or datetime.min,
        duration_min=row.take("duration_min", positive_int) or 30,
        provider=row.take("provider", text) or "",
        location=row.take("location", text) or "",
    )
    row.done()
    return slot


@dataclass(frozen=True)
class Context:
    """What validating and writing rows of one file depends on."""

    keyring: Keyring
    purposes: Collection[str] | None = None
    attributes: Collection[str] = frozenset()
    actor: str = "import"
    source: str = "import"


# --- writing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    reason: str


Outcome = str | Rejected  # "imported" | "updated" | "unchanged", or why not
Writer = Callable[[Session, list[Any], Context], list[Outcome]]


def _outcome(change: str, external_id: str, conflict: str = "") -> Outcome:
    if change == "erased":
        return Rejected(f"patient {external_id} has been erased")
    if change == "conflict":
        return Rejected(conflict)
    return change


def _unknown(external_id: str) -> Rejected:
    return Rejected(f"unknown patient {external_id}")


def write_patients(session: Session, items: list[Any], context: Context) -> list[Outcome]:
    changes = queries.upsert_patients(session=session, keyring=context.keyring, records=items)
    return [_outcome(c, r.patient.external_id) for c, r in zip(changes, items, strict=True)]


def _for_known_patients(
    session: Session,
    items: list[tuple[str, Any]],
    write: Callable[[list[tuple[int, Any]]], list[queries.Change]],
    conflict: Callable[[Any], str] = lambda _record: "",
) -> list[Outcome]:
    """Write the items whose external id is a known patient; reject the others."""
    ids = queries.patient_ids_for(session=session, external_ids=(e for e, _ in items))
    changes = iter(write([(ids[e], record) for e, record in items if e in ids]))
    return [
        _outcome(next(changes), e, conflict(record)) if e in ids else _unknown(e)
        for e, record in items
    ]


def write_prescriptions(session: Session, items: list[Any], context: Context) -> list[Outcome]:
    return _for_known_patients(
        session,
        items,
        lambda known: queries.upsert_prescriptions(
            session=session, keyring=context.keyring, items=known
        ),
    )


def write_appointments(session: Session, items: list[Any], context: Context) -> list[Outcome]:
    return _for_known_patients(
        session,
        items,
        lambda known: queries.upsert_appointments(session=session, items=known),
        lambda appt: f"appointment_id {appt.appointment_id} belongs to another patient",
    )


def write_slots(session: Session, items: list[Any], context: Context) -> list[Outcome]:
    return list(queries.upsert_slots(session=session, slots=items))


def write_consents(session: Session, items: list[Any], context: Context) -> list[Outcome]:
    """Append the events not already in the ledger (same patient, purpose, status, time)."""
    keyring = context.keyring
    ids = queries.patient_ids_for(session=session, external_ids=(e.patient for e in items))
    live = queries.ciphers_for(session=session, keyring=keyring, patient_ids=ids.values())
    seen = consent_queries.consent_keys_for(session=session, patient_ids=live)
    new, outcomes = [], []
    for event in items:
        pid = ids.get(event.patient)
        if pid is None or pid not in live:
            outcomes.append(_outcome("erased", event.patient) if pid else _unknown(event.patient))
            continue
        key = (pid, event.purpose, event.status, event.occurred_at.astimezone(UTC))
        if key in seen:
            outcomes.append("unchanged")
            continue
        seen.add(key)
        new.append((pid, event))
        outcomes.append("imported")
    consent_queries.record_consent_events(
        session=session, keyring=keyring, items=new, source=context.source
    )
    return outcomes


WRITERS: dict[str, Writer] = {
    "patients": write_patients,
    "prescriptions": write_prescriptions,
    "appointments": write_appointments,
    "slots": write_slots,
    "consents": write_consents,
}
