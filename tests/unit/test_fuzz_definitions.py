"""Hypothesis over definition loading: the starter set with one file mutated (lines dropped,
repeated or swapped, the text cut short, YAML syntax, tags, tabs, anchors or any text
inserted) either loads or fails with SourceErrors naming a file of the set and a line inside
it, never another exception."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.definitions import load_sources
from engine.defsource import read_tree
from engine.yamlsource import SourceErrors

ROOT = Path(__file__).resolve().parents[2]
STARTER = read_tree(ROOT)
FILES = sorted(STARTER)
TOKENS = [
    ":", "- ", "  ", "\t", "{", "}", "[", "]", "&a ", "*a", "!!python/object/apply:os.system []",
    "!!binary", "---", "...", "'", '"', "%YAML 1.1", "@", "`", "? ", "|", ">", "#", "~", "null",
    "x: y", "id: other", "id: [1, 2]", "purpose: nope", "when: 'patient.age >'", "{{", "}}",
    "{% for x in y %}", "{{ ''.__class__ }}", "max_length: 0", "example: '²'", "example: ²",
    "at: 25:00", "offsets: [1.5d]", "window: {start: 9}", "limit: -1", "&a [*a, *a, *a]",
    "<<: *a", "2001-02-30", "0x1F", "1e999", ".inf", "é", "\u202e", "\ufeff", "\x85",
]  # fmt: skip
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str]:
    rel = draw(st.sampled_from(FILES))
    lines = STARTER[rel].splitlines(keepends=True)
    at = draw(st.integers(0, max(len(lines) - 1, 0)))
    how = draw(st.sampled_from(["drop", "repeat", "swap", "cut", "insert", "replace"]))
    if how == "drop":
        lines = lines[:at] + lines[at + 1 :]
    elif how == "repeat":
        lines = lines[: at + 1] + lines[at:]
    elif how == "swap" and len(lines) > 1:
        other = draw(st.integers(0, len(lines) - 1))
        lines[at], lines[other] = lines[other], lines[at]
    elif how == "cut":
        text = "".join(lines)
        return rel, text[: draw(st.integers(0, len(text)))]
    else:
        token = draw(st.sampled_from(TOKENS) | st.text(st.characters(exclude_categories=("Cs",))))
        line = lines[at] if lines else ""
        column = draw(st.integers(0, len(line)))
        end = column if how == "insert" else draw(st.integers(column, len(line)))
        lines[at : at + 1] = [line[:column] + token + line[end:]]
    return rel, "".join(lines)


def _assert_precise(errors: SourceErrors, sources: dict[str, str]) -> None:
    assert errors.errors
    for error in errors.errors:
        assert error.message and str(error).startswith(error.file)
        assert error.file in sources or error.file.startswith("policies/"), error
        if error.line is not None:
            last = len(sources.get(error.file, "").splitlines()) + 1
            assert 1 <= error.line <= last, (str(error), last)


@FUZZ
@given(mutation=mutations())
@example(
    mutation=(
        "policies/data.yaml",
        STARTER["policies/data.yaml"].replace("example: Maria}", "example: '²'}"),
    )
)
@example(
    mutation=(
        "templates/statin-refill.en.sms.j2",
        STARTER["templates/statin-refill.en.sms.j2"] + "{{ " + "(" * 400 + "x" + ")" * 400 + " }}",
    )
)
def test_a_mutated_file_loads_or_fails_with_its_file_and_line(mutation: tuple[str, str]) -> None:
    rel, text = mutation
    sources = {**STARTER, rel: text}
    try:
        load_sources(sources)
    except SourceErrors as errors:
        _assert_precise(errors, sources)


@FUZZ
@given(
    rel=st.sampled_from(FILES),
    garbage=st.text(st.characters(exclude_categories=("Cs",)), max_size=200),
)
def test_any_text_as_any_file_loads_or_fails_precisely(rel: str, garbage: str) -> None:
    sources = {**STARTER, rel: garbage}
    try:
        load_sources(sources)
    except SourceErrors as errors:
        _assert_precise(errors, sources)
