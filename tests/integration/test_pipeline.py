"""From files to texts: sync, import, plan, dispatch through the twilio SDK to the sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from engine.store import db
from engine.transports.registry import make_transport
from engine.worker import Worker, WorkerConfig
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT, SAMPLE

ALLOWED = {"S001", "S004", "S006", "S007", "S009"}  # what the dry-run allows at AT


def _engage(engage: Engage, sandbox) -> Engage:  # type: ignore[no-untyped-def]
    engage.env.update(
        {
            "ENGAGE_TRANSPORT": "sandbox",
            "TWILIO_API_BASE_URL": sandbox.url,
            "ENGAGE_STATUS_CALLBACK_URL": "",
            "ENGAGE_SEND_RATE": "0",
        }
    )
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    engage("approve", "statin-refill", "--by", "carol")
    return engage


def test_plan_then_dispatch_sends_exactly_what_the_dry_run_allows(engage: Engage, sandbox) -> None:  # type: ignore[no-untyped-def]
    run = _engage(engage, sandbox)
    dry = json.loads(run("dry-run", "statin-refill", "--at", AT, "--json").stdout)
    allowed_texts = sorted(d["text"] for d in dry["decisions"] if d["outcome"] == "allow")
    run("plan", "--at", AT)
    run("plan", "--at", AT)  # a second tick adds nothing
    run("dispatch", "--once", "--at", AT)
    run("dispatch", "--once", "--at", AT)  # nothing left to send
    received = sandbox.messages()
    assert sorted(m["body"] for m in received) == allowed_texts
    assert len(received) == len(ALLOWED)
    status = json.loads(run("status", "statin-refill", "--json").stdout)
    text = json.dumps(status)
    assert "consent-required" in text and "gdpr-explicit-consent" in text


def test_a_revocation_between_plan_and_dispatch_stops_the_text(engage: Engage, sandbox) -> None:  # type: ignore[no-untyped-def]
    run = _engage(engage, sandbox)
    run("plan", "--at", AT)
    run("consent", "revoke", "--patient", "S001", "--purpose", "adherence", "--method", "phone",
        "--by", "front-desk", "--at", "2026-12-07T15:59:00Z")  # fmt: skip
    run("dispatch", "--once", "--at", AT)
    bodies = [m["body"] for m in sandbox.messages()]
    assert len(bodies) == len(ALLOWED) - 1
    assert not any("Hi Ada" in b for b in bodies)


def test_a_paused_campaign_is_neither_planned_nor_sent(engage: Engage, sandbox) -> None:  # type: ignore[no-untyped-def]
    run = _engage(engage, sandbox)
    run("plan", "--at", AT)
    run("campaign", "pause", "statin-refill", "--by", "ops")
    run("dispatch", "--once", "--at", AT)
    assert sandbox.messages() == []
    run("campaign", "resume", "statin-refill", "--by", "ops")
    run("dispatch", "--once", "--at", AT)
    assert len(sandbox.messages()) == len(ALLOWED)


def test_the_worker_plans_and_sends_on_its_own_engines(  # type: ignore[no-untyped-def]
    engage: Engage, sandbox, db_url: str, tmp_path: Path
) -> None:
    """The worker claims with BEGIN IMMEDIATE on SQLite but plans on ordinary transactions:
    the planner streams patients on one connection while it writes on another."""
    from engine.runtime import Runtime
    from engine.settings import Settings

    run = _engage(engage, sandbox)
    rt = Runtime(Settings.from_env(run.env))
    claims_engine = db.make_engine(db_url, sqlite_immediate=True)
    transport = make_transport(rt.settings)
    worker = Worker(
        config=WorkerConfig(worker_id="w1", rate_per_second=0),
        settings=rt.settings, session_factory=db.make_session_factory(claims_engine),
        keyring=rt.keyring, transport=transport, clock=lambda: datetime.fromisoformat(AT),
        plan_session_factory=rt.session_factory,
    )  # fmt: skip
    try:
        worker.plan_tick()
        worker.dispatch_tick()
    finally:
        transport.close()  # type: ignore[attr-defined]
        claims_engine.dispose()
    assert len(sandbox.messages()) == len(ALLOWED)
