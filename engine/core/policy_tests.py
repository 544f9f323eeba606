"""Policy tests: `given` a context in plain data, `expect` an outcome (and rule, send time).

A test in a policy file reads:

    - name: quiet at night in New York
      given:
        now: "2026-03-11T03:00:00Z"
        patient: {timezone: America/New_York}
        consent: {adherence: {active: true, legal_basis: express}}
        message: {purpose: adherence}
        history: {sent: [{ago: 2h, purpose: adherence}]}
      expect: {outcome: defer, rule: quiet-hours, send_at: "2026-03-11T12:00:00Z"}

Everything in `given` is optional; the defaults are a New York adult with no consent,
an adherence message and an empty history at 2026-03-10T15:00:00Z.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any

from engine.core.cel_context import PolicyError
from engine.core.domain import (
    ConsentState,
    Decision,
    DecisionContext,
    History,
    MessageFacts,
    Patient,
    SentMessage,
)
from engine.core.policy import CompiledPolicySet, decide

DEFAULT_NOW = "2026-03-10T15:00:00Z"
PATIENT_DEFAULTS: Mapping[str, Any] = {
    "external_id": "test",
    "timezone": "America/New_York",
    "country": "US",
    "region": "NY",
    "locale": "en",
    "allow_phi_sms": False,
    "birth_date": "1970-01-01",
}
MESSAGE_DEFAULTS: Mapping[str, Any] = {
    "campaign": "test",
    "template": "test",
    "segments": 1,
    "encoding": "GSM-7",
    "length": 100,
    "contains_phi": False,
    "has_opt_out_text": True,
}
OUTCOMES = ("allow", "defer", "deny")
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}


@dataclass(frozen=True)
class PolicyTest:
    name: str
    given: Mapping[str, Any]
    expect_outcome: str
    expect_rule: str | None = None
    line: int = 0
    expect_send_at: datetime | None = None


@dataclass(frozen=True)
class PolicyTestResult:
    name: str
    passed: bool
    message: str
    line: int = 0
    decision: Decision | None = field(default=None, compare=False)


def policy_test_from_mapping(raw: Mapping[str, Any], *, line: int = 0) -> PolicyTest:
    """A test as written in YAML: {name, given, expect: outcome | {outcome, rule?, send_at?}}."""
    name = str(raw.get("name") or f"test at line {line}")
    unknown = sorted(set(raw) - {"name", "given", "expect"})
    if unknown:
        raise PolicyError(f"test {name}: unknown key {unknown[0]!r}", line)
    expect = raw.get("expect")
    if isinstance(expect, str):
        expect = {"outcome": expect}
    if not isinstance(expect, Mapping) or expect.get("outcome") not in OUTCOMES:
        raise PolicyError(f"test {name}: expect needs an outcome: allow, defer or deny", line)
    given = raw.get("given") or {}
    if not isinstance(given, Mapping):
        raise PolicyError(f"test {name}: given must be a mapping", line)
    send_at = expect.get("send_at")
    return PolicyTest(
        name=name,
        given=given,
        expect_outcome=expect["outcome"],
        expect_rule=expect.get("rule"),
        line=line,
        expect_send_at=None if send_at is None else _instant(send_at),
    )


def run_policy_tests(
    policy_set: CompiledPolicySet, tests: Sequence[PolicyTest]
) -> list[PolicyTestResult]:
    return [_run(policy_set, test) for test in tests]


def _run(policy_set: CompiledPolicySet, test: PolicyTest) -> PolicyTestResult:
    try:
        ctx = context_from_given(test.given, purposes=policy_set.purposes)
    except (LookupError, TypeError, ValueError) as exc:  # PolicyError is a ValueError
        return PolicyTestResult(test.name, False, f"invalid given: {exc}", test.line)
    decision = decide(policy_set, ctx)
    expected = _describe(test.expect_outcome, test.expect_rule, test.expect_send_at)
    got = _describe(decision.outcome, decision.deciding_rule, decision.send_at)
    passed = (
        decision.outcome == test.expect_outcome
        and test.expect_rule in (None, decision.deciding_rule)
        and test.expect_send_at in (None, decision.send_at)
    )
    if passed:
        return PolicyTestResult(test.name, True, f"{got} as expected", test.line, decision)
    reasons = "; ".join(f"{r.rule}: {r.message}" for r in decision.reasons) or "no reasons"
    message = f"expected {expected}, got {got} ({reasons})"
    return PolicyTestResult(test.name, False, message, test.line, decision)


def _describe(outcome: str, rule: str | None, send_at: datetime | None) -> str:
    text = outcome
    if rule:
        text += f" by {rule}"
    if send_at is not None and outcome == "defer":
        text += f" until {send_at.astimezone(UTC):%Y-%m-%dT%H:%M:%S}Z"
    return text


# --- given -> DecisionContext -------------------------------------------------------------


def context_from_given(given: Mapping[str, Any], *, purposes: Sequence[str]) -> DecisionContext:
    """The DecisionContext a test describes, defaults filled in (see the module docstring)."""
    _only(given, {"now", "patient", "consent", "message", "history"}, "given")
    now = _instant(given.get("now", DEFAULT_NOW))
    return DecisionContext(
        patient=_patient(given.get("patient") or {}),
        consents=_consents(given.get("consent") or {}, now),
        message=_message(given.get("message") or {}, purposes),
        history=_history(given.get("history") or {}, now),
        now=now,
    )


def _patient(raw: Mapping[str, Any]) -> Patient:
    _only(raw, {f.name for f in fields(Patient)}, "patient")
    values = {**PATIENT_DEFAULTS, **raw}
    birth = values.get("birth_date")
    if isinstance(birth, str):
        values["birth_date"] = date.fromisoformat(birth)
    values["candidate_timezones"] = tuple(values.get("candidate_timezones") or ())
    return Patient(**values)


def _consents(raw: Mapping[str, Any], now: datetime) -> dict[str, ConsentState]:
    allowed = {"active", "channel", "legal_basis", "method", "granted_at", "revoked_at"}
    out = {}
    for purpose, entry in raw.items():
        entry = entry if isinstance(entry, Mapping) else {"active": bool(entry)}
        _only(entry, allowed, f"consent.{purpose}")
        values = dict(entry)
        for key in ("granted_at", "revoked_at"):
            if values.get(key) is not None:
                values[key] = _instant(values[key])
        if values.get("active") and values.get("granted_at") is None:
            values["granted_at"] = now - timedelta(days=30)
        out[purpose] = ConsentState(purpose=purpose, **values)
    return out


def _message(raw: Mapping[str, Any], purposes: Sequence[str]) -> MessageFacts:
    _only(raw, {f.name for f in fields(MessageFacts)}, "message")
    default = "adherence" if "adherence" in purposes or not purposes else purposes[0]
    return MessageFacts(**{"purpose": default, **MESSAGE_DEFAULTS, **raw})


def _history(raw: Mapping[str, Any], now: datetime) -> History:
    _only(raw, {"sent"}, "history")
    sent = []
    for entry in raw.get("sent") or ():
        _only(entry, {"ago", "at", "purpose"}, "history.sent")
        at = _instant(entry["at"]) if "at" in entry else now - parse_duration(entry["ago"])
        sent.append(SentMessage(at=at, purpose=entry["purpose"]))
    return History(sent=tuple(sent))


def _only(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        keys = ", ".join(sorted(allowed))
        raise PolicyError(f"{where}: unknown key {unknown[0]!r}; keys: {keys}")


def _instant(value: str | datetime) -> datetime:
    """An ISO instant; a YAML timestamp without offset is UTC (YAML's own rule)."""
    instant = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant


def parse_duration(text: str) -> timedelta:
    """'90s', '30m', '2h', '1d', '1w'."""
    found = _DURATION.match(str(text))
    if not found:
        raise PolicyError(f"bad duration {text!r}; write e.g. 30m, 2h, 1d")
    return timedelta(seconds=int(found.group(1)) * _UNITS[found.group(2)])
