"""Lint of SMS templates: declared variables, PHI use, encoding and segments, opt-out text."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
from jinja2 import meta, nodes

from engine.core import sms
from engine.core.domain import Encoding, RenderedMessage, Template, Variable
from engine.core.render import (
    CompiledTemplate,
    OutputTooLong,
    SandboxViolation,
    TemplateError,
    build_compiled,
    file_line,
    parse_body,
    render,
    temporal_value,
    where_of,
)
from engine.core.template_rules import FORBIDDEN_NAMES, const_str, static_problems, too_deep

Severity = Literal["error", "warning", "info"]


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
        self.template, self.variables, self.file = template, variables, where_of(template)
        self.issues: list[LintIssue] = []
        self.uses: dict[str, int] = {}

    def add(self, severity: Severity, body_line: int | None, message: str) -> None:
        line = file_line(self.template, body_line)
        self.issues.append(LintIssue(severity, line, message, self.file))

    def check(
        self, opt_out_required: bool
    ) -> tuple[RenderedMessage | None, RenderedMessage | None]:
        """Return the worst and typical renders (None when they cannot be computed)."""
        ast = parse_body(self.template)
        for line, message in static_problems(ast):
            self.add("error", line, message)
        if too_deep(ast) is not None:  # the checks below recurse once per level
            return None, None
        self.find_uses(ast)
        for name, line in self.uses.items():
            if name not in self.variables:
                self.add(
                    "error", line, f"undeclared variable {name!r}: declare it in policies/data.yaml"
                )
            elif self.variables[name].classification == "phi":
                self.add("info", line, f"uses PHI variable {name!r}: policy decides if it may go")
        if any(i.severity == "error" for i in self.issues):
            return None, None
        compiled = build_compiled(self.template, ast)
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
        # The examples, not the max-length filler, show what a real message says.
        text = typical.text if typical else "".join(_static_texts(ast).values())
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
        _collect_paths(ast, roots - FORBIDDEN_NAMES, paths)
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
                # A sandbox refusal is the template's doing whatever the values: an error.
                refused = isinstance(e, OutputTooLong | SandboxViolation)
                severity: Severity = "error" if refused else "warning"
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
        """A pii/phi free-text value (a name, a medication) could turn the message UCS-2.

        Each variable is tried alone, so one that passes through the `gsm` filter is not
        blamed for another."""
        free = [n for n in self.uses if self.variables[n].classification != "public"]
        free = [n for n in free if not _typed(self.variables[n])]
        culprits, segments = [], worst.segments
        for name in free:
            accented = self.render(
                compiled, lambda v, n, name=name: _worst(v, n, "á" if n == name else "x")
            )
            if accented and accented.encoding == "UCS-2":
                culprits.append(name)
                segments = max(segments, accented.segments)
        if culprits:
            self.add(
                "warning",
                min(self.uses[n] for n in culprits),
                f"{', '.join(culprits)} may hold characters outside GSM-7 (such as 'á'), making"
                f" the message UCS-2 ({segments} segment(s) at worst instead of"
                f" {worst.segments}): use the gsm filter",
            )


def _static_texts(ast: nodes.Template) -> dict[nodes.Node, str]:
    """The literal text a template prints, by node."""
    found = {}
    for output in ast.find_all(nodes.Output):
        for node in output.nodes:
            text = node.data if isinstance(node, nodes.TemplateData) else const_str(node)
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
        name = node.attr if isinstance(node, nodes.Getattr) else const_str(node.arg)
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
    if temporal_value(variable.example) is not None:
        return variable.example
    if _whole_number(variable.example):
        return int("9" * min(variable.max_length, 18))
    return fill * variable.max_length


def _typical(variable: Variable, name: str) -> Any:
    example = variable.example
    return int(example) if _whole_number(example) else example or f"<{name}>"


def _typed(variable: Variable) -> bool:
    return temporal_value(variable.example) is not None or _whole_number(variable.example)


def _whole_number(text: str) -> bool:
    """ASCII digits only: "²" and "١" are digits to str.isdigit, and int() refuses "²"."""
    return text.isascii() and text.isdigit()
