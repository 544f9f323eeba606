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
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import cel

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

__all__ = [
    "APPOINTMENT_FIELDS", "AUDIENCE_NAMES", "CONSENT_FIELDS", "DAY", "DEFAULT_PURPOSES",
    "HISTORY_FIELDS", "LOCAL_FIELDS", "MESSAGE_FIELDS", "PATIENT_FIELDS", "POLICY_NAMES",
    "PRESCRIPTION_FIELDS", "RECORD_MAPS", "SAMPLE_NOW", "WEEK", "CompiledExpression", "Names",
    "PolicyError", "Uses", "audience_variables", "bind", "compile_expression",
    "consent_vars", "flat_name", "history_vars", "local_vars", "message_vars", "patient_vars",
    "policy_variables", "sample_audience_variables", "sample_patient",
    "sample_policy_variables",
]  # fmt: skip


class PolicyError(ValueError):
    """A policy definition that cannot be compiled; `line` is the rule's line in its file."""

    def __init__(self, message: str, line: int | None = None, *, rule: str | None = None):
        super().__init__(message)
        self.message = message
        self.line = line
        self.rule = rule


Path = tuple[str, ...]


@dataclass(frozen=True)
class Uses:
    """What expressions read: names used whole, and name -> the paths read as `name.a.b`.

    A path read is compiled as the flat variable `name__a__b`: the cel module converts a
    top-level variable several times faster than a map entry, and only read paths are built.
    """

    whole: frozenset[str] = frozenset()
    fields: Mapping[str, frozenset[Path]] = field(default_factory=dict)

    @property
    def names(self) -> frozenset[str]:
        return self.whole | frozenset(self.fields)

    @cached_property
    def flat_names(self) -> dict[str, tuple[tuple[Path, str], ...]]:
        return {n: tuple((p, flat_name(n, p)) for p in paths) for n, paths in self.fields.items()}

    def __or__(self, other: Uses) -> Uses:
        merged = dict(self.fields)
        for name, read in other.fields.items():
            merged[name] = merged.get(name, frozenset()) | read
        return Uses(self.whole | other.whole, merged)


def flat_name(name: str, path: Path) -> str:
    return "__".join((name, *path))


def bind(variables: Mapping[str, Any], uses: Uses) -> dict[str, Any]:
    """The activation of compiled expressions from nested variables; a path through a null
    record (an absent anchor) is null."""
    out = {name: variables[name] for name in uses.whole}
    for name, pairs in uses.flat_names.items():
        for path, flat in pairs:
            value = variables[name]
            for key in path:
                value = None if value is None else value[key]
            out[flat] = value
    return out


@dataclass(frozen=True)
class CompiledExpression:
    """A CEL expression compiled once (with `name.field` reads rewritten to flat names)."""

    source: str
    where: str
    program: cel.Program = field(repr=False, compare=False)
    uses: Uses = Uses()

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        """Evaluate on nested variables, as policy_variables or audience_variables build."""
        return self.program.execute(bind(variables, self.uses))

    results: dict[tuple[Any, ...], Any] = field(
        default_factory=dict, repr=False, compare=False, hash=False
    )
    """Results by the values of `key_names` (see `run_memoized`)."""

    def run(self, activation: cel.Context) -> Any:
        """Evaluate on a prebuilt activation: `cel.Context(bind(variables, uses))` for these
        uses or a superset (build one per decision and share it among expressions)."""
        return self.program.execute(activation)

    @cached_property
    def key_names(self) -> tuple[str, ...] | None:
        """The flat variables the compiled program reads, when it reads nothing else (no
        name used whole, no macro variable): its result is a function of their values."""
        if self.uses.whole:
            return None
        return tuple(sorted(f for pairs in self.uses.flat_names.values() for _, f in pairs))

    def run_memoized(self, flat: Mapping[str, Any], activation: Callable[[], cel.Context]) -> Any:
        """`run`, remembering the result by the values of `key_names` in `flat` (the flat
        variables of the activation): most decisions of a tick share them (a purpose, an
        encoding, a country), and evaluating CEL is the larger part of deciding. Errors are
        not remembered (they raise again); at MEMO_LIMIT results the memo starts over."""
        names = self.key_names
        if names is None:
            return self.run(activation())
        try:
            key = tuple([flat[n] for n in names])
            known = self.results.get(key, _UNKNOWN)
        except TypeError:  # an unhashable value: evaluate
            return self.run(activation())
        if known is _UNKNOWN:
            known = self.run(activation())
            if len(self.results) >= MEMO_LIMIT:
                self.results.clear()
            self.results[key] = known
        return known


MEMO_LIMIT = 4096
_UNKNOWN = object()


# --- compilation --------------------------------------------------------------------------

_STRING = (
    r"""[rRbB]{0,2}(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''"""
    r"""|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')"""
)
_TOKEN = re.compile(
    rf"(?P<string>{_STRING})"
    r"|(?<![\w.])(?P<name>[A-Za-z_]\w*)(?P<path>(?:\s*\.\s*[A-Za-z_]\w*)*)(?P<call>\s*\()?"
)
_IDENT = re.compile(r"[A-Za-z_]\w*")
_BOUND = re.compile(r"\.\s*(?:all|exists_one|exists|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_HAS_OPEN = re.compile(r"has\s*\(\s*$")
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
    unknown = sorted(set(program.variables()) - set(_BOUND.findall(source)) - set(names))
    if unknown:
        raise PolicyError(
            f"{where}: unknown name {unknown[0]!r}; allowed names: {', '.join(sorted(names))}"
        )
    uses = _scan_uses(source, names, where)
    flat = _flatten_source(source, uses) if uses.fields else source
    compiled = CompiledExpression(source, where, cel.compile(flat), uses)
    if sample is None:
        sample = _default_sample(names)
    if sample is not None:
        _try_sample(compiled, sample, boolean=boolean)
    return compiled


def _syntax_message(text: str) -> str:
    found = _SYNTAX.search(text)
    if not found:
        return f"CEL syntax error: {text.splitlines()[0] if text else 'invalid expression'}"
    line, column, detail = found.groups()
    detail = detail.removeprefix("Syntax error: ")
    return f"CEL syntax error at line {line}, column {column}: {detail}"


def _scan_uses(source: str, names: Names, where: str) -> Uses:
    """Check `name.field` reads against `names`; a name read other than by a path of plain
    field selections (whole, indexed, in has(), or rebound by a macro) is used whole."""
    whole = set(_BOUND.findall(source)) & set(names)
    read: dict[str, set[Path]] = {}
    for token in _TOKEN.finditer(source):
        name = token.group("name")
        if name not in names:
            continue
        path = _path(token)
        if not path or _HAS_OPEN.search(source, 0, token.start()):
            whole.add(name)
        else:
            read.setdefault(name, set()).add(path)
        _check_fields(name, path, names[name], where)
    return Uses(frozenset(whole), {n: frozenset(p) for n, p in read.items() if n not in whole})


def _path(token: re.Match[str]) -> Path:
    """The field selections after the name, less a method called on the last one."""
    path = tuple(_IDENT.findall(token.group("path")))
    return path[:-1] if token.group("call") else path


def _check_fields(name: str, path: Path, fields: frozenset[str] | None, where: str) -> None:
    if path and fields is not None and path[0] not in fields:
        listed = ", ".join(sorted(fields))
        raise PolicyError(f"{where}: unknown field {name}.{path[0]}; {name} has: {listed}")
    entry = RECORD_MAPS.get(name)
    if entry is not None and len(path) > 1 and path[1] not in entry:
        raise PolicyError(
            f"{where}: unknown field {path[1]!r} of a {name} entry; "
            f"each has: {', '.join(sorted(entry))}"
        )


def _flatten_source(source: str, uses: Uses) -> str:
    def replace(token: re.Match[str]) -> str:
        name, call = token.group("name", "call")
        path = _path(token) if name in uses.fields else ()
        if not path:
            return token.group(0)
        method = f".{_IDENT.findall(token.group('path'))[-1]}" if call else ""
        return flat_name(name, path) + method + (call or "")

    return _TOKEN.sub(replace, source)


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
