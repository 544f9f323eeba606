"""Seed a migrated database with the synthetic population, fast, in the stored format.

`engage import` validates and upserts row by row (about 7,000 rows a second); the seeder
writes what it would write for the same CSV files, without the round trips: worker
processes generate blocks of the population (bench.population), parse each row with the
importer's own parsers (engine.import_rows), seal it with the codec's writers
(engine.store.codec: per-patient data keys wrapped by the master key, blind phone index)
and hand back plain rows; the parent writes them with explicit ids (executemany on
SQLite, COPY on PostgreSQL) and records the importer's audit entry. The one difference
is row ids: a patient's id is its number in the population plus one, so the rows the
import rejects leave gaps. tests/integration/test_bench_seed.py checks the rest is equal.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import URL, Connection, Dialect, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from bench.population import PatientRows, Population, blocks, generate
from engine import audit
from engine.crypto import Keyring, PatientCipher
from engine.import_rows import Context, RowError
from engine.importer import COLUMNS, parse
from engine.settings import Settings
from engine.store import codec, db
from engine.store import models as m

TABLES: dict[str, tuple[str, ...]] = {  # table: columns, in the order rows are built
    "patients": ("id", "external_id", "given_name_enc", "family_name_enc", "phone_enc",
                 "birth_date_enc", "attributes_enc", "phone_index", "timezone",
                 "candidate_timezones", "locale", "country", "region", "allow_phi_sms",
                 "created_at", "updated_at"),
    "patient_keys": ("id", "patient_id", "wrapped_key", "master_key_id", "created_at"),
    "prescriptions": ("id", "patient_id", "rx_id", "medication_enc", "medication_class",
                      "refill_due", "status", "created_at", "updated_at"),
    "appointments": ("id", "patient_id", "appointment_id", "starts_at", "kind", "provider",
                     "location", "status", "created_at", "updated_at"),
    "consent_events": ("id", "patient_id", "purpose", "channel", "status", "legal_basis",
                       "method", "notice_version", "evidence_enc", "occurred_at",
                       "recorded_at", "recorded_by", "source"),
}  # fmt: skip
LEDGER = set(TABLES["consent_events"]) - {"id", "recorded_at"}  # what consent_row sets
CHILDREN = ("prescriptions", "appointments", "consent_events")  # ids given by the parent
CONSENTS_SOURCE = "import:consents.csv"  # what the importer records for consents.csv
BLOCKS_PER_TASK = 20


@dataclass
class Built:
    """The rows of some blocks of the population; children still without their ids."""

    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: {t: [] for t in TABLES})
    consents: Counter[str] = field(default_factory=Counter)  # outcomes, as the importer counts


@dataclass(frozen=True)
class SeedReport:
    patients: int
    rows: dict[str, int]
    seconds: float


# --- building rows (in worker processes) ------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    pop: Population
    context: Context
    now: datetime


_JOB: _Job | None = None


def _init(job: _Job) -> None:
    global _JOB  # one job per worker process, set by the pool initializer
    _JOB = job


def _build_task(block_ids: Sequence[int]) -> Built:
    assert _JOB is not None
    return build(_JOB.pop, block_ids, _JOB.context, _JOB.now)


def build(pop: Population, block_ids: Sequence[int], context: Context, now: datetime) -> Built:
    """Parse and seal the patients of these blocks as `engage import` would store them."""
    built = Built()
    for block in block_ids:
        for rows in generate(pop, block):
            _build_patient(rows, context, now, built)
    return built


def _build_patient(rows: PatientRows, context: Context, now: datetime, built: Built) -> None:
    record = _parsed("patients", rows.patient, context)
    if record is None:  # rejected by the import; so are its other rows (unknown patient)
        built.consents["rejected"] += len(rows.consents)
        return
    record = codec.merge_attributes(record, {})
    external_id = record.patient.external_id
    pid = int(external_id.removeprefix("P")) + 1
    dek, wrapped, key_id = context.keyring.new_data_key(patient_id=external_id)
    cipher = PatientCipher(dek, patient_id=external_id)
    out = built.rows
    sealed = SimpleNamespace()  # stands in for a models.Patient: the codec sets attributes
    codec.write_patient(sealed, cipher, record, context.keyring)  # type: ignore[arg-type]
    out["patients"].append(_row("patients", vars(sealed), now, id=pid, external_id=external_id))
    out["patient_keys"].append((pid, pid, wrapped, key_id, now))
    for _, rx in _all_parsed("prescriptions", rows.prescriptions, context):
        sealed = SimpleNamespace()
        codec.seal_prescription(sealed, cipher, rx)  # type: ignore[arg-type]
        out["prescriptions"].append(
            _row("prescriptions", vars(sealed), now, patient_id=pid, rx_id=rx.rx_id)
        )
    for _, appt in _all_parsed("appointments", rows.appointments, context):
        sealed = SimpleNamespace(appointment_id=appt.appointment_id)
        codec.set_appointment(sealed, appt)  # type: ignore[arg-type]
        starts_at = appt.starts_at.astimezone(UTC)
        out["appointments"].append(
            _row("appointments", vars(sealed), now, patient_id=pid, starts_at=starts_at)
        )
    events = list(_all_parsed("consents", rows.consents, context))
    built.consents["rejected"] += len(rows.consents) - len(events)
    built.consents["imported"] += len(events)
    for event in events:
        ledger = codec.consent_row(pid, event, cipher, CONSENTS_SOURCE)
        values = {c: getattr(ledger, c) for c in TABLES["consent_events"] if c in LEDGER}
        occurred_at = event.occurred_at.astimezone(UTC)
        out["consent_events"].append(_row("consent_events", values, now, occurred_at=occurred_at))


def _parsed(kind: str, raw: list[str], context: Context) -> Any:
    """The row parsed by the importer's own parser; None when the import rejects it."""
    try:
        return parse(kind, dict(zip(COLUMNS[kind], raw, strict=True)), context)
    except RowError:
        return None


def _all_parsed(kind: str, raws: list[list[str]], context: Context) -> Iterator[Any]:
    return (p for p in (_parsed(kind, raw, context) for raw in raws) if p is not None)


def _row(table: str, values: dict[str, Any], now: datetime, **more: Any) -> tuple[Any, ...]:
    """The table's columns from `values` and `more`; children's ids are left to the parent."""
    values = {"created_at": now, "updated_at": now, "recorded_at": now, **values, **more}
    columns = TABLES[table] if table not in CHILDREN else TABLES[table][1:]
    return tuple(values[c] for c in columns)


# --- writing (in the parent) ------------------------------------------------------------------


def seed(
    pop: Population,
    *,
    engine: Engine,
    keyring: Keyring,
    purposes: Collection[str] | None = None,
    workers: int | None = None,
    blocks_per_task: int = BLOCKS_PER_TASK,
    now: datetime | None = None,
) -> SeedReport:
    """Write `pop` into the migrated, empty database of `engine`, as `engage import` of its
    CSV files would (one audit entry included). `workers` processes seal rows (0: none,
    all in this process; None: one per core)."""
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    job = _Job(pop, Context(keyring, purposes, frozenset(), "import"), now)
    ids = blocks(pop)
    tasks = [ids[i : i + blocks_per_task] for i in range(0, len(ids), blocks_per_task)]
    totals: Counter[str] = Counter()
    consents: Counter[str] = Counter()
    for built in _built(job, tasks, (os.cpu_count() or 1) if workers is None else workers):
        with engine.begin() as conn:
            for table, rows in built.rows.items():
                if table in CHILDREN:
                    first = totals[table] + 1
                    rows = [(first + i, *row) for i, row in enumerate(rows)]
                _write(conn, table, rows)
                totals[table] += len(rows)
        consents.update(built.consents)
    _finish(engine, {"files": {"consents.csv": dict(sorted(consents.items()))}})
    return SeedReport(totals["patients"], dict(totals), time.perf_counter() - started)


def _built(job: _Job, tasks: list[Sequence[int]], workers: int) -> Iterator[Built]:
    if workers <= 0:
        for task in tasks:
            yield build(job.pop, task, job.context, job.now)
        return
    # Spawned, never forked: a fork copies the locks other threads hold at that moment
    # (a test runner's, a transport's), and a child can wait on one of them forever.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init, initargs=(job,)) as pool:
        yield from pool.imap(_build_task, tasks)


def _write(conn: Connection, table: str, rows: list[tuple[Any, ...]]) -> None:
    """Bulk insert without RETURNING: COPY on PostgreSQL, executemany on SQLite with the
    values converted by the columns' own SQLAlchemy types, as a Core insert would."""
    if not rows:
        return
    columns = TABLES[table]
    if conn.dialect.name != "postgresql":
        process = [(i, p) for i, p in enumerate(_processors(conn.dialect, table)) if p]
        params = [list(row) for row in rows]
        for row in params:
            for i, p in process:
                row[i] = p(row[i])
        params = [tuple(row) for row in params]
        marks = ", ".join("?" * len(columns))
        conn.exec_driver_sql(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", params)
        return
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _processors(dialect: Dialect, table: str) -> list[Any]:
    """The bind processor of each column (None where values go through unchanged); those of
    times and dates are memoized, as rows share few distinct ones (`now`, days)."""
    found = m.Base.metadata.tables[table].c
    processors = []
    for column in TABLES[table]:
        kind = found[column].type
        process = kind.dialect_impl(dialect).bind_processor(dialect)
        if process is not None and getattr(kind, "impl", kind).python_type in (datetime, date):
            process = functools.lru_cache(maxsize=1 << 16)(process)
        processors.append(process)
    return processors


def _finish(engine: Engine, details: dict[str, Any]) -> None:
    """The importer's audit entry; on PostgreSQL, sequences past the explicit ids, and
    fresh planner statistics."""
    with Session(engine) as session, session.begin():
        if details["files"]["consents.csv"].get("imported"):
            audit.record(session=session, actor="cli:import", action="consents_imported",
                         details=details, now=datetime.now(UTC))  # fmt: skip
        if engine.dialect.name == "postgresql":
            for table in TABLES:
                session.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                     f"(SELECT max(id) FROM {table}))"))  # fmt: skip
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"ANALYZE {', '.join(TABLES)}"))


# --- cache: a seeded database kept for the next run at the same scale ------------------------


def cache_key(pop: Population, backend: str) -> str:
    """Patients, seed, start, schema head and a fingerprint of the code that builds the rows."""
    code = b"".join(Path(__file__).with_name(f).read_bytes() for f in ("population.py", "seed.py"))
    fingerprint = hashlib.sha256(code).hexdigest()[:8]
    return (f"{pop.patients}p-seed{pop.seed}-{pop.start.isoformat()}-{db.head_revision()}-"
            f"{fingerprint}-{backend}")  # fmt: skip


def restore(cache: Path, key: str, settings: Settings) -> bool:
    """Put the cached database and its key files in place of `settings`'; False on a miss."""
    entry = cache / key
    if settings.master_key or settings.index_key or not (entry / "master.key").exists():
        return False
    url = make_url(db.normalize_url(settings.database_url))
    if url.get_backend_name() == "sqlite":
        if not (entry / "bench.db").exists():
            return False
        target = Path(url.database or "")
        for suffix in ("-wal", "-shm"):
            target.with_name(target.name + suffix).unlink(missing_ok=True)
        shutil.copyfile(entry / "bench.db", target)
    else:
        template = (entry / "postgresql-database").read_text().strip()
        with admin_connection(url) as admin:
            if admin.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": template}):
                admin.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
                admin.execute(text(f'CREATE DATABASE "{url.database}" TEMPLATE "{template}"'))
            else:
                return False
    for name, path in (("master.key", settings.master_key_file),
                       ("index.key", settings.index_key_file)):  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.unlink(missing_ok=True)
        shutil.copyfile(entry / name, path)
        path.chmod(0o600)
    return True


def store(cache: Path, key: str, settings: Settings) -> None:
    """Keep the seeded database of `settings` (no connection may be open) with its keys."""
    entry = cache / key
    entry.mkdir(parents=True, exist_ok=True, mode=0o700)
    url = make_url(db.normalize_url(settings.database_url))
    if url.get_backend_name() == "sqlite":
        _copy_atomically(Path(url.database or ""), entry / "bench.db")
    else:
        template = "engage_bench_cache_" + hashlib.sha256(key.encode()).hexdigest()[:16]
        with admin_connection(url) as admin:
            admin.execute(text(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)'))
            admin.execute(text(f'CREATE DATABASE "{template}" TEMPLATE "{url.database}"'))
        (entry / "postgresql-database").write_text(template + "\n")
    for name, path in (("master.key", settings.master_key_file),
                       ("index.key", settings.index_key_file)):  # fmt: skip
        _copy_atomically(path, entry / name)


def _copy_atomically(source: Path, target: Path) -> None:
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.copyfile(source, partial)
    partial.chmod(0o600)
    os.replace(partial, target)


@contextmanager
def admin_connection(url: URL) -> Iterator[Connection]:
    """An AUTOCOMMIT connection to the server's maintenance database."""
    engine = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()
