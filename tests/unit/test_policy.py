"""decide(): the legal cases, rule by rule and combined; compile errors with their lines."""

from __future__ import annotations

from datetime import time, timedelta

import pytest

from engine.core.domain import ConsentState, Rule
from engine.core.policy import CompiledPolicySet, PolicyError, compile_policy_set, decide
from engine.core.quiet_hours import next_window_start
from tests.unit.builders import (
    NOW,
    PURPOSES,
    at,
    make_consent,
    make_consents,
    make_context,
    make_history,
    make_message,
    make_patient,
    make_rule,
)

H = timedelta(hours=1)
EU = '["AT","BE","DE","DK","ES","FI","FR","IE","IT","NL","PL","PT","SE"]'

CONSENT = make_rule(id="consent-required", cite="TCPA 47 CFR 64.1200(a)")
MARKETING_WRITTEN = make_rule(
    id="marketing-written", purposes=["marketing"], legal_bases=("written",)
)
GDPR_EXPLICIT = make_rule(
    id="gdpr-explicit", legal_bases=("explicit",), where=f"patient.country in {EU}"
)
QUIET = make_rule(
    id="quiet-hours",
    kind="quiet_hours",
    effect="defer",
    window_start=time(8),
    window_end=time(21),
    cite="TCPA 47 CFR 64.1200(c)(1)",
)
QUIET_FL = make_rule(
    id="quiet-hours-fl",
    kind="quiet_hours",
    effect="defer",
    window_start=time(8),
    window_end=time(20),
    purposes=["marketing"],
    where='patient.region in ["FL","OK","WA"]',
    cite="Fla. Stat. 501.059(8)(a)",
)
HEALTHCARE = ["adherence", "appointment"]
CAP_DAY = make_rule(
    id="cap-day",
    kind="frequency_cap",
    effect="defer",
    limit=1,
    window=timedelta(days=1),
    purposes=HEALTHCARE,
    cite="FCC 15-72 para. 147",
)
CAP_WEEK = make_rule(
    id="cap-week",
    kind="frequency_cap",
    effect="deny",
    limit=3,
    window=timedelta(days=7),
    purposes=HEALTHCARE,
)
PHI = make_rule(
    id="no-phi",
    kind="expression",
    when="message.contains_phi && !patient.allow_phi_sms",
    message="message contains PHI and the patient has not allowed PHI by SMS",
)


def compiled(*rules: Rule) -> CompiledPolicySet:
    return compile_policy_set(rules, purposes=PURPOSES)


def ny_at(text: str, zone: str = "America/New_York", **patient: object):
    return make_context(now=at(text), patient=make_patient(timezone=zone, **patient))


# --- quiet hours --------------------------------------------------------------------------

QUIET_CASES = [
    # zone, now (UTC), expected defer_until (UTC) or None for allow
    ("America/New_York", "2026-03-10T15:00:00Z", None),
    ("America/New_York", "2026-03-11T02:00:00Z", "2026-03-11T12:00:00Z"),  # 22:00 EDT
    ("America/New_York", "2026-03-10T11:30:00Z", "2026-03-10T12:00:00Z"),  # 07:30 EDT
    ("America/New_York", "2026-03-11T00:59:00Z", None),  # 20:59 EDT
    ("America/New_York", "2026-03-11T01:00:00Z", "2026-03-11T12:00:00Z"),  # 21:00: end excluded
    ("America/Los_Angeles", "2026-03-10T15:00:00Z", None),  # 08:00 PDT: start included
    ("America/Los_Angeles", "2026-03-10T14:59:00Z", "2026-03-10T15:00:00Z"),
    ("Pacific/Honolulu", "2026-03-10T05:00:00Z", None),  # 19:00 HST
    ("Pacific/Honolulu", "2026-03-10T08:00:00Z", "2026-03-10T18:00:00Z"),  # 22:00 HST
    ("Europe/Berlin", "2026-03-10T20:00:00Z", "2026-03-11T07:00:00Z"),  # 21:00 CET
    # US spring forward, Sunday 2026-03-08: the next 08:00 is EDT (12:00Z), not EST (13:00Z)
    ("America/New_York", "2026-03-08T03:00:00Z", "2026-03-08T12:00:00Z"),
    ("America/New_York", "2026-03-07T03:00:00Z", "2026-03-07T13:00:00Z"),  # the day before
    ("Pacific/Honolulu", "2026-03-08T08:00:00Z", "2026-03-08T18:00:00Z"),  # no DST there
    # US fall back, Sunday 2026-11-01: the next 08:00 is EST (13:00Z)
    ("America/New_York", "2026-11-01T03:00:00Z", "2026-11-01T13:00:00Z"),
    ("America/New_York", "2026-11-01T12:30:00Z", "2026-11-01T13:00:00Z"),  # 07:30 EST
    ("America/Los_Angeles", "2026-11-01T06:00:00Z", "2026-11-01T16:00:00Z"),
    # EU spring forward, 2026-03-29: 08:00 CEST is 06:00Z; fall back 2026-10-25: 08:00 CET
    ("Europe/Berlin", "2026-03-28T21:00:00Z", "2026-03-29T06:00:00Z"),
    ("Europe/Berlin", "2026-10-24T20:00:00Z", "2026-10-25T07:00:00Z"),
    ("Europe/Berlin", "2026-10-25T06:30:00Z", "2026-10-25T07:00:00Z"),  # 07:30 CET
]


@pytest.mark.parametrize(("zone", "now", "until"), QUIET_CASES)
def test_quiet_hours_defers_to_the_next_local_window_start(zone, now, until):
    decision = decide(compiled(CONSENT, QUIET), ny_at(now, zone))
    if until is None:
        assert decision.outcome == "allow"
        assert decision.send_at == at(now)
    else:
        assert (decision.outcome, decision.deciding_rule) == ("defer", "quiet-hours")
        assert decision.send_at == at(until)
        assert decision.reasons[0].defer_until == at(until)
        assert "outside 08:00-21:00" in decision.reasons[0].message


NY = ["America/New_York"]
WINDOW_CASES = [
    # zones, window, now, expected; a start in a spring-forward gap opens at the transition
    (NY, (time(2, 30), time(5)), "2026-03-08T05:00:00Z", "2026-03-08T07:00:00Z"),
    (["Europe/Berlin"], (time(2, 30), time(5)), "2026-03-28T23:00:00Z", "2026-03-29T01:00:00Z"),
    # 01:30 happens twice on a fall-back day: EDT (05:30Z), then EST (06:30Z)
    (NY, (time(1, 30), time(1, 45)), "2026-11-01T04:00:00Z", "2026-11-01T05:30:00Z"),
    (NY, (time(1, 30), time(1, 45)), "2026-11-01T05:50:00Z", "2026-11-01T06:30:00Z"),
    # overnight windows; at 02:00 EDT the clock falls back into [22:00, 01:30) at 01:00 EST
    (NY, (time(22), time(6)), "2026-03-10T15:00:00Z", "2026-03-11T02:00:00Z"),
    (NY, (time(22), time(1, 30)), "2026-11-01T05:45:00Z", "2026-11-01T06:00:00Z"),
    # several zones: the first instant inside in all of them
    (["America/New_York", "Pacific/Honolulu"], (time(8), time(21)), "2026-03-10T12:30:00Z",
     "2026-03-10T18:00:00Z"),
    (["America/New_York", "Asia/Tokyo"], (time(8), time(20)), "2026-03-10T15:00:00Z",
     "2026-03-10T23:00:00Z"),
    (["America/New_York", "Asia/Tokyo"], (time(9), time(12)), "2026-03-10T15:00:00Z", None),
]  # fmt: skip


@pytest.mark.parametrize(("zones", "window", "now", "expected"), WINDOW_CASES)
def test_next_window_start(zones, window, now, expected):
    found = next_window_start(at(now), zones, *window)
    assert found == (at(expected) if expected else None)


OVERNIGHT = make_rule(
    id="night-shift", kind="quiet_hours", effect="defer", window_start=time(22), window_end=time(6)
)


@pytest.mark.parametrize(
    ("now", "outcome"),
    [
        ("2026-03-11T03:00:00Z", "allow"),  # 23:00 EDT
        ("2026-03-11T09:59:00Z", "allow"),  # 05:59 EDT
        ("2026-03-11T10:00:00Z", "defer"),  # 06:00 EDT
        ("2026-03-10T15:00:00Z", "defer"),
    ],
)
def test_overnight_window(now, outcome):
    assert decide(compiled(OVERNIGHT), ny_at(now)).outcome == outcome


FLORIDA_CASES = [
    # purpose, region, zone, now, outcome, deciding rule, send_at
    ("marketing", "FL", "America/New_York", "2026-03-11T00:30:00Z", "defer", "quiet-hours-fl",
     "2026-03-11T12:00:00Z"),  # 20:30 EDT: past Florida's 20:00, within federal 21:00
    ("marketing", "NY", "America/New_York", "2026-03-11T00:30:00Z", "allow", None, None),
    ("adherence", "FL", "America/New_York", "2026-03-11T00:30:00Z", "allow", None, None),
    ("marketing", "WA", "America/Los_Angeles", "2026-03-11T03:30:00Z", "defer", "quiet-hours-fl",
     "2026-03-11T15:00:00Z"),
    ("marketing", "OK", "America/Chicago", "2026-03-11T00:30:00Z", "allow", None, None),
    ("marketing", "FL", "America/New_York", "2026-03-11T01:30:00Z", "defer", "quiet-hours",
     "2026-03-11T12:00:00Z"),  # both defer to the same 08:00
]  # fmt: skip


@pytest.mark.parametrize(
    ("purpose", "region", "zone", "now", "outcome", "rule", "send_at"), FLORIDA_CASES
)
def test_florida_marketing_window(purpose, region, zone, now, outcome, rule, send_at):
    consents = make_consents(adherence="express", marketing="written")
    ctx = make_context(
        now=at(now),
        patient=make_patient(region=region, timezone=zone),
        consents=consents,
        purpose=purpose,
    )
    decision = decide(compiled(CONSENT, QUIET, QUIET_FL), ctx)
    assert decision.outcome == outcome
    if rule:
        assert decision.deciding_rule == rule
        assert decision.send_at == at(send_at)
    fl_result = decision.trace[2]
    if purpose != "marketing" or region not in ("FL", "OK", "WA"):
        assert fl_result.effect == "skip"


UNKNOWN_ZONE_CASES = [
    # candidate zones, now, outcome, send_at
    (("America/New_York", "America/Chicago"), "2026-03-10T12:30:00Z", "defer",
     "2026-03-10T13:00:00Z"),  # 08:30 in New York but 07:30 in Chicago
    (("America/New_York", "America/Chicago"), "2026-03-11T00:30:00Z", "allow", None),
    (("America/New_York", "America/Chicago"), "2026-03-11T01:30:00Z", "defer",
     "2026-03-11T13:00:00Z"),  # 21:30 in New York
    (("America/New_York", "Asia/Tokyo"), "2026-03-10T15:00:00Z", "defer", "2026-03-10T23:00:00Z"),
]  # fmt: skip


@pytest.mark.parametrize(("zones", "now", "outcome", "send_at"), UNKNOWN_ZONE_CASES)
def test_unknown_zone_window_must_hold_in_every_candidate_zone(zones, now, outcome, send_at):
    patient = make_patient(timezone=None, candidate_timezones=zones)
    decision = decide(compiled(QUIET), make_context(now=at(now), patient=patient))
    assert decision.outcome == outcome
    assert decision.send_at == at(send_at or now)
    assert all(zone in decision.trace[0].message for zone in zones)


def test_no_common_window_within_a_week_denies():
    narrow = make_rule(
        id="narrow", kind="quiet_hours", effect="defer", window_start=time(9), window_end=time(12)
    )
    patient = make_patient(timezone=None, candidate_timezones=("America/New_York", "Asia/Tokyo"))
    decision = decide(compiled(narrow), make_context(patient=patient))
    assert decision.outcome == "deny"
    assert "never holds in all of America/New_York, Asia/Tokyo" in decision.trace[0].message


# --- frequency caps -----------------------------------------------------------------------

CAP_CASES = [
    # sent (hours ago, purpose), outcome, deciding rule, send_at
    ([], "allow", "consent-required", NOW),
    ([(2, "adherence")], "defer", "cap-day", NOW + 22 * H),
    ([(2, "marketing")], "allow", "consent-required", NOW),  # healthcare caps skip marketing
    ([(25, "appointment")], "allow", "consent-required", NOW),
    ([(5, "adherence"), (2, "appointment")], "defer", "cap-day", NOW + 22 * H),
    ([(25, "adherence"), (49, "adherence"), (73, "appointment")], "deny", "cap-week", None),
    ([(2, "adherence"), (49, "adherence"), (73, "adherence")], "deny", "cap-week", None),
    ([(25, "adherence"), (49, "adherence"), (7 * 24 + 1, "adherence")], "allow",
     "consent-required", NOW),
]  # fmt: skip


@pytest.mark.parametrize(("sent", "outcome", "rule", "send_at"), CAP_CASES)
def test_healthcare_exemption_caps(sent, outcome, rule, send_at):
    history = make_history(*((hours * H, purpose) for hours, purpose in sent))
    decision = decide(compiled(CONSENT, CAP_DAY, CAP_WEEK), make_context(history=history))
    assert (decision.outcome, decision.deciding_rule, decision.send_at) == (outcome, rule, send_at)


def test_cap_counts_the_given_purposes_and_defers_until_enough_have_left_the_window():
    cap = make_rule(
        id="two-a-day",
        kind="frequency_cap",
        effect="defer",
        limit=2,
        window=timedelta(days=1),
        count_purposes=("adherence", "marketing"),
    )
    history = make_history((10 * H, "marketing"), (3 * H, "adherence"), (1 * H, "appointment"))
    decision = decide(compiled(cap), make_context(history=history, purpose="appointment"))
    assert (decision.outcome, decision.send_at) == ("defer", NOW + 14 * H)
    assert decision.trace[0].message.startswith("2 adherence, marketing sent in the last 1d")


def test_cap_of_zero_denies():
    cap = make_rule(id="none", kind="frequency_cap", effect="defer", limit=0, window=H)
    assert decide(compiled(cap), make_context()).outcome == "deny"


# --- consent ------------------------------------------------------------------------------

CONSENT_CASES = [
    # purpose, country, consents, outcome, deciding rule, message fragment
    ("adherence", "US", make_consents(adherence="express"), "allow", None,
     "consent adherence active (express)"),
    ("adherence", "US", {}, "deny", "consent-required", "no active consent for adherence"),
    ("marketing", "US", make_consents(marketing="express"), "deny", "marketing-written",
     "consent marketing is express; needs written"),
    ("marketing", "US", make_consents(marketing="written"), "allow", None, ""),
    ("adherence", "DE", make_consents(adherence="express"), "deny", "gdpr-explicit",
     "needs explicit"),
    ("adherence", "DE", make_consents(adherence="explicit"), "allow", None, ""),
    ("adherence", "US", {"adherence": make_consent(channel="email")}, "deny", "consent-required",
     "covers email, not sms"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("purpose", "country", "consents", "outcome", "rule", "fragment"), CONSENT_CASES
)
def test_consent_and_legal_basis(purpose, country, consents, outcome, rule, fragment):
    patient = make_patient(country=country, timezone="Europe/Berlin" if country == "DE" else None)
    ctx = make_context(patient=patient, consents=consents, purpose=purpose)
    decision = decide(compiled(CONSENT, MARKETING_WRITTEN, GDPR_EXPLICIT), ctx)
    assert (decision.outcome, decision.deciding_rule if rule else None) == (outcome, rule)
    assert any(fragment in r.message for r in decision.trace)


def test_consent_revoked_then_granted_again():
    policy = compiled(CONSENT)
    revoked = ConsentState(
        "adherence",
        active=False,
        legal_basis="express",
        granted_at=at("2026-01-05T10:00:00Z"),
        revoked_at=at("2026-02-01T10:00:00Z"),
    )
    regranted = ConsentState(
        "adherence", active=True, legal_basis="express", granted_at=at("2026-03-01T10:00:00Z")
    )
    first = decide(policy, make_context(consents={"adherence": revoked}))
    second = decide(policy, make_context(consents={"adherence": regranted}))
    assert first.outcome == "deny"
    assert first.trace[0].message == "no active consent for adherence (revoked 2026-02-01)"
    assert first.trace[0].cite == "TCPA 47 CFR 64.1200(a)"
    assert second.outcome == "allow"


# --- expressions and fail-closed ----------------------------------------------------------


@pytest.mark.parametrize(
    ("contains_phi", "allow_phi_sms", "outcome"),
    [(True, False, "deny"), (True, True, "allow"), (False, False, "allow")],
)
def test_phi_needs_the_patients_permission(contains_phi, allow_phi_sms, outcome):
    ctx = make_context(
        patient=make_patient(allow_phi_sms=allow_phi_sms),
        message=make_message(contains_phi=contains_phi),
    )
    decision = decide(compiled(CONSENT, PHI), ctx)
    assert decision.outcome == outcome
    if outcome == "deny":
        assert decision.reasons[0].message == PHI.message


FAILING = [
    # a rule that compiles (it is fine on the sample) but fails on this context
    (make_rule(id="boom", kind="expression", when="message.length / message.segments > 200"),
     make_context(message=make_message(segments=0)), "ZeroDivisionError"),
    (make_rule(id="boom", kind="expression",
               when='message.purpose == "marketing" && history.purpose_24h[message.campaign] > 0'),
     make_context(purpose="marketing", consents=make_consents(marketing="written")), "KeyError"),
    (make_rule(id="boom", kind="quiet_hours", effect="defer", window_start=time(8),
               window_end=time(21)),
     make_context(patient=make_patient(timezone="Mars/Olympus_Mons")), "ZoneInfoNotFoundError"),
    (make_rule(id="boom", kind="expression", when="patient.age < 18"),
     make_context(patient=make_patient(birth_date=None)), "TypeError"),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "ctx", "error"), FAILING)
def test_a_rule_that_fails_denies_with_policy_error(rule, ctx, error):
    decision = decide(compiled(CONSENT, rule), ctx)
    assert (decision.outcome, decision.deciding_rule, decision.send_at) == ("deny", "boom", None)
    assert decision.reasons[0].message.startswith(f"policy-error: {error}")


# --- combination and trace ----------------------------------------------------------------

COMBINATION_CASES = [
    # now, sent hours ago, contains_phi, outcome, deciding rule, send_at
    ("2026-03-10T15:00:00Z", [], False, "allow", "consent-required", "2026-03-10T15:00:00Z"),
    # quiet hours until 12:00Z, cap until the next day 00:00Z: the later one wins
    ("2026-03-11T02:00:00Z", [2], False, "defer", "quiet-hours", "2026-03-12T00:00:00Z"),
    # cap until 2026-03-11T03:00Z, quiet hours until 12:00Z
    ("2026-03-11T02:00:00Z", [23], False, "defer", "quiet-hours", "2026-03-11T12:00:00Z"),
    ("2026-03-11T02:00:00Z", [2], True, "deny", "no-phi", None),  # deny beats two defers
    ("2026-03-11T02:00:00Z", [2, 30, 50], False, "deny", "cap-week", None),
]


@pytest.mark.parametrize(("now", "sent", "phi", "outcome", "rule", "send_at"), COMBINATION_CASES)
def test_deny_overrides_defer_overrides_allow(now, sent, phi, outcome, rule, send_at):
    history = make_history(*((hours * H, "adherence") for hours in sent), now=at(now))
    ctx = make_context(now=at(now), history=history, message=make_message(contains_phi=phi))
    decision = decide(compiled(CONSENT, QUIET, CAP_DAY, CAP_WEEK, PHI), ctx)
    assert (decision.outcome, decision.deciding_rule) == (outcome, rule)
    assert decision.send_at == (at(send_at) if send_at else None)


def test_trace_has_every_rule_in_order_with_a_message():
    rules = (CONSENT, MARKETING_WRITTEN, GDPR_EXPLICIT, QUIET, QUIET_FL, CAP_DAY, CAP_WEEK, PHI)
    decision = decide(compiled(*rules), make_context())
    assert [r.rule for r in decision.trace] == [r.id for r in rules]
    assert [r.effect for r in decision.trace] == [
        "allow", "skip", "skip", "allow", "skip", "allow", "allow", "allow"
    ]  # fmt: skip
    assert all(r.message for r in decision.trace)
    assert decision.trace[1].message == "purpose adherence is not marketing"
    assert decision.trace[2].message.startswith("where is false: patient.country in")


# --- compile errors -----------------------------------------------------------------------

COMPILE_ERRORS = [
    (make_rule(kind="expression", when="message.segments >"), "CEL syntax error at line 1"),
    (make_rule(kind="expression", when="foo > 1"), "unknown name 'foo'"),
    (make_rule(kind="expression", when='patient.ssn == ""'), "unknown field patient.ssn"),
    (make_rule(where="patient.ssn == 1"), "applies_to.where: unknown field patient.ssn"),
    (make_rule(kind="expression", when="consent.research.active"), "key 'research' not found"),
    (make_rule(kind="expression", when="patient.age"), "must be a boolean"),
    (make_rule(purposes=["billing"]), "unknown purpose 'billing'"),
    (make_rule(kind="quiet_hours", effect="defer"), "needs window_start and window_end"),
    (make_rule(kind="quiet_hours", window_start=time(8), window_end=time(8)), "would be empty"),
    (make_rule(kind="frequency_cap", limit=-1, window=H), "limit >= 0"),
    (make_rule(kind="frequency_cap", limit=1, window=timedelta(0)), "window > 0"),
    (make_rule(kind="frequency_cap", limit=1, window=H, count_purposes=("x",)), "unknown purpose"),
    (make_rule(kind="expression"), "needs `when`"),
    (make_rule(legal_bases=("verbal",)), "unknown legal basis 'verbal'"),
    (make_rule(effect="defer"), "cannot defer"),
    (make_rule(when="true"), "`when` is only for expression rules"),
]


@pytest.mark.parametrize(("rule", "fragment"), COMPILE_ERRORS)
def test_compile_errors_carry_the_rules_id_and_line(rule, fragment):
    rule = make_rule(**{**rule.__dict__, "id": "bad-rule", "line": 42})
    with pytest.raises(PolicyError) as raised:
        compile_policy_set([CONSENT, rule], purposes=PURPOSES)
    assert (raised.value.rule, raised.value.line) == ("bad-rule", 42)
    assert fragment in raised.value.message
    assert raised.value.message.startswith("rule bad-rule: ")


def test_duplicate_rule_id_is_reported_at_the_second_rule():
    first = make_rule(id="same", line=3)
    second = make_rule(id="same", line=9)
    with pytest.raises(PolicyError, match="duplicate rule id 'same'") as raised:
        compile_policy_set([first, second], purposes=PURPOSES)
    assert raised.value.line == 9
