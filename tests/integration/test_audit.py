"""The audit log: the database refuses to change it, `engage audit verify` names the first
entry an edit, deletion, insertion or reordering broke (triggers bypassed as an attacker
with database rights would), and the operations the law asks about leave entries."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from engine import audit
from engine.inbound import InboundSms, handle_inbound
from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import models as m
from engine.store.db import make_engine
from tests.integration.conftest import Engage

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "sample"
AT = "2026-12-07T16:00:00Z"
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def db(db_url: str, engage: Engage) -> Iterator[Engine]:
    """The migrated database of `engage` (after init and sync)."""
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def _append(db: Engine, n: int) -> list[tuple[int, str]]:
    """n more entries, one minute apart; (id, hash) of every entry in the log."""
    with _session(db) as session:
        for i in range(n):
            audit.record(
                session=session,
                actor=f"user:clerk-{i}",
                action="test_entry",
                subject=f"patient:S00{i}",
                details={"i": i},
                now=T0 + timedelta(minutes=i),
            )
    with db.connect() as connection:
        return [(r.id, r.hash) for r in connection.execute(text(_ORDERED))]


_ORDERED = "SELECT id, hash FROM audit_log ORDER BY id"


@contextmanager
def _session(db: Engine) -> Iterator[Session]:
    with Session(db) as session, session.begin():
        yield session


@contextmanager
def tampering(db: Engine) -> Iterator[Connection]:
    """A transaction in which the append-only triggers do not fire: PostgreSQL replica
    mode; on SQLite the triggers are dropped and put back afterwards."""
    with db.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL session_replication_role = replica")
            yield connection
            return
        triggers = connection.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'"
        ).all()
        assert len(triggers) == 2
        for name, _ in triggers:
            connection.exec_driver_sql(f"DROP TRIGGER {name}")
        yield connection
        for _, sql in triggers:
            connection.exec_driver_sql(sql)


def _verify(engage: Engage, code: int) -> str:
    return engage("audit", "verify", code=code).output


def _forge(connection: Connection, *, entry_id: int, prev_hash: str, at: datetime) -> None:
    details = {"i": 99}
    digest = audit.entry_hash(
        prev_hash, at=at, actor="user:mallory", action="test_entry", subject=None, details=details
    )
    connection.execute(
        text(
            "INSERT INTO audit_log (id, at, actor, action, subject, details, prev_hash, hash) "
            "VALUES (:id, :at, 'user:mallory', 'test_entry', NULL, :details, :prev, :hash)"
        ),
        {
            "id": entry_id,
            "at": at,
            "details": json.dumps(details),
            "prev": prev_hash,
            "hash": digest,
        },
    )


def _edit(c: Connection, chain: list[tuple[int, str]]) -> int:
    c.execute(
        text("UPDATE audit_log SET actor = 'user:mallory' WHERE id = :id"), {"id": chain[3][0]}
    )
    return chain[3][0]


def _delete_middle(c: Connection, chain: list[tuple[int, str]]) -> int:
    c.execute(text("DELETE FROM audit_log WHERE id = :id"), {"id": chain[3][0]})
    return chain[4][0]  # the entry that follows the gap


def _insert(c: Connection, chain: list[tuple[int, str]]) -> int:
    """A well-formed entry slipped in after the fourth: ids after it moved up to make room."""
    c.execute(text("UPDATE audit_log SET id = id + 1000 WHERE id > :id"), {"id": chain[3][0]})
    _forge(
        c, entry_id=chain[3][0] + 1, prev_hash=chain[3][1], at=T0 + timedelta(minutes=3, seconds=30)
    )
    return chain[3][0] + 1


def _reorder(c: Connection, chain: list[tuple[int, str]]) -> int:
    first, second = chain[3][0], chain[4][0]
    swap = "UPDATE audit_log SET id = :to WHERE id = :id"
    c.execute(text(swap), {"id": first, "to": -1})
    c.execute(text(swap), {"id": second, "to": first})
    c.execute(text(swap), {"id": -1, "to": second})
    return first


TAMPERINGS: dict[str, tuple[Callable[[Connection, list[tuple[int, str]]], int], str]] = {
    "edited": (_edit, "edited: its content does not match its hash"),
    "deleted in the middle": (_delete_middle, "deleted: the entry it follows is missing"),
    "inserted": (_insert, "inserted: the chain skips it"),
    "reordered": (_reorder, "reordered: it follows entry"),
}


def test_an_intact_chain_verifies(engage: Engage, db: Engine) -> None:
    chain = _append(db, 6)
    out = _verify(engage, 0)
    assert f"{len(chain)} entries checked, chain OK" in out


@pytest.mark.parametrize("how", list(TAMPERINGS))
def test_verify_names_the_first_tampered_entry(engage: Engage, db: Engine, how: str) -> None:
    chain = _append(db, 6)
    tamper, problem = TAMPERINGS[how]
    with tampering(db) as connection:
        bad = tamper(connection, chain)
    with db.connect() as connection:
        row = connection.execute(
            text("SELECT at, action FROM audit_log WHERE id = :id"), {"id": bad}
        ).one()
    out = _verify(engage, 1)
    assert f"BROKEN at entry {bad} (" in out and f", {row.action})" in out, out
    assert problem in out, out
    assert str(row.at)[:16].replace(" ", "T") in out, out


def test_verify_notices_entries_deleted_from_the_end(engage: Engage, db: Engine) -> None:
    chain = _append(db, 6)
    with tampering(db) as connection:
        connection.execute(text("DELETE FROM audit_log WHERE id >= :id"), {"id": chain[-2][0]})
    out = _verify(engage, 1)
    assert f"deleted: 2 entries after entry {chain[-3][0]} are missing" in out, out


def test_verify_notices_an_entry_appended_behind_the_heads_back(engage: Engage, db: Engine) -> None:
    chain = _append(db, 3)
    with tampering(db) as connection:
        _forge(
            connection,
            entry_id=chain[-1][0] + 1,
            prev_hash=chain[-1][1],
            at=T0 + timedelta(hours=1),
        )
    out = _verify(engage, 1)
    assert f"BROKEN at entry {chain[-1][0] + 1} (" in out and "inserted: appended" in out, out


def test_the_database_refuses_to_change_the_log(db: Engine) -> None:
    chain = _append(db, 2)
    refusals = [
        ("UPDATE audit_log SET actor = 'user:mallory' WHERE id = :id", "append-only"),
        ("DELETE FROM audit_log WHERE id = :id", "append-only"),
        ("DELETE FROM audit_head", "cannot be deleted"),
        ("UPDATE audit_head SET entries = 0, last_hash = NULL", "fewer entries"),
    ]
    for statement, message in refusals:
        with pytest.raises(DBAPIError, match=message), db.begin() as connection:
            connection.execute(text(statement), {"id": chain[0][0]})
    if db.dialect.name == "postgresql":
        for table in ("audit_log", "audit_head"):
            with pytest.raises(DBAPIError), db.begin() as connection:
                connection.exec_driver_sql(f"TRUNCATE {table}")
    with db.connect() as connection:
        assert [tuple(r) for r in connection.execute(text(_ORDERED))] == chain
    _append(db, 1)  # appending still moves the head forward
    with _session(db) as session:
        assert audit.verify(session=session).ok


def _entries(db: Engine, since: int = 0) -> list[tuple[str, str, str | None, dict[str, Any]]]:
    with _session(db) as session:
        rows = session.scalars(
            select(m.AuditEntry).where(m.AuditEntry.id > since).order_by(m.AuditEntry.id)
        )
        return [(r.actor, r.action, r.subject, r.details) for r in rows]


def test_operations_leave_audit_entries_without_phi(
    engage: Engage, db: Engine, settings: Settings
) -> None:
    [(actor, action, subject, details)] = _entries(db)
    assert (actor.startswith("cli:"), action) == (True, "definitions_loaded")
    assert subject == f"definitions:{details['version']}" and details["added"]
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    engage("approve", "statin-refill", "--by", "carol")
    engage("consent", "revoke", "--patient", "S001", "--purpose", "adherence",
           "--method", "phone", "--by", "dan")  # fmt: skip
    engage("campaign", "pause", "statin-refill", "--by", "erin")
    engage("campaign", "resume", "statin-refill", "--by", "erin")
    engage("plan", "--at", AT, "--horizon", "1d")
    engage("dispatch", "--once", "--at", AT, "--id", "w1")
    entries = _entries(db)
    actions = [(a, act) for a, act, _, _ in entries]
    assert actions[1][1] == "consents_imported" and actions[1][0].startswith("cli:")
    assert ("cli:carol", "template_approved") in actions
    assert ("cli:dan", "consent_recorded") in actions
    assert ("cli:erin", "campaign_paused") in actions and (
        "cli:erin",
        "campaign_resumed",
    ) in actions
    by_action = {act: (a, s, d) for a, act, s, d in entries}
    assert by_action["consents_imported"][2]["files"]["consents.csv"]["imported"] > 0
    assert by_action["consent_recorded"][1] == "patient:S001"
    plan = by_action["plan_tick"][2]
    assert plan["inserted"] > 0 and plan["campaigns"]
    assert sum(sum(c["by_status"].values()) for c in plan["campaigns"].values()) == plan["inserted"]
    actor, _, dispatched = by_action["dispatch_batch"]
    assert actor == "worker:w1" and dispatched["claimed"] + dispatched["blocked"] > 0
    assert [a for a in actions if a[1] == "dispatch_batch"] == [("worker:w1", "dispatch_batch")]

    last = _last_id(db)
    _inbound(settings, "SM01", "STOP")
    _inbound(settings, "SM02", "START")
    _inbound(settings, "SM03", "STOP", number="+12125559999")
    keyword = _entries(db, since=last)
    assert [(a, act, s) for a, act, s, _ in keyword] == [
        ("twilio", "consent_opt_out", "patient:S001"),
        ("twilio", "consent_opt_in", "patient:S001"),
        ("twilio", "consent_opt_out", "unknown-number"),
    ]
    assert keyword[0][3]["events"] > 0 and keyword[1][3]["events"] > 0

    everything = json.dumps(_entries(db))
    for phi in ("Lovelace", "Ada", "555-0101", "2125550101", "1961-05-04"):
        assert phi not in everything
    assert "chain OK" in _verify(engage, 0)


def _last_id(db: Engine) -> int:
    with db.connect() as connection:
        return int(connection.execute(text("SELECT max(id) FROM audit_log")).scalar_one())


def _inbound(settings: Settings, sid: str, body: str, number: str = "+12125550101") -> None:
    rt = Runtime(settings)
    with rt.write_sessions.begin() as session:
        handle_inbound(
            session=session,
            keyring=rt.keyring,
            defs=rt.definitions(session),
            message=InboundSms(
                message_sid=sid, from_number=number, to_number="+15550000000", body=body
            ),
            now=datetime(2026, 12, 8, 15, 0, tzinfo=UTC),
        )
    rt.engine.dispose()
