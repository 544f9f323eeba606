"""A corpus of known Jinja sandbox-escape and template-injection payloads
(tests/data/jinja_escapes.txt): each is refused by the lint with the file and line, by
definition loading (what `engage check` and `engage sync` run), and, with the lint skipped,
by the runtime sandbox, quickly and without printing any object."""

from __future__ import annotations

import time
import types
from datetime import date
from pathlib import Path

import jinja2.utils
import pytest

from engine.core.domain import Template, Variable
from engine.core.lint import lint
from engine.core.render import TemplateError, _compile_unchecked, compile_template, render
from engine.definitions import load_sources
from engine.defsource import read_tree
from engine.yamlsource import SourceErrors

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "jinja_escapes.txt"
PAYLOADS = [
    line
    for line in CORPUS.read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#")
]
PAYLOAD_LINE = 6  # front matter on lines 1-4, "Hi" on 5, the payload on 6
LOADED_LINE = 7  # the same with a five-line front matter
VARIABLES = {
    "x": Variable("x", "public", max_length=20, example="abcd"),
    "n": Variable("n", "public", max_length=3, example="7"),
    "d": Variable("d", "public", example="2024-03-15"),
}
# What a careless host might put in the context: the sandbox must hold even then.
HOSTILE_CONTEXT = {
    "x": "abcd",
    "n": 7,
    "d": date(2024, 3, 15),
    "cycler": jinja2.utils.Cycler(1, 2),
    "joiner": jinja2.utils.Joiner(),
    "namespace": jinja2.utils.Namespace,
    "lipsum": jinja2.utils.generate_lorem_ipsum,
    "range": range,
    "dict": dict,
    "config": {"SECRET_KEY": "s3cr3t"},
    "request": types.SimpleNamespace(application=render, args={"c": "__class__"}),
    "url_for": render,
    "get_flashed_messages": render,
}
SECONDS = 2.0  # far above the few milliseconds a refusal takes: anything slower is unbounded


def template_of(payload: str, template_id: str = "escape") -> Template:
    body = f"Hi\n{payload}\nReply STOP to opt out"
    return Template(
        id=template_id,
        purpose="adherence",
        locale="en",
        body=body,
        version="v1",
        file=f"templates/{template_id}.en.sms.j2",
        body_line=5,
    )


def test_the_corpus_is_large_and_has_no_duplicates() -> None:
    assert len(PAYLOADS) >= 120
    assert len(set(PAYLOADS)) == len(PAYLOADS)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_lint_refuses_with_the_file_and_line(payload: str) -> None:
    report = lint(template_of(payload), VARIABLES, opt_out_required=True)
    assert report.errors, payload
    assert {(i.file, i.line) for i in report.errors} == {
        ("templates/escape.en.sms.j2", PAYLOAD_LINE)
    }, [str(i) for i in report.errors]
    assert all(i.message for i in report.errors)
    with pytest.raises(TemplateError):
        render(compile_template(template_of(payload)), HOSTILE_CONTEXT)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_runtime_sandbox_refuses_without_the_lint(payload: str) -> None:
    started = time.perf_counter()
    with pytest.raises(TemplateError) as refused:
        render(_compile_unchecked(template_of(payload)), HOSTILE_CONTEXT)
    assert time.perf_counter() - started < SECONDS, payload
    message = str(refused.value)
    assert message.startswith("templates/escape.en.sms.j2"), message
    for leak in ("object at 0x", "s3cr3t", "<function", "<class", "uid="):
        assert leak not in message, message


def test_definition_loading_refuses_every_payload_and_names_its_file_line() -> None:
    sources = read_tree(ROOT)
    files = {}
    for n, payload in enumerate(PAYLOADS):
        template_id = f"escape-{n:03d}"
        front = f"---\nid: {template_id}\npurpose: adherence\nlocale: en\n---\n"
        rel = f"templates/{template_id}.en.sms.j2"
        files[rel] = payload
        sources[rel] = front + f"Hi {{{{ program_name }}}}\n{payload}\n{{{{ opt_out }}}}\n"
    with pytest.raises(SourceErrors) as caught:
        load_sources(sources)
    by_file: dict[str, list[int | None]] = {}
    for error in caught.value.errors:
        by_file.setdefault(error.file, []).append(error.line)
    assert set(by_file) == set(files), "errors in files other than the payloads"
    for rel, lines in by_file.items():
        # besides, a payload that stops the sample render may hide the opt-out text (no line)
        assert LOADED_LINE in lines and set(lines) <= {LOADED_LINE, None}, (files[rel], lines)
