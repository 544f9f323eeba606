"""Migrations, the patient store, the consent ledger and suppressions, on both databases."""

from __future__ import annotations

import random
import re
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, event, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from engine.core.consent import current_consents
from engine.core.domain import Appointment, ConsentEvent, Patient, Prescription
from engine.crypto import Keyring
from engine.store import consent_queries, db, queries
from engine.store import models as m
from engine.store.db import current_revision, head_revision, make_engine, upgrade
from engine.store.queries import PatientRecord, SlotRecord

PURPOSES = ("adherence", "appointment", "marketing")
T0 = datetime(2024, 1, 1, 9, 0, tzinfo=UTC)


def make_record(external_id: str = "P1", phone: str = "+12125550142", **overrides) -> PatientRecord:
    fields = {
        "external_id": external_id,
        "given_name": "Zebulon",
        "family_name": "Quackenbush",
        "timezone": "America/New_York",
        "birth_date": date(1980, 4, 2),
        "region": "NY",
        "attributes": {"plan": "gold"},
    }
    return PatientRecord(patient=Patient(**(fields | overrides)), phone=phone)


def add_patients(session: Session, keyring: Keyring, *records: PatientRecord) -> None:
    queries.upsert_patients(session=session, keyring=keyring, records=list(records))
    session.commit()


def grant(patient: str, purpose: str, at: datetime, status: str = "granted") -> ConsentEvent:
    return ConsentEvent(
        patient=patient,
        purpose=purpose,
        status=status,  # type: ignore[arg-type]
        occurred_at=at,
        legal_basis="express" if status == "granted" else None,
        method="web_form",
        evidence="signed form #123" if status == "granted" else None,
        recorded_by="test",
    )


def destroy_key(session: Session, external_id: str) -> int:
    """Destroy the patient's data key, as erasure does; their row id."""
    pid = queries.patient_ids_for(session=session, external_ids=[external_id])[external_id]
    session.execute(
        update(m.PatientKey)
        .where(m.PatientKey.patient_id == pid)
        .values(wrapped_key=None, destroyed_at=T0)
    )
    return pid


def schema_differences(engine: Engine) -> list[Any]:
    """What autogenerate finds between the migrated database and the models (types too)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, m.Base.metadata))


def test_migrations_create_the_model_schema(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        upgrade(db_url)  # a second run is a no-op, from a URL too
        assert current_revision(db_url) == head_revision() == "0011"
        assert schema_differences(engine) == []
        tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set(m.Base.metadata.tables)
    finally:
        engine.dispose()


def test_migration_0011_keeps_only_sent_rows_in_two_outbox_indexes(
    db_url: str, keyring: Keyring
) -> None:
    """From 0010, with a planned row and a sent one: the provider-sid and sent-at indexes
    become partial (the schema is the models'), both rows stay and are found by sid and by
    sent time through them; downgrading makes them whole again."""
    engine = make_engine(db_url)
    sessions = db.make_session_factory(engine)

    def conditions() -> dict[str, str]:
        indexes = {i["name"]: i for i in inspect(engine).get_indexes("outbox")}
        key = f"{engine.dialect.name}_where"
        names = ("ix_outbox_provider_sid", "ix_outbox_patient_id_sent_at")
        where = {n: indexes[n].get("dialect_options", {}).get(key) for n in names}
        return {n: "" if w is None else str(w) for n, w in where.items()}

    try:
        upgrade(engine, "0010")
        with sessions() as session:
            add_patients(session, keyring, make_record("P1"))
            pid = queries.patient_ids_for(session=session, external_ids=["P1"])["P1"]
            row = dict(campaign_id="c", campaign_version="1", purpose="adherence",
                       outcome="allow", due_at=T0, expires_at=T0, reasons=[], patient_id=pid,
                       occurrence="")  # fmt: skip
            session.add(m.Outbox(**row, idempotency_key="planned", status="queued"))
            session.add(m.Outbox(**row, idempotency_key="sent", status="sent", sent_at=T0,
                                 provider_sid="SM1"))  # fmt: skip
            session.commit()
        assert all(c == "" for c in conditions().values())
        upgrade(engine)
        assert schema_differences(engine) == []
        after = conditions()
        assert "provider_sid IS NOT NULL" in after["ix_outbox_provider_sid"]
        assert "sent_at IS NOT NULL" in after["ix_outbox_patient_id_sent_at"]
        o = m.Outbox
        with sessions() as session:
            assert session.scalars(select(o.idempotency_key).order_by(o.id)).all() == [
                "planned",
                "sent",
            ]
            assert (
                session.scalar(select(o.idempotency_key).where(o.provider_sid == "SM1")) == "sent"
            )
            by_time = select(o.idempotency_key).where(o.patient_id == pid, o.sent_at >= T0)
            assert session.scalars(by_time).all() == ["sent"]
        db.downgrade(engine, "0010")
        assert current_revision(engine) == "0010"
        assert all(c == "" for c in conditions().values())
    finally:
        engine.dispose()


def test_migration_0010_keeps_the_outbox_and_scopes_its_key_by_patient(
    db_url: str, keyring: Keyring
) -> None:
    """From 0009, with rows and a scheduling link pointing at one (SQLite rebuilds the
    table under it): every row and the link survive, the claim's partial index keeps its
    condition, the schema is the models', and one key may now be stored once per patient.
    Downgrading restores the key's own uniqueness, from the `alembic` command line too."""
    engine = make_engine(db_url)
    sessions = db.make_session_factory(engine)
    try:
        upgrade(engine, "0009")
        with sessions() as session:
            add_patients(session, keyring, make_record("P1"))
            pid = queries.patient_ids_for(session=session, external_ids=["P1"])["P1"]
            row = dict(
                campaign_id="c",
                campaign_version="1",
                purpose="adherence",
                outcome="allow",
                status="queued",
                due_at=T0,
                expires_at=T0,
                reasons=[],
            )
            for n in range(3):
                session.add(m.Outbox(**row, idempotency_key=f"k{n}", patient_id=pid, occurrence=""))
            session.flush()
            first = session.scalars(select(m.Outbox.id).order_by(m.Outbox.id)).first()
            link = dict(token_hash="t", kind="booking", expires_at=T0)
            session.add(m.SchedulingLink(**link, patient_id=pid, outbox_id=first))
            session.commit()
            before = session.execute(select(m.Outbox.id, m.Outbox.idempotency_key)).all()
        upgrade(engine)
        assert schema_differences(engine) == []
        due = {i["name"]: i for i in inspect(engine).get_indexes("outbox")}["ix_outbox_due"]
        where = due["dialect_options"][f"{engine.dialect.name}_where"]
        assert "deferred" in str(where) and "queued" in str(where)
        with sessions() as session:
            assert sorted(session.execute(select(m.Outbox.id, m.Outbox.idempotency_key))) == sorted(
                before
            )
            assert session.scalar(select(m.SchedulingLink.outbox_id)) == first
        with pytest.raises(DBAPIError), sessions.begin() as session:
            session.execute(
                text("UPDATE outbox SET idempotency_key = 'k0' WHERE idempotency_key = 'k1'")
            )
        # Down and up again as the `alembic` command line does (its own engine), then down
        # through db.downgrade.
        config = db.alembic_config()
        config.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
        command.downgrade(config, "0009")
        assert current_revision(engine) == "0009"
        command.upgrade(config, "head")
        db.downgrade(engine, "0009")
        assert current_revision(engine) == "0009"
        names = {u["name"] for u in inspect(engine).get_unique_constraints("outbox")}
        assert "uq_outbox_idempotency_key" in names
        assert "uq_outbox_patient_id_idempotency_key" not in names
        with sessions() as session:
            assert session.scalar(select(m.SchedulingLink.outbox_id)) == first
    finally:
        engine.dispose()


def test_sqlite_connections_get_the_write_path_settings(tmp_path) -> None:
    """WAL, foreign keys, the busy wait, a 64 MiB cache, and checkpoints every 10,000
    pages rather than SQLite's 1,000 (engine.store.db): on every connection of the pool."""
    engine = make_engine(f"sqlite:///{tmp_path / 'settings.db'}")
    try:
        with engine.connect() as first, engine.connect() as second:
            for connection in (first, second):
                read = connection.exec_driver_sql
                assert read("PRAGMA journal_mode").scalar() == "wal"
                assert read("PRAGMA foreign_keys").scalar() == 1
                assert read("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
                assert read("PRAGMA cache_size").scalar() == -db.SQLITE_CACHE_KIB
                assert read("PRAGMA wal_autocheckpoint").scalar() == 10_000
    finally:
        engine.dispose()


def test_aware_datetimes_round_trip_as_utc(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    new_york = timezone(timedelta(hours=-5))
    with session_factory() as session:
        add_patients(session, keyring, make_record())
        queries.upsert_appointment(
            session=session,
            patient_external_id="P1",
            appointment=Appointment("A1", datetime(2025, 3, 10, 14, 30, tzinfo=new_york), "visit"),
        )
        session.commit()
    with session_factory() as session:
        starts_at = session.scalar(select(m.Appointment.starts_at))
        later = session.scalar(
            select(m.Appointment.appointment_id).where(
                m.Appointment.starts_at > datetime(2025, 3, 10, 19, 29, tzinfo=UTC)
            )
        )
    assert starts_at == datetime(2025, 3, 10, 19, 30, tzinfo=UTC) and starts_at.tzinfo is UTC
    assert later == "A1"


def test_datetimes_read_back_as_the_same_instant_in_utc(
    session_factory: sessionmaker[Session],
) -> None:
    """Whole seconds, microseconds, before 1970, far ahead, any offset, and a value the
    database wrote itself as text without fraction (SQL, not the model): each reads back
    as the instant written, aware in UTC."""
    written = [
        datetime(2025, 3, 10, 14, 30, tzinfo=UTC),
        datetime(2025, 3, 10, 14, 30, 0, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(9998, 1, 1, tzinfo=timezone(timedelta(hours=14))),
        datetime(2024, 2, 29, 0, 0, 7, 250_000, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
    ]
    with session_factory() as session:
        for i, at in enumerate(written):
            session.add(m.Slot(slot_id=f"S{i}", kind="visit", starts_at=at, booked_at=None))
        session.execute(
            text(
                "INSERT INTO slots (slot_id, kind, provider, location, starts_at, duration_min,"
                " created_at) VALUES ('SQL', 'visit', '', '', '2025-01-02 03:04:05', 30,"
                " '2025-01-02 03:04:05')"
            )
        )
        session.commit()
        read = dict(session.execute(select(m.Slot.slot_id, m.Slot.starts_at)).all())
        none = session.scalars(select(m.Slot.booked_at)).all()
    assert read.pop("SQL") == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert [read[f"S{i}"] for i in range(len(written))] == written
    assert all(at.tzinfo is UTC for at in read.values()) and set(none) == {None}


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
def test_postgresql_sessions_are_in_utc_whatever_the_servers_zone(db_url: str) -> None:
    """The database's own zone is New York: every session of make_engine is in UTC (times
    come back as datetime.UTC, taken as they are), keeping any options the URL gives."""
    setup = make_engine(db_url)
    with setup.connect() as connection:
        name = connection.exec_driver_sql("SELECT current_database()").scalar()
        connection.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET TimeZone = 'America/New_York'")
        connection.commit()
    setup.dispose()
    written = datetime(2025, 3, 10, 14, 30, 0, 250_000, tzinfo=timezone(timedelta(hours=-9)))
    for url in (db_url, f"{db_url}?options=-c%20statement_timeout%3D4000"):
        engine = make_engine(url)
        try:
            upgrade(engine)
            with db.make_session_factory(engine)() as session:
                assert session.execute(text("SHOW TimeZone")).scalar() == "UTC"
                session.add(m.Slot(slot_id="S1", kind="visit", starts_at=written))
                session.flush()
                read = session.scalar(select(m.Slot.starts_at))
                timeout = session.execute(text("SHOW statement_timeout")).scalar()
        finally:
            engine.dispose()
        assert read == written and read.tzinfo is UTC
        assert timeout == ("4s" if "options" in url else "0")


def test_naive_datetimes_are_refused(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        session.add(m.Slot(slot_id="S1", kind="visit", starts_at=datetime(2025, 1, 1, 9, 0)))
        with pytest.raises(StatementError, match="naive datetime"):
            session.flush()


def test_upsert_patient_is_idempotent_and_updates_in_place(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    with session_factory() as session:
        assert (
            queries.upsert_patient(session=session, keyring=keyring, record=make_record())
            == "imported"
        )
        assert (
            queries.upsert_patient(session=session, keyring=keyring, record=make_record())
            == "unchanged"
        )
        moved = make_record(phone="+13055550100", timezone="America/New_York", locale="es")
        assert queries.upsert_patient(session=session, keyring=keyring, record=moved) == "updated"
        session.commit()
    with session_factory() as session:
        record = queries.load_patient_record(session=session, keyring=keyring, external_id="P1")
        keys = session.scalars(select(m.PatientKey)).all()
        assert queries.load_patient(session=session, keyring=keyring, external_id="nobody") is None
    assert record == moved
    assert len(keys) == 1 and keys[0].master_key_id == keyring.master_key_id


def test_attributes_merge_and_a_none_value_removes_one(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    with session_factory() as session:
        add_patients(session, keyring, make_record(attributes={"plan": "gold", "clinic": "north"}))
        add_patients(session, keyring, make_record(attributes={"plan": None, "tier": "2"}))
        patient = queries.load_patient(session=session, keyring=keyring, external_id="P1")
    assert patient is not None and patient.attributes == {"clinic": "north", "tier": "2"}


def test_iter_patients_streams_batches_with_their_records(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    with session_factory() as session:
        records = [make_record(f"P{i}", phone=f"+1212555{i:04d}") for i in range(7)]
        add_patients(session, keyring, *records)
        for i in range(7):
            rx = Prescription(f"RX{i}", f"Drug {i}", "statin", date(2025, 3, i + 1))
            queries.upsert_prescription(
                session=session, keyring=keyring, patient_external_id=f"P{i}", prescription=rx
            )
        queries.upsert_appointment(
            session=session,
            patient_external_id="P3",
            appointment=Appointment("A3", T0, "visit", provider="Dr. Osei"),
        )
        session.commit()
        streamed = list(queries.iter_patients(session=session, keyring=keyring, batch_size=3))
    assert [d.patient.external_id for d in streamed] == [f"P{i}" for i in range(7)]
    assert all(d.patient.given_name == "Zebulon" for d in streamed)
    assert [d.prescriptions[0].medication for d in streamed] == [f"Drug {i}" for i in range(7)]
    assert streamed[3].appointments == (Appointment("A3", T0, "visit", provider="Dr. Osei"),)
    assert all(not d.appointments for d in streamed if d.patient.external_id != "P3")


@pytest.mark.parametrize("low", [None, 1, 3, 4])
@pytest.mark.parametrize("high", [None, 4, 9, 99])
def test_iter_patients_streams_an_id_range_with_one_lower_bound_per_page(
    session_factory: sessionmaker[Session], keyring: Keyring, low: int | None, high: int | None
) -> None:
    """A range process streams [low, high). Each page's statement has a single lower bound
    on the id (the keyset's), since SQLite given two starts its scan at the lower one."""
    with session_factory() as session:
        add_patients(session, keyring, *(make_record(f"P{i}") for i in range(9)))
        session.commit()
        row_ids = dict(session.execute(select(m.Patient.external_id, m.Patient.id)).tuples().all())
    wanted = [
        name
        for name, row_id in sorted(row_ids.items(), key=lambda item: item[1])
        if (low is None or row_id >= low) and (high is None or row_id < high)
    ]
    statements: list[str] = []
    engine = session_factory.kw["bind"]

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM patients" in statement and "LIMIT" in statement:
            statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        with session_factory() as session:
            stream = queries.iter_patients(
                session=session, keyring=keyring, batch_size=2, ids=(low, high)
            )
            streamed = [d.patient.external_id for d in stream]
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert streamed == wanted
    assert statements
    for statement in statements:
        assert statement.count("patients.id >") <= 1, statement
        assert "BETWEEN" not in statement, statement


def test_iter_patients_can_release_its_snapshot_between_batches(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    """A planner tick reads the population batch after batch without holding one read
    transaction throughout (SQLite's WAL could not be checkpointed under it); a patient
    added meanwhile is still streamed, once."""
    with session_factory() as session:
        add_patients(session, keyring, *(make_record(f"P{i}") for i in range(5)))
        session.commit()
    rollbacks: list[object] = []
    event.listen(session_factory.kw["bind"], "rollback", rollbacks.append)
    with session_factory() as session:
        stream = queries.iter_patients(session=session, keyring=keyring, batch_size=2, release=True)
        first = next(stream)
        # Ended by a commit: a rollback would drop psycopg's prepared statements.
        assert not session.in_transaction() and rollbacks == []
        with session_factory() as writer:
            add_patients(writer, keyring, make_record("P9"))
            writer.commit()
        rest = list(stream)
    names = [d.patient.external_id for d in (first, *rest)]
    assert names == ["P0", "P1", "P2", "P3", "P4", "P9"]


def test_iter_patients_leaves_out_a_patient_whose_key_was_destroyed_inside_a_dense_range(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    """A batch's records are read by an id range (BETWEEN, for a dense run of more than 50
    ids): a patient in that range whose key is gone, and their records, are left out."""
    with session_factory() as session:
        add_patients(session, keyring, *(make_record(f"P{i:02d}") for i in range(60)))
        for i in range(60):
            rx = Prescription(f"RX{i}", f"Drug {i}", "statin", date(2025, 3, 1))
            queries.upsert_prescription(
                session=session, keyring=keyring, patient_external_id=f"P{i:02d}", prescription=rx
            )
        destroy_key(session, "P30")
        session.commit()
        streamed = list(queries.iter_patients(session=session, keyring=keyring, batch_size=100))
    expected = [f"P{i:02d}" for i in range(60) if i != 30]
    assert [d.patient.external_id for d in streamed] == expected
    assert [d.prescriptions[0].medication for d in streamed] == [
        f"Drug {i}" for i in range(60) if i != 30
    ]


def test_iter_patients_opens_only_the_sealed_fields_asked_for(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    with session_factory() as session:
        add_patients(session, keyring, make_record("P1"))
        rx = Prescription("RX1", "Drug 1", "statin", date(2025, 3, 1))
        queries.upsert_prescription(
            session=session, keyring=keyring, patient_external_id="P1", prescription=rx
        )
        session.commit()
        every = list(queries.iter_patients(session=session, keyring=keyring))
        some = list(queries.iter_patients(session=session, keyring=keyring, sealed={"birth_date"}))
    full, partial = every[0].patient, some[0].patient
    assert (full.given_name, every[0].prescriptions[0].medication) == ("Zebulon", "Drug 1")
    assert (partial.given_name, partial.family_name, some[0].prescriptions[0].medication) == (
        "",
        "",
        "",
    )
    assert partial.birth_date == full.birth_date and partial.zones == full.zones
    assert some[0].prescriptions[0].refill_due == rx.refill_due


def test_patients_by_phone_uses_the_blind_index(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    with session_factory() as session:
        add_patients(
            session,
            keyring,
            make_record("P1"),
            make_record("P2", given_name="Ignatius"),  # same family phone
            make_record("P3", phone="+13055550100"),
        )
        family = queries.patients_by_phone(session=session, keyring=keyring, e164="+12125550142")
        nobody = queries.patients_by_phone(session=session, keyring=keyring, e164="+12125550143")
        stored = set(session.scalars(select(m.Patient.phone_index)))
    assert [(p.external_id, p.given_name) for p in family] == [
        ("P1", "Zebulon"),
        ("P2", "Ignatius"),
    ]
    assert nobody == []
    assert stored == {keyring.phone_index("+12125550142"), keyring.phone_index("+13055550100")}


def test_consent_is_derived_from_an_append_only_ledger(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    with session_factory() as session:
        add_patients(session, keyring, make_record("P1"))
        for event in (
            grant("P1", "marketing", T0),
            grant("P1", "marketing", T0 + timedelta(days=1), status="revoked"),
            grant("P1", "marketing", T0 + timedelta(days=2)),
            grant("P1", "adherence", T0),
            grant("P1", "adherence", T0 + timedelta(days=3), status="revoked"),
        ):
            consent_queries.record_consent_event(
                session=session, keyring=keyring, event=event, source="test"
            )
        session.commit()
        ledger = consent_queries.consent_events_for(
            session=session, keyring=keyring, patient_id="P1"
        )
        states = consent_queries.current_consents_for(
            session=session, keyring=keyring, patient_external_id="P1", purposes=PURPOSES
        )
    assert [(e.purpose, e.status) for e in ledger] == [
        ("marketing", "granted"), ("marketing", "revoked"), ("marketing", "granted"),
        ("adherence", "granted"), ("adherence", "revoked"),
    ]  # fmt: skip
    assert ledger[0] == grant("P1", "marketing", T0)  # evidence decrypted, time aware UTC
    assert states["marketing"].active and states["marketing"].granted_at == T0 + timedelta(days=2)
    assert not states["adherence"].active
    assert states["adherence"].revoked_at == T0 + timedelta(days=3)
    assert not states["appointment"].active


@pytest.mark.parametrize(
    "statement", ["UPDATE consent_events SET status = 'granted'", "DELETE FROM consent_events"]
)
def test_the_database_refuses_to_rewrite_the_consent_ledger(
    engine: Engine, session_factory: sessionmaker[Session], keyring: Keyring, statement: str
) -> None:
    with session_factory() as session:
        add_patients(session, keyring, make_record("P1"))
        event = grant("P1", "marketing", T0, status="revoked")
        consent_queries.record_consent_event(session=session, keyring=keyring, event=event)
        session.commit()
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
        connection.execute(text(statement))
    with session_factory() as session:
        assert session.scalars(select(m.ConsentEvent.status)).all() == ["revoked"]


def test_consent_states_for_many_patients_at_once(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    with session_factory() as session:
        add_patients(
            session, keyring, *(make_record(f"P{i}", phone=f"+1212555{i:04d}") for i in range(3))
        )
        for event in (grant("P0", "adherence", T0), grant("P2", "marketing", T0)):
            consent_queries.record_consent_event(session=session, keyring=keyring, event=event)
        session.commit()
        ids = queries.patient_ids_for(session=session, external_ids=["P0", "P1", "P2"])
        states = consent_queries.consent_states_for_many(
            session=session, patient_ids=list(ids.values()), purposes=PURPOSES
        )
    active = {
        external_id: sorted(p for p, s in states[pid].items() if s.active)
        for external_id, pid in ids.items()
    }
    assert active == {"P0": ["adherence"], "P1": [], "P2": ["marketing"]}


def test_the_batch_consent_fold_equals_folding_each_ledger(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    """Random ledgers (same-second events, revocations before any grant, other channels,
    events recorded out of time order): the planner's batch fold, ordered by the database,
    gives what engine.core.consent gives for each patient's events."""
    rng = random.Random(7)
    bases, methods = ["express", "written", None], ["intake_form", "sms_keyword", None]
    ledgers: dict[str, list[ConsentEvent]] = {}
    for i in range(60):
        events = []
        for _ in range(rng.randint(0, 8)):
            status = rng.choice(["granted", "granted", "revoked"])
            events.append(
                ConsentEvent(
                    patient=f"P{i}",
                    purpose=rng.choice(PURPOSES),
                    status=status,  # type: ignore[arg-type]
                    occurred_at=T0 + timedelta(seconds=rng.choice([0, 0, 1, 3600, 86_400])),
                    channel=rng.choice(["sms", "sms", "sms", "email"]),
                    legal_basis=rng.choice(bases) if status == "granted" else None,
                    method=rng.choice(methods),
                )
            )
        ledgers[f"P{i}"] = events
    with session_factory() as session:
        records = (make_record(p, phone=f"+1212555{i:04d}") for i, p in enumerate(ledgers))
        add_patients(session, keyring, *records)
        for events in ledgers.values():
            for event in events:
                consent_queries.record_consent_event(session=session, keyring=keyring, event=event)
        session.commit()
        ids = queries.patient_ids_for(session=session, external_ids=list(ledgers))
        batch = consent_queries.consent_states_for_many(
            session=session, patient_ids=sorted(ids.values()), purposes=PURPOSES
        )
    for external_id, events in ledgers.items():
        assert batch[ids[external_id]] == current_consents(events, purposes=PURPOSES)


def test_batch_reads_of_scattered_ids_equal_reads_one_patient_at_a_time(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    """Ids too sparse for a range (one array on PostgreSQL, IN lists on SQLite), a dense
    run (one BETWEEN) and none at all: each batch read finds what reading every patient
    alone finds."""
    with session_factory() as session:
        records = [make_record(f"P{i}", phone=f"+1212555{i:04d}") for i in range(240)]
        add_patients(session, keyring, *records)
        for i in range(0, 240, 3):
            event = grant(f"P{i}", PURPOSES[i % 3], T0)
            consent_queries.record_consent_event(session=session, keyring=keyring, event=event)
        for i in range(0, 240, 5):
            consent_queries.add_suppression(
                session=session, keyring=keyring, e164=f"+1212555{i:04d}", reason="stop"
            )
        session.commit()
        ids = sorted(
            queries.patient_ids_for(
                session=session, external_ids=[f"P{i}" for i in range(240)]
            ).values()
        )
        scattered, dense = ids[::4], ids[100:180]

        def batch(chosen: list[int]) -> tuple:
            return (
                sorted(queries.ciphers_for(session=session, keyring=keyring, patient_ids=chosen)),
                queries.keyed_patients(session=session, patient_ids=chosen),
                consent_queries.suppressed_patients(session=session, patient_ids=chosen),
                consent_queries.consent_states_for_many(
                    session=session, patient_ids=chosen, purposes=PURPOSES
                ),
            )

        def alone(chosen: list[int]) -> tuple:
            parts = [batch([pid]) for pid in chosen]
            return (
                sorted(pid for part in parts for pid in part[0]),
                set().union(*(part[1] for part in parts)),
                set().union(*(part[2] for part in parts)),
                {pid: states for part in parts for pid, states in part[3].items()},
            )

        for chosen in (scattered, dense):
            found = batch(chosen)
            assert found == alone(chosen)
            assert len(found[0]) == len(chosen) and found[2] and found[3]
        assert batch([]) == ([], set(), set(), {})


def test_suppressions_by_blind_index(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    with session_factory() as session:
        assert consent_queries.add_suppression(
            session=session, keyring=keyring, e164="+12125550142", reason="stop"
        )
        assert not consent_queries.add_suppression(
            session=session, keyring=keyring, e164="+12125550142", reason="stop"
        )
        session.commit()
        assert consent_queries.is_suppressed(session=session, keyring=keyring, e164="+12125550142")
        assert not consent_queries.is_suppressed(
            session=session, keyring=keyring, e164="+12125550143"
        )
        stored = session.scalars(select(m.Suppression.phone_index)).all()
    assert stored == [keyring.phone_index("+12125550142")]


def test_an_erased_patient_is_unreadable_and_not_streamed(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    with session_factory() as session:
        add_patients(session, keyring, make_record("P1"), make_record("P2", phone="+13055550100"))
        consent_queries.record_consent_event(
            session=session, keyring=keyring, event=grant("P1", "adherence", T0)
        )
        pid = destroy_key(session, "P1")
        session.commit()
        with pytest.raises(queries.PatientErased):
            queries.load_patient(session=session, keyring=keyring, external_id="P1")
        streamed = [
            d.patient.external_id for d in queries.iter_patients(session=session, keyring=keyring)
        ]
        ledger = consent_queries.consent_events_for(
            session=session, keyring=keyring, patient_id=pid
        )
        again = queries.upsert_patient(session=session, keyring=keyring, record=make_record("P1"))
    assert streamed == ["P2"]
    assert [(e.status, e.evidence) for e in ledger] == [("granted", None)]
    assert again == "erased"


def test_slots_upsert_by_slot_id(session_factory: sessionmaker[Session]) -> None:
    slot = SlotRecord("S1", "visit", T0, provider="Dr. Osei")
    with session_factory() as session:
        assert queries.upsert_slot(session=session, slot=slot) == "imported"
        assert queries.upsert_slot(session=session, slot=slot) == "unchanged"
        moved = SlotRecord("S1", "visit", T0 + timedelta(hours=1), provider="Dr. Osei")
        assert queries.upsert_slot(session=session, slot=moved) == "updated"
        session.commit()
        assert session.scalars(select(m.Slot.starts_at)).all() == [T0 + timedelta(hours=1)]


def test_the_claim_reads_due_rows_from_the_partial_index(engine: Engine) -> None:
    """The partial index's condition names exactly the waiting statuses, and the claim's
    query (as the database plans it) reads its rows in order from that index."""
    from engine.dispatch_reads import _SQLITE_DUE, due_rows
    from engine.outbox_status import WAITING

    assert set(re.findall(r"'(\w+)'", m.WAITING_SQL)) == set(WAITING)
    with Session(engine) as session:
        if engine.dialect.name == "sqlite":
            query = str(_SQLITE_DUE).replace(":now", "'2030-01-01'").replace(":limit", "10")
            plan = " ".join(str(r) for r in session.execute(text(f"EXPLAIN QUERY PLAN {query}")))
        else:
            query = (
                f"SELECT id FROM outbox WHERE {m.WAITING_SQL} AND send_at <= '2030-01-01Z' "
                "AND campaign_id NOT IN (SELECT campaign_id FROM campaign_states WHERE paused) "
                "ORDER BY send_at, id LIMIT 10 FOR UPDATE SKIP LOCKED"
            )
            session.execute(text("SET LOCAL enable_seqscan = off"))
            plan = " ".join(str(r) for r in session.execute(text(f"EXPLAIN {query}")))
        assert "ix_outbox_due" in plan and "TEMP B-TREE" not in plan, plan
        assert due_rows(session=session, now=T0, limit=10) == []
