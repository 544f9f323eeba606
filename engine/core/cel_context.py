"""CEL expressions compiled once, and what they read (the names and plain variables are in
engine.core.cel_variables and re-exported here).

Value conventions (documented for rule authors in docs/policy-language.md):
- instants (`now`, `consent.<purpose>.granted_at`, `appointment.starts_at`) are CEL timestamps;
- calendar days (`local.date`, `prescription.refill_due`) are ISO strings "YYYY-MM-DD", so
  they compare as strings and `timestamp(d + "T00:00:00Z")` turns one into a timestamp;
- unknown values: `patient.age` is null, `patient.region` and `patient.timezone` are "";
- `local.weekday` is ISO: 1 = Monday ... 7 = Sunday;
- `consent`, `history.purpose_24h` and `history.purpose_7d` hold every declared purpose,
  so `history.purpose_24h.adherence` and `consent.marketing.active` never miss a key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import cel

from engine.core.cel_uses import (  # re-exported: what expressions read
    BOUND,
    UNBOUND,
    Path,
    PolicyError,
    Read,
    Uses,
    bind,
    flat_name,
    flatten_source,
    scan_uses,
)
from engine.core.cel_variables import (  # re-exported: the variables' names and builders
    APPOINTMENT_FIELDS,
    AUDIENCE_NAMES,
    CONSENT_FIELDS,
    DAY,
    DEFAULT_PURPOSES,
    HISTORY_FIELDS,
    LOCAL_FIELDS,
    MESSAGE_FIELDS,
    PATIENT_FIELDS,
    POLICY_NAMES,
    PRESCRIPTION_FIELDS,
    RECORD_MAPS,
    SAMPLE_NOW,
    WEEK,
    Names,
    audience_variables,
    consent_vars,
    history_vars,
    local_vars,
    message_vars,
    patient_vars,
    policy_variables,
    sample_audience_variables,
    sample_patient,
    sample_policy_variables,
)
from engine.core.memo import keep

__all__ = [
    "APPOINTMENT_FIELDS", "AUDIENCE_NAMES", "BOUND", "CONSENT_FIELDS", "DAY",
    "DEFAULT_PURPOSES", "HISTORY_FIELDS", "LOCAL_FIELDS", "MESSAGE_FIELDS", "PATIENT_FIELDS",
    "POLICY_NAMES", "PRESCRIPTION_FIELDS", "RECORD_MAPS", "SAMPLE_NOW", "UNBOUND", "WEEK",
    "CompiledExpression", "Names", "Path", "PolicyError", "Read", "Uses", "audience_variables",
    "bind", "compile_expression", "consent_vars", "flat_name", "flatten_source", "history_vars",
    "local_vars", "message_vars", "patient_vars", "policy_variables",
    "sample_audience_variables", "sample_patient", "sample_policy_variables", "scan_uses",
]  # fmt: skip


@dataclass(frozen=True)
class CompiledExpression:
    """A CEL expression compiled once, with its reads rewritten to flat names (see
    engine.core.cel_uses); `fallback` is the expression as written, for indexed reads that
    are not plain map entries."""

    source: str
    where: str
    program: cel.Program = field(repr=False, compare=False)
    uses: Uses = field(default_factory=Uses)
    fallback: CompiledExpression | None = field(default=None, repr=False, compare=False)
    results: dict[tuple[Any, ...], Any] = field(
        default_factory=dict, repr=False, compare=False, hash=False
    )
    """Results by the values of `key_names` (see `run_memoized`)."""

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        """Evaluate on nested variables, as policy_variables or audience_variables build."""
        flat = bind(variables, self.uses)
        if self.fallback is not None and self.unbound(flat):
            return self.fallback.evaluate(variables)
        return self.program.execute(flat)

    def evaluate_memoized(self, variables: Mapping[str, Any]) -> Any:
        """`evaluate`, remembering results as `run_memoized` does."""
        flat = bind(variables, self.uses)
        return self.run_memoized(flat, lambda: flat, lambda: variables)

    def run(self, activation: cel.Context | Mapping[str, Any]) -> Any:
        """Evaluate on a prebuilt activation: `cel.Context(bind(variables, uses))` for these
        uses or a superset (build one per decision and share it among expressions)."""
        return self.program.execute(activation)

    def unbound(self, flat: Mapping[str, Any]) -> bool:
        """Whether an indexed read has no plain value in `flat` (then: `fallback`)."""
        return any(flat[name] is UNBOUND for name in self.uses.indexed_names)

    @cached_property
    def key_names(self) -> tuple[str, ...] | None:
        """The flat variables the compiled program reads, when it reads nothing else (no
        name used whole, no macro variable): its result is a function of their values."""
        if self.uses.whole:
            return None
        return tuple(sorted(self.uses.reads))

    def run_memoized(
        self,
        flat: Mapping[str, Any],
        activation: Callable[[], cel.Context | Mapping[str, Any]],
        nested: Callable[[], Mapping[str, Any]] | None = None,
    ) -> Any:
        """`run`, remembering the result by the values of `key_names` in `flat` (the flat
        variables of the activation, which may compute them as they are read): most
        decisions of a tick share them (a purpose, an encoding, a country, a consent's legal
        basis), and evaluating CEL is the larger part of deciding. Errors are not
        remembered (they raise again); at MEMO_LIMIT results the memo starts over. An
        unbound indexed read evaluates `fallback` on the nested variables (`nested()`)."""
        if self.fallback is not None and self.unbound(flat):
            if nested is None:
                raise ValueError(f"{self.where}: nested variables are needed to evaluate")
            return self.fallback.evaluate(nested())
        names = self.key_names
        if names is None:
            return self.run(activation())
        try:
            key = tuple([flat[n] for n in names])
            known = self.results.get(key, _UNKNOWN)
        except TypeError:  # an unhashable value: evaluate
            return self.run(activation())
        if known is _UNKNOWN:
            known = keep(self.results, key, self.run(activation()), limit=MEMO_LIMIT)
        return known


MEMO_LIMIT = 4096
_UNKNOWN = object()


# --- compilation --------------------------------------------------------------------------

_SYNTAX = re.compile(r"<input>:(\d+):(\d+): ([^\n]*)")


def compile_expression(
    source: str,
    *,
    names: Names,
    where: str,
    sample: Mapping[str, Any] | None = None,
    boolean: bool = True,
) -> CompiledExpression:
    """Compile `source`, rejecting syntax errors, names or fields outside `names`, and
    expressions that fail (missing key, type error) or are not boolean on a sample context.
    `sample` (nested variables) defaults to a typical one for POLICY_NAMES or AUDIENCE_NAMES."""
    try:
        program = cel.compile(source)
    except ValueError as exc:
        raise PolicyError(f"{where}: {_syntax_message(str(exc))}") from None
    unknown = sorted(set(program.variables()) - set(BOUND.findall(source)) - set(names))
    if unknown:
        raise PolicyError(
            f"{where}: unknown name {unknown[0]!r}; allowed names: {', '.join(sorted(names))}"
        )
    uses = scan_uses(source, names, where)
    fallback = None
    if uses.indexed:
        fallback = _flattened(source, where, scan_uses(source, names, where, indexed=False))
    compiled = replace(_flattened(source, where, uses), fallback=fallback)
    if sample is None:
        sample = _default_sample(names)
    if sample is not None:
        _try_sample(compiled, sample, boolean=boolean)
    return compiled


def _flattened(source: str, where: str, uses: Uses) -> CompiledExpression:
    flat = flatten_source(source, uses) if uses.fields or uses.indexed else source
    return CompiledExpression(source, where, cel.compile(flat), uses)


def _syntax_message(text: str) -> str:
    found = _SYNTAX.search(text)
    if not found:
        return f"CEL syntax error: {text.splitlines()[0] if text else 'invalid expression'}"
    line, column, detail = found.groups()
    detail = detail.removeprefix("Syntax error: ")
    return f"CEL syntax error at line {line}, column {column}: {detail}"


def _default_sample(names: Names) -> Mapping[str, Any] | None:
    if names is POLICY_NAMES:
        return sample_policy_variables()
    if names is AUDIENCE_NAMES:
        return sample_audience_variables()
    return None


def _try_sample(compiled: CompiledExpression, sample: Mapping[str, Any], *, boolean: bool) -> None:
    """Run the expression on typical data: a missing key, a type mismatch or an unknown
    function there is a mistake in the expression, not in the data."""
    where = compiled.where
    try:
        result = compiled.evaluate(sample)
    except KeyError as exc:
        raise PolicyError(
            f"{where}: key {exc} not found on a sample context "
            "(only documented fields and declared purposes exist)"
        ) from None
    except TypeError as exc:
        detail = _first_sentence(exc)
        raise PolicyError(f"{where}: type error on a sample context: {detail}") from None
    except RuntimeError as exc:
        if "Undefined variable or function" not in str(exc):
            return
        raise PolicyError(f"{where}: {_first_sentence(exc)}") from None
    except (ArithmeticError, LookupError, ValueError):
        return  # data-dependent (division by zero, index out of range): decided at run time
    if boolean and not isinstance(result, bool):
        raise PolicyError(f"{where}: must be a boolean, got {type(result).__name__} {result!r}")


def _first_sentence(exc: BaseException) -> str:
    return str(exc).split(". ", 1)[0]
