"""Template variables for one patient and anchor record, formatted in the patient's locale."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from engine.core.domain import Appointment, Patient, Prescription
from engine.core.zones import get_zone

_MONTHS = {
    "en": ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"],
    "es": ["ene", "feb", "mar", "abr", "may", "jun", "jul", "ago", "sep", "oct", "nov", "dic"],
}

PREVIEW_LINK_TOKEN = "PREVIEW-not-a-real-link"
SEALED_SOURCES = {
    "given_name": "given_name",
    "family_name": "family_name",
    "medication": "medication",
}
"""Template variables filled from a sealed field (engine.store.codec), by that field."""
VARIABLES = frozenset(SEALED_SOURCES) | {"program_name", "support_contact", "opt_out", "link"}
VARIABLES |= {"medication_class", "refill_due", "appointment_date", "appointment_time"}
VARIABLES |= {"appointment_kind", "provider", "location"}
"""Every variable template_variables fills."""


def format_date(day: date, language: str) -> str:
    months = _MONTHS.get(language, _MONTHS["en"])
    if language == "en":
        return f"{months[day.month - 1]} {day.day}"
    return f"{day.day} {months[day.month - 1]}"


def format_time(moment: datetime, language: str) -> str:
    if language == "en":
        hour = moment.hour % 12 or 12
        return f"{hour}:{moment.minute:02d} {'AM' if moment.hour < 12 else 'PM'}"
    return f"{moment.hour}:{moment.minute:02d}"


def template_variables(
    *,
    patient: Patient,
    anchor: Prescription | Appointment | None,
    language: str,
    program_name: str,
    support_contact: str,
    opt_out: str,
    link: str | None = None,
) -> dict[str, Any]:
    """Every declared variable this patient and anchor can fill; the rest stay absent."""
    values: dict[str, Any] = {
        "given_name": patient.given_name,
        "family_name": patient.family_name,
        "program_name": program_name,
        "support_contact": support_contact,
        "opt_out": opt_out,
    }
    if link is not None:
        values["link"] = link
    if isinstance(anchor, Prescription):
        values.update(
            medication=anchor.medication,
            medication_class=anchor.medication_class,
            refill_due=format_date(anchor.refill_due, language),
        )
    elif isinstance(anchor, Appointment):
        local = anchor.starts_at.astimezone(get_zone(patient.zones[0]))
        values.update(
            appointment_date=format_date(local.date(), language),
            appointment_time=format_time(local, language),
            appointment_kind=anchor.kind,
            provider=anchor.provider,
            location=anchor.location,
        )
    return values
