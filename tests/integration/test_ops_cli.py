"""`engage plan`, `engage status` and `engage campaign pause|resume`, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update

from engine import outbox_status as st
from engine.store import models as m
from engine.store.db import make_engine
from tests.integration import conftest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "sample"
AT = "2026-12-07T16:00:00Z"


class Engage(conftest.Engage):
    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture
def engage(db_url: str, tmp_path: Path) -> Engage:
    root = tmp_path / "defs"
    for folder in ("campaigns", "templates", "policies"):
        shutil.copytree(ROOT / folder, root / folder)
    run = Engage(
        {
            "DATABASE_URL": db_url,
            "ENGAGE_VAR_DIR": str(tmp_path / "var"),
            "ENGAGE_DEFINITIONS_DIR": str(root),
            "ENGAGE_PUBLIC_URL": "https://rh.example",
        }
    )
    run("init")
    run("sync")
    run("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    run("approve", "statin-refill", "--by", "carol")
    return run


@pytest.fixture
def database(db_url: str, engage: Engage) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def test_plan_reports_and_a_second_tick_adds_nothing(engage: Engage) -> None:
    out = engage("plan", "--at", AT).stdout
    assert "statin-refill" in out and "11 new" in out
    report = engage.json("plan", "--at", AT)
    assert report["inserted"] == 0 and report["already_present"] == 11
    statin = report["campaigns"]["statin-refill"]
    assert statin["already_present"] == 9 and statin["inserted"] == 0


def test_plan_json_counts_outcomes_per_campaign(engage: Engage) -> None:
    report = engage.json("plan", "--at", AT)
    statin = report["campaigns"]["statin-refill"]
    assert (statin["allow"], statin["defer"], statin["deny"]) == (5, 1, 3)
    assert statin["by_status"] == {"queued": 5, "blocked": 3, "expired": 1}
    assert statin["by_rule"]["consent-required"] == 2
    reminder = report["campaigns"]["appointment-reminder"]
    assert reminder["deny"] == 2 and reminder["unapproved_templates"]
    assert report["horizon_seconds"] == 300 and report["patients"] == 10


def test_horizon_looks_ahead(engage: Engage) -> None:
    early = "2026-12-07T08:30:00Z"  # due at 09:00Z in Berlin, 15:00Z in New York
    assert engage.json("plan", "--at", early)["inserted"] == 0
    assert engage.json("plan", "--at", early, "--horizon", "1h")["inserted"] == 2
    assert engage.json("plan", "--at", early, "--horizon", "7h")["inserted"] == 9
    result = engage("plan", "--horizon", "soon", code=2)
    assert "--horizon" in result.stderr


def test_status_counts_rules_errors_and_lists_unknown_rows(
    engage: Engage, database: Engine
) -> None:
    engage("plan", "--at", AT)
    o = m.Outbox
    with database.begin() as connection:
        queued = connection.execute(
            select(o.id, o.patient_id).where(o.status == st.QUEUED).order_by(o.id)
        ).all()
        claimed = datetime(2026, 12, 7, 16, 1, tzinfo=UTC)
        connection.execute(
            update(o)
            .where(o.id == queued[0].id)
            .values(status=st.UNKNOWN, claimed_at=claimed, last_error="worker died while sending")
        )
        connection.execute(
            update(o).where(o.id == queued[1].id).values(status=st.FAILED, error_code=21211)
        )
        external_id = connection.scalar(
            select(m.Patient.external_id).where(m.Patient.id == queued[0].patient_id)
        )
    data = engage.json("status")
    assert data["by_status"] == {"blocked": 5, "expired": 1, "failed": 1, "queued": 3, "unknown": 1}
    rules = {(r["status"], r["rule"]): r["count"] for r in data["by_rule"]}
    assert rules == {
        ("blocked", "consent-required"): 2,
        ("blocked", "gdpr-explicit-consent"): 1,
        ("blocked", "template-approval"): 2,
        ("expired", "hc-daily-cap"): 1,
    }
    assert data["failed_by_error_code"] == {"21211": 1}
    (unknown,) = data["unknown"]
    assert unknown["patient"] == external_id and unknown["id"] == queued[0].id
    assert unknown["claimed_at"] == claimed.isoformat()
    assert unknown["last_error"] == "worker died while sending"
    table = engage("status").stdout
    for expected in ("By status", "consent-required", "21211", "Unknown", external_id):
        assert expected in table


def test_status_of_one_campaign(engage: Engage) -> None:
    engage("plan", "--at", AT)
    data = engage.json("status", "appointment-reminder")
    assert data["campaign"] == "appointment-reminder"
    assert data["by_status"] == {"blocked": 2}
    assert "unknown campaign" in engage("status", "nope", code=2).stderr


def test_pause_stops_planning_and_resume_restarts_it(engage: Engage, database: Engine) -> None:
    assert (
        "statin-refill paused by dana"
        in engage("campaign", "pause", "statin-refill", "--by", "dana").stdout
    )
    assert "already paused" in engage("campaign", "pause", "statin-refill", "--by", "dana").stdout
    report = engage.json("plan", "--at", AT)
    assert report["skipped"] == {"statin-refill": "paused"}
    assert "statin-refill" not in report["campaigns"]
    assert engage.json("status")["paused"] == ["statin-refill"]
    with database.connect() as connection:
        state = connection.execute(select(m.CampaignState)).one()
    assert (state.campaign_id, state.paused, state.updated_by) == ("statin-refill", True, "dana")
    assert "resumed" in engage("campaign", "resume", "statin-refill", "--by", "dana").stdout
    report = engage.json("plan", "--at", AT)
    assert report["campaigns"]["statin-refill"]["inserted"] == 9


@pytest.mark.parametrize("verb", ["pause", "resume"])
def test_unknown_campaign_exits_2(engage: Engage, verb: str) -> None:
    result = engage("campaign", verb, "no-such-campaign", "--by", "dana", code=2)
    assert "unknown campaign" in result.stderr
