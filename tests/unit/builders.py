"""Small builders of core objects for unit tests: sensible defaults, keyword overrides."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from engine.core.domain import (
    AppliesTo,
    ConsentState,
    DecisionContext,
    History,
    MessageFacts,
    Patient,
    Rule,
    SentMessage,
)

NOW = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)
PURPOSES = ("adherence", "appointment", "marketing")


def at(text: str) -> datetime:
    """An aware instant from ISO text ('2026-03-10T15:00:00Z' or with an offset)."""
    return datetime.fromisoformat(text).astimezone(UTC)


def make_patient(**overrides: Any) -> Patient:
    values: dict[str, Any] = {
        "external_id": "p-1",
        "timezone": "America/New_York",
        "country": "US",
        "region": "NY",
        "locale": "en",
        "birth_date": date(1970, 1, 1),
        "allow_phi_sms": False,
    }
    return Patient(**{**values, **overrides})


def make_consent(purpose: str = "adherence", **overrides: Any) -> ConsentState:
    values: dict[str, Any] = {
        "active": True,
        "legal_basis": "express",
        "method": "intake-form",
        "granted_at": NOW - timedelta(days=30),
    }
    return ConsentState(purpose=purpose, **{**values, **overrides})


def make_consents(**bases: str | None) -> dict[str, ConsentState]:
    """make_consents(adherence="express", marketing=None): None means revoked."""
    return {
        purpose: make_consent(purpose, legal_basis=basis)
        if basis
        else make_consent(purpose, active=False, legal_basis=None, granted_at=None)
        for purpose, basis in bases.items()
    }


def make_message(**overrides: Any) -> MessageFacts:
    values: dict[str, Any] = {
        "purpose": "adherence",
        "campaign": "refill-reminder",
        "template": "refill",
        "length": 100,
        "has_opt_out_text": True,
    }
    return MessageFacts(**{**values, **overrides})


def make_history(*sent: tuple[timedelta, str], now: datetime = NOW) -> History:
    """make_history((timedelta(hours=2), "adherence"), ...): messages sent that long ago."""
    return History(sent=tuple(SentMessage(at=now - ago, purpose=p) for ago, p in sent))


def make_context(**overrides: Any) -> DecisionContext:
    """A decision context; `purpose=` is a shortcut for the message's purpose."""
    purpose = overrides.pop("purpose", None)
    values: dict[str, Any] = {
        "patient": make_patient(),
        "consents": make_consents(adherence="express", appointment="express"),
        "message": make_message(**({"purpose": purpose} if purpose else {})),
        "history": History(),
        "now": NOW,
    }
    return DecisionContext(**{**values, **overrides})


def make_rule(**overrides: Any) -> Rule:
    """A rule; `purposes=` and `where=` are shortcuts for applies_to."""
    applies = {k: overrides.pop(k) for k in ("purposes", "where") if k in overrides}
    if applies:
        overrides["applies_to"] = AppliesTo(
            purposes=tuple(applies["purposes"]) if applies.get("purposes") else None,
            where=applies.get("where"),
        )
    values: dict[str, Any] = {
        "id": "consent-required",
        "kind": "consent",
        "effect": "deny",
        "policy": "test",
        "description": "test rule",
    }
    return Rule(**{**values, **overrides})
