"""Hooks for the whole suite (loaded by the main pytest process, also under xdist)."""

from __future__ import annotations

import pytest

FIGURES = "figures_line"
"""A test's user property whose value is a line of figures for the terminal summary."""

_lines: list[str] = []


def add_figures(request: pytest.FixtureRequest, line: str) -> None:
    """Print `line` in the run's "figures" summary, whichever process runs the test."""
    request.node.user_properties.append((FIGURES, line))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _lines.extend(str(value) for key, value in report.user_properties if key == FIGURES)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures the fault tests measured, printed once at the end: a test's own output
    is captured, and under xdist it runs in a worker whose output is not shown at all."""
    if _lines:
        terminalreporter.section("figures")
        for line in sorted(_lines):
            terminalreporter.write_line(line)
