"""Pydantic models of the definition files (campaigns/, templates/, policies/).

They check shape and values; cross-file checks (a campaign's template exists, a rule's
purposes are declared) happen in `engine.definitions`.
"""

from __future__ import annotations

import re
from datetime import date, time, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
RESERVED_CAMPAIGN_IDS = frozenset({"program", "preview"})
_DURATION = re.compile(r"^([+-]?)(\d+)\s*(m|h|d|w)$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(value: Any) -> timedelta:
    """`30m`, `12h`, `-3d`, `2w` -> timedelta."""
    if isinstance(value, timedelta):
        return value
    match = _DURATION.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a duration like 30m, 12h, 3d or 2w")
    sign, amount, unit = match.groups()
    delta = timedelta(**{_UNITS[unit]: int(amount)})
    return -delta if sign == "-" else delta


def parse_time(value: Any) -> time:
    """`"10:00"` -> time. An unquoted 10:00 reaches us as YAML 1.1 sexagesimal 600."""
    if isinstance(value, time):
        return value
    if isinstance(value, int) and 0 <= value < 24 * 60:
        return time(value // 60, value % 60)
    try:
        hours, minutes = str(value).split(":")
        return time(int(hours), int(minutes))
    except ValueError as exc:
        raise ValueError(f'{value!r} is not a time of day like "08:00"') from exc


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
TimeOfDay = Annotated[time, BeforeValidator(parse_time)]
Identifier = Annotated[str, Field(pattern=ID_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PurposeModel(Strict):
    description: str
    category: Literal["healthcare", "marketing", "operational"] = "healthcare"


class PurposesFile(Strict):
    purposes: dict[Identifier, PurposeModel]

    @field_validator("purposes")
    @classmethod
    def _required(cls, value: dict[str, PurposeModel]) -> dict[str, PurposeModel]:
        missing = {"adherence", "appointment", "marketing"} - set(value)
        if missing:
            raise ValueError(f"missing required purposes: {', '.join(sorted(missing))}")
        return value


class VariableModel(Strict):
    classification: Literal["public", "pii", "phi"]
    description: str = ""
    max_length: int = Field(default=40, ge=1, le=1600)
    example: str = ""


class DataFile(Strict):
    variables: dict[str, VariableModel]
    patient_attributes: dict[str, VariableModel] = {}


class ProgramTexts(Strict):
    help: str
    stop: str
    start: str
    opt_out: str = Field(description="the opt-out instruction appended where rules require it")


class ProgramFile(Strict):
    name: str
    support_contact: str
    default_locale: str = "en"
    texts: dict[str, ProgramTexts]

    @model_validator(mode="after")
    def _texts(self) -> ProgramFile:
        if self.default_locale not in self.texts:
            raise ValueError(f"texts has no entry for default_locale {self.default_locale!r}")
        for locale, texts in self.texts.items():
            # CTIA Messaging Principles: HELP names the program and a support contact.
            if self.support_contact not in texts.help:
                raise ValueError(f"texts.{locale}.help must include the support contact")
            if self.name not in texts.help:
                raise ValueError(f"texts.{locale}.help must include the program name")
        return self


class AppliesToModel(Strict):
    purposes: list[Identifier] | None = None
    where: str | None = None


class RuleModel(Strict):
    id: Identifier
    kind: Literal["consent", "quiet_hours", "frequency_cap", "expression"]
    description: str
    effect: Literal["deny", "defer"] = "deny"
    cite: str | None = None
    message: str | None = None
    applies_to: AppliesToModel = AppliesToModel()
    legal_bases: list[Literal["express", "written", "hipaa_authorization", "explicit"]] = []
    window: dict[str, TimeOfDay] | Duration | None = None
    limit: int | None = Field(default=None, ge=0)
    count_purposes: list[Identifier] | None = None
    when: str | None = None

    @model_validator(mode="after")
    def _by_kind(self) -> RuleModel:
        kind = self.kind
        if kind == "quiet_hours" and (
            not isinstance(self.window, dict) or set(self.window) != {"start", "end"}
        ):
            raise ValueError('quiet_hours needs window: {start: "08:00", end: "21:00"}')
        if kind == "frequency_cap" and (
            self.limit is None or not isinstance(self.window, timedelta)
        ):
            raise ValueError("frequency_cap needs limit and window (a duration like 24h or 7d)")
        if kind == "expression" and not self.when:
            raise ValueError("expression needs when (a CEL boolean)")
        if kind != "expression" and self.when:
            raise ValueError(f"when is only for expression rules, not {kind}")
        return self


class PolicyTestModel(Strict):
    name: str
    given: dict[str, Any] = {}
    expect: Literal["allow", "defer", "deny"] | dict[str, Any]

    @field_validator("expect")
    @classmethod
    def _expect(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if value.get("outcome") not in ("allow", "defer", "deny"):
                raise ValueError("expect.outcome must be allow, defer or deny")
            unknown = set(value) - {"outcome", "rule"}
            if unknown:
                raise ValueError(f"expect has unknown keys: {', '.join(sorted(unknown))}")
        return value


class PolicyFile(Strict):
    id: Identifier
    description: str
    cite: str | None = None
    rules: list[RuleModel] = Field(min_length=1)
    tests: list[PolicyTestModel] = []


class TemplateFront(Strict):
    id: Identifier
    purpose: Identifier
    locale: Annotated[str, Field(pattern=r"^[a-z]{2}(-[A-Z]{2})?$")]
    description: str = ""


class AudienceModel(Strict):
    anchor: Literal["prescription", "appointment", "none"] = "none"
    where: str | None = None


class ScheduleModel(Strict):
    at: TimeOfDay
    relative_to: Literal["prescription.refill_due", "appointment.starts_at"] | None = None
    offsets: list[Duration] = []
    every: Literal["day", "week", "month"] | None = None
    start: date | Literal["prescription.refill_due", "appointment.starts_at"] | None = None
    count: int | None = Field(default=None, ge=1, le=366)
    on: date | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleModel:
        kinds = [k for k in ("relative_to", "every", "on") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a schedule has exactly one of relative_to, every or on")
        if self.relative_to and not self.offsets:
            raise ValueError("relative_to needs offsets, e.g. [-3d, 0d]")
        if any(o % timedelta(days=1) for o in self.offsets):
            raise ValueError("offsets are whole days, e.g. -3d")
        if self.every and (self.start is None or self.count is None):
            raise ValueError("every needs start (a date or an anchor field) and count")
        return self

    @property
    def kind(self) -> str:
        return "relative" if self.relative_to else "recurring" if self.every else "once"


class LinkModel(Strict):
    kind: str
    expires_after: Duration = timedelta(days=7)
    # The template of the text confirming a booking made from the link (same purpose).
    confirmation: Identifier | None = None


class CampaignFile(Strict):
    id: Identifier
    name: str
    description: str = ""
    purpose: Identifier
    template: Identifier
    audience: AudienceModel = AudienceModel()
    schedule: ScheduleModel
    expires_after: Duration
    link: LinkModel | None = None
    status: Literal["active", "paused"] = "active"

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        # "program" rows are the engine's own replies to STOP/START/HELP (engine.inbound),
        # which the dispatcher sends without the consent re-check.
        if value in RESERVED_CAMPAIGN_IDS:
            raise ValueError(f"campaign id {value!r} is reserved by the engine")
        return value

    @model_validator(mode="after")
    def _anchor_fits(self) -> CampaignFile:
        wanted = self.schedule.relative_to or (
            self.schedule.start if isinstance(self.schedule.start, str) else None
        )
        if wanted and not wanted.startswith(self.audience.anchor + "."):
            raise ValueError(
                f"schedule uses {wanted} but audience.anchor is {self.audience.anchor}"
            )
        if self.expires_after <= timedelta(0):
            raise ValueError("expires_after must be positive")
        return self


# --- policies/retention.yaml -----------------------------------------------------------------

_PERIOD = re.compile(r"^(\d+)\s*(d|w|y)$")
# A year counts 366 days, so a period in years never ends before the law's.
_PERIOD_DAYS = {"d": 1, "w": 7, "y": 366}
HIPAA_DOCUMENTATION = timedelta(days=6 * 366)  # 45 CFR 164.316(b)(2)(i): six years


def parse_period(value: Any) -> timedelta:
    """`90d`, `52w`, `6y` -> timedelta (a year is 366 days)."""
    if isinstance(value, timedelta):
        return value
    match = _PERIOD.match(str(value).strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{value!r} is not a retention period like 90d, 52w or 6y")
    return timedelta(days=int(match.group(1)) * _PERIOD_DAYS[match.group(2)])


Period = Annotated[timedelta, BeforeValidator(parse_period)]


class RetentionItem(Strict):
    keep: Period
    cite: str = Field(min_length=1, description="the law or rule that sets the period")
    description: str = ""


class RetentionFile(Strict):
    """How long each kind of record is kept before `engage retention run` purges it."""

    message_bodies: RetentionItem
    inbound_free_text: RetentionItem
    inbound_keyword_text: RetentionItem
    scheduling_links: RetentionItem
    decisions: RetentionItem
    consent_evidence: RetentionItem

    @field_validator("decisions", "consent_evidence")
    @classmethod
    def _hipaa_minimum(cls, value: RetentionItem) -> RetentionItem:
        if value.keep < HIPAA_DOCUMENTATION:
            raise ValueError("must be kept at least 6y (HIPAA 45 CFR 164.316(b)(2)(i))")
        return value
