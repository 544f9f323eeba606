"""Policy rules compiled once, and `decide`: allow, defer or deny with a trace of every rule.

Deny overrides defer overrides allow. A rule that fails while being evaluated denies
(fail closed) with a message starting "policy-error: ".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from engine.core.cel_context import (
    DEFAULT_PURPOSES,
    POLICY_NAMES,
    CompiledExpression,
    PolicyError,
    Uses,
    compile_expression,
    sample_policy_variables,
)
from engine.core.domain import (
    LEGAL_BASES,
    Decision,
    DecisionContext,
    Rule,
    RuleResult,
)
from engine.core.policy_evaluation import Evaluation, boolean
from engine.core.policy_memo import DecisionKeys, decision_keys
from engine.core.quiet_hours import SEARCH_HORIZON, in_window, next_window_start

__all__ = ["CompiledPolicySet", "CompiledRule", "PolicyError", "compile_policy_set", "decide"]

KINDS = ("consent", "quiet_hours", "frequency_cap", "expression")

# What CEL (common-expression-language 0.10) raises at run time, found by experiment:
# KeyError (missing map key), IndexError, TypeError ("No such overload", null member access),
# ZeroDivisionError, OverflowError, ValueError (conversion), RuntimeError (unknown function,
# bad regex, int("x")); plus zoneinfo's ZoneInfoNotFoundError (a KeyError) for a bad zone.
RULE_ERRORS = (ArithmeticError, LookupError, RuntimeError, TypeError, ValueError, AttributeError)


@dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    purposes: frozenset[str] | None
    where: CompiledExpression | None
    when: CompiledExpression | None
    count_purposes: frozenset[str] | None
    detail: str = ""
    """Precomputed message text: the window, the cap's scope."""
    memo: dict[tuple[object, ...], RuleResult] = field(
        default_factory=dict, compare=False, repr=False
    )
    """Results that depend only on the key (a skip, a consent that holds, a false `when`):
    made once, since building a RuleResult costs about as much as evaluating the rule."""
    latest: dict[tuple[str, ...], tuple[datetime, RuleResult]] = field(
        default_factory=dict, compare=False, repr=False
    )
    """Quiet hours: the result for a zone set at the latest time it was decided for."""


@dataclass(frozen=True)
class CompiledPolicySet:
    """Rules in evaluation order; `uses` is what their CEL reads (to build only that)."""

    rules: tuple[CompiledRule, ...]
    purposes: tuple[str, ...]
    uses: Uses
    keys: DecisionKeys | None = field(default=None, compare=False, repr=False)
    """How decisions are remembered (engine.core.policy_memo); None: they are not."""


# --- compilation --------------------------------------------------------------------------


def compile_policy_set(rules: Sequence[Rule], *, purposes: Sequence[str]) -> CompiledPolicySet:
    """Validate every rule and compile its CEL once; the first problem raises PolicyError
    carrying the rule's id and line."""
    sample = sample_policy_variables(tuple(purposes) or DEFAULT_PURPOSES)
    seen: set[str] = set()
    compiled: list[CompiledRule] = []
    for rule in rules:
        try:
            if rule.id in seen:
                raise PolicyError(f"duplicate rule id {rule.id!r}")
            seen.add(rule.id)
            compiled.append(_compile_rule(rule, frozenset(purposes), sample))
        except PolicyError as exc:
            raise PolicyError(f"rule {rule.id}: {exc.message}", rule.line, rule=rule.id) from None
    uses = Uses()
    for expression in (e for c in compiled for e in (c.where, c.when) if e is not None):
        uses |= expression.uses
    keys = decision_keys(uses, {c.rule.kind for c in compiled})
    return CompiledPolicySet(tuple(compiled), tuple(purposes), uses, keys)


def _compile_rule(
    rule: Rule, purposes: frozenset[str], sample: Mapping[str, object]
) -> CompiledRule:
    _validate_parameters(rule, purposes)
    where = when = None
    if rule.applies_to.where is not None:
        where = compile_expression(
            rule.applies_to.where, names=POLICY_NAMES, where="applies_to.where", sample=sample
        )
    if rule.when is not None:
        when = compile_expression(rule.when, names=POLICY_NAMES, where="when", sample=sample)
    count = rule.count_purposes if rule.count_purposes is not None else rule.applies_to.purposes
    return CompiledRule(
        rule=rule,
        purposes=_frozen(rule.applies_to.purposes),
        where=where,
        when=when,
        count_purposes=_frozen(count),
        detail=_detail(rule, count),
    )


def _detail(rule: Rule, count: Sequence[str] | None) -> str:
    if rule.kind == "quiet_hours" and rule.window_start and rule.window_end:
        return f"{rule.window_start:%H:%M}-{rule.window_end:%H:%M}"
    if rule.kind == "frequency_cap" and rule.window is not None:
        scope = f" {', '.join(sorted(count))}" if count is not None else ""
        return f"{scope} sent in the last {format_duration(rule.window)}; limit {rule.limit}"
    return ""


def _validate_parameters(rule: Rule, purposes: frozenset[str]) -> None:
    problems: list[str] = []
    if rule.kind not in KINDS:
        problems.append(f"unknown kind {rule.kind!r}; kinds: {', '.join(KINDS)}")
    if rule.effect not in ("deny", "defer"):
        problems.append(f"effect must be deny or defer, not {rule.effect!r}")
    elif rule.effect == "defer" and rule.kind in ("consent", "expression"):
        problems.append(f"a {rule.kind} rule cannot defer (no time to defer to); use deny")
    for label, listed in (
        ("applies_to.purposes", rule.applies_to.purposes),
        ("count_purposes", rule.count_purposes),
    ):
        unknown = sorted(set(listed or ()) - purposes)
        if unknown:
            problems.append(
                f"{label}: unknown purpose {unknown[0]!r}; purposes: {', '.join(sorted(purposes))}"
            )
    problems.extend(_kind_problems(rule))
    if problems:
        raise PolicyError(problems[0])


def _kind_problems(rule: Rule) -> list[str]:
    problems: list[str] = []
    if rule.kind != "expression" and rule.when is not None:
        problems.append("`when` is only for expression rules; use applies_to.where")
    if rule.kind == "consent":
        bad = sorted(set(rule.legal_bases) - set(LEGAL_BASES))
        if bad:
            problems.append(f"unknown legal basis {bad[0]!r}; bases: {', '.join(LEGAL_BASES)}")
    elif rule.kind == "quiet_hours":
        if rule.window_start is None or rule.window_end is None:
            problems.append("quiet_hours needs window_start and window_end")
        elif rule.window_start == rule.window_end:
            problems.append("window_start equals window_end; the window would be empty")
    elif rule.kind == "frequency_cap":
        if rule.limit is None or rule.limit < 0:
            problems.append("frequency_cap needs limit >= 0")
        if rule.window is None or rule.window <= timedelta(0):
            problems.append("frequency_cap needs a window > 0")
    elif rule.kind == "expression" and not rule.when:
        problems.append("expression rule needs `when`")
    return problems


def _frozen(values: Sequence[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


# --- decision -----------------------------------------------------------------------------


def decide(policy_set: CompiledPolicySet, ctx: DecisionContext) -> Decision:
    """Evaluate every rule in order; deny overrides defer overrides allow. A deferred
    decision's send_at is the latest defer_until, so that every deferring rule holds.
    A decision on the same facts as an earlier one is that one (engine.core.policy_memo)."""
    keys = policy_set.keys
    if keys is None:
        return decide_unmemoized(policy_set, ctx)
    try:
        key = keys.key(ctx)
    except RULE_ERRORS:  # a fact that cannot be read (a zone that does not exist): the
        return decide_unmemoized(policy_set, ctx)  # rules that read it fail closed
    decision = keys.remembered(key)
    if decision is None:
        decision = decide_unmemoized(policy_set, ctx)
        keys.remember(key, decision)
    return decision


def decide_unmemoized(policy_set: CompiledPolicySet, ctx: DecisionContext) -> Decision:
    """`decide`, evaluating every rule (whatever was decided before)."""
    evaluation = Evaluation(policy_set, ctx)
    trace = tuple(_evaluate(compiled, evaluation) for compiled in policy_set.rules)
    effects = {result.effect for result in trace}
    if "deny" in effects:
        return Decision("deny", None, trace)
    if "defer" in effects:
        times = [r.defer_until for r in trace if r.effect == "defer" and r.defer_until]
        return Decision("defer", max(times, default=None), trace)
    return Decision("allow", ctx.now, trace)


def _evaluate(compiled: CompiledRule, evaluation: Evaluation) -> RuleResult:
    rule = compiled.rule
    purpose = evaluation.ctx.message.purpose
    try:
        if compiled.purposes is not None and purpose not in compiled.purposes:
            return _memo(compiled, ("purpose", purpose), "skip", _skip_purpose, purpose)
        if compiled.where is not None and not evaluation.holds(compiled.where):
            return _memo(compiled, ("where",), "skip", _skip_where)
        return _CHECKS[rule.kind](compiled, evaluation)
    except RULE_ERRORS as exc:  # fail closed: a rule that cannot be evaluated denies
        return _result(rule, "deny", f"policy-error: {type(exc).__name__}: {exc}")


def _result(
    rule: Rule, effect: str, message: str, defer_until: datetime | None = None
) -> RuleResult:
    return RuleResult(rule.id, rule.policy, effect, message, rule.cite, defer_until)  # type: ignore[arg-type]


def _memo(
    compiled: CompiledRule,
    key: tuple[object, ...],
    effect: str,
    message: Callable[..., str],
    *args: object,
) -> RuleResult:
    """The result for `key`, made with `message(compiled, *args)` the first time only."""
    result = compiled.memo.get(key)
    if result is None:
        result = _result(compiled.rule, effect, message(compiled, *args))
        compiled.memo[key] = result
    return result


def _skip_purpose(compiled: CompiledRule, purpose: str) -> str:
    listed = compiled.rule.applies_to.purposes or ()
    return f"purpose {purpose} is not {listed[0] if len(listed) == 1 else ', '.join(listed)}"


def _skip_where(compiled: CompiledRule) -> str:
    return f"where is false: {compiled.where.source if compiled.where else ''}"


def _check_consent(compiled: CompiledRule, evaluation: Evaluation) -> RuleResult:
    rule, ctx = compiled.rule, evaluation.ctx
    purpose = ctx.message.purpose
    consent = ctx.consents.get(purpose)
    if consent is None or not consent.active:
        revoked = consent.revoked_at if consent is not None else None
        when = f" (revoked {revoked:%Y-%m-%d})" if revoked else ""
        return _result(rule, rule.effect, f"no active consent for {purpose}{when}")
    if consent.channel != "sms":
        return _result(rule, rule.effect, f"consent {purpose} covers {consent.channel}, not sms")
    basis = consent.legal_basis or "no basis recorded"
    if rule.legal_bases and consent.legal_basis not in rule.legal_bases:
        wanted = " or ".join(rule.legal_bases)
        return _result(rule, rule.effect, f"consent {purpose} is {basis}; needs {wanted}")
    return _memo(compiled, ("consent", purpose, basis), "allow", _consent_holds, purpose, basis)


def _consent_holds(compiled: CompiledRule, purpose: str, basis: str) -> str:
    return f"consent {purpose} active ({basis})"


def _check_expression(compiled: CompiledRule, evaluation: Evaluation) -> RuleResult:
    rule, when = compiled.rule, compiled.when
    assert when is not None  # compile_policy_set guarantees it
    if boolean(when, evaluation.run(when)):
        return _memo(compiled, ("when", True), rule.effect, _when_true)
    return _memo(compiled, ("when", False), "allow", _when_false)


def _when_true(compiled: CompiledRule) -> str:
    rule = compiled.rule
    return rule.message or rule.description or rule.when or ""


def _when_false(compiled: CompiledRule) -> str:
    return f"when is false: {compiled.rule.when}"


def _check_frequency_cap(compiled: CompiledRule, evaluation: Evaluation) -> RuleResult:
    """Rolling window: a message counts while `at > now - window` (committed ones too)."""
    rule, now = compiled.rule, evaluation.ctx.now
    limit, window, wanted = rule.limit or 0, rule.window or timedelta(0), compiled.count_purposes
    since = now - window
    times = sorted(
        m.at
        for m in evaluation.ctx.history.sent
        if m.at > since and (wanted is None or m.purpose in wanted)
    )
    if len(times) < limit:
        return _memo(compiled, ("count", len(times)), "allow", _cap_summary, len(times))
    summary = _cap_summary(compiled, len(times))
    if rule.effect == "deny" or limit == 0:
        return _result(rule, "deny", summary)
    until = times[len(times) - limit] + window
    return _result(rule, "defer", f"{summary}; next slot {until.isoformat('T', 'minutes')}", until)


def _cap_summary(compiled: CompiledRule, count: int) -> str:
    return f"{count}{compiled.detail}"


def _check_quiet_hours(compiled: CompiledRule, evaluation: Evaluation) -> RuleResult:
    """Depends on the time and the patient's zones only: decided once per zone set and
    time (a tick decides most of its population for one time), keeping only the latest
    time so that a long-running process does not accumulate results."""
    ctx = evaluation.ctx
    cached = compiled.latest.get(ctx.patient.zones)
    if cached is not None and cached[0] == ctx.now:
        return cached[1]
    result = _quiet_hours(compiled, evaluation)
    compiled.latest[ctx.patient.zones] = (ctx.now, result)
    return result


def _quiet_hours(compiled: CompiledRule, evaluation: Evaluation) -> RuleResult:
    rule, ctx = compiled.rule, evaluation.ctx
    start, end = rule.window_start, rule.window_end
    assert start is not None and end is not None  # compile_policy_set guarantees it
    local, clocks = evaluation.clocks()
    window = compiled.detail
    if all(in_window(t.time(), start, end) for t in local):
        return _result(rule, "allow", f"local time {clocks} within {window}")
    if rule.effect == "deny":
        return _result(rule, "deny", f"local time {clocks} outside {window}")
    until = next_window_start(ctx.now, ctx.patient.zones, start, end)
    if until is None:
        every = ", ".join(ctx.patient.zones)
        days = SEARCH_HORIZON.days
        return _result(rule, "deny", f"{window} never holds in all of {every} within {days} days")
    first = until.astimezone(local[0].tzinfo)
    next_local = first.replace(tzinfo=None).isoformat(" ", "minutes")
    message = f"local time {clocks} outside {window}; next {next_local} {first.tzinfo}"
    return _result(rule, "defer", message, until)


_CHECKS: Mapping[str, Callable[[CompiledRule, Evaluation], RuleResult]] = {
    "consent": _check_consent,
    "quiet_hours": _check_quiet_hours,
    "frequency_cap": _check_frequency_cap,
    "expression": _check_expression,
}


def format_duration(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
