"""Memoized paths give what the straightforward ones give: decisions, CEL on indexed reads,
renders, shared occurrences and idempotency keys."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from pathlib import Path

import cel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core import policy, render, schedule
from engine.core.cel_context import (
    AUDIENCE_NAMES,
    POLICY_NAMES,
    UNBOUND,
    audience_variables,
    compile_expression,
    policy_variables,
)
from engine.core.domain import (
    Appointment,
    Campaign,
    ConsentState,
    DecisionContext,
    History,
    MessageFacts,
    Patient,
    Prescription,
    Rule,
    Schedule,
    SentMessage,
)
from engine.definitions import DefinitionSet, load_definitions
from engine.dryrun import Candidate, DryRunSummary, in_audience
from engine.planner_rows import sealed_fields
from tests.unit.builders import NOW, PURPOSES, make_context, make_message, make_rule
from tests.unit.test_render import make_template

ROOT = Path(__file__).resolve().parents[2]


@cache
def starter() -> DefinitionSet:
    return load_definitions(ROOT)


# --- decisions ---------------------------------------------------------------------------

ZONES = ("America/New_York", "America/Los_Angeles", "Europe/Berlin", "Pacific/Honolulu")
BASES = (None, "express", "written", "explicit", "hipaa_authorization")
TIMES = st.sampled_from([NOW, NOW + timedelta(hours=5), NOW + timedelta(hours=11, minutes=30)])


@st.composite
def consents(draw: st.DrawFn) -> dict[str, ConsentState]:
    out = {}
    for purpose in PURPOSES:
        basis = draw(st.sampled_from(BASES))
        active = basis is not None and draw(st.booleans())
        revoked = None if active or basis is None else NOW - timedelta(days=draw(st.integers(0, 3)))
        granted = NOW - timedelta(days=draw(st.integers(1, 3))) if basis else None
        channel = draw(st.sampled_from(["sms", "sms", "email"]))
        out[purpose] = ConsentState(purpose, channel, active, basis, "web", granted, revoked)
    return out


@st.composite
def contexts(draw: st.DrawFn) -> DecisionContext:
    now = draw(TIMES)
    patient = Patient(
        "p-1",
        draw(st.sampled_from(ZONES)),
        country=draw(st.sampled_from(["US", "DE", "ES"])),
        region=draw(st.sampled_from(["FL", "NY", None])),
        birth_date=draw(st.sampled_from([None, date(1990, 3, 11), date(2010, 1, 1)])),
        allow_phi_sms=draw(st.booleans()),
    )
    message = MessageFacts(
        purpose=draw(st.sampled_from(PURPOSES)),
        encoding=draw(st.sampled_from(["GSM-7", "UCS-2"])),
        length=draw(st.sampled_from([60, 160, 161])),
        contains_phi=draw(st.booleans()),
        has_opt_out_text=draw(st.booleans()),
    )
    ago = st.sampled_from([timedelta(hours=1), timedelta(hours=30), timedelta(days=6)])
    sent = draw(st.lists(st.tuples(ago, st.sampled_from(PURPOSES)), max_size=4))
    history = History(tuple(SentMessage(now - a, p) for a, p in sent))
    return DecisionContext(patient, draw(consents()), message, history, now)


@settings(max_examples=400, deadline=None)
@given(st.lists(contexts(), min_size=1, max_size=8))
def test_remembered_decisions_equal_fresh_ones(batch: list[DecisionContext]) -> None:
    policy_set = starter().policy_set
    assert policy_set.keys is not None  # the starter rules are memoizable
    for ctx in [*batch, *batch]:  # the second time round, from the memo
        assert policy.decide(policy_set, ctx) == policy.decide_unmemoized(policy_set, ctx)


def test_a_decision_on_other_facts_is_not_shared() -> None:
    policy_set = starter().policy_set
    denied = make_context(purpose="marketing")
    allowed = make_context()
    assert policy.decide(policy_set, denied).outcome == "deny"
    assert policy.decide(policy_set, allowed).outcome == "allow"
    assert policy.decide(policy_set, denied).outcome == "deny"


def test_failed_rules_are_not_remembered() -> None:
    rules = starter().policy_set.rules
    broken = policy.compile_policy_set(
        [c.rule for c in rules] + [_rule("100 / message.length > 1")], purposes=PURPOSES
    )
    assert broken.keys is not None
    ctx = make_context(message=make_message(length=0))
    decision = policy.decide(broken, ctx)
    assert decision.trace[-1].message.startswith("policy-error: ")
    assert broken.keys.decisions == {}


def test_sets_reading_what_cannot_be_keyed_are_not_memoized() -> None:
    whole = policy.compile_policy_set([_rule("patient.exists(k, k == 'age')")], purposes=PURPOSES)
    assert whole.keys is not None  # the whole patient: every field is in the key
    assert policy.decide(whole, make_context()).outcome == "deny"


def _rule(when: str) -> Rule:
    return make_rule(id="x-expression", kind="expression", when=when)


# --- CEL indexed reads -------------------------------------------------------------------

INDEXED = [
    'consent[message.purpose].legal_basis == "express"',
    "consent[message.purpose].active && consent.marketing.legal_basis != 'written'",
    "consent[message.purpose].legal_basis.startsWith('ex')",
    "has(consent[message.purpose].method) && consent[message.purpose].active",
    "['adherence'].exists(message, consent[message].active)",
    "consent[message.purpose].granted_at < now",
]


@pytest.mark.parametrize("source", INDEXED)
@settings(max_examples=60, deadline=None)
@given(ctx=contexts(), extra=st.sampled_from([None, "research"]))
def test_indexed_reads_evaluate_as_written(source: str, ctx: DecisionContext, extra) -> None:  # type: ignore[no-untyped-def]
    if extra:  # a purpose that is not declared: its entry exists only when held
        ctx = DecisionContext(
            ctx.patient, ctx.consents, make_message(purpose=extra), ctx.history, ctx.now
        )
    compiled = compile_expression(source, names=POLICY_NAMES, where="when", boolean=False)
    variables = policy_variables(ctx, purposes=PURPOSES)
    expected = _outcome(lambda: cel.evaluate(source, variables))
    assert _outcome(lambda: compiled.evaluate(variables)) == expected
    flat = {n: r.value(variables.__getitem__) for n, r in compiled.uses.reads.items()}
    activation = lambda: cel.Context(flat)  # noqa: E731
    for _ in range(2):
        memo = _outcome(lambda: compiled.run_memoized(flat, activation, lambda: variables))
        assert memo == expected


def _outcome(run):  # type: ignore[no-untyped-def]
    try:
        return ("value", run())
    except (LookupError, TypeError, ValueError, RuntimeError) as exc:
        return ("error", type(exc).__name__)


def test_an_indexed_read_is_keyed_by_the_entrys_field() -> None:
    compiled = compile_expression(INDEXED[0], names=POLICY_NAMES, where="when")
    assert compiled.key_names == ("consent_of_message__purpose__legal_basis",)
    assert compiled.fallback is not None


def test_an_index_that_is_not_a_plain_entry_evaluates_the_expression_as_written() -> None:
    compiled = compile_expression(INDEXED[0], names=POLICY_NAMES, where="when")
    variables = policy_variables(make_context(), purposes=PURPOSES)
    variables["message"] = {**variables["message"], "purpose": "unheard-of"}
    flat = {n: r.value(variables.__getitem__) for n, r in compiled.uses.reads.items()}
    assert set(flat.values()) == {UNBOUND}
    with pytest.raises(KeyError):
        compiled.run_memoized(flat, lambda: cel.Context(flat), lambda: variables)
    assert compiled.results == {}


# --- rendering ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(names=st.lists(st.sampled_from(["Ana", "Zoë", "José", "", "x" * 200]), max_size=6))
def test_remembered_renders_equal_fresh_ones(names: list[str]) -> None:
    compiled = render.compile_template(make_template("Hi {{ given_name|gsm }}, {{ opt_out }}"))
    fresh = render.compile_template(make_template("Hi {{ given_name|gsm }}, {{ opt_out }}"))
    for name in names:
        variables = {"given_name": name, "opt_out": "Reply STOP", "family_name": "Lopez"}
        expected = fresh.rendered.clear() or render.render(fresh, variables)
        assert render.render(compiled, variables) == expected
    assert len(compiled.rendered) == len(set(names))  # keyed by what the template reads


def test_renders_of_other_values_or_failures_are_not_remembered() -> None:
    compiled = render.compile_template(make_template("{{ n }} {{ given_name }}"))
    assert render.render(compiled, {"n": 1, "given_name": "A"}).text == "1 A"
    assert render.render(compiled, {"n": True, "given_name": "A"}).text == "True A"
    with pytest.raises(render.TemplateError):
        render.render(compiled, {"n": "1"})
    assert compiled.rendered == {}


# --- occurrences -------------------------------------------------------------------------

MONTHLY = Campaign(
    "monthly", "Monthly", "marketing", "t", "none", None,
    Schedule("recurring", time(11, 0), every="month", start=date(2026, 12, 1), count=12),
    timedelta(days=3),
)  # fmt: skip


@pytest.mark.parametrize("zone", ["America/New_York", "Pacific/Honolulu", "Pacific/Kiritimati"])
def test_shared_occurrences_equal_each_patients_own(zone: str) -> None:
    at = datetime(2026, 12, 2, tzinfo=UTC)
    for external_id in ("p-1", "p-2", "p-1"):
        patient = Patient(external_id, zone)
        found = schedule.occurrences(MONTHLY, patient, None, not_after=at, alive_at=at)
        window = schedule._window(MONTHLY, None, zone, at, at)
        assert [(o.label, o.due_at, o.expires_at) for o in found] == list(window)
        assert [o.idempotency_key for o in found] == [
            schedule.idempotency_key("monthly", external_id, "none", label) for label, *_ in window
        ]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(), min_size=4, max_size=4))
def test_idempotency_keys_hash_the_json_array(fields: list[str]) -> None:
    text = json.dumps(fields, ensure_ascii=False)
    expected = __import__("hashlib").sha256(text.encode("utf-8")).hexdigest()[:32]
    assert schedule.idempotency_key(*fields) == expected


# --- audiences ---------------------------------------------------------------------------

AUDIENCES = [
    "patient.age == null || patient.age >= 18",
    'prescription.medication_class == "statin" && prescription.status == "active"',
    'appointment.status == "booked" && appointment.starts_at > now',
    'patient.region == "FL" || prescription.refill_due < "2026-12-05"',
]


@st.composite
def anchors(draw: st.DrawFn) -> Prescription | Appointment | None:
    kind = draw(st.sampled_from(["rx", "appointment", None]))
    status = draw(st.sampled_from(["active", "booked", "stopped"]))
    if kind == "rx":
        day = date(2026, 12, draw(st.integers(1, 9)))
        return Prescription("rx-1", "atorvastatin", draw(st.sampled_from(["statin", "ssri"])),
                            day, status)  # fmt: skip
    if kind == "appointment":
        return Appointment("ap-1", NOW + timedelta(hours=draw(st.integers(-30, 30))), "lab",
                           status=status)  # fmt: skip
    return None


@pytest.mark.parametrize("source", AUDIENCES)
@settings(max_examples=80, deadline=None)
@given(ctx=contexts(), anchor=anchors())
def test_remembered_audiences_equal_fresh_ones(source: str, ctx: DecisionContext, anchor) -> None:  # type: ignore[no-untyped-def]
    audience = compile_expression(source, names=AUDIENCE_NAMES, where="audience")
    candidate = Candidate(1, ctx.patient)
    outcome = _outcome(lambda: audience.evaluate(audience_variables(ctx.patient, anchor, ctx.now)))
    for _ in range(2):
        summary = DryRunSummary()
        assert in_audience(audience, candidate, anchor, ctx.now, summary) is (outcome[1] is True)
        assert summary.audience_errors == (outcome[0] == "error")


def test_an_audience_error_is_counted_and_not_remembered() -> None:
    audience = compile_expression("patient.age >= 18", names=AUDIENCE_NAMES, where="audience")
    candidate = Candidate(1, Patient("p-1", "Mars/Olympus_Mons"))
    summary = DryRunSummary()
    assert not in_audience(audience, candidate, None, NOW, summary)
    assert summary.audience_errors == 1


def test_a_fact_that_cannot_be_read_fails_the_rules_not_the_decision() -> None:
    ages = policy.compile_policy_set([_rule("patient.age != null && patient.age < 18")],
                                     purposes=PURPOSES)  # fmt: skip
    ctx = make_context(patient=Patient("p-1", "Mars/Olympus_Mons"))
    decision = policy.decide(ages, ctx)
    assert decision == policy.decide_unmemoized(ages, ctx)
    assert decision.outcome == "deny" and decision.trace[0].message.startswith("policy-error")


# --- what a tick decrypts ----------------------------------------------------------------


def test_a_tick_decrypts_only_the_fields_its_templates_and_audiences_read() -> None:
    defs = starter()
    campaigns = defs.campaigns
    assert sealed_fields(defs, [campaigns["awareness-monthly"]]) == {"birth_date"}
    assert sealed_fields(defs, campaigns.values()) == {"birth_date", "given_name"}
    audience = compile_expression(
        "prescription.medication == 'x'", names=AUDIENCE_NAMES, where="audience"
    )
    with_medication = replace(defs, audiences={**defs.audiences, "awareness-monthly": audience})
    assert "medication" in sealed_fields(with_medication, [campaigns["awareness-monthly"]])
