"""Import and dry-run benchmark: rows imported per second, decisions plus renders per second.

    python -m bench dryrun --patients 100000 --db sqlite
    python -m bench dryrun --patients 100000 --db postgresql
    python -m bench dryrun --patients 1000000 --db postgresql --cache var/bench-cache

Builds a synthetic population (bench.population) and imports it with the real importer
(encryption on), or above 100,000 patients (or with --load seed) writes the same stored
rows with bench.seed, keeping the seeded database in --cache for the next run at that
scale. Then it loads the starter definitions, then dry-runs campaigns at times where
many occurrences are due. Each dry-run streams patients from the database, decrypts them,
evaluates the audience, computes occurrences, renders and decides with every starter rule.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from bench.population import Population, write_population
from bench.seed import cache_key, restore, seed, store
from engine.crypto import Keyring, ensure_key_files, load_keys
from engine.definitions import DefinitionSet, load_definitions
from engine.dryrun import Candidate, DryRunSummary, dry_run
from engine.gc_tuning import bulk_collector
from engine.importer import import_files
from engine.settings import Settings
from engine.store import consent_queries, db, queries
from engine.store.defqueries import approved_versions, record_review, sync_definitions

ROOT = Path(__file__).resolve().parents[1]
IMPORT_UP_TO = 100_000  # patients; above, "auto" seeds (bench.seed) instead of importing
RUNS = [  # (campaign, at): times where many occurrences are due
    ("awareness-monthly", "2026-12-02T00:00:00+00:00"),
    ("statin-refill", "2026-12-10T20:00:00+00:00"),
    ("appointment-reminder", "2026-12-12T20:00:00+00:00"),
]


@dataclass
class Figures:
    rows: list[tuple[str, str, str]]

    def add(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"  {what}: {value} {note}", flush=True)

    def print_table(self) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.add("peak RSS", f"{peak:,.0f} MiB")
        width = max(len(r[0]) for r in self.rows)
        print(f"\n{'measure'.ljust(width)}  figure")
        for what, value, note in self.rows:
            print(f"{what.ljust(width)}  {value} {note}")


def databases(kind: str, workdir: Path) -> Iterator[str]:
    """One fresh database URL of the kind asked for (a PostgreSQL one is dropped after)."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    admin = os.environ.get(
        "ENGAGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    yield from postgres_database(admin)


def postgres_database(admin_url: str) -> Iterator[str]:
    name = f"engage_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(db.normalize_url(admin_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Prepared:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    keyring: Keyring
    defs: DefinitionSet


def prepare(
    patients: int,
    database: str,
    workdir: Path,
    figures: Figures,
    env: dict[str, str] | None = None,
    *,
    load: str = "auto",
    cache: Path | None = None,
) -> Prepared:
    """A migrated database with a synthetic population and the starter definitions synced
    and approved.

    `load`: "import" (the real importer; its rate goes into `figures`), "seed" (bench.seed,
    much faster) or "auto" (import up to IMPORT_UP_TO patients, else seed). A seeded
    database is kept in `cache` (default: $ENGAGE_BENCH_CACHE, if set) and reused by the
    next run at the same scale, with its key files.
    """
    settings = Settings.from_env(
        {"ENGAGE_VAR_DIR": str(workdir), "DATABASE_URL": database, **(env or {})}
    )
    if load == "auto":
        load = "import" if patients <= IMPORT_UP_TO else "seed"
    if cache is None and os.environ.get("ENGAGE_BENCH_CACHE"):
        cache = Path(os.environ["ENGAGE_BENCH_CACHE"])
    pop = Population(patients)
    key = cache_key(pop, make_url(db.normalize_url(database)).get_backend_name())
    started = time.perf_counter()
    restored = load == "seed" and cache is not None and restore(cache, key, settings)
    if restored:
        figures.add("seed", "from cache", f"({cache} in {time.perf_counter() - started:.1f} s)")
    ensure_key_files(settings)
    keyring = load_keys(settings)
    engine = db.make_engine(database)
    db.upgrade(engine)
    sessions = db.make_session_factory(engine)
    defs = load_definitions(ROOT)
    if load == "import":
        _import(pop, workdir, sessions, keyring, defs, figures)
    elif not restored:
        report = seed(pop, engine=engine, keyring=keyring, purposes=set(defs.purposes))
        rows = sum(report.rows.values())
        figures.add("seed", f"{report.patients / report.seconds:,.0f} patients/s",
                    f"({report.patients:,} patients, {rows:,} rows in {report.seconds:.1f} s; "
                    f"load average {os.getloadavg()[0]:.1f})")  # fmt: skip
        if cache is not None:
            engine.dispose()
            store(cache, key, settings)
    _approve_definitions(sessions, defs)
    return Prepared(settings, engine, sessions, keyring, defs)


def _approve_definitions(sessions: sessionmaker[Session], defs: DefinitionSet) -> None:
    now = datetime.now(UTC)
    with sessions.begin() as session:
        sync_definitions(session=session, defs=defs, now=now)
        for (tid, loc), t in defs.templates.items():
            record_review(session=session, template_id=tid, locale=loc, version=t.version,
                          decision="approve", by="bench", now=now)  # fmt: skip


def _import(
    pop: Population,
    workdir: Path,
    sessions: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    figures: Figures,
) -> None:
    data = workdir / "population"
    counts = write_population(pop, data)
    started = time.perf_counter()
    import_files(sorted(data.glob("*.csv")), session_factory=sessions, keyring=keyring,
                 progress=False, purposes=set(defs.purposes))  # fmt: skip
    elapsed = time.perf_counter() - started
    total = sum(counts.values())
    figures.add(
        "import",
        f"{total / elapsed:,.0f} rows/s",
        f"({total:,} rows of 4 files in {elapsed:.1f} s)",
    )


def run(patients: int, database: str, workdir: Path, figures: Figures, **options: Any) -> None:
    p = prepare(patients, database, workdir, figures, **options)
    defs, sessions, keyring, engine = p.defs, p.sessions, p.keyring, p.engine
    with sessions() as session:
        approved = approved_versions(session=session)
        for campaign_id, at in RUNS:
            _dry_run(
                defs, session, keyring, campaign_id, datetime.fromisoformat(at), approved, figures
            )
    engine.dispose()


def _dry_run(defs, session, keyring, campaign_id, at, approved, figures: Figures) -> None:  # type: ignore[no-untyped-def]
    summary = DryRunSummary()
    candidates = (
        Candidate(d.id, d.patient, d.prescriptions, d.appointments)
        for d in queries.iter_patients(session=session, keyring=keyring)
    )

    def consents(ids: list[int]):  # type: ignore[no-untyped-def]
        return consent_queries.consent_states_for_many(
            session=session, patient_ids=ids, purposes=list(defs.purposes)
        )

    started = time.perf_counter()
    with bulk_collector():  # as `engage dry-run` does
        decided = sum(
            1
            for _ in dry_run(
                defs,
                campaign=defs.campaigns[campaign_id],
                candidates=candidates,
                consents_for=consents,
                at=at,
                approved_versions=approved,
                public_url="https://rh.example",
                summary=summary,
            )
        )
    elapsed = time.perf_counter() - started
    outcomes = ", ".join(f"{k} {summary.outcomes[k]:,}" for k in ("allow", "defer", "deny"))
    figures.add(
        f"dry-run {campaign_id}",
        f"{decided / elapsed:,.0f} decisions/s",
        f"({summary.patients_seen / elapsed:,.0f} patients/s scanned; {decided:,} "
        f"decisions in {elapsed:.1f} s: {outcomes})",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="import and dry-run benchmark")
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--load", choices=["auto", "import", "seed"], default="auto",
                        help=f"how the population gets in (auto: import up to "
                        f"{IMPORT_UP_TO:,} patients, else seed)")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep and reuse seeded databases here (default: "
                        "$ENGAGE_BENCH_CACHE)")  # fmt: skip
    args = parser.parse_args(argv)
    figures = Figures([])
    print(f"bench dryrun: {args.patients:,} patients on {args.db} (load: {args.load}; "
          f"load average {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="engage-bench-") as tmp:
        for url in databases(args.db, Path(tmp)):
            run(args.patients, url, Path(tmp), figures, load=args.load, cache=args.cache)
    figures.print_table()
