"""The plain variables behind CEL expressions: the names and fields expressions may use,
and the values of a decision or an audience check (conventions in engine.core.cel_context)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from engine.core.domain import (
    Appointment,
    ConsentState,
    DecisionContext,
    History,
    MessageFacts,
    Patient,
    Prescription,
)
from engine.core.zones import get_zone

Names = Mapping[str, frozenset[str] | None]
"""Top-level name -> the fields it has (None: not a record, no field check)."""

PATIENT_FIELDS = frozenset(
    {"external_id", "age", "country", "region", "timezone", "locale", "allow_phi_sms"}
)
CONSENT_FIELDS = frozenset({"active", "legal_basis", "method", "granted_at"})
MESSAGE_FIELDS = frozenset(
    {"purpose", "campaign", "template", "locale", "segments", "encoding", "length"}
    | {"contains_phi", "has_opt_out_text"}
)
LOCAL_FIELDS = frozenset({"hour", "minute", "weekday", "date"})
HISTORY_FIELDS = frozenset({"sent_24h", "sent_7d", "purpose_24h", "purpose_7d"})
PRESCRIPTION_FIELDS = frozenset({"rx_id", "medication", "medication_class", "refill_due", "status"})
APPOINTMENT_FIELDS = frozenset(
    {"appointment_id", "starts_at", "kind", "provider", "location", "status"}
)

POLICY_NAMES: Names = MappingProxyType(
    {
        "patient": PATIENT_FIELDS,
        "consent": None,
        "message": MESSAGE_FIELDS,
        "local": LOCAL_FIELDS,
        "history": HISTORY_FIELDS,
        "now": None,
    }
)
AUDIENCE_NAMES: Names = MappingProxyType(
    {
        "patient": PATIENT_FIELDS,
        "prescription": PRESCRIPTION_FIELDS,
        "appointment": APPOINTMENT_FIELDS,
        "now": None,
    }
)
RECORD_MAPS: Mapping[str, frozenset[str]] = MappingProxyType({"consent": CONSENT_FIELDS})
"""Maps whose values are records: `consent.<purpose>.<field>` checks <field>."""

DEFAULT_PURPOSES: tuple[str, ...] = ("adherence", "appointment", "marketing")
DAY = timedelta(days=1)
WEEK = timedelta(days=7)


# --- variables ----------------------------------------------------------------------------


def patient_vars(patient: Patient, *, today: date) -> dict[str, Any]:
    return {
        "external_id": patient.external_id,
        "age": patient.age_on(today),
        "country": patient.country,
        "region": patient.region or "",
        "timezone": patient.timezone or "",
        "locale": patient.locale,
        "allow_phi_sms": patient.allow_phi_sms,
    }


PATIENT_SOURCES: Mapping[str, Callable[[Patient, datetime], object]] = MappingProxyType(
    {
        "external_id": lambda p, now: p.external_id,
        "age": lambda p, now: p.age_on(local_today(now, p.zones[0])),
        "country": lambda p, now: p.country,
        "region": lambda p, now: p.region,
        "timezone": lambda p, now: p.timezone,
        "locale": lambda p, now: p.locale,
        "allow_phi_sms": lambda p, now: p.allow_phi_sms,
    }
)
"""What each field of patient_vars derives from at a time: equal sources, equal values
(memos key on these, which cost less than the variables)."""


def consent_vars(consents: Mapping[str, ConsentState], purposes: Iterable[str]) -> dict[str, Any]:
    """Every declared purpose (inactive unless granted) plus any other the patient holds."""
    out: dict[str, Any] = {
        p: {"active": False, "legal_basis": None, "method": None, "granted_at": None}
        for p in purposes
    }
    for purpose, state in consents.items():
        out[purpose] = {
            "active": state.active and state.channel == "sms",
            "legal_basis": state.legal_basis,
            "method": state.method,
            "granted_at": state.granted_at,
        }
    return out


def history_vars(history: History, now: datetime, purposes: Iterable[str]) -> dict[str, Any]:
    """Counts of messages after now-24h and now-7d (messages committed for later count too)."""
    day_cut, week_cut = now - DAY, now - WEEK
    per_day = dict.fromkeys(purposes, 0)
    per_week = dict(per_day)
    sent_24h = sent_7d = 0
    for m in history.sent:
        if m.at > week_cut:
            sent_7d += 1
            per_week[m.purpose] = per_week.get(m.purpose, 0) + 1
            if m.at > day_cut:
                sent_24h += 1
                per_day[m.purpose] = per_day.get(m.purpose, 0) + 1
    per_day.update((p, 0) for p in per_week if p not in per_day)
    return {
        "sent_24h": sent_24h,
        "sent_7d": sent_7d,
        "purpose_24h": per_day,
        "purpose_7d": per_week,
    }


@lru_cache(maxsize=1024)
def local_today(now: datetime, zone: str) -> date:
    """The date in `zone` at `now` (most patients of a tick share a time and a zone)."""
    return now.astimezone(get_zone(zone)).date()


def local_vars(now: datetime, zone: str) -> dict[str, Any]:
    local = now.astimezone(get_zone(zone))
    return {
        "hour": local.hour,
        "minute": local.minute,
        "weekday": local.isoweekday(),
        "date": local.date().isoformat(),
    }


def message_vars(message: MessageFacts) -> dict[str, Any]:
    return {name: getattr(message, name) for name in MESSAGE_FIELDS}


def policy_variables(
    ctx: DecisionContext, *, purposes: Sequence[str] = (), only: Iterable[str] | None = None
) -> dict[str, Any]:
    """The nested variables of a decision (`only`: just these names, to save the work)."""
    zone = ctx.patient.zones[0]
    out: dict[str, Any] = {}
    for name in POLICY_NAMES if only is None else only:
        if name == "now":
            out[name] = ctx.now
        elif name == "patient":
            out[name] = patient_vars(ctx.patient, today=local_today(ctx.now, zone))
        elif name == "consent":
            out[name] = consent_vars(ctx.consents, purposes)
        elif name == "message":
            out[name] = message_vars(ctx.message)
        elif name == "local":
            out[name] = local_vars(ctx.now, zone)
        elif name == "history":
            out[name] = history_vars(ctx.history, ctx.now, purposes)
    return out


def audience_variables(
    patient: Patient, anchor: Prescription | Appointment | None, now: datetime
) -> dict[str, Any]:
    """Variables of a campaign's audience `where`; the anchor that is not this one is null."""
    return dict(LazyAudienceVariables(patient, anchor, now).built())


class LazyAudienceVariables(dict[str, Any]):
    """audience_variables, each variable built when first read (an audience reads one or
    two of them); a patient zone that does not exist fails at once, as it fails there."""

    __slots__ = ("_anchor", "_now", "_patient")

    def __init__(
        self, patient: Patient, anchor: Prescription | Appointment | None, now: datetime
    ) -> None:
        super().__init__()
        self._patient, self._anchor, self._now = patient, anchor, now
        local_today(now, patient.zones[0])

    def built(self) -> LazyAudienceVariables:
        for name in AUDIENCE_NAMES:
            self[name]  # builds it
        return self

    def __missing__(self, name: str) -> Any:
        anchor = self._anchor
        if name == "patient":
            today = local_today(self._now, self._patient.zones[0])
            value: Any = patient_vars(self._patient, today=today)
        elif name == "prescription":
            value = None
            if isinstance(anchor, Prescription):
                rx = {f: getattr(anchor, f) for f in PRESCRIPTION_FIELDS}
                value = rx | {"refill_due": anchor.refill_due.isoformat()}
        elif name == "appointment":
            value = None
            if isinstance(anchor, Appointment):
                value = {f: getattr(anchor, f) for f in APPOINTMENT_FIELDS}
        elif name == "now":
            value = self._now
        else:
            raise KeyError(name)
        self[name] = value
        return value


SAMPLE_NOW = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)


def sample_patient() -> Patient:
    return Patient("sample", "America/New_York", region="NY", birth_date=date(1970, 1, 1))


def sample_policy_variables(purposes: Sequence[str] = DEFAULT_PURPOSES) -> dict[str, Any]:
    """A typical decision's variables, every purpose consented: used to test-run expressions."""
    consents = {
        p: ConsentState(p, active=True, legal_basis="express", granted_at=SAMPLE_NOW - WEEK)
        for p in purposes
    }
    ctx = DecisionContext(
        patient=sample_patient(),
        consents=consents,
        message=MessageFacts(purpose=purposes[0] if purposes else "adherence", length=100),
        history=History(),
        now=SAMPLE_NOW,
    )
    return policy_variables(ctx, purposes=purposes)


def sample_audience_variables() -> dict[str, Any]:
    """Both anchors present, so a `where` on either can be test-run."""
    rx = Prescription("rx-1", "atorvastatin", "statin", SAMPLE_NOW.date() + WEEK)
    appt = Appointment("ap-1", SAMPLE_NOW + WEEK, "follow-up", "Dr. Lee", "Main St")
    out = audience_variables(sample_patient(), rx, SAMPLE_NOW)
    out["appointment"] = audience_variables(sample_patient(), appt, SAMPLE_NOW)["appointment"]
    return out
