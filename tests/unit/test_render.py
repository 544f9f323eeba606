from datetime import date, datetime, time
from typing import Any

import jinja2.utils
import pytest

from engine.core.domain import Template, Variable
from engine.core.lint import lint
from engine.core.render import (
    OutputTooLong,
    TemplateError,
    _compile_unchecked,
    compile_template,
    format_datetime,
    render,
)

BODY_LINE = 5  # the front matter takes the file's first four lines


def make_template(body: str, **overrides: Any) -> Template:
    fields = {"id": "refill", "purpose": "adherence", "locale": "en", "version": "v1"}
    fields |= {"file": "templates/refill.en.sms.j2", "body_line": BODY_LINE}
    return Template(**{**fields, "body": body, **overrides})


def make_variable(name: str, classification: str = "public", **overrides: Any) -> Variable:
    return Variable(**{"name": name, "classification": classification, **overrides})


VARIABLES = {
    v.name: v
    for v in [
        make_variable("given_name", "pii", max_length=20, example="Ana"),
        make_variable("medication", "phi", max_length=30, example="Lisinopril"),
        make_variable("refill_due", "public", example="2024-03-15"),
        make_variable("starts_at", "public", example="2024-03-16T09:05:00"),
        make_variable("link", "public", max_length=30, example="https://ex.am/s/abc"),
        make_variable("days", "public", max_length=3, example="3"),
        make_variable("patient.given_name", "pii", max_length=20, example="Ana"),
    ]
}


def rendered(body: str, variables: dict[str, Any], **overrides: Any) -> str:
    return render(compile_template(make_template(body, **overrides)), variables).text


@pytest.mark.parametrize(
    ("body", "locale", "variables", "expected"),
    [
        (
            "Hi {{ given_name }}, your refill is due {{ refill_due|date }}.\nReply STOP to opt out",
            "en",
            {"given_name": "Ana", "refill_due": date(2024, 3, 15)},
            "Hi Ana, your refill is due March 15.\nReply STOP to opt out",
        ),
        (
            "Hola {{ given_name }}, su cita es el {{ starts_at|date }} a las {{ starts_at|time }}.",
            "es",
            {"given_name": "Íñigo", "starts_at": datetime(2024, 3, 16, 9, 5)},
            "Hola Íñigo, su cita es el 16 de marzo a las 9:05.",
        ),
        (
            "Visit at {{ starts_at|time }} on {{ starts_at|date('%a %b %-d') }}",
            "en-US",
            {"starts_at": "2024-03-16T14:30:00"},
            "Visit at 2:30 PM on Sat Mar 16",
        ),
        (
            "{% if days > 1 %}{{ days }} days left{% else %}Last day{% endif %}",
            "en",
            {"days": 1},
            "Last day",
        ),
        (
            "{% if link %}\nBook: {{ link }}\n{% endif %}\n\nThanks\n\n  \n",
            "en",
            {"link": "https://ex.am/s/1"},
            "Book: https://ex.am/s/1\n\nThanks",
        ),
        ("{{ patient.given_name|upper }}", "en", {"patient": {"given_name": "ana"}}, "ANA"),
        ("{{ days % 7 }} of {{ 'x' * 3 }}", "en", {"days": 9}, "2 of xxx"),
    ],
)
def test_render(body: str, locale: str, variables: dict[str, Any], expected: str) -> None:
    assert rendered(body, variables, locale=locale) == expected


@pytest.mark.parametrize(
    ("day", "encoding", "segments"),
    [
        (date(2024, 3, 15), "GSM-7", 1),  # viernes
        (date(2024, 3, 16), "UCS-2", 2),  # sábado: á is not GSM-7, the message doubles
    ],
)
def test_spanish_day_names_can_switch_encoding(day: date, encoding: str, segments: int) -> None:
    body = "Hola {{ name }}, le esperamos el {{ day|date('%A %-d de %B') }}. Responda PARAR."
    body += " Tarifas de mensajes y datos pueden aplicar."
    message = render(
        compile_template(make_template(body, locale="es")), {"name": "Ana", "day": day}
    )
    assert (message.encoding, message.segments) == (encoding, segments)


def test_compiled_once_renders_many() -> None:
    compiled = compile_template(make_template("Hi {{ given_name }}"))
    assert [render(compiled, {"given_name": n}).text for n in ("Ana", "Bo")] == ["Hi Ana", "Hi Bo"]
    assert render(compiled, {"given_name": "Ana"}).segments == 1


@pytest.mark.parametrize(
    ("value", "pattern", "language", "expected"),
    [
        (date(2024, 3, 5), "%d/%m/%y", "en", "05/03/24"),
        (date(2024, 3, 5), "%-d/%-m/%Y", "en", "5/3/2024"),
        (date(2024, 3, 5), "%A %B %-d", "en", "Tuesday March 5"),
        (date(2024, 3, 5), "%A %-d de %B", "es", "martes 5 de marzo"),
        (date(2024, 3, 5), "%a %b", "es-MX", "mar mar"),
        (date(2024, 3, 5), "%a %b", "fr", "Tue Mar"),  # no French tables yet: English
        (time(0, 7), "%I:%M %p", "en", "12:07 AM"),
        (time(13, 7), "%-I:%M %p", "es", "1:07 p. m."),
        (time(13, 7), "%H:%M 100%%", "en", "13:07 100%"),
        ("2024-12-31T23:59:00", "%Y-%m-%d %H:%M", "en", "2024-12-31 23:59"),
        ("09:30", "%-H.%M", "en", "9.30"),
    ],
)
def test_format_datetime(value: Any, pattern: str, language: str, expected: str) -> None:
    assert format_datetime(value, pattern, language) == expected


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (date(2024, 3, 5), "%H:%M"),  # a date has no time
        (time(9), "%d"),  # a time has no date
        (date(2024, 3, 5), "%s"),  # not in the safe subset
        (date(2024, 3, 5), "%c"),
        ("tomorrow", "%d"),
        ("20240305", "%d"),
        (42, "%d"),
    ],
)
def test_format_datetime_rejects(value: Any, pattern: str) -> None:
    with pytest.raises(ValueError):
        format_datetime(value, pattern)


def test_missing_variable_names_it_and_the_file_line() -> None:
    compiled = compile_template(make_template("Hi {{ given_name }},\nyour {{ medication }}"))
    with pytest.raises(TemplateError, match="'medication' is undefined") as raised:
        render(compiled, {"given_name": "Ana"})
    assert raised.value.line == BODY_LINE + 1
    assert str(raised.value).startswith(f"templates/refill.en.sms.j2:{BODY_LINE + 1}: ")


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("Hi\n{% if x %}\nno end", 3, "Unexpected end of template"),
        ("Hi {{ x }", 1, "unexpected"),
        ("Hi\n\n{{ x|center(9) }}", 3, "No filter named 'center'"),
        ("{{ x|date('%s') }}", 1, "unsupported date directive %s"),
    ],
)
def test_compile_errors_name_the_file_line(body: str, line: int, message: str) -> None:
    with pytest.raises(TemplateError, match=message) as raised:
        compile_template(make_template(body))
    assert raised.value.line == BODY_LINE + line - 1
    assert str(raised.value) == f"templates/refill.en.sms.j2:{BODY_LINE + line - 1}: " + (
        raised.value.message
    )


# Each payload sits on body line 2 (file line 6).
ESCAPES = [
    ("{{ ''.__class__.__mro__ }}", "private attribute"),
    ("{{ x|attr('__class__') }}", "'attr' filter"),
    ("{{ '%s'|format(x) }}", "'format' filter"),
    ("{{ '{0.__class__}'.format(x) }}", r"calling \.format\(\)"),
    ("{{ x.format_map }}", "str.format_map"),
    ("{{ cycler.__init__.__globals__ }}", "private attribute"),
    ("{{ self }}", "name 'self'"),
    ("{{ self._TemplateReference__context }}", "private attribute"),
    ("{{ x['__globals__'] }}", "private attribute"),
    ("{% set __x = 1 %}", "name '__x'"),
    ("{% for i in range(9) %}{{ i }}{% endfor %}", "loops are not allowed"),
    ("{% set ns = namespace(a=1) %}", r"calling namespace\(\)"),
    ("{{ lipsum(9999) }}", r"calling lipsum\(\)"),
    ("{{ x.ljust(99999) }}", r"calling \.ljust\(\)"),
    ("{{ 9 ** 9 ** 9 }}", r"\*\* operator"),
    ("{{ '%99999s' % x }}", "%-formatting"),
    ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "macros"),
    ("{% include 'other.j2' %}", "self-contained"),
]


@pytest.mark.parametrize(("payload", "message"), ESCAPES)
def test_static_check_rejects_escapes_with_the_file_line(payload: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message) as raised:
        compile_template(make_template("Hi\n" + payload))
    assert raised.value.line == BODY_LINE + 1


@pytest.mark.parametrize(("payload", "message"), ESCAPES)
def test_lint_reports_escapes_as_errors_with_the_file_line(payload: str, message: str) -> None:
    report = lint(make_template("Hi\n" + payload), {"x": make_variable("x")})
    assert any(i.line == BODY_LINE + 1 for i in report.errors)
    assert report.segments is None


SANDBOX_VARIABLES = {"x": "abcd", "cycler": jinja2.utils.Cycler(1, 2)}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        # the environment has no attr or format filter: compiling fails
        ("{{ x|attr('__class__') }}", "No filter named 'attr'"),
        ("{{ '%s'|format(x) }}", "No filter named 'format'"),
        ("{{ '{0.__class__}'.format(x) }}", "sandbox"),
        ("{{ cycler.__init__.__globals__ }}", "unsafe"),
        ("{{ self._TemplateReference__context }}", "unsafe"),
        ("{{ range(3) }}", "not allowed"),
        ("{{ x.ljust(99999) }}", "not allowed"),
        ("{{ 'x' * 99999 }}", "too long"),
        # intercepted, so never constant-folded at compile time either
        ("{{ 9 ** 9 ** 9 }}", r"\*\* operator"),
        ("{{ '%99999s' % x }}", "% operator"),
        (
            "{{ x|replace('a', 'a' * 40)|replace('a', 'a' * 40)|replace('a', 'a' * 40) }}",
            "too long",
        ),
    ],
)
def test_runtime_sandbox_blocks_escapes_without_the_static_check(
    payload: str, message: str
) -> None:
    template = make_template("Hi\n" + payload)
    with pytest.raises(TemplateError, match=message) as raised:
        render(_compile_unchecked(template), SANDBOX_VARIABLES)
    assert raised.value.line == BODY_LINE + 1


@pytest.mark.parametrize(
    ("body", "variables", "max_length", "ok"),
    [
        ("{{ x }}", {"x": "a" * 1600}, 1600, True),
        ("{{ x }}", {"x": "a" * 1601}, 1600, False),
        ("{{ x }}{{ x }}", {"x": "a" * 5}, 9, False),
        ("{{ x }}   \n\n   ", {"x": "a" * 5}, 5, True),
        ("{{ x ~ x ~ x ~ x }}", {"x": "a" * 500}, 1600, False),
    ],
)
def test_output_is_bounded(body: str, variables: dict[str, str], max_length: int, ok: bool) -> None:
    compiled = compile_template(make_template(body))
    if ok:
        assert len(render(compiled, variables, max_length=max_length).text) <= max_length
    else:
        with pytest.raises(OutputTooLong, match=f"longer than {max_length}"):
            render(compiled, variables, max_length=max_length)


def issues_of(body: str, **kwargs: Any) -> list[tuple[str, int | None, str]]:
    report = lint(make_template(body), VARIABLES, **kwargs)
    return [(i.severity, i.line, i.message) for i in report.issues]


def test_lint_clean_template() -> None:
    body = "Hi {{ given_name|gsm }}, refill due {{ refill_due|date }}. Reply STOP to opt out."
    report = lint(make_template(body), VARIABLES, opt_out_required=True)
    assert [i for i in report.issues if i.severity != "info"] == []
    assert report.variables_used == ("given_name", "refill_due")
    assert report.phi_variables == ()
    assert (report.encoding, report.segments, report.typical_segments) == ("GSM-7", 1, 1)
    assert report.preview == "Hi Ana, refill due March 15. Reply STOP to opt out."
    assert report.length == len(body) - len("{{ given_name|gsm }}{{ refill_due|date }}") + 20 + 8


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("Hi\n{{ nickname }}", ("error", BODY_LINE + 1, "undeclared variable 'nickname'")),
        (
            "Hi\n\n{{ patient.phone }}",
            ("error", BODY_LINE + 2, "undeclared variable 'patient.phone'"),
        ),
        ("Your\n{{ medication }} is ready", ("info", BODY_LINE + 1, "PHI variable 'medication'")),
        ("Hi {{ given_name }}\nAquí", ("warning", BODY_LINE + 1, "UCS-2 halves the characters")),
        ("Hi\n{% if x %}", ("error", BODY_LINE + 1, "Unexpected end of template")),
        ("Hi {{ given_name|center }}", ("error", BODY_LINE, "No filter named 'center'")),
        ("{{ link }}", ("error", None, "no opt-out instructions")),
    ],
)
def test_lint_issue(body: str, expected: tuple[str, int | None, str]) -> None:
    severity, line, message = expected
    found = issues_of(body, opt_out_required=True)
    assert any(s == severity and n == line and message in m for s, n, m in found), found


def test_lint_reports_phi_variables_and_dotted_names() -> None:
    body = "{{ patient.given_name }}: {{ medication }} is ready. Reply STOP to opt out."
    report = lint(make_template(body), VARIABLES)
    assert report.variables_used == ("patient.given_name", "medication")
    assert report.phi_variables == ("medication",)
    assert report.errors == ()
    assert report.preview == "Ana: Lisinopril is ready. Reply STOP to opt out."


@pytest.mark.parametrize(
    ("body", "segments", "warned"),
    [
        ("x" * 140 + "{{ given_name }}", 1, False),  # 160 septets
        ("x" * 141 + "{{ given_name }}", 2, True),  # 161 septets: the worst case is two parts
        ("{{ link }} " + "x" * 129, 1, False),  # 160 septets: a public link cannot go UCS-2
        ("á" * 51 + "{{ given_name }}", 2, True),  # UCS-2 static text: 70 units per part
    ],
)
def test_lint_worst_case_segments(body: str, segments: int, warned: bool) -> None:
    report = lint(make_template(body), VARIABLES)
    assert report.segments == segments
    assert any("worst case" in i.message for i in report.issues) == warned


PADDING = ". " + "x" * 60


@pytest.mark.parametrize(
    ("body", "warned"),
    [
        ("Hi {{ given_name }}" + PADDING, True),  # a name may carry á, ó, í...
        ("Your {{ medication }}" + PADDING, True),
        ("Hi {{ given_name }}", True),  # one segment still, but UCS-2 loses the FCC exemption
        ("Hi {{ given_name|gsm }}" + PADDING, False),  # transliterated to GSM-7
        ("Book {{ link }}" + PADDING, False),  # public
        ("Due {{ refill_due|date }}" + PADDING, False),  # a date, not free text
        ("Hola {{ given_name }}, ¿cómo está?" + PADDING, False),  # already UCS-2
    ],
)
def test_lint_warns_when_free_text_could_make_the_message_ucs2(body: str, warned: bool) -> None:
    messages = [m for _, _, m in issues_of(body)]
    assert any("outside GSM-7" in m for m in messages) == warned


def test_lint_free_text_warning_gives_the_ucs2_size() -> None:
    body = "Hi {{ given_name }}, " + "x" * 60
    (message,) = [m for _, _, m in issues_of(body) if "outside GSM-7" in m]
    assert "given_name" in message and "2 segment(s) at worst instead of 1" in message


def test_lint_blames_only_the_variable_that_can_turn_ucs2() -> None:
    body = "Hi {{ given_name|gsm }}, your {{ medication }} is ready"
    (message,) = [m for _, _, m in issues_of(body) if "outside GSM-7" in m]
    assert message.startswith("medication may hold")


@pytest.mark.parametrize(
    ("body", "locale", "has_error"),
    [
        ("{{ link }}. Reply STOP to opt out", "en", False),
        ("{{ link }}. Responda PARAR para cancelar", "es", False),
        ("{{ link }}. Don't stop taking your meds", "en", True),
    ],
)
def test_lint_opt_out_required(body: str, locale: str, has_error: bool) -> None:
    report = lint(make_template(body, locale=locale), VARIABLES, opt_out_required=True)
    assert any("opt-out" in i.message for i in report.errors) == has_error


def test_lint_worst_case_over_the_output_bound_is_an_error() -> None:
    variables = {"note": make_variable("note", max_length=2000)}
    report = lint(make_template("{{ note }}"), variables)
    assert [(i.severity, i.line) for i in report.errors] == [("error", None)]
    assert "longer than 1600" in report.errors[0].message


def test_lint_issue_str_names_file_and_line() -> None:
    (issue,) = lint(make_template("Hi\n{{ nickname }}"), VARIABLES).issues
    assert str(issue) == (
        f"templates/refill.en.sms.j2:{BODY_LINE + 1}: error: "
        "undeclared variable 'nickname': declare it in policies/data.yaml"
    )
