"""The API's request and response shapes (pydantic). The OpenAPI document is generated from
these same classes (engine.web.api.openapi), so what is documented is what is validated and
what is answered.

Requests forbid unknown fields; strings that end up in clear columns refuse control
characters (PostgreSQL cannot store NUL, and no identifier or method name has one).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from engine.core.domain import LegalBasis
from engine.defmodels import ID_PATTERN
from engine.outbox_status import FINAL, WAITING

STATUSES = tuple(sorted({*WAITING, *FINAL, "sending"}))
EXTERNAL_ID_PATTERN = r"^[^\u0000-\u001F\u007F]{1,64}$"
LINE_PATTERN = r"^[^\u0000-\u001F\u007F]*$"
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,24}$"

Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
ExternalId = Annotated[
    str, Field(pattern=EXTERNAL_ID_PATTERN, description="The patient's external id (EHR id).")
]
Line = Annotated[str, Field(pattern=LINE_PATTERN)]
IsoTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
Outcome = Literal["allow", "defer", "deny"]
# Beyond these, schedules and time zones stop making sense (and datetimes overflow).
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
Status = Literal[STATUSES]  # type: ignore[valid-type]


def _in_utc(value: datetime) -> datetime:
    try:
        moment = value.astimezone(UTC)
    except OverflowError:
        raise ValueError("this time is out of range") from None
    if not EARLIEST <= moment < LATEST:
        raise ValueError("give a time from 1970 to 2099")
    return moment


UtcTime = Annotated[AwareDatetime, AfterValidator(_in_utc)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- query strings -------------------------------------------------------------------------


class PageQuery(Request):
    limit: int = Field(50, ge=1, le=200, description="Items per page.")
    cursor: str | None = Field(
        None, pattern=CURSOR_PATTERN, description="`next_cursor` of the previous page."
    )


class PatientQuery(PageQuery):
    external_id: ExternalId | None = None


class DecisionQuery(PageQuery):
    campaign: Identifier | None = None
    outcome: Outcome | None = None
    rule: Identifier | None = Field(None, description="The rule a row is blocked or held by.")
    patient: ExternalId | None = Field(None, description="Needs the patients.view permission.")


class MessageQuery(PageQuery):
    status: Status | None = None
    campaign: Identifier | None = None


# --- request bodies ------------------------------------------------------------------------


class ConsentRequest(Request):
    """One consent event, recorded as `engage consent grant|revoke` records it."""

    patient: ExternalId
    purpose: Identifier = Field(description="A purpose of policies/purposes.yaml.")
    status: Literal["granted", "revoked"]
    legal_basis: LegalBasis | None = Field(
        None, validate_default=True, description="Required to grant; never given to revoke."
    )
    method: Annotated[Line, Field(min_length=1, max_length=64, examples=["web_form"])]
    notice_version: Annotated[Line, Field(max_length=64)] | None = None
    evidence: Annotated[str, Field(max_length=2000)] | None = Field(
        None, description="What proves it (stored encrypted, never returned)."
    )
    occurred_at: UtcTime | None = Field(None, description="Default: now.")

    @field_validator("legal_basis")
    @classmethod
    def _basis_matches_status(cls, value: str | None, info: ValidationInfo) -> str | None:
        status = info.data.get("status")
        if status == "granted" and value is None:
            raise ValueError("a legal basis is required to grant consent")
        if status == "revoked" and value is not None:
            raise ValueError("a revocation has no legal basis")
        return value


class DryRunRequest(Request):
    at: UtcTime | None = Field(None, description="Decide as of this time (default: now).")
    limit: int = Field(100, ge=0, le=1000, description="Decisions listed (all are counted).")


# --- answers -------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    status: int
    field: str = Field(description="The request field at fault, or what failed.")
    message: str


class ErrorAnswer(BaseModel):
    error: ErrorBody


class ConsentState(Answer):
    active: bool
    legal_basis: str | None
    method: str | None
    granted_at: datetime | None
    revoked_at: datetime | None


class PatientSummary(Answer):
    external_id: str
    locale: str
    timezone: str | None
    country: str
    region: str | None
    suppressed: bool = Field(description="The number is on the suppression list.")
    erased: bool
    consent: dict[str, ConsentState] = Field(description="Current consent by purpose.")


class PatientDetail(PatientSummary):
    candidate_timezones: list[str]
    allow_phi_sms: bool
    created_at: datetime
    updated_at: datetime
    erased_at: datetime | None


class PatientPage(Answer):
    items: list[PatientSummary]
    next_cursor: str | None


class ConsentEventOut(Answer):
    id: int
    purpose: str
    status: str
    channel: str
    legal_basis: str | None
    method: str | None
    notice_version: str | None
    occurred_at: datetime
    recorded_at: datetime
    recorded_by: str | None


class ConsentRecorded(Answer):
    patient: str
    event: ConsentEventOut
    consent: dict[str, ConsentState]


class CampaignSummary(Answer):
    id: str
    name: str
    purpose: str
    template: str
    anchor: str
    version: str
    status: str = Field(description="As the campaign file says: active or paused.")
    paused: bool = Field(description="Paused by an operator (not planned nor dispatched).")


class RuleCount(Answer):
    status: str
    rule: str
    count: int


class ErrorCount(Answer):
    error_code: int | None
    count: int


class CampaignDetail(CampaignSummary):
    counts: dict[str, int] = Field(description="Outbox rows by status.")
    by_rule: list[RuleCount] = Field(description="Rows not sent, by the rule they are down to.")
    failed_by_error: list[ErrorCount]


class CampaignList(Answer):
    items: list[CampaignSummary]


class CampaignControl(CampaignSummary):
    changed: bool = Field(description="False when it already was paused (or running).")


class Reason(BaseModel):
    """Why a rule allowed, deferred or denied (more fields may be added)."""

    model_config = ConfigDict(extra="allow")
    rule: str
    policy: str | None = None
    effect: str
    message: str | None = None
    cite: str | None = None


class DryRunDecision(BaseModel):
    """One entry of `engage dry-run --json`'s decisions (more fields may be added)."""

    model_config = ConfigDict(extra="allow")
    patient: str | None = Field(description="Only for tokens with patients.view, else null.")
    occurrence: str = Field(
        description="anchor/label; the label alone for tokens without patients.view."
    )
    idempotency_key: str
    due_at: IsoTime
    outcome: Outcome
    send_at: IsoTime | None
    template: str
    template_version: str
    approved: bool
    locale: str
    segments: int | None
    encoding: str | None
    text: str | None
    reasons: list[Reason]


class DryRunSummary(BaseModel):
    model_config = ConfigDict(extra="allow")
    allow: int
    defer: int
    deny: int
    by_rule: dict[str, int]
    patients: int
    in_audience: int
    audience_errors: int
    unapproved_templates: list[str]


class DryRunReport(BaseModel):
    """The object `engage dry-run --json` prints, with `decisions` cut to the asked limit."""

    model_config = ConfigDict(extra="allow")
    campaign: str
    campaign_version: str
    policy_set: str
    definitions: str
    at: IsoTime
    decisions: list[DryRunDecision]
    summary: DryRunSummary
    truncated: bool = Field(description="More decisions were made than listed.")


class DecisionOut(Answer):
    id: int
    campaign: str
    campaign_version: str
    purpose: str
    occurrence: str
    patient: str | None = Field(description="Only for tokens with patients.view, else null.")
    anchor: str | None = Field(description="Only for tokens with patients.view, else null.")
    outcome: str
    status: str
    deciding_rule: str | None = Field(description="For blocked, deferred, expired, cancelled.")
    due_at: datetime
    send_at: datetime | None
    decided_at: datetime | None
    policy_set: str | None
    template: str | None
    template_version: str | None
    locale: str | None
    reasons: list[Reason]


class DecisionPage(Answer):
    items: list[DecisionOut]
    next_cursor: str | None


class MessageOut(Answer):
    id: int
    campaign: str
    status: str
    provider_status: str | None
    segments: int | None
    encoding: str | None
    send_at: datetime | None
    sent_at: datetime | None
    error_code: int | None
    attempts: int


class MessagePage(Answer):
    items: list[MessageOut]
    next_cursor: str | None


def reasons_of(stored: list[Any] | None) -> list[Reason]:
    """An outbox row's stored reasons (dicts written by the planner and dispatcher)."""
    return [
        Reason(
            rule=str(r.get("rule")),
            policy=r.get("policy"),
            effect=str(r.get("effect")),
            message=r.get("message"),
            cite=r.get("cite"),
        )
        for r in stored or []
        if isinstance(r, dict)
    ]
