"""Builders for dispatcher and worker tests: patients with consent, and outbox rows as the
planner writes them (body sealed with the patient's key), plus a subprocess entry point.

Run as a script it is `engage`:
    python tests/integration/outbox_builders.py worker --id w1
"""

from __future__ import annotations

import functools
import multiprocessing.queues
import multiprocessing.synchronize
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from engine import outbox_status as st
from engine.core.domain import ConsentEvent, Patient
from engine.crypto import Keyring
from engine.definitions import DefinitionSet, load_definitions
from engine.settings import Settings
from engine.store import consent_queries, queries
from engine.store import models as m
from engine.store.defqueries import record_review, sync_definitions
from engine.store.outbox_queries import body_field

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 3, 10, 16, 0, tzinfo=UTC)  # 11:00 in New York: inside quiet hours
CAMPAIGN = "statin-refill"
TEMPLATE = ("statin-refill", "en")


@functools.cache
def definitions() -> DefinitionSet:
    return load_definitions(ROOT)


def body_text(n: int) -> str:
    return f"Riverside Health: reminder {n}, your refill is due soon. Reply STOP to opt out."


def midday_zone(now: datetime) -> str:
    """A fixed-offset zone where `now` is about noon (quiet hours hold with a real clock)."""
    offset = 12 - now.hour
    return "Etc/GMT" + (f"{-offset:+d}" if offset else "")


def setup_definitions(session: Session, defs: DefinitionSet, now: datetime = NOW) -> None:
    """Make `defs` the active set and approve every template variant."""
    sync_definitions(session=session, defs=defs, now=now)
    for (tid, locale), template in defs.templates.items():
        record_review(
            session=session,
            template_id=tid,
            locale=locale,
            version=template.version,
            decision="approve",
            by="carol",
            now=now - timedelta(days=30),
        )


def add_patients(
    session: Session,
    keyring: Keyring,
    phones: Sequence[str],
    *,
    legal_basis: str = "written",
    timezone: str = "America/New_York",
    prefix: str = "P",
    granted_at: datetime = NOW - timedelta(days=30),
) -> list[int]:
    """Patients (one per phone) with SMS consent for adherence and appointment.

    Consent events go in with one INSERT (no evidence to seal): thousands in a second."""
    records = [
        queries.PatientRecord(
            Patient(f"{prefix}{i:05d}", timezone=timezone, given_name="Ada", family_name="Test"),
            phone,
        )
        for i, phone in enumerate(phones)
    ]
    queries.upsert_patients(session=session, keyring=keyring, records=records)
    external = [r.patient.external_id for r in records]
    ids = queries.patient_ids_for(session=session, external_ids=external)
    events = [
        dict(
            patient_id=ids[e],
            purpose=purpose,
            channel="sms",
            status="granted",
            legal_basis=legal_basis,
            method="intake_form",
            occurred_at=granted_at,
            recorded_at=granted_at,
            recorded_by="test",
        )
        for e in external
        for purpose in ("adherence", "appointment")
    ]
    session.execute(insert(m.ConsentEvent), events)
    return [ids[e] for e in external]


def revoke(session: Session, keyring: Keyring, external_id: str, at: datetime) -> None:
    for purpose in ("adherence", "appointment"):
        event = ConsentEvent(external_id, purpose, "revoked", at, method="web_form")
        consent_queries.record_consent_event(session=session, keyring=keyring, event=event)


def add_rows(
    session: Session,
    keyring: Keyring,
    items: Sequence[tuple[int, str]],
    *,
    send_at: datetime = NOW - timedelta(minutes=1),
    expires_at: datetime = NOW + timedelta(hours=10),
    status: str = st.QUEUED,
    key_prefix: str = "k",
) -> list[int]:
    """Outbox rows (patient row id, body) of the statin-refill campaign; their ids."""
    template = definitions().templates[TEMPLATE]
    ciphers = queries.ciphers_for(
        session=session, keyring=keyring, patient_ids={pid for pid, _ in items}
    )
    common = {
        "campaign_id": CAMPAIGN, "campaign_version": "v1", "template_id": template.id,
        "template_version": template.version, "locale": "en", "purpose": "adherence",
        "anchor": "", "outcome": "allow", "status": status, "due_at": send_at,
        "send_at": send_at, "expires_at": expires_at, "segments": 1, "encoding": "GSM-7",
        "reasons": [], "attempts": 0, "created_at": send_at, "updated_at": send_at,
    }  # fmt: skip
    values: list[dict[str, Any]] = []
    for n, (pid, body) in enumerate(items):
        key = f"{key_prefix}-{n}-{pid}"
        sealed = ciphers[pid].encrypt_field(body_field(key), body)
        values.append(
            {**common, "idempotency_key": key, "patient_id": pid, "occurrence": f"o{n}",
             "body_enc": sealed}
        )  # fmt: skip
    session.execute(insert(m.Outbox), values)
    keys = [v["idempotency_key"] for v in values]
    found = dict(
        session.execute(
            select(m.Outbox.idempotency_key, m.Outbox.id).where(m.Outbox.idempotency_key.in_(keys))
        ).all()
    )
    return [found[k] for k in keys]


def outbox(session_factory: sessionmaker[Session], ids: Sequence[int] | None = None) -> list[Any]:
    with session_factory() as session:
        stmt = select(m.Outbox).order_by(m.Outbox.id)
        if ids is not None:
            stmt = stmt.where(m.Outbox.id.in_(ids))
        return list(session.scalars(stmt))


def dispatch_in_process(
    db_url: str,
    settings: Settings,
    *,
    at: datetime,
    worker_id: str,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.queues.Queue[tuple[str, dict[str, float]]],
) -> None:
    """A worker process for the frequency cap test: wait for the others, then dispatch one
    row per claim until nothing is due; put the report's counts on `results`."""
    from engine.crypto import load_keys
    from engine.dispatcher import dispatch_until_idle
    from engine.store.db import make_engine, make_session_factory
    from engine.transports.registry import make_transport

    engine = make_engine(db_url, sqlite_immediate=True)
    session_factory = make_session_factory(engine)
    transport, keyring, defs = make_transport(settings), load_keys(settings), definitions()
    run = {
        "session_factory": session_factory,
        "keyring": keyring,
        "defs": defs,
        "transport": transport,
        "worker_id": worker_id,
        "limit": 1,
    }
    # Warm up before the race: connect, and claim once a year early (nothing is due then),
    # so that no process is still compiling its first claim when another has finished.
    dispatch_until_idle(clock=lambda: at - timedelta(days=365), **run)  # type: ignore[arg-type]
    barrier.wait(timeout=60)
    report = dispatch_until_idle(clock=lambda: at, **run)  # type: ignore[arg-type]
    engine.dispose()
    results.put((worker_id, report.fields()))


if __name__ == "__main__":
    from engine.cli import main

    main()
