"""The domain's plain data: frozen dataclasses shared by the core and the edges.

Nothing here touches a database, the network or the disk. Times are timezone-aware
datetimes in UTC unless a name says "local".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from functools import cached_property
from typing import Any, Literal

from engine.core.frozen import fast_init

Outcome = Literal["allow", "defer", "deny"]
Effect = Literal["allow", "defer", "deny", "skip"]
LegalBasis = Literal["express", "written", "hipaa_authorization", "explicit"]
Classification = Literal["public", "pii", "phi"]
Encoding = Literal["GSM-7", "UCS-2"]

LEGAL_BASES: tuple[str, ...] = ("express", "written", "hipaa_authorization", "explicit")
OUTCOME_RANK: Mapping[str, int] = {"allow": 0, "defer": 1, "deny": 2}


@fast_init
@dataclass(frozen=True)
class Patient:
    """A patient as the core sees them (identifiers already decrypted by the edge)."""

    external_id: str
    timezone: str | None = None
    candidate_timezones: tuple[str, ...] = ()
    locale: str = "en"
    country: str = "US"
    region: str | None = None
    birth_date: date | None = None
    allow_phi_sms: bool = False
    given_name: str = ""
    family_name: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @cached_property  # read several times per occurrence planned
    def zones(self) -> tuple[str, ...]:
        """Every zone the patient may be in: the known one, else each one the number maps to."""
        if self.timezone:
            return (self.timezone,)
        return self.candidate_timezones or ("UTC",)

    def age_on(self, day: date) -> int | None:
        if self.birth_date is None:
            return None
        born = self.birth_date
        return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


@fast_init
@dataclass(frozen=True)
class Prescription:
    rx_id: str
    medication: str
    medication_class: str
    refill_due: date
    status: str = "active"


@fast_init
@dataclass(frozen=True)
class Appointment:
    appointment_id: str
    starts_at: datetime
    kind: str
    provider: str = ""
    location: str = ""
    status: str = "booked"


@fast_init
@dataclass(frozen=True)
class ConsentEvent:
    """One entry of the append-only consent ledger."""

    patient: str
    purpose: str
    status: Literal["granted", "revoked"]
    occurred_at: datetime
    channel: str = "sms"
    legal_basis: str | None = None
    method: str | None = None
    notice_version: str | None = None
    evidence: str | None = None
    recorded_by: str | None = None


@fast_init
@dataclass(frozen=True)
class ConsentState:
    """Current consent for one (patient, purpose, channel), derived from the ledger."""

    purpose: str
    channel: str = "sms"
    active: bool = False
    legal_basis: str | None = None
    method: str | None = None
    granted_at: datetime | None = None
    revoked_at: datetime | None = None


@fast_init
@dataclass(frozen=True)
class SentMessage:
    at: datetime
    purpose: str


@fast_init
@dataclass(frozen=True)
class History:
    """Messages already sent (or committed to be sent) to the patient, newest irrelevant."""

    sent: tuple[SentMessage, ...] = ()

    def count(self, *, since: datetime, purposes: frozenset[str] | None = None) -> int:
        return sum(
            1 for m in self.sent if m.at > since and (purposes is None or m.purpose in purposes)
        )


@fast_init
@dataclass(frozen=True)
class MessageFacts:
    """What a rule may know about the message that would be sent."""

    purpose: str
    campaign: str = ""
    template: str = ""
    locale: str = "en"
    segments: int = 1
    encoding: str = "GSM-7"
    length: int = 0
    contains_phi: bool = False
    has_opt_out_text: bool = False


@fast_init
@dataclass(frozen=True)
class DecisionContext:
    """Everything `policy.decide` looks at."""

    patient: Patient
    consents: Mapping[str, ConsentState]
    message: MessageFacts
    history: History
    now: datetime


# --- rules -----------------------------------------------------------------------------


@fast_init
@dataclass(frozen=True)
class AppliesTo:
    purposes: tuple[str, ...] | None = None
    where: str | None = None


@fast_init
@dataclass(frozen=True)
class Rule:
    """A policy rule. `kind` selects which of the optional parameters are meaningful.

    consent:        legal_bases (any of them suffices; empty means any basis)
    quiet_hours:    window_start, window_end (local wall-clock; allowed window)
    frequency_cap:  limit, window, count_purposes (None: the applies_to purposes, else all)
    expression:     when (CEL boolean; true means the effect applies)
    """

    id: str
    kind: Literal["consent", "quiet_hours", "frequency_cap", "expression"]
    effect: Literal["deny", "defer"]
    policy: str = ""
    description: str = ""
    cite: str | None = None
    message: str | None = None
    applies_to: AppliesTo = AppliesTo()
    legal_bases: tuple[str, ...] = ()
    window_start: time | None = None
    window_end: time | None = None
    limit: int | None = None
    window: timedelta | None = None
    count_purposes: tuple[str, ...] | None = None
    when: str | None = None
    line: int = 0


@fast_init
@dataclass(frozen=True)
class RuleResult:
    """One rule's verdict in a decision's trace."""

    rule: str
    policy: str
    effect: Effect
    message: str
    cite: str | None = None
    defer_until: datetime | None = None


@fast_init
@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    send_at: datetime | None
    trace: tuple[RuleResult, ...]

    @property
    def reasons(self) -> tuple[RuleResult, ...]:
        """The rule results that made the outcome what it is (deny and defer ones)."""
        return tuple(r for r in self.trace if r.effect in ("deny", "defer"))

    @property
    def deciding_rule(self) -> str | None:
        for r in self.trace:
            if r.effect == self.outcome:
                return r.rule
        return None


# --- templates and campaigns --------------------------------------------------------------


@fast_init
@dataclass(frozen=True)
class Template:
    """One locale variant of a message template; `version` is the content hash."""

    id: str
    purpose: str
    locale: str
    body: str
    version: str
    description: str = ""
    file: str = ""
    body_line: int = 1


@fast_init
@dataclass(frozen=True)
class Variable:
    """A template variable declared in policies/data.yaml."""

    name: str
    classification: Classification
    description: str = ""
    max_length: int = 40
    example: str = ""


@fast_init
@dataclass(frozen=True)
class RenderedMessage:
    text: str
    encoding: Encoding
    segments: int
    length: int


@fast_init
@dataclass(frozen=True)
class Schedule:
    """When a campaign's occurrences fall.

    relative:  relative_to ("prescription.refill_due" | "appointment.starts_at"), offsets (days)
    recurring: every ("day" | "week" | "month"), start (a date, or an anchor field), count
    once:      on (a local date)
    All kinds send at `at`, local wall-clock time in the patient's zone.
    """

    kind: Literal["relative", "recurring", "once"]
    at: time
    relative_to: str | None = None
    offsets: tuple[int, ...] = ()
    every: Literal["day", "week", "month"] | None = None
    start: date | str | None = None
    count: int | None = None
    on: date | None = None


@fast_init
@dataclass(frozen=True)
class LinkSettings:
    kind: str
    expires_after: timedelta
    confirmation: str | None = None  # template id of the booking confirmation text


@fast_init
@dataclass(frozen=True)
class Campaign:
    id: str
    name: str
    purpose: str
    template: str
    anchor: Literal["prescription", "appointment", "none"]
    where: str | None
    schedule: Schedule
    expires_after: timedelta
    version: str = ""
    link: LinkSettings | None = None
    status: Literal["active", "paused"] = "active"
    file: str = ""


@fast_init
@dataclass(frozen=True)
class Occurrence:
    """(campaign, patient, anchor record, offset): one message ever, by idempotency_key."""

    campaign: str
    patient: str
    anchor: str
    label: str
    due_at: datetime
    expires_at: datetime
    idempotency_key: str
