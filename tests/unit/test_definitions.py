"""Loading the definition folders: the starter set, and every kind of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.checking import check_definitions
from engine.definitions import load_definitions
from engine.yamlsource import SourceErrors

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the starter definitions that a test may break."""
    for folder in ("campaigns", "templates", "policies"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    return tmp_path


def errors_of(root: Path) -> list[str]:
    with pytest.raises(SourceErrors) as caught:
        load_definitions(root)
    return [str(e) for e in caught.value.errors]


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_starter_set_loads_and_passes_check() -> None:
    report = check_definitions(ROOT)
    assert report.errors == []
    assert report.tests_failed == 0 and report.tests_run >= 25
    defs = report.definitions
    assert defs is not None
    assert {"statin-refill", "appointment-reminder", "awareness-monthly"} <= set(defs.campaigns)
    for campaign in defs.campaigns.values():
        assert defs.template_locales(campaign.template) == ["en", "es"]


def test_versions_are_content_hashes(tree: Path) -> None:
    first = load_definitions(tree)
    again = load_definitions(tree)
    assert first.version == again.version
    path = tree / "templates" / "statin-refill.en.sms.j2"
    replace_in(path, "is due soon", "is due in a few days")
    changed = load_definitions(tree)
    assert changed.version != first.version
    old = first.templates[("statin-refill", "en")].version
    assert changed.templates[("statin-refill", "en")].version != old
    assert changed.templates[("statin-refill", "es")] == first.templates[("statin-refill", "es")]


def test_locale_fallback(tree: Path) -> None:
    defs = load_definitions(tree)
    assert defs.template_for("statin-refill", "es-MX").locale == "es"
    assert defs.template_for("statin-refill", "de").locale == "en"


BAD_INPUT = [
    pytest.param(
        "policies/tcpa.yaml",
        "kind: quiet_hours\n",
        "kind: quiet_hourz\n",
        "kind",
        "kind: quiet_hourz",
        id="unknown-rule-kind",
    ),
    pytest.param(
        "policies/hipaa.yaml",
        "when: 'message.contains_phi && !patient.allow_phi_sms'",
        "when: 'message.contains_phi && !patient.allow_phi_sms &&'",
        "syntax",
        "when: 'message.contains_phi",
        id="cel-syntax-error",
    ),
    pytest.param(
        "policies/hipaa.yaml",
        "when: 'message.contains_phi && !patient.allow_phi_sms'",
        "when: 'message.contains_phi && !patient.ssn_on_file'",
        "ssn_on_file",
        "when: 'message.contains_phi",
        id="cel-unknown-field",
    ),
    pytest.param(
        "policies/ctia.yaml",
        "when: '!message.has_opt_out_text'",
        "when: '!msg.has_opt_out_text'",
        "msg",
        "when: '!msg",
        id="cel-unknown-name",
    ),
    pytest.param(
        "templates/statin-refill.en.sms.j2",
        "{{ given_name|gsm }}",
        "{{ given_name|gsm }",
        "",
        "Hi {{ given_name|gsm }",
        id="template-syntax-error",
    ),
    pytest.param(
        "templates/statin-refill.en.sms.j2",
        "{{ given_name|gsm }}",
        "{{ ''.__class__.__mro__ }}",
        "",
        "__class__",
        id="sandbox-escape-dunder",
    ),
    pytest.param(
        "templates/statin-refill.en.sms.j2",
        "{{ given_name|gsm }}",
        "{{ given_name|attr('__class__') }}",
        "attr",
        "attr(",
        id="sandbox-escape-attr",
    ),
    pytest.param(
        "templates/statin-refill.en.sms.j2",
        "{{ given_name|gsm }}",
        "{{ '{0.__class__}'.format(given_name) }}",
        "",
        ".format(",
        id="sandbox-escape-format",
    ),
    pytest.param(
        "templates/statin-refill.en.sms.j2",
        "{{ given_name|gsm }}",
        "{{ ssn }}",
        "ssn",
        "{{ ssn }}",
        id="undeclared-variable",
    ),
    pytest.param(
        "campaigns/statin-refill.yaml",
        'at: "10:00"',
        'at: "25:00"',
        "schedule.at",
        'at: "25:00"',
        id="bad-send-time",
    ),
    pytest.param(
        "campaigns/statin-refill.yaml",
        "template: statin-refill",
        "template: statin-refil",
        "unknown template",
        "template: statin-refil",
        id="unknown-template",
    ),
]


@pytest.mark.parametrize(("rel", "old", "new", "expect", "needle"), BAD_INPUT)
def test_bad_input_names_file_and_line(
    tree: Path, rel: str, old: str, new: str, expect: str, needle: str
) -> None:
    path = tree / rel
    replace_in(path, old, new)
    errors = errors_of(tree)
    expected_prefix = f"{rel}:{line_of(path, needle)}:"
    matching = [e for e in errors if e.startswith(expected_prefix)]
    assert matching, f"no error at {expected_prefix} in {errors}"
    assert expect.lower() in " ".join(matching).lower()


def test_malformed_yaml_names_the_line(tree: Path) -> None:
    path = tree / "policies" / "gdpr.yaml"
    path.write_text("id: gdpr\ndescription: x\nrules:\n  - id: [unclosed\n")
    errors = errors_of(tree)
    assert any(e.startswith("policies/gdpr.yaml:") and "invalid YAML" in e for e in errors)


def test_every_problem_is_reported_at_once(tree: Path) -> None:
    replace_in(tree / "templates" / "statin-refill.en.sms.j2", "{{ given_name|gsm }}", "{{ ssn }}")
    replace_in(tree / "policies" / "ctia.yaml", "kind: expression", "kind: nope")
    errors = errors_of(tree)
    assert any(e.startswith("templates/statin-refill.en.sms.j2:") for e in errors)
    assert any(e.startswith("policies/ctia.yaml:") for e in errors)


def test_duplicate_rule_id_across_files(tree: Path) -> None:
    replace_in(
        tree / "policies" / "ctia.yaml", "id: ctia-marketing-opt-out", "id: consent-required"
    )
    errors = errors_of(tree)
    assert any("consent-required" in e and "also used" in e for e in errors)


def test_failing_policy_test_fails_check(tree: Path) -> None:
    replace_in(tree / "policies" / "consent.yaml", "expect: allow", "expect: deny")
    report = check_definitions(tree)
    assert not report.ok
    assert report.tests_failed == 1
    assert any(
        e.startswith("policies/consent.yaml:") and "expected deny" in e for e in report.errors
    )


def test_template_without_opt_out_fails_where_a_rule_requires_it(tree: Path) -> None:
    replace_in(tree / "templates" / "awareness-monthly.en.sms.j2", " {{ opt_out }}", "")
    errors = errors_of(tree)
    assert any(
        e.startswith("templates/awareness-monthly.en.sms.j2") and "opt-out" in e for e in errors
    )


def test_program_help_must_name_the_support_contact(tree: Path) -> None:
    replace_in(tree / "policies" / "program.yaml", "help at 800-555-0199", "help online")
    errors = errors_of(tree)
    assert any(e.startswith("policies/program.yaml:") and "support contact" in e for e in errors)


def test_the_engines_own_campaign_ids_are_reserved(tree: Path) -> None:
    """Rows of campaign "program" are replies to a patient's keyword, sent without the
    consent re-check: no campaign file may take that id."""
    source = tree / "campaigns" / "awareness-monthly.yaml"
    text = source.read_text().replace("id: awareness-monthly", "id: program", 1)
    source.unlink()
    (tree / "campaigns" / "program.yaml").write_text(text)
    errors = errors_of(tree)
    assert any(e.startswith("campaigns/program.yaml:1:") and "reserved" in e for e in errors)
