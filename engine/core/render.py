"""Sandboxed Jinja2 rendering of SMS templates, and their lint.

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
join, first, last, length, count, int, float, round, abs, string, and `date`/`time`, which
format a date, time or ISO string with month and day names in the template's language.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any, Literal

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from engine.core import sms
from engine.core.domain import Encoding, RenderedMessage, Template, Variable

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
    moment: Any = _temporal(value)
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


def _temporal(value: Any) -> date | time | None:
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
    return env


@dataclass(frozen=True)
class CompiledTemplate:
    """A template parsed and compiled once, rendered many times."""

    template: Template
    jinja: jinja2.Template = field(repr=False, compare=False)
    ast: nodes.Template = field(repr=False, compare=False)

    @property
    def file(self) -> str:
        return _where(self.template)


def compile_template(template: Template) -> CompiledTemplate:
    """Parse, check and compile once; TemplateError naming the file line on a syntax error or
    anything the static check forbids."""
    ast = _parse(template)
    for line, message in static_problems(ast):
        raise TemplateError(message, file=_where(template), line=_file_line(template, line))
    return _build(template, ast)


def _compile_unchecked(template: Template) -> CompiledTemplate:
    """Compile without the static check: only to prove the runtime sandbox holds on its own."""
    return _build(template, _parse(template))


def _where(template: Template) -> str:
    return template.file or f"templates/{template.id}.{template.locale}.sms.j2"


def _file_line(template: Template, body_line: int | None) -> int | None:
    return None if body_line is None else template.body_line + body_line - 1


def _syntax_error(template: Template, error: jinja2.TemplateSyntaxError) -> TemplateError:
    line = _file_line(template, error.lineno)
    return TemplateError(error.message or str(error), file=_where(template), line=line)


def _parse(template: Template) -> nodes.Template:
    env = make_environment(language_of(template.locale))
    try:
        return env.parse(template.body, name=_where(template), filename=_where(template))
    except jinja2.TemplateSyntaxError as e:
        raise _syntax_error(template, e) from e


def _build(template: Template, ast: nodes.Template) -> CompiledTemplate:
    env = make_environment(language_of(template.locale))
    try:
        code = env.compile(ast, name=_where(template), filename=_where(template))
    except jinja2.TemplateSyntaxError as e:
        raise _syntax_error(template, e) from e
    return CompiledTemplate(template, env.template_class.from_code(env, code, {}), ast)


_FORBIDDEN_NAMES = frozenset({"self", "range", "lipsum", "dict", "cycler", "joiner", "namespace"})
_FORBIDDEN_NAMES |= {"loop", "caller", "varargs", "kwargs"}
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
    if isinstance(node, nodes.Name) and (node.name[:1] == "_" or node.name in _FORBIDDEN_NAMES):
        return f"the name {node.name!r} is not allowed in SMS templates"
    if isinstance(node, nodes.Getattr | nodes.Getitem):
        name = node.attr if isinstance(node, nodes.Getattr) else _const_str(node.arg)
        if name.startswith("_"):
            return f"access to the private attribute {name!r} is not allowed"
        if name in ("format", "format_map"):
            return f"str.{name} is not allowed (format strings can reach attributes)"
    if isinstance(node, nodes.Call):
        return f"calling {_describe(node.node)} is not allowed: use a filter (e.g. |title)"
    if isinstance(node, nodes.Mod) and isinstance(node.left, nodes.Const):
        return "%-formatting is not allowed in SMS templates: join text with ~"
    if isinstance(node, nodes.Filter) and node.name in ("attr", "format"):
        return f"the {node.name!r} filter is not allowed in SMS templates"
    if isinstance(node, nodes.Filter) and node.name in ("date", "time") and node.args:
        try:
            check_pattern(_const_str(node.args[0]))
        except ValueError as e:
            return f"|{node.name}: {e}"
    return None


def _const_str(node: nodes.Node) -> str:
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
    """
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
    return TemplateError(message, file=compiled.file, line=_file_line(compiled.template, line))


@dataclass(frozen=True)
class LintIssue:
    """One finding; `line` is the line in the template file (None: the whole template)."""

    severity: Severity
    line: int | None
    message: str
    file: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.severity}: {self.message}"


@dataclass(frozen=True)
class LintReport:
    """Lint's findings, and the message size in the worst case (every variable at its
    max_length) and the typical case (every variable at its example)."""

    issues: tuple[LintIssue, ...]
    variables_used: tuple[str, ...] = ()
    phi_variables: tuple[str, ...] = ()
    encoding: Encoding | None = None
    segments: int | None = None
    length: int | None = None
    typical_segments: int | None = None
    preview: str | None = None

    @property
    def errors(self) -> tuple[LintIssue, ...]:
        return tuple(i for i in self.issues if i.severity == "error")


def lint(
    template: Template, variables: Mapping[str, Variable], *, opt_out_required: bool = False
) -> LintReport:
    """Check a template against the variables declared in policies/data.yaml.

    Errors: syntax, sandbox violations, undeclared variables, a worst case over the output
    bound, missing opt-out text when required. Warnings: UCS-2 static text, a worst case over
    one segment, pii/phi free text that could turn the message UCS-2. Info: each PHI variable.
    """
    run = _Lint(template, variables)
    try:
        worst, typical = run.check(opt_out_required)
    except TemplateError as e:  # syntax errors, and what only the compiler sees
        run.issues.append(LintIssue("error", e.line, e.message, run.file))
        worst = typical = None
    return LintReport(
        tuple(run.issues),
        tuple(run.uses),
        tuple(n for n in run.uses if n in variables and variables[n].classification == "phi"),
        encoding=worst.encoding if worst else None,
        segments=worst.segments if worst else None,
        length=worst.length if worst else None,
        typical_segments=typical.segments if typical else None,
        preview=typical.text if typical else None,
    )


class _Lint:
    """One lint run: the template, the variables it reads, and the issues found so far."""

    def __init__(self, template: Template, variables: Mapping[str, Variable]) -> None:
        self.template, self.variables, self.file = template, variables, _where(template)
        self.issues: list[LintIssue] = []
        self.uses: dict[str, int] = {}

    def add(self, severity: Severity, body_line: int | None, message: str) -> None:
        line = _file_line(self.template, body_line)
        self.issues.append(LintIssue(severity, line, message, self.file))

    def check(
        self, opt_out_required: bool
    ) -> tuple[RenderedMessage | None, RenderedMessage | None]:
        """Return the worst and typical renders (None when they cannot be computed)."""
        ast = _parse(self.template)
        for line, message in static_problems(ast):
            self.add("error", line, message)
        self.find_uses(ast)
        for name, line in self.uses.items():
            if name not in self.variables:
                self.add(
                    "error", line, f"undeclared variable {name!r}: declare it in policies/data.yaml"
                )
            elif self.variables[name].classification == "phi":
                self.add("info", line, f"uses PHI variable {name!r}: sent only where allowed")
        if any(i.severity == "error" for i in self.issues):
            return None, None
        compiled = _build(self.template, ast)
        worst = self.render(compiled, _worst, case="max-length values")
        typical = self.render(compiled, _typical, case="the examples")
        self.check_static_text(ast)
        if worst and worst.segments > 1:
            unit = "septets" if worst.encoding == "GSM-7" else "UTF-16 units"
            self.add(
                "warning", None, f"worst case: {worst.segments} segments, {worst.length} {unit}"
            )
        if worst and worst.encoding == "GSM-7":
            self.check_free_text(compiled, worst)
        text = worst.text if worst else "".join(_static_texts(ast).values())
        if opt_out_required and not sms.has_opt_out_text(text):
            self.add("error", None, "no opt-out instructions (e.g. 'Reply STOP to opt out')")
        return worst, typical

    def find_uses(self, ast: nodes.Template) -> None:
        """Each variable read, with the body line of its first use.

        A dotted path (patient.given_name) is named by its longest declared prefix."""
        try:
            roots = meta.find_undeclared_variables(ast)
        except jinja2.TemplateAssertionError:  # a forbidden filter: static_problems names it
            roots = {n.name for n in ast.find_all(nodes.Name) if n.ctx == "load"}
        paths: dict[str, int] = {}
        _collect_paths(ast, roots - _FORBIDDEN_NAMES, paths)
        for path, line in sorted(paths.items(), key=lambda item: item[1]):
            parts = path.split(".")
            prefixes = (".".join(parts[:k]) for k in range(len(parts), 0, -1))
            self.uses.setdefault(next((p for p in prefixes if p in self.variables), path), line)

    def render(
        self,
        compiled: CompiledTemplate,
        value_of: Callable[[Variable, str], Any],
        case: str | None = None,
    ) -> RenderedMessage | None:
        """Render with a value for each variable; a failure is an issue when `case` names it."""
        values = _values({n: value_of(self.variables[n], n) for n in self.uses})
        try:
            return render(compiled, values)
        except TemplateError as e:
            if case:
                severity: Severity = "error" if isinstance(e, OutputTooLong) else "warning"
                message = f"rendering with {case} failed: {e.message}"
                self.issues.append(LintIssue(severity, e.line, message, self.file))
            return None

    def check_static_text(self, ast: nodes.Template) -> None:
        for node, text in _static_texts(ast).items():
            bad = next((i for i, ch in enumerate(text) if ch not in sms.GSM_ALL), None)
            if bad is not None:
                line = node.lineno + text.count("\n", 0, bad)
                message = f"{text[bad]!r} is not in GSM-7, so the message goes as UCS-2"
                self.add("warning", line, f"{message}: UCS-2 halves the characters per segment")
                return

    def check_free_text(self, compiled: CompiledTemplate, worst: RenderedMessage) -> None:
        """A pii/phi free-text value (a name, a medication) could turn the message UCS-2."""
        free = [n for n in self.uses if self.variables[n].classification != "public"]
        free = [n for n in free if not _typed(self.variables[n])]
        accented = self.render(compiled, lambda v, n: _worst(v, n, "á" if n in free else "x"))
        if free and accented and accented.segments > worst.segments:
            self.add(
                "warning",
                min(self.uses[n] for n in free),
                f"{', '.join(free)} may hold characters outside GSM-7 (such as 'á'), making the"
                f" message UCS-2: up to {accented.segments} segments instead of {worst.segments}",
            )


def _static_texts(ast: nodes.Template) -> dict[nodes.Node, str]:
    """The literal text a template prints, by node."""
    found = {}
    for output in ast.find_all(nodes.Output):
        for node in output.nodes:
            text = node.data if isinstance(node, nodes.TemplateData) else _const_str(node)
            if text:
                found[node] = text
    return found


def _collect_paths(node: nodes.Node, roots: set[str], paths: dict[str, int]) -> None:
    path = _static_path(node)
    if path and path.split(".")[0] in roots:
        paths[path] = min(paths.get(path, node.lineno), node.lineno)
        return
    for child in node.iter_child_nodes():
        _collect_paths(child, roots, paths)


def _static_path(node: nodes.Node) -> str | None:
    if isinstance(node, nodes.Name) and node.ctx == "load":
        return node.name
    if isinstance(node, nodes.Getattr | nodes.Getitem):
        name = node.attr if isinstance(node, nodes.Getattr) else _const_str(node.arg)
        inner = _static_path(node.node)
        return f"{inner}.{name}" if inner and name else None
    return None


def _values(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nest dotted names for rendering: {"patient.given_name": v} -> {"patient": {...}}."""
    root: dict[str, Any] = {}
    for name in sorted(flat, key=lambda n: n.count(".")):
        *parents, leaf = name.split(".")
        node = root
        for parent in parents:
            if not isinstance(node.get(parent), dict):
                node[parent] = {}
            node = node[parent]
        node[leaf] = flat[name]
    return root


def _worst(variable: Variable, name: str, fill: str = "x") -> Any:
    """A value of the variable's max_length; dates and numbers keep their example's type."""
    if _temporal(variable.example) is not None:
        return variable.example
    if variable.example.isdigit():
        return int("9" * min(variable.max_length, 18))
    return fill * variable.max_length


def _typical(variable: Variable, name: str) -> Any:
    example = variable.example
    return int(example) if example.isdigit() else example or f"<{name}>"


def _typed(variable: Variable) -> bool:
    return _temporal(variable.example) is not None or variable.example.isdigit()
