"""bench.seed stores what `engage import` stores for the same synthetic population.

Both go into fresh databases of the same kind with the same keys; then every patient is
read back through the store's own queries (decrypted patient, prescriptions, appointments,
phone and its blind index, consent ledger and current consent) and compared.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from bench.population import Population, write_population
from bench.seed import admin_connection, cache_key, restore, seed, store
from engine import audit
from engine.core import domain
from engine.crypto import Keyring, load_keys
from engine.importer import import_files
from engine.settings import Settings
from engine.store import consent_queries, queries
from engine.store import models as m
from engine.store.db import make_engine, make_session_factory, upgrade
from engine.store.queries import PatientRecord
from tests.integration.conftest import postgres_admin_url

PATIENTS = 300  # includes two rows the import rejects (P0000022 and P0000265: bad phones)
PURPOSES = ("adherence", "appointment", "marketing")


@pytest.fixture
def imported_engine(
    db_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Engine]:
    """A second fresh, migrated database of the same kind, for the real importer."""
    if db_backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'imported.db'}"
    else:
        admin: Engine = request.getfixturevalue("postgres_admin")
        name = f"engage_test_{secrets.token_hex(6)}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(postgres_admin_url()).set(database=name).render_as_string(False)
    eng = make_engine(url)
    upgrade(eng)
    yield eng
    eng.dispose()
    if db_backend != "sqlite":
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def snapshot(sessions: sessionmaker[Session], keyring: Keyring) -> dict[str, tuple[Any, ...]]:
    """Everything the engine reads about each patient, by external id."""
    with sessions() as session:
        data = list(queries.iter_patients(session=session, keyring=keyring))
        ids = [d.id for d in data]
        states = consent_queries.consent_states_for_many(
            session=session, patient_ids=ids, purposes=PURPOSES
        )
        index = dict(session.execute(select(m.Patient.external_id, m.Patient.phone_index)).all())
        out = {}
        for d in data:
            eid = d.patient.external_id
            record = queries.load_patient_record(session=session, keyring=keyring, external_id=eid)
            ledger = consent_queries.consent_events_for(
                session=session, keyring=keyring, patient_id=eid
            )
            out[eid] = (d.patient, d.prescriptions, d.appointments, states[d.id], record,
                        index[eid], ledger)  # fmt: skip
        return out


def test_seeded_database_equals_imported(
    engine: Engine,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    imported_engine: Engine,
    tmp_path: Path,
) -> None:
    pop = Population(PATIENTS)
    # Several tasks over two worker processes: ids must follow on across blocks.
    report = seed(pop, engine=engine, keyring=keyring, workers=2, blocks_per_task=1)
    imported = make_session_factory(imported_engine)
    write_population(pop, tmp_path / "csv")
    result = import_files(sorted((tmp_path / "csv").glob("*.csv")), session_factory=imported,
                          keyring=keyring, progress=False)  # fmt: skip
    assert {r.row for r in result.rejections if r.file.endswith("patients.csv")} == {24, 267}

    seeded, expected = snapshot(session_factory, keyring), snapshot(imported, keyring)
    assert len(seeded) == report.patients == PATIENTS - 2
    assert seeded.keys() == expected.keys()
    for eid, values in expected.items():
        assert seeded[eid] == values, eid
    record, index = seeded["P0000001"][4:6]
    assert isinstance(record, PatientRecord) and record.phone and index.startswith("v1:")
    assert index == keyring.phone_index(record.phone)
    revoked = [e for v in seeded.values() for e in v[6] if e.status == "revoked"]
    assert revoked and all(isinstance(e, domain.ConsentEvent) for e in revoked)
    _assert_same_audit(session_factory, imported)


def _assert_same_audit(seeded: sessionmaker[Session], imported: sessionmaker[Session]) -> None:
    entries = []
    for sessions in (seeded, imported):
        with sessions() as session:
            assert audit.verify(session=session).ok
            entry = session.scalars(select(m.AuditEntry)).one()
            entries.append((entry.actor, entry.action, entry.details))
            sources = session.execute(
                select(m.ConsentEvent.source, m.ConsentEvent.recorded_by, func.count()).group_by(
                    m.ConsentEvent.source, m.ConsentEvent.recorded_by
                )
            ).all()
            entries.append(sources)
    assert entries[0] == entries[2]
    assert entries[1] == entries[3]


def test_seeded_database_takes_new_rows(
    engine: Engine, session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    """Ids were given explicitly: later inserts (sequences on PostgreSQL) must not collide."""
    seed(Population(120), engine=engine, keyring=keyring, workers=0)
    patient = domain.Patient(external_id="NEW-1", birth_date=date(1980, 1, 1))
    event = domain.ConsentEvent(patient="NEW-1", purpose="marketing", status="granted",
                                occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
                                legal_basis="written")  # fmt: skip
    with session_factory.begin() as session:
        record = PatientRecord(patient=patient, phone="+14155550100")
        assert queries.upsert_patient(session=session, keyring=keyring, record=record) == "imported"
        consent_queries.record_consent_event(session=session, keyring=keyring, event=event)
        rx = domain.Prescription("NEW-RX", "atorvastatin", "statin", date(2026, 12, 3))
        queries.upsert_prescription(session=session, keyring=keyring, patient_external_id="NEW-1",
                                    prescription=rx)  # fmt: skip
        appt = domain.Appointment("NEW-A", datetime(2026, 12, 3, 15, tzinfo=UTC), "lab")
        queries.upsert_appointment(session=session, patient_external_id="NEW-1", appointment=appt)
    with session_factory() as session:
        new = queries.patient_by_external_id(session=session, external_id="NEW-1")
        assert new is not None and new.id > 120


def test_cache_keeps_the_database_with_its_keys(
    engine: Engine,
    session_factory: sessionmaker[Session],
    settings: Settings,
    keyring: Keyring,
    imported_engine: Engine,
    tmp_path: Path,
) -> None:
    """A stored seeded database comes back in place of another one, and still decrypts."""
    pop = Population(120, seed=secrets.randbelow(10**9))  # a key no other run shares
    seed(pop, engine=engine, keyring=keyring, workers=0)
    expected = snapshot(session_factory, keyring)
    engine.dispose()
    cache, key = tmp_path / "cache", cache_key(pop, engine.dialect.name)
    store(cache, key, settings)
    url = imported_engine.url.render_as_string(False)
    imported_engine.dispose()
    var = tmp_path / "var-restored"
    other = Settings(var_dir=var, database_url=url, master_key_file=var / "master.key",
                     index_key_file=var / "index.key")  # fmt: skip
    assert not restore(cache, cache_key(Population(121, seed=pop.seed), engine.dialect.name), other)
    try:
        assert restore(cache, key, other)
        restored = make_engine(url)
        assert snapshot(make_session_factory(restored), load_keys(other)) == expected
        restored.dispose()
    finally:
        if engine.dialect.name == "postgresql":
            template = (cache / key / "postgresql-database").read_text().strip()
            with admin_connection(make_url(postgres_admin_url())) as admin:
                admin.execute(text(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)'))
