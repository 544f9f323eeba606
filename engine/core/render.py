"""Sandboxed Jinja2 rendering of SMS templates (their lint is in engine.core.lint).

Defense in depth: a static check over the template's AST (engine.core.template_rules)
rejects, naming the file line, what an SMS template never needs (private names, calls,
loops, macros, includes, containers, the attr and format filters...); the runtime is an
ImmutableSandboxedEnvironment (engine.core.jinja_sandbox) with StrictUndefined, no globals,
a short list of filters, a compiler that refuses the same constructs, no calls, bounded
growth of every value and a cap on the output length.

Block tags on a line of their own leave no blank line (trim_blocks, lstrip_blocks), and the
text is stripped. Filters: upper, lower, title, capitalize, trim, truncate, replace, default,
join, first, last, length, count, int, float, round, abs, string, `gsm` (transliterate to
the GSM-7 alphabet: Zoë -> Zoe), and `date`/`time`, which
format a date, time or ISO string with month and day names in the template's language.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any, Literal

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import SecurityError

from engine.core import jinja_sandbox, sms
from engine.core.domain import RenderedMessage, Template
from engine.core.memo import keep
from engine.core.template_rules import DIRECTIVE, check_pattern, static_problems, too_deep

Severity = Literal["error", "warning", "info"]
MAX_INTERMEDIATE = jinja_sandbox.MAX_INTERMEDIATE

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


class SandboxViolation(TemplateError):
    """The runtime sandbox refused something the template did (never a data problem)."""


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

    return DIRECTIVE.sub(one, pattern)


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


@functools.cache
def make_environment(language: str = "en") -> jinja2.Environment:
    """The sandboxed environment for one language, built on first use and then shared."""
    env = jinja_sandbox.SmsSandbox(
        undefined=jinja2.StrictUndefined,
        finalize=jinja_sandbox.printable,
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
    env.filters["replace"] = jinja_sandbox.replace
    env.filters["join"] = jinja_sandbox.join
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


TOO_DEEP = "the template nests too deeply to compile"


def parse_body(template: Template) -> nodes.Template:
    env = make_environment(language_of(template.locale))
    try:
        return env.parse(template.body, name=where_of(template), filename=where_of(template))
    except jinja2.TemplateSyntaxError as e:
        raise _syntax_error(template, e) from e
    except RecursionError as e:  # the parser recurses once per level of nesting
        line = file_line(template, busiest_line(env, template.body))
        raise TemplateError(TOO_DEEP, file=where_of(template), line=line) from e


def busiest_line(env: jinja2.Environment, body: str) -> int:
    """The body line with the most tokens: where a too deeply nested template nests."""
    try:
        lines = Counter(lineno for lineno, _, _ in env.lexer.tokeniter(body, None))
    except jinja2.TemplateSyntaxError:
        return 1
    return max(lines, key=lambda n: (lines[n], -n), default=1)


def build_compiled(template: Template, ast: nodes.Template) -> CompiledTemplate:
    env = make_environment(language_of(template.locale))
    deep = too_deep(ast)
    if deep is not None:  # the compiler recurses once per level: refuse before it runs
        raise TemplateError(TOO_DEEP, file=where_of(template), line=file_line(template, deep))
    try:
        code = env.compile(ast, name=where_of(template), filename=where_of(template))
    except jinja2.TemplateSyntaxError as e:
        raise _syntax_error(template, e) from e
    except (RecursionError, SyntaxError) as e:  # Python's compiler has its own nesting limits
        raise TemplateError(TOO_DEEP, file=where_of(template)) from e
    return CompiledTemplate(template, env.template_class.from_code(env, code, {}), ast)


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
        where = file_line(compiled.template, line)
        return SandboxViolation(message, file=compiled.file, line=where)
    else:
        message = f"{type(error).__name__}: {error}"
    return TemplateError(message, file=compiled.file, line=file_line(compiled.template, line))
