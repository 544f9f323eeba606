"""The `engage` commands end to end, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import Engage

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "sample"
AT = "2026-12-07T16:00:00Z"


@pytest.fixture
def loaded(engage: Engage) -> Engage:
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    engage("approve", "statin-refill", "--by", "carol")
    return engage


def dry_run(engage: Engage, campaign: str = "statin-refill", at: str = AT) -> dict:
    return json.loads(engage("dry-run", campaign, "--at", at, "--json").stdout)


def outcomes(report: dict) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for d in report["decisions"]:
        found.setdefault(d["patient"], []).append(
            d["outcome"] + (f":{d['reasons'][0]['rule']}" if d["reasons"] else "")
        )
    return {p: sorted(v) for p, v in found.items()}


def test_init_creates_private_key_files_and_is_repeatable(engage: Engage, tmp_path: Path) -> None:
    for name in ("master.key", "index.key"):
        assert (tmp_path / "var" / name).stat().st_mode & 0o777 == 0o600
    assert "already at" in engage("init").stdout


def test_dry_run_json_decides_every_due_occurrence_with_reasons(loaded: Engage) -> None:
    report = dry_run(loaded)
    assert {"campaign", "campaign_version", "policy_set", "at", "summary", "decisions"} <= set(
        report
    )
    assert report["campaign"] == "statin-refill"
    assert outcomes(report) == {
        "S001": ["allow"],
        "S002": ["deny:consent-required"],  # marketing consent only
        "S003": ["deny:gdpr-explicit-consent"],  # EU patient on express consent
        "S004": ["allow"],  # EU patient on explicit consent
        "S005": ["deny:consent-required"],  # revoked
        "S006": ["allow"],  # revoked, then granted again
        "S007": ["allow", "defer:hc-daily-cap"],  # two refills due the same day
        "S009": ["allow"],
    }
    assert report["summary"] | {"by_rule": None} == report["summary"] | {
        "allow": 5,
        "defer": 1,
        "deny": 3,
        "by_rule": None,
    }
    first = next(d for d in report["decisions"] if d["patient"] == "S009")
    assert first["locale"] == "es" and first["encoding"] == "GSM-7" and first["segments"] == 1
    assert "Hola José" in first["text"] and "PARAR" in first["text"]
    deferred = next(d for d in report["decisions"] if d["outcome"] == "defer")
    assert deferred["send_at"] == "2026-12-08T16:00:00+00:00"
    assert deferred["reasons"][0]["cite"].startswith("FCC 15-72")


def test_dry_run_writes_nothing(loaded: Engage) -> None:
    assert dry_run(loaded) == dry_run(loaded)


def test_unapproved_template_is_flagged_and_denied(engage: Engage) -> None:
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    report = dry_run(engage)
    assert report["summary"]["unapproved_templates"]
    assert {d["outcome"] for d in report["decisions"]} == {"deny"}
    assert all(d["reasons"][-1]["rule"] == "template-approval" for d in report["decisions"])
    table = engage("dry-run", "statin-refill", "--at", AT).stdout
    assert "is not approved" in table


def test_consent_commands_change_the_next_decision(loaded: Engage) -> None:
    loaded(
        "consent",
        "revoke",
        "--patient",
        "S001",
        "--purpose",
        "adherence",
        "--method",
        "phone",
        "--by",
        "front-desk",
        "--at",
        "2026-12-01T12:00:00Z",
    )
    assert outcomes(dry_run(loaded))["S001"] == ["deny:consent-required"]
    granted = loaded(
        "consent",
        "grant",
        "--patient",
        "S003",
        "--purpose",
        "adherence",
        "--legal-basis",
        "explicit",
        "--method",
        "web_form",
        "--evidence",
        "form 7781 signed",
        "--by",
        "portal",
        "--at",
        "2026-12-01T12:00:00Z",
    )
    assert "S003 adherence: active (explicit)" in granted.stdout
    assert outcomes(dry_run(loaded))["S003"] == ["allow"]


def test_table_output_counts_outcomes_and_rules(loaded: Engage) -> None:
    out = loaded("dry-run", "statin-refill", "--at", AT).stdout
    for expected in (
        "Outcomes",
        "consent-required",
        "gdpr-explicit-consent",
        "hc-daily-cap",
        "S007",
    ):
        assert expected in out


def test_preview_renders_and_explains(loaded: Engage) -> None:
    out = loaded("preview", "statin-refill", "--patient", "S009", "--at", AT).stdout
    assert "Hola José" in out and "GSM-7" in out and "approved" in out
    assert "decision: allow" in out and "consent-required" in out


@pytest.mark.parametrize(
    "args",
    [
        ("dry-run", "no-such-campaign", "--at", AT),
        ("preview", "no-such-template", "--patient", "S001"),
        ("preview", "statin-refill", "--patient", "NOBODY"),
        ("approve", "no-such-template", "--by", "carol"),
        (
            "consent",
            "grant",
            "--patient",
            "NOBODY",
            "--purpose",
            "adherence",
            "--legal-basis",
            "express",
            "--method",
            "phone",
            "--by",
            "x",
        ),
        (
            "consent",
            "grant",
            "--patient",
            "S001",
            "--purpose",
            "nonsense",
            "--legal-basis",
            "express",
            "--method",
            "phone",
            "--by",
            "x",
        ),
    ],
)
def test_unknown_ids_exit_2_with_a_clear_message(loaded: Engage, args: tuple[str, ...]) -> None:
    result = loaded(*args, code=2)
    assert "unknown" in result.stderr.lower()


def test_a_broken_definition_leaves_the_active_set(loaded: Engage, definitions: Path) -> None:
    before = dry_run(loaded)
    path = definitions / "policies" / "tcpa.yaml"
    path.write_text(path.read_text().replace("kind: quiet_hours", "kind: quiet_hourz", 1))
    result = loaded("sync", code=1)
    assert "policies/tcpa.yaml:" in result.stderr and "active set is unchanged" in result.stderr
    assert dry_run(loaded)["policy_set"] == before["policy_set"]
    assert loaded("check", code=1).stderr.count("policies/tcpa.yaml:") >= 1


def test_sync_versions_by_content(loaded: Engage, definitions: Path) -> None:
    assert "nothing changed" in loaded("sync").stdout
    path = definitions / "templates" / "statin-refill.en.sms.j2"
    path.write_text(path.read_text().replace("is due soon", "is due in 3 days"))
    out = loaded("sync").stdout
    assert "changed: templates/statin-refill.en.sms.j2" in out
    report = dry_run(loaded)
    english = [d for d in report["decisions"] if d["locale"] == "en"]
    assert english and all(not d["approved"] for d in english)  # a new version needs review
    spanish = [d for d in report["decisions"] if d["locale"] == "es"]
    assert spanish and all(d["approved"] for d in spanish)


def test_import_reports_bad_rows_and_keeps_good_ones(engage: Engage, tmp_path: Path) -> None:
    bad = tmp_path / "patients.csv"
    rows = (SAMPLE / "patients.csv").read_text().splitlines()
    rows[3] = rows[3].replace("+49 151 23456781", "555-12")
    rows[4] = rows[4].replace("Europe/Berlin", "Mars/Olympus")
    bad.write_text("\n".join(rows) + "\n")
    out = engage("import", str(bad)).stdout
    assert f"{bad}:4: phone" in out
    assert f"{bad}:5: " in out and "Mars/Olympus" in out
    assert "8 imported" in out and "2 rejected" in out
    engage("import", "--strict", str(bad), code=1)
