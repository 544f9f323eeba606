"""CEL expressions, the variables they see, and policy tests' `given` contexts."""

from __future__ import annotations

from datetime import date, time, timedelta

import cel
import pytest

from engine.core import cel_context
from engine.core.cel_context import (
    AUDIENCE_NAMES,
    POLICY_NAMES,
    CompiledExpression,
    PolicyError,
    audience_variables,
    compile_expression,
    history_vars,
    patient_vars,
    policy_variables,
)
from engine.core.domain import Appointment, Prescription
from engine.core.policy import compile_policy_set
from engine.core.policy_tests import (
    PolicyTest,
    context_from_given,
    parse_duration,
    policy_test_from_mapping,
    run_policy_tests,
)
from tests.unit.builders import (
    NOW,
    PURPOSES,
    at,
    make_consents,
    make_context,
    make_history,
    make_message,
    make_patient,
    make_rule,
)

H = timedelta(hours=1)

# --- compile_expression -------------------------------------------------------------------

VALID = [
    "patient.region in ['FL', 'OK', 'WA']",
    "message.contains_phi && !patient.allow_phi_sms",
    "consent.marketing.active && consent.marketing.legal_basis == 'written'",
    "history.purpose_24h['adherence'] >= 1 || history.purpose_7d.appointment > 2",
    "local.hour < 9 && local.weekday >= 6",
    "now > timestamp('2026-01-01T00:00:00Z')",
    "['FL', 'OK'].exists(r, r == patient.region)",  # r is bound by the macro
    "patient.region == 'patient.ssn'",  # names inside strings are not read
    "has(patient.age) && patient.age >= 18",
    "patient.exists(k, k == 'region')",
]


@pytest.mark.parametrize("source", VALID)
def test_valid_policy_expressions_compile(source):
    assert compile_expression(source, names=POLICY_NAMES, where="when").source == source


INVALID = [
    ("patient.age >", "when: CEL syntax error at line 1, column 14"),
    ("patient.age > 18 &&\n  bogus(", "CEL syntax error at line 2"),
    ("foo == 1", "unknown name 'foo'; allowed names: consent, history, local, message, now"),
    ("prescription.status == 'active'", "unknown name 'prescription'"),
    ("patient.ssn == '1'", "unknown field patient.ssn; patient has: age, allow_phi_sms"),
    ("has(message.body)", "unknown field message.body"),
    ("consent.adherence.revoked", "unknown field 'revoked' of a consent entry"),
    ("consent.research.active", "key 'research' not found on a sample context"),
    ("history.purpose_24h['research'] > 0", "key 'research' not found"),
    ("patient.age > 'eighteen'", "type error on a sample context"),
    ("date(now) == '2026-03-10'", "Undefined variable or function: 'date'"),
    ("patient.age + 1", "must be a boolean, got int"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "fragment"), INVALID)
def test_invalid_policy_expressions_are_rejected(source, fragment):
    with pytest.raises(PolicyError) as raised:
        compile_expression(source, names=POLICY_NAMES, where="when")
    assert fragment in str(raised.value)
    assert raised.value.line is None  # compile_policy_set adds the rule's line


def test_runtime_only_failures_pass_compilation_and_fail_later():
    compiled = compile_expression("message.length / message.segments > 1", names=POLICY_NAMES,
                                  where="when")  # fmt: skip
    with pytest.raises(ZeroDivisionError):
        compiled.evaluate(policy_variables(make_context(message=make_message(segments=0))))


def test_non_boolean_allowed_when_asked():
    compiled = compile_expression("patient.age + 1", names=POLICY_NAMES, where="x", boolean=False)
    assert compiled.evaluate(policy_variables(make_context(), purposes=PURPOSES)) == 57


@pytest.mark.parametrize(
    ("source", "whole", "paths"),
    [
        ("patient.age > 1 && local.hour < 3", set(), {"patient": {"age"}, "local": {"hour"}}),
        ("consent.marketing.active && history.purpose_7d.marketing < 2", set(),
         {"consent": {"marketing.active"}, "history": {"purpose_7d.marketing"}}),
        ("history.purpose_24h['adherence'] > 0", set(), {"history": {"purpose_24h"}}),
        ("patient.region.startsWith('F')", set(), {"patient": {"region"}}),
        ("has(patient.age) && patient.region == ''", {"patient"}, {}),
        ("'x' in patient && patient.region == ''", {"patient"}, {}),
        ("consent['marketing'].active", {"consent"}, {}),
        ("now > timestamp('2026-01-01T00:00:00Z')", {"now"}, {}),
    ],
)  # fmt: skip
def test_uses_lists_what_is_read_and_flattening_keeps_the_result(source, whole, paths):
    compiled = compile_expression(source, names=POLICY_NAMES, where="when", boolean=False)
    assert compiled.uses.whole == whole
    assert {k: {".".join(p) for p in v} for k, v in compiled.uses.fields.items()} == paths
    variables = policy_variables(make_context(), purposes=PURPOSES)
    assert compiled.evaluate(variables) == cel.evaluate(source, variables)


RX = Prescription("rx", "atorvastatin", "statin", date(2026, 3, 20))
VISIT = Appointment("ap", NOW + H, "follow-up")
AUDIENCE = [
    ("prescription.medication_class == 'statin'", RX, True),
    ("prescription.medication_class == 'statin'", VISIT, False),  # fields of no anchor are null
    ("prescription != null && prescription.refill_due < '2026-04-01'", RX, True),
    ("prescription != null && prescription.refill_due < '2026-04-01'", None, False),
    ("appointment.kind == 'follow-up' && appointment.starts_at > now", VISIT, True),
    ("patient.age >= 65", None, False),
]


@pytest.mark.parametrize(("source", "anchor", "expected"), AUDIENCE)
def test_audience_where(source, anchor, expected):
    compiled = compile_expression(source, names=AUDIENCE_NAMES, where="audience")
    assert compiled.evaluate(audience_variables(make_patient(), anchor, NOW)) is expected


def test_audience_names_are_not_policy_names():
    with pytest.raises(PolicyError, match="unknown name 'message'"):
        compile_expression("message.purpose == 'x'", names=AUDIENCE_NAMES, where="audience")


# --- variables ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, {"age": 56, "region": "NY", "timezone": "America/New_York"}),
        ({"birth_date": None, "region": None}, {"age": None, "region": ""}),
        ({"timezone": None}, {"timezone": ""}),
        ({"birth_date": date(2008, 3, 11)}, {"age": 17}),  # eighteen tomorrow
        ({"birth_date": date(2008, 3, 10)}, {"age": 18}),
    ],
)  # fmt: skip
def test_patient_vars(overrides, expected):
    values = patient_vars(make_patient(**overrides), today=date(2026, 3, 10))
    assert {k: values[k] for k in expected} == expected


def test_history_counts_every_declared_purpose():
    history = make_history(
        (2 * H, "adherence"), (23 * H, "adherence"), (30 * H, "appointment"), (200 * H, "marketing")
    )  # fmt: skip
    assert history_vars(history, NOW, PURPOSES) == {
        "sent_24h": 2,
        "sent_7d": 3,
        "purpose_24h": {"adherence": 2, "appointment": 0, "marketing": 0},
        "purpose_7d": {"adherence": 2, "appointment": 1, "marketing": 0},
    }


@pytest.mark.parametrize(
    ("zone", "now", "local"),
    [
        ("America/New_York", "2026-03-10T15:00:00Z", (11, 0, 2, "2026-03-10")),
        ("Pacific/Honolulu", "2026-03-10T05:30:00Z", (19, 30, 1, "2026-03-09")),
        ("Europe/Berlin", "2026-03-29T01:30:00Z", (3, 30, 7, "2026-03-29")),  # CEST already
    ],
)  # fmt: skip
def test_local_is_the_patients_wall_clock(zone, now, local):
    ctx = make_context(now=at(now), patient=make_patient(timezone=zone))
    expected = dict(zip(("hour", "minute", "weekday", "date"), local, strict=True))
    assert policy_variables(ctx, only=["local"]) == {"local": expected}


def test_consent_holds_every_declared_purpose_and_only_sms_is_active():
    ctx = make_context(consents=make_consents(adherence="express", marketing=None))
    consent = policy_variables(ctx, purposes=PURPOSES, only=["consent"])["consent"]
    assert set(consent) == set(PURPOSES)
    assert consent["adherence"]["active"] is True
    assert consent["marketing"]["active"] is False
    assert consent["appointment"] == {
        "active": False, "legal_basis": None, "method": None, "granted_at": None
    }  # fmt: skip


# --- policy tests -------------------------------------------------------------------------

QUIET = make_rule(
    id="quiet-hours", kind="quiet_hours", effect="defer", window_start=time(8), window_end=time(21)
)


def test_given_defaults():
    ctx = context_from_given({}, purposes=PURPOSES)
    assert ctx.now == at("2026-03-10T15:00:00Z")
    assert (ctx.patient.timezone, ctx.patient.region, ctx.patient.allow_phi_sms) == (
        "America/New_York", "NY", False
    )  # fmt: skip
    assert ctx.patient.birth_date == date(1970, 1, 1)
    assert ctx.consents == {}
    assert (ctx.message.purpose, ctx.message.segments, ctx.message.has_opt_out_text) == (
        "adherence", 1, True
    )  # fmt: skip
    assert ctx.history.sent == ()


def test_given_builds_consent_and_history():
    given = {
        "now": "2026-03-11T02:00:00Z",
        "patient": {"timezone": None, "candidate_timezones": ["America/Chicago"], "region": "FL"},
        "consent": {"marketing": {"active": True, "legal_basis": "written", "method": "web"}},
        "message": {"purpose": "marketing", "contains_phi": True},
        "history": {"sent": [{"ago": "2h", "purpose": "adherence"}]},
    }
    ctx = context_from_given(given, purposes=PURPOSES)
    assert ctx.patient.zones == ("America/Chicago",)
    assert ctx.consents["marketing"].legal_basis == "written"
    assert ctx.consents["marketing"].granted_at == ctx.now - timedelta(days=30)
    assert ctx.message.contains_phi is True
    assert ctx.history.sent[0].at == at("2026-03-11T00:00:00Z")


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ({"patients": {}}, "given: unknown key 'patients'"),
        ({"patient": {"ssn": "1"}}, "patient: unknown key 'ssn'"),
        ({"history": {"sent": [{"ago": "2 fortnights", "purpose": "adherence"}]}}, "bad duration"),
    ],
)
def test_bad_given_fails_the_test_with_a_message(given, fragment):
    policy = compile_policy_set([make_rule()], purposes=PURPOSES)
    [result] = run_policy_tests(policy, [PolicyTest("bad", given, "allow", line=7)])
    assert not result.passed
    assert fragment in result.message
    assert result.line == 7


RUN_CASES = [
    # given, expect, passed, message fragment
    ({"consent": {"adherence": {"active": True, "legal_basis": "express"}}}, "allow", True,
     "allow by consent-required as expected"),
    ({}, "allow", False,
     "expected allow, got deny by consent-required (consent-required: no active consent"),
    ({"now": "2026-03-11T02:00:00Z", "consent": {"adherence": True}},
     {"outcome": "defer", "rule": "quiet-hours", "send_at": "2026-03-11T12:00:00Z"}, True,
     "defer by quiet-hours until 2026-03-11T12:00:00Z as expected"),
    ({"now": "2026-03-11T02:00:00Z", "consent": {"adherence": True}},
     {"outcome": "defer", "send_at": "2026-03-11T13:00:00Z"}, False,
     "expected defer until 2026-03-11T13:00:00Z, got defer by quiet-hours until 2026-03-11T12:00"),
    ({}, {"outcome": "deny", "rule": "quiet-hours"}, False,
     "expected deny by quiet-hours, got deny by consent-required"),
]  # fmt: skip


@pytest.mark.parametrize(("given", "expect", "passed", "fragment"), RUN_CASES)
def test_run_policy_tests(given, expect, passed, fragment):
    policy = compile_policy_set([make_rule(), QUIET], purposes=PURPOSES)
    test = policy_test_from_mapping({"name": "t", "given": given, "expect": expect}, line=12)
    [result] = run_policy_tests(policy, [test])
    assert (result.passed, result.line) == (passed, 12)
    assert fragment in result.message


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"name": "t", "given": {}}, "expect needs an outcome"),
        ({"name": "t", "expect": "maybe"}, "expect needs an outcome"),
        ({"name": "t", "expect": "allow", "extra": 1}, "unknown key 'extra'"),
    ],
)
def test_malformed_policy_test(raw, fragment):
    with pytest.raises(PolicyError, match=fragment) as raised:
        policy_test_from_mapping(raw, line=5)
    assert raised.value.line == 5


@pytest.mark.parametrize(
    ("text", "span"),
    [("90s", timedelta(seconds=90)), ("30m", 30 * H / 60), ("2h", 2 * H), ("1d", 24 * H),
     ("1w", 7 * 24 * H)],
)  # fmt: skip
def test_parse_duration(text, span):
    assert parse_duration(text) == span


# --- memoized evaluation -------------------------------------------------------------------


def _memo_expression(source: str) -> CompiledExpression:
    return compile_expression(source, names=POLICY_NAMES, where="when")


def _flat(expression: CompiledExpression, **values: object) -> dict[str, object]:
    flat = {name: None for name in expression.key_names or ()}
    flat.update(values)
    return flat


def test_an_expression_of_flat_fields_is_evaluated_once_per_distinct_values() -> None:
    expression = _memo_expression('message.encoding != "GSM-7" || message.length > 160')
    assert expression.key_names == ("message__encoding", "message__length")
    runs: list[dict[str, object]] = []

    def activation_for(flat: dict[str, object]):  # type: ignore[no-untyped-def]
        def build() -> cel.Context:
            runs.append(flat)
            return cel.Context(flat)

        return build

    cases = [("GSM-7", 120, False), ("GSM-7", 120, False), ("GSM-7", 161, True),
             ("UCS-2", 120, True), ("GSM-7", 161, True)]  # fmt: skip
    for encoding, length, expected in cases:
        flat = _flat(expression, message__encoding=encoding, message__length=length)
        assert expression.run_memoized(flat, activation_for(flat)) is expected
    assert len(runs) == 3  # one evaluation per distinct (encoding, length)


def test_errors_are_not_remembered_and_whole_names_are_not_memoized() -> None:
    expression = _memo_expression("100 / message.length > 1")
    flat = _flat(expression, message__length=0)
    for _ in range(2):
        with pytest.raises((ArithmeticError, RuntimeError, ValueError)):
            expression.run_memoized(flat, lambda: cel.Context(flat))
    assert expression.results == {}
    whole = _memo_expression("consent[message.purpose] == consent.marketing")
    assert whole.key_names is None


def test_the_memo_starts_over_at_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cel_context, "MEMO_LIMIT", 3)
    expression = _memo_expression("message.length > 100")
    for length in range(10):
        flat = _flat(expression, message__length=length)
        expression.run_memoized(flat, lambda flat=flat: cel.Context(flat))
        assert len(expression.results) <= 3
