"""Retention: what policies/retention.yaml says is due is purged, with time passed in."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from engine.crypto import new_token
from engine.definitions import load_sources
from engine.defsource import read_tree
from engine.retention import purge_due
from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import models as m
from engine.transports.console import ConsoleTransport
from engine.worker import Worker, WorkerConfig
from engine.yamlsource import SourceErrors
from tests.integration.conftest import Engage

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "sample"
NOW = datetime(2033, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
YEAR = timedelta(days=366)


@pytest.fixture
def rt(engage: Engage) -> Runtime:
    engage("import", str(SAMPLE / "patients.csv"))
    return Runtime(Settings.from_env(engage.env))


def outbox(session: Session, pid: int, key: str, *, status: str, at: datetime) -> m.Outbox:
    row = m.Outbox(
        idempotency_key=key, campaign_id="c", campaign_version="1", purpose="adherence",
        patient_id=pid, occurrence=key, outcome="allow", status=status, due_at=at,
        send_at=at, expires_at=at + DAY, body_enc=b"sealed", reasons=[], decided_at=at,
        sent_at=at if status == "delivered" else None, created_at=at, updated_at=at,
    )  # fmt: skip
    session.add(row)
    return row


def seed(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Rows just past and just within each period (bodies 90d, free text 1y, keyword
    text 6y, links 90d after expiry, decisions 6y) as of NOW."""
    with sessions.begin() as session:
        pid = session.scalars(select(m.Patient.id).order_by(m.Patient.id)).first()
        assert pid is not None
        old_body = outbox(session, pid, "a", status="delivered", at=NOW - 91 * DAY)
        outbox(session, pid, "b", status="delivered", at=NOW - 89 * DAY)
        outbox(session, pid, "c", status="queued", at=NOW - 200 * DAY)  # not final: kept
        old_decision = outbox(session, pid, "d", status="blocked", at=NOW - 6 * YEAR - DAY)
        outbox(session, pid, "e", status="blocked", at=NOW - 6 * YEAR + DAY)
        session.flush()
        for n, (kind, age) in enumerate(
            [("other", YEAR + DAY), ("other", YEAR - DAY), ("opt_out", YEAR + DAY),
             ("opt_out", 6 * YEAR + DAY)]
        ):  # fmt: skip
            session.add(
                m.InboundMessage(
                    provider_sid=f"SM{n}", from_index=f"v1:{n}", patient_id=pid,
                    body_enc=b"sealed", classification=kind, received_at=NOW - age,
                )
            )  # fmt: skip
        for n, expired in enumerate((91 * DAY, 89 * DAY)):
            link_to = old_decision.id if n == 1 else None  # kept, its decision is not
            session.add(
                m.SchedulingLink(
                    token_hash=new_token()[1], patient_id=pid, kind="refill",
                    outbox_id=link_to, expires_at=NOW - expired,
                )
            )  # fmt: skip
        return {"old_body": old_body.id, "old_decision": old_decision.id}


def snapshot(session: Session) -> dict[str, object]:
    o, i = m.Outbox, m.InboundMessage
    return {
        "bodies": sorted(session.scalars(select(o.idempotency_key).where(o.body_enc.is_not(None)))),
        "outbox": sorted(session.scalars(select(o.idempotency_key))),
        "inbound_bodies": session.scalar(
            select(func.count()).select_from(i).where(i.body_enc.is_not(None))
        ),
        "links": sorted(
            str(link_to) for link_to in session.scalars(select(m.SchedulingLink.outbox_id))
        ),
    }


def test_purge_due_purges_exactly_what_is_past_its_period(rt: Runtime) -> None:
    seed(rt.session_factory)
    with rt.session_factory() as session:
        defs = rt.definitions(session)
        before = snapshot(session)
        dry = purge_due(session=session, defs=defs, now=NOW, dry_run=True)
        assert snapshot(session) == before
    expected = {
        "message_bodies": 3,  # "a" (91 days after sending), "d" and "e" (blocked long ago)
        "inbound_free_text": 1,
        "inbound_keyword_text": 1,
        "scheduling_links": 1,
        "decisions": 1,
        "consent_events_past_period": 0,
        "policy": True,
    }
    assert dry.fields() == expected
    with rt.session_factory.begin() as session:
        counts = purge_due(session=session, defs=defs, now=NOW)
    assert counts.fields() == expected
    with rt.session_factory() as session:
        assert snapshot(session) == {
            "bodies": ["b", "c"],
            "outbox": ["a", "b", "c", "e"],
            "inbound_bodies": 2,
            "links": ["None"],  # unhooked from the deleted decision
        }
        entries = session.scalars(
            select(m.AuditEntry).where(m.AuditEntry.action == "retention_purged")
        ).all()
        assert [e.details for e in entries] == [expected]
    with rt.session_factory.begin() as session:  # nothing more is due: a second run is a no-op
        again = purge_due(session=session, defs=defs, now=NOW)
    assert again.message_bodies == again.decisions == again.scheduling_links == 0


def test_cli_dry_run_counts_and_run_purges(rt: Runtime, engage: Engage) -> None:
    seed(rt.session_factory)
    at = NOW.isoformat()
    dry = json.loads(engage("retention", "run", "--at", at, "--dry-run").stdout)
    assert dry["dry_run"] and dry["message_bodies"] == 3
    real = json.loads(engage("retention", "run", "--at", at).stdout)
    assert real["decisions"] == 1 and real["scheduling_links"] == 1
    after = json.loads(engage("retention", "run", "--at", at, "--dry-run").stdout)
    assert after["message_bodies"] == after["decisions"] == 0
    engage("retention", "run", "--at", "yesterday", code=2)


def test_the_worker_runs_retention_daily_with_its_clock(rt: Runtime) -> None:
    seed(rt.session_factory)
    worker = Worker(
        config=WorkerConfig(worker_id="w1"), settings=rt.settings,
        session_factory=rt.session_factory, keyring=rt.keyring,
        transport=ConsoleTransport(), clock=lambda: NOW,
    )  # fmt: skip
    job = worker.scheduler().get_job("retention")
    assert job is not None and job.trigger.interval == timedelta(hours=24)
    worker.retention_tick()
    with rt.session_factory() as session:
        assert snapshot(session)["outbox"] == ["a", "b", "c", "e"]
        actors = session.scalars(
            select(m.AuditEntry.actor).where(m.AuditEntry.action == "retention_purged")
        ).all()
        assert actors == ["system:worker"]


def test_a_set_without_retention_file_loads_and_purges_nothing(rt: Runtime) -> None:
    sources = read_tree(Path(rt.settings.definitions_dir))
    del sources["policies/retention.yaml"]
    defs = load_sources(sources)
    assert defs.retention is None
    seed(rt.session_factory)
    with rt.session_factory.begin() as session:
        before = snapshot(session)
        assert purge_due(session=session, defs=defs, now=NOW).policy is False
        assert snapshot(session) == before


@pytest.mark.parametrize(
    ("change", "line", "message"),
    [
        (("keep: 6y\n  cite: \"HIPAA documentation", "keep: 1y\n  cite: \"HIPAA documentation"),
         28, "at least 6y"),
        (("keep: 90d", "keep: 90 days"), 5, "retention period"),
    ],
)  # fmt: skip
def test_a_bad_retention_file_is_reported_with_file_and_line(
    change: tuple[str, str], line: int, message: str
) -> None:
    sources = read_tree(ROOT)
    text = sources["policies/retention.yaml"]
    assert change[0] in text
    sources["policies/retention.yaml"] = text.replace(change[0], change[1], 1)
    with pytest.raises(SourceErrors) as caught:
        load_sources(sources)
    errors = [str(e) for e in caught.value.errors]
    assert any(e.startswith(f"policies/retention.yaml:{line}") and message in e for e in errors), (
        errors
    )
