"""`engage check`: validate the folders, lint every template, run every policy's tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.core import policy, policy_tests
from engine.definitions import DefinitionSet, load_definitions
from engine.yamlsource import SourceError, SourceErrors


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tests_run: int = 0
    tests_failed: int = 0
    definitions: DefinitionSet | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and not self.tests_failed


def check_definitions(root: Path | str) -> CheckReport:
    """Everything `engage check` reports; `ok` is False on any error or failing test."""
    report = CheckReport()
    try:
        defs = load_definitions(root)
    except SourceErrors as exc:
        report.errors.extend(str(e) for e in exc.errors)
        return report
    report.definitions = defs
    _lint(defs, report)
    _run_policy_tests(defs, report)
    return report


def _lint(defs: DefinitionSet, report: CheckReport) -> None:
    for key in sorted(defs.lint):
        lint = defs.lint[key]
        template = defs.templates[key]
        for issue in lint.issues:
            where = f"{template.file}:{issue.line}" if issue.line else template.file
            line = f"{where}: {issue.message}"
            if issue.severity == "error":
                report.errors.append(line)
            elif issue.severity == "warning":
                report.warnings.append(line)
        phi = f", PHI: {', '.join(sorted(lint.phi_variables))}" if lint.phi_variables else ""
        report.notes.append(
            f"{template.file}: {lint.encoding}, {lint.typical_segments} segment(s) typical, "
            f"{lint.segments} worst case{phi}"
        )


def _run_policy_tests(defs: DefinitionSet, report: CheckReport) -> None:
    purposes = list(defs.purposes)
    for pol in defs.policies:
        if not pol.tests:
            report.warnings.append(f"{pol.file}: policy {pol.id} has no tests")
            continue
        compiled = policy.compile_policy_set(pol.rules, purposes=purposes)
        for result in policy_tests.run_policy_tests(compiled, pol.tests):
            report.tests_run += 1
            if not result.passed:
                report.tests_failed += 1
                error = SourceError(
                    pol.file, result.line, f"test {result.name!r}: {result.message}"
                )
                report.errors.append(str(error))
