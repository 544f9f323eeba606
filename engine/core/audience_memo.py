"""Audience results remembered by the raw facts their `where` reads.

An audience reads a field or two (`patient.age`, `prescription.medication_class`), and a
tick checks it for every patient and anchor record: the result is kept by the facts those
fields derive from (the patient's birth date and zone, the anchor's own fields, the time),
which cost less to collect than the variables. An audience reading anything else is not
remembered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.core.cel_uses import Uses
from engine.core.cel_variables import (
    APPOINTMENT_FIELDS,
    PATIENT_SOURCES,
    PRESCRIPTION_FIELDS,
)
from engine.core.domain import Appointment, Patient, Prescription
from engine.core.memo import keep, recall

MEMO_LIMIT = 4096
Anchor = Prescription | Appointment | None


@dataclass(frozen=True)
class AudienceMemo:
    """How to key one audience's results, and the results so far."""

    patient_fields: tuple[Callable[[Patient, datetime], object], ...]
    prescription_fields: tuple[str, ...]
    appointment_fields: tuple[str, ...]
    results: dict[tuple[Any, ...], bool] = field(default_factory=dict, compare=False)

    def key(self, patient: Patient, anchor: Anchor, now: datetime) -> tuple[Any, ...]:
        if isinstance(anchor, Prescription):
            anchor_facts = tuple([getattr(anchor, f) for f in self.prescription_fields])
        elif isinstance(anchor, Appointment):
            values = [getattr(anchor, f) for f in self.appointment_fields]
            anchor_facts = tuple([(v, getattr(v, "tzinfo", None)) for v in values])
        else:
            anchor_facts = ()
        patient_facts = tuple([source(patient, now) for source in self.patient_fields])
        return (now, now.tzinfo, type(anchor), patient_facts, anchor_facts)

    def remembered(self, key: tuple[Any, ...]) -> bool | None:
        return recall(self.results, key)

    def remember(self, key: tuple[Any, ...], result: bool) -> None:
        keep(self.results, key, result, limit=MEMO_LIMIT)


def audience_memo(uses: Uses) -> AudienceMemo | None:
    """The memo of an audience reading `uses`; None when it reads what cannot be keyed."""
    wanted: dict[str, set[str]] = {"patient": set(), "prescription": set(), "appointment": set()}
    every = {
        "patient": set(PATIENT_SOURCES),
        "prescription": set(PRESCRIPTION_FIELDS),
        "appointment": set(APPOINTMENT_FIELDS),
    }
    for read in uses.reads.values():
        if read.name == "now":
            continue
        if read.name not in wanted or read.index is not None:
            return None
        wanted[read.name].update(read.path[:1] or every[read.name])
    if any(not wanted[name] <= every[name] for name in wanted):
        return None
    return AudienceMemo(
        patient_fields=tuple(PATIENT_SOURCES[f] for f in sorted(wanted["patient"])),
        prescription_fields=tuple(sorted(wanted["prescription"])),
        appointment_fields=tuple(sorted(wanted["appointment"])),
    )
