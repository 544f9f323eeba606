"""Sandboxed Jinja2 rendering of SMS templates (their lint is in engine.core.lint).

Defense in depth. A static check over the template's AST rejects, naming the file line:
  - any name, attribute or constant item starting with "_" (``''.__class__``,
    ``x['__globals__']``, ``{% set __x %}``),
  - the ``attr`` and ``format`` filters, ``.format``/``.format_map``, %-formatting and ``**``,
  - every function or method call (SMS templates use filters instead),
  - the names self, range, lipsum, dict, cycler, joiner, namespace, loop, caller, varargs, kwargs,
  - ``{% for %}``, ``{% macro %}``, ``{% call %}`` (no loops or recursion: output stays bounded),
    and include, import, extends and block (templates are self-contained).
The runtime is an ImmutableSandboxedEnvironment with StrictUndefined, no globals, a short
list of filters, no calls, bounded string repetition and a cap on the output length.

Block tags on a line of their own leave no blank line (trim_blocks, lstrip_blocks), and the
text is stripped. Filters: upper, lower, title, capitalize, trim, truncate, replace, default,
join, first, last, length, count, int, float, round, abs, string, `gsm` (transliterate to
the GSM-7 alphabet: Zoë -> Zoe), and `date`/`time`, which
format a date, time or ISO string with month and day names in the template's language.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any, Literal

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from engine.core import sms
from engine.core.domain import RenderedMessage, Template
from engine.core.memo import keep

Severity = Literal["error", "warning", "info"]
MAX_INTERMEDIATE = 10_000  # longest string one expression may build (replace, *)

_FILTERS = ("abs", "capitalize", "count", "d", "default", "first", "float", "int", "join", "last")
_FILTERS += ("length", "lower", "round", "string", "title", "trim", "truncate", "upper")
# months | abbreviated months | days from Monday | abbreviated days | AM, PM
_NAMES = {
    "en": "January February March April May June July August September October November"
    " December|Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec|Monday Tuesday Wednesday"
    " Thursday Friday Saturday Sunday|Mon Tue Wed Thu Fri Sat Sun|AM PM",
    "es": "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre"
    " diciembre|ene feb mar abr may jun jul ago sept oct nov dic|lunes martes miércoles"
    " jueves viernes sábado domingo|lun mar mié jue vie sáb dom|a._m. p._m.",
}
_DEFAULT_PATTERNS = {"en": ("%B %-d", "%-I:%M %p"), "es": ("%-d de %B", "%-H:%M")}
_DIRECTIVE = re.compile(r"%(-?)(.)")
_DATE_CODES, _TIME_CODES = frozenset("aAbBdmyY"), frozenset("HIMp")
_NUMBER_FIELDS = dict(d="day", m="month", y="year", Y="year", H="hour", I="hour", M="minute")


class TemplateError(Exception):
    """A template that cannot compile or render; `line` is the line in the template file."""

    def __init__(self, message: str, *, file: str = "", line: int | None = None) -> None:
        super().__init__(message)
        self.message, self.file, self.line = message, file, line

    def __str__(self) -> str:
        where = self.file or "<template>"
        return f"{where}:{self.line}: {self.message}" if self.line else f"{where}: {self.message}"


class OutputTooLong(TemplateError):
    """The rendered text is longer than the caller's bound."""


def language_of(locale: str) -> str:
    """The name tables a locale uses ("es-US" -> "es"); English when there are none."""
    language = re.split(r"[-_]", locale, maxsplit=1)[0].lower()
    return language if language in _NAMES else "en"


def format_datetime(value: Any, pattern: str, language: str = "en") -> str:
    """strftime over a safe subset (%a %A %b %B %d %m %y %Y %H %I %M %p %%; "%-d" unpadded)
    with names in `language`, whatever the process locale. A datetime shows in its own zone.
    """
    moment: Any = temporal_value(value)
    if moment is None:
        raise ValueError(f"expected a date, time or ISO 8601 string, got {value!r}")
    check_pattern(
        pattern, date_ok=isinstance(moment, date), time_ok=isinstance(moment, datetime | time)
    )
    months, short_months, days, short_days, halves = (
        part.split() for part in _NAMES[language_of(language)].split("|")
    )

    def one(match: re.Match[str]) -> str:
        unpadded, code = match.groups()
        if code == "%":
            return "%"
        if code == "p":
            return halves[moment.hour >= 12].replace("_", " ")
        if code in "aA":
            return (short_days if code == "a" else days)[moment.weekday()]
        if code in "bB":
            return (short_months if code == "b" else months)[moment.month - 1]
        number = getattr(moment, _NUMBER_FIELDS[code])
        number = {"y": number % 100, "I": number % 12 or 12}.get(code, number)
        return str(number) if unpadded or code == "Y" else f"{number:02d}"

    return _DIRECTIVE.sub(one, pattern)


def check_pattern(pattern: str, *, date_ok: bool = True, time_ok: bool = True) -> None:
    """Raise ValueError for a directive outside the safe subset or not applicable to the value."""
    for _, code in _DIRECTIVE.findall(pattern):
        if code not in _DATE_CODES | _TIME_CODES | {"%"}:
            raise ValueError(f"unsupported date directive %{code}")
        if (code in _DATE_CODES and not date_ok) or (code in _TIME_CODES and not time_ok):
            raise ValueError(f"%{code} does not apply to a {'time' if date_ok else 'date'}")


def temporal_value(value: Any) -> date | time | None:
    """A date, time or datetime, parsed from ISO 8601 when a string ("2024-03-15", "09:30")."""
    if isinstance(value, date | time):
        return value
    if not isinstance(value, str) or value.isdigit():
        return None
    for parse in (date.fromisoformat, datetime.fromisoformat, time.fromisoformat):
        try:
            return parse(value)
        except ValueError:
            continue
    return None


def _replace(value: Any, old: Any, new: Any, count: int = -1) -> str:
    """str.replace that refuses to build more than MAX_INTERMEDIATE characters."""
    text, old, new = str(value), str(old), str(new)
    hits = text.count(old) if count < 0 else min(count, text.count(old))
    if len(text) + hits * (len(new) - len(old)) > MAX_INTERMEDIATE:
        raise SecurityError("replace would build a string that is too long")
    return text.replace(old, new, count)


class _SmsSandbox(ImmutableSandboxedEnvironment):
    """The Jinja sandbox, plus: no calls at all, no ** or %-formatting, bounded repetition."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        raise SecurityError(f"calling {obj!r} is not allowed in SMS templates")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" or (operator == "%" and isinstance(left, str)):
            raise SecurityError(f"the {operator} operator is not allowed in SMS templates")
        if operator == "*":
            size = max(len(x) if isinstance(x, str | list | tuple) else 0 for x in (left, right))
            times = next((x for x in (left, right) if isinstance(x, int)), 1)
            if size * times > MAX_INTERMEDIATE:
                raise SecurityError("repetition would build a string that is too long")
        return super().call_binop(context, operator, left, right)


@functools.cache
def make_environment(language: str = "en") -> jinja2.Environment:
    """The sandboxed environment for one language, built on first use and then shared."""
    env = _SmsSandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
        cache_size=0,
    )
    env.globals.clear()
    date_pattern, time_pattern = _DEFAULT_PATTERNS.get(language, _DEFAULT_PATTERNS["en"])
    env.filters = {name: env.filters[name] for name in _FILTERS}
    env.filters["date"] = lambda v, p=date_pattern: format_datetime(v, p, language)
    env.filters["time"] = lambda v, p=time_pattern: format_datetime(v, p, language)
    env.filters["replace"] = _replace
    env.filters["gsm"] = lambda v: sms.to_gsm(str(v))
    return env


@dataclass(frozen=True)
class CompiledTemplate:
    """A template parsed and compiled once, rendered many times."""

    template: Template
    jinja: jinja2.Template = field(repr=False, compare=False)
    ast: nodes.Template = field(repr=False, compare=False)
    rendered: dict[tuple[object, ...], RenderedMessage] = field(
        default_factory=dict, repr=False, compare=False
    )
    """Messages by the text values of the variables the template reads (see `render`)."""

    @property
    def file(self) -> str:
        return where_of(self.template)

    @functools.cached_property
    def reads(self) -> tuple[str, ...]:
        """The variables the template reads: its output is a function of their values (the
        sandbox has no globals, calls or other source of values)."""
        return tuple(sorted(jinja2.meta.find_undeclared_variables(self.ast)))


def compile_template(template: Template) -> CompiledTemplate:
    """Parse, check and compile once; TemplateError naming the file line on a syntax error or
    anything the static check forbids."""
    ast = parse_body(template)
    for line, message in static_problems(ast):
        raise TemplateError(message, file=where_of(template), line=file_line(template, line))
    return build_compiled(template, ast)


def _compile_unchecked(template: Template) -> CompiledTemplate:
    """Compile without the static check: only to prove the runtime sandbox holds on its own."""
    return build_compiled(template, parse_body(template))


def where_of(template: Template) -> str:
    return template.file or f"templates/{template.id}.{template.locale}.sms.j2"


def file_line(template: Template, body_line: int | None) -> int | None:
    return None if body_line is None else template.body_line + body_line - 1


def _syntax_error(template: Template, error: jinja2.TemplateSyntaxError) -> TemplateError:
    line = file_line(template, error.lineno)
    return TemplateError(error.message or str(error), file=where_of(template), line=line)


def parse_body(template: Template) -> nodes.Template:
    env = make_environment(language_of(template.locale))
    try:
        return env.parse(template.body, name=where_of(template), filename=where_of(template))
    except jinja2.TemplateSyntaxError as e:
        raise _syntax_error(template, e) from e


def build_compiled(template: Template, ast: nodes.Template) -> CompiledTemplate:
    env = make_environment(language_of(template.locale))
    try:
        code = env.compile(ast, name=where_of(template), filename=where_of(template))
    except jinja2.TemplateSyntaxError as e:
        raise _syntax_error(template, e) from e
    return CompiledTemplate(template, env.template_class.from_code(env, code, {}), ast)


FORBIDDEN_NAMES = frozenset({"self", "range", "lipsum", "dict", "cycler", "joiner", "namespace"})
FORBIDDEN_NAMES |= {"loop", "caller", "varargs", "kwargs"}
_SELF_CONTAINED = "templates are self-contained: no include, import, extends or block"
_FORBIDDEN_NODES: dict[type[nodes.Node], str] = {
    nodes.For: "{% for %} loops are not allowed: an SMS template renders one bounded message",
    nodes.Macro: "macros are not allowed in SMS templates",
    nodes.CallBlock: "{% call %} is not allowed in SMS templates",
    nodes.Pow: "the ** operator is not allowed in SMS templates",
    **dict.fromkeys(
        (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends, nodes.Block),
        _SELF_CONTAINED,
    ),
}


def static_problems(ast: nodes.Template) -> list[tuple[int, str]]:
    """(body line, message) for every construct the SMS sandbox forbids, in template order."""
    found = ((node.lineno, _problem(node)) for node in ast.find_all(nodes.Node))
    return [(line, message) for line, message in found if message]


def _problem(node: nodes.Node) -> str | None:
    if type(node) in _FORBIDDEN_NODES:
        return _FORBIDDEN_NODES[type(node)]
    if isinstance(node, nodes.Name) and (node.name[:1] == "_" or node.name in FORBIDDEN_NAMES):
        return f"the name {node.name!r} is not allowed in SMS templates"
    if isinstance(node, nodes.Getattr | nodes.Getitem):
        name = node.attr if isinstance(node, nodes.Getattr) else const_str(node.arg)
        if name.startswith("_"):
            return f"access to the private attribute {name!r} is not allowed"
        if name in ("format", "format_map"):
            return f"str.{name} is not allowed (format strings can reach attributes)"
    if isinstance(node, nodes.Call):
        return f"calling {_describe(node.node)} is not allowed: use a filter (e.g. |title)"
    if isinstance(node, nodes.Mod) and isinstance(getattr(node.left, "value", None), str):
        return "%-formatting is not allowed in SMS templates: join text with ~"
    if isinstance(node, nodes.Filter) and node.name in ("attr", "format"):
        return f"the {node.name!r} filter is not allowed in SMS templates"
    if isinstance(node, nodes.Filter) and node.name in ("date", "time") and node.args:
        try:
            check_pattern(const_str(node.args[0]))
        except ValueError as e:
            return f"|{node.name}: {e}"
    return None


def const_str(node: nodes.Node) -> str:
    return node.value if isinstance(node, nodes.Const) and isinstance(node.value, str) else ""


def _describe(node: nodes.Node) -> str:
    if isinstance(node, nodes.Getattr):
        return f".{node.attr}()"
    return f"{node.name}()" if isinstance(node, nodes.Name) else "a function"


def render(
    compiled: CompiledTemplate, variables: Mapping[str, Any], *, max_length: int = 1600
) -> RenderedMessage:
    """The message text, stripped of surrounding whitespace, with its encoding and segments.

    TemplateError on a missing variable, a sandbox violation, a failing filter, or an output
    longer than `max_length` characters (OutputTooLong, raised as soon as it is exceeded).
    A message made from text values is remembered by them (most templates read no name,
    or a name many patients share); a failure is not.
    """
    key = _memo_key(compiled, variables, max_length)
    if key is not None:
        known = compiled.rendered.get(key)
        if known is not None:
            return known
    message = _render(compiled, variables, max_length)
    if key is not None:
        keep(compiled.rendered, key, message, limit=MEMO_LIMIT)
    return message


MEMO_LIMIT = 4096
_ABSENT = object()


def _memo_key(
    compiled: CompiledTemplate, variables: Mapping[str, Any], max_length: int
) -> tuple[object, ...] | None:
    """The values of the variables the template reads, when each is a string or absent
    (other values may be equal but print differently: 1, 1.0 and True)."""
    values: list[object] = [max_length]
    for name in compiled.reads:
        value = variables.get(name, _ABSENT)
        if value is not _ABSENT and type(value) is not str:
            return None
        values.append(value)
    return tuple(values)


def _render(
    compiled: CompiledTemplate, variables: Mapping[str, Any], max_length: int
) -> RenderedMessage:
    parts: list[str] = []
    size = 0
    try:
        for chunk in compiled.jinja.generate(variables):
            parts.append(chunk)
            size += len(chunk)
            if size > max_length and len("".join(parts).strip()) > max_length:
                message = f"output is longer than {max_length} characters"
                raise OutputTooLong(message, file=compiled.file)
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as e:
        raise _runtime_error(compiled, e) from e
    text = "".join(parts).strip()
    encoding, segments, length = sms.measure(text)
    return RenderedMessage(text=text, encoding=encoding, segments=segments, length=length)


def _runtime_error(compiled: CompiledTemplate, error: Exception) -> TemplateError:
    line, tb = None, error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == compiled.file:
            line = tb.tb_lineno
        tb = tb.tb_next
    if isinstance(error, jinja2.UndefinedError):
        message = f"missing variable: {error.message}"
    elif isinstance(error, SecurityError):
        message = f"blocked by the sandbox: {error.message}"
    else:
        message = f"{type(error).__name__}: {error}"
    return TemplateError(message, file=compiled.file, line=file_line(compiled.template, line))
