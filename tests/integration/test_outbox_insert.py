"""The planner's bulk outbox insert stores what the ORM stores, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from engine.crypto import Keyring
from engine.store import models as m
from engine.store import outbox_insert, queries

from .test_store import add_patients, make_record

NOW = datetime(2026, 3, 10, 16, 0, tzinfo=UTC)
SKIPPED = {"id", "idempotency_key", "created_at", "updated_at"}


def planned(pid: int, n: int, reasons: list[Any]) -> dict[str, Any]:
    """A planned row as the planner gives it: no anchor, attempts, times of creation."""
    # Times repeat across rows, as in a tick; microseconds survive.
    due = NOW + timedelta(minutes=n % 3, microseconds=n % 2 * 123_457)
    return {
        "campaign_id": "statin-refill", "campaign_version": "v1", "template_id": "statin-refill",
        "template_version": "t1", "locale": "en", "purpose": "adherence", "patient_id": pid,
        "occurrence": f"o{n}", "outcome": "allow" if n % 2 else "deny",
        "status": "queued" if n % 2 else "blocked", "due_at": due,
        "send_at": due.astimezone(timezone(timedelta(hours=-5))) if n % 2 else None,
        "expires_at": due + timedelta(hours=10), "body_enc": bytes([n % 256]) * 40,
        "segments": 1, "encoding": "GSM-7", "reasons": reasons, "policy_set": "p1",
        "decided_at": NOW,
    }  # fmt: skip


def stored(session: Session, prefix: str) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(m.Outbox).where(m.Outbox.idempotency_key.startswith(prefix)).order_by(m.Outbox.id)
    )
    return [
        {c.name: getattr(r, c.key) for c in m.Outbox.__table__.columns if c.name not in SKIPPED}
        for r in rows
    ]


def test_bulk_rows_read_back_as_rows_the_orm_inserted(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    with session_factory() as session:
        add_patients(session, keyring, make_record("P1"))
        pid = queries.patient_ids_for(session=session, external_ids=["P1"])["P1"]
        # What a text COPY would have to escape: backslashes, tabs and newlines.
        message = 'no "consent"\\ for\tadherence\n— yet é'
        shared = [{"rule": "consent", "effect": "deny", "message": message, "cite": None}]
        rows = [planned(pid, n, shared if n % 2 == 0 else []) for n in range(7)]
        bulk = [{**r, "idempotency_key": f"bulk-{n}"} for n, r in enumerate(rows)]
        orm = [
            {**r, "idempotency_key": f"orm-{n}", "anchor": "", "attempts": 0}
            for n, r in enumerate(rows)
        ]
        ids = outbox_insert.insert_outbox_rows(session=session, rows=list(reversed(bulk)))
        session.execute(insert(m.Outbox), orm)
        session.commit()
        assert sorted(ids) == [f"bulk-{n}" for n in range(7)]
        assert stored(session, "bulk-") == stored(session, "orm-")
        times = session.execute(
            select(m.Outbox.created_at, m.Outbox.updated_at).where(m.Outbox.id.in_(ids.values()))
        ).all()
        assert {created for created, _ in times} == {updated for _, updated in times}
        assert all(abs(created - datetime.now(UTC)) < timedelta(minutes=1) for created, _ in times)
        again = outbox_insert.insert_outbox_rows(session=session, rows=bulk[:3])
        session.commit()
        assert again == {} and len(stored(session, "bulk-")) == 7


def test_a_batch_larger_than_one_statement_stores_every_row_once(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    """2,517 rows: on SQLite three full statements and the rest by powers of two, on
    PostgreSQL one COPY; either way every row once, with its id, and a second insert of
    some of them (plus new ones) adds only the new."""
    with session_factory() as session:
        add_patients(session, keyring, make_record("P1"))
        pid = queries.patient_ids_for(session=session, external_ids=["P1"])["P1"]
        rows = [{**planned(pid, n, []), "idempotency_key": f"big-{n:05d}"} for n in range(2517)]
        ids = outbox_insert.insert_outbox_rows(session=session, rows=rows)
        session.commit()
        assert sorted(ids) == sorted(r["idempotency_key"] for r in rows)
        assert len(set(ids.values())) == 2517
        more = [
            {**planned(pid, n, []), "idempotency_key": f"big-{n:05d}"} for n in range(2000, 3100)
        ]
        added = outbox_insert.insert_outbox_rows(session=session, rows=more)
        session.commit()
        assert sorted(added) == [f"big-{n:05d}" for n in range(2517, 3100)]
        assert len(stored(session, "big-")) == 3100


def test_sqlite_statements_come_in_a_dozen_sizes_whatever_the_batch() -> None:
    sizes: set[int] = set()
    for count in range(0, 5000):
        parts = outbox_insert.sqlite_parts(count)
        assert sum(parts) == count
        assert parts == sorted(parts, reverse=True)
        sizes.update(parts)
    assert max(sizes) == outbox_insert.SQLITE_ROWS
    assert len(sizes) <= 1 + outbox_insert.SQLITE_ROWS.bit_length()


def test_existing_keys_finds_exactly_the_stored_pairs(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    """(patient, key) pairs: more than one VALUES list holds on SQLite, and a remainder
    that is padded; one pair of arrays on PostgreSQL. Duplicates, keys never stored and a
    stored key asked for under another patient are not found."""
    with session_factory() as session:
        add_patients(session, keyring, make_record("P1"), make_record("P2", phone="+12125550143"))
        ids = queries.patient_ids_for(session=session, external_ids=["P1", "P2"])
        p1, p2 = ids["P1"], ids["P2"]
        rows = [{**planned(p1, n, []), "idempotency_key": f"k-{n:05d}"} for n in range(0, 1400, 2)]
        rows.append({**planned(p2, 1, []), "idempotency_key": "k-p2"})
        outbox_insert.insert_outbox_rows(session=session, rows=rows)
        session.commit()
        asked = [(p1, f"k-{n:05d}") for n in range(1400)] + [(p1, "k-00002"), (p1, "k-00003")]
        asked += [(p2, "k-p2"), (p2, "k-00004"), (p1, "k-p2")]
        found = outbox_insert.existing_keys(session=session, keys=asked)
        assert found == {f"k-{n:05d}" for n in range(0, 1400, 2)} | {"k-p2"}
        assert outbox_insert.existing_keys(session=session, keys=[]) == set()
        assert outbox_insert.existing_keys(session=session, keys=[(p1, "k-00001")]) == set()
        assert outbox_insert.existing_keys(session=session, keys=[(p2, "k-00000")]) == set()
        assert outbox_insert.existing_keys(session=session, keys=[(p1, "k-p2")]) == set()


def test_sqlite_key_lookups_come_in_three_sizes() -> None:
    for count in (1, 31, 32, 33, 129, 512, 513, 1100):
        pairs = [(n, f"k{n}") for n in range(count)]
        chunks = list(outbox_insert._padded_chunks(pairs))
        assert {len(c) for c in chunks} <= set(outbox_insert.EXISTING_KEYS_SIZES)
        assert sorted({pair for c in chunks for pair in c}) == pairs


def test_one_key_is_stored_once_per_patient(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    """The unique index is (patient_id, idempotency_key): a second row with the same key for
    the same patient is skipped by the bulk insert and refused to a plain insert. (A key
    hashes its patient's external id, so the same key for another patient cannot occur.)"""
    with session_factory() as session:
        add_patients(session, keyring, make_record("P1"))
        pid = queries.patient_ids_for(session=session, external_ids=["P1"])["P1"]
        first = {**planned(pid, 1, []), "idempotency_key": "once"}
        assert list(outbox_insert.insert_outbox_rows(session=session, rows=[first])) == ["once"]
        again = {**planned(pid, 3, []), "idempotency_key": "once"}
        assert outbox_insert.insert_outbox_rows(session=session, rows=[again]) == {}
        session.commit()
        with pytest.raises(IntegrityError):
            session.execute(insert(m.Outbox), [{**again, "anchor": "", "attempts": 0}])
        session.rollback()
        assert [r["occurrence"] for r in stored(session, "once")] == ["o1"]


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
def test_postgresql_copies_straight_into_the_outbox_unless_a_key_is_taken(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    """New keys: one COPY into the outbox, no staging table. A batch with a key already
    stored (another planner's): the savepoint is rolled back, nothing of the COPY stays,
    and the staging path inserts the others, with ids the outbox hands out."""
    with session_factory() as session:
        add_patients(session, keyring, make_record("P1"))
        pid = queries.patient_ids_for(session=session, external_ids=["P1"])["P1"]
        staged = text("SELECT to_regclass('pg_temp.outbox_stage') IS NOT NULL")
        first = [{**planned(pid, n, []), "idempotency_key": f"c-{n:03d}"} for n in range(5)]
        ids = outbox_insert.insert_outbox_rows(session=session, rows=first)
        assert sorted(ids) == [f"c-{n:03d}" for n in range(5)]
        assert session.scalar(staged) is False
        session.commit()
        second = [{**planned(pid, n, []), "idempotency_key": f"c-{n:03d}"} for n in range(3, 8)]
        added = outbox_insert.insert_outbox_rows(session=session, rows=second)
        assert sorted(added) == ["c-005", "c-006", "c-007"]
        assert session.scalar(staged) is True
        session.commit()
        rows = session.execute(
            select(m.Outbox.idempotency_key, m.Outbox.id).where(
                m.Outbox.idempotency_key.startswith("c-")
            )
        ).all()
        assert dict(rows) == ids | added


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
def test_postgresql_key_lookups_are_planned_each_time_never_prepared(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    """psycopg prepares a statement after a few runs on a connection, and PostgreSQL then
    keeps one generic plan: for the key lookup, one made while the outbox was empty scans
    the whole outbox. Many lookups on one connection across commits (as a tick's): the
    lookup is never among the session's prepared statements, and still finds its key."""
    with session_factory() as session:
        add_patients(session, keyring, make_record("P1"))
        pid = queries.patient_ids_for(session=session, external_ids=["P1"])["P1"]
        session.commit()
        for n in range(12):
            row = {**planned(pid, n, []), "idempotency_key": f"p-{n:03d}"}
            outbox_insert.insert_outbox_rows(session=session, rows=[row])
            found = outbox_insert.existing_keys(session=session, keys=[(pid, f"p-{n:03d}")])
            assert found == {f"p-{n:03d}"}
            session.commit()
        prepared = session.scalars(text("SELECT statement FROM pg_prepared_statements")).all()
    assert prepared, "psycopg prepared nothing: the test no longer exercises the lookup"
    assert not [s for s in prepared if "unnest" in s]
