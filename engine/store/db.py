"""Engines, sessions and migrations, built only when asked.

SQLite gets WAL, foreign keys and a busy timeout on every connection, and real
transactions: the pysqlite driver's own BEGIN handling is switched off so that
SAVEPOINT and (optionally) BEGIN IMMEDIATE behave as documented by SQLAlchemy.
PostgreSQL is reached through psycopg 3. Each pooled connection is checked at checkout:
by a `SELECT 1` round trip (`pool_pre_ping`), or, with `ping=False` (the web server, where
that round trip was a tenth of a webhook's time), by looking at its socket without a
round trip (`_drop_dead_connections`).
"""

from __future__ import annotations

import select
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg.pq import TransactionStatus
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_CACHE_KIB = 65_536  # per connection; the default 2 MiB thrashes on large outboxes
# WAL pages (4 KiB) between automatic checkpoints, against SQLite's 1,000. A planner batch
# dirties about a thousand pages of the outbox's idempotency-key index (random keys), so
# at the default nearly every commit copied its pages back into the database file and
# synced it; at 10,000 a page written by several commits is copied once. A 1M-patient
# tick took 6-10% less time. The WAL grows to about 40 MiB between checkpoints.
SQLITE_WAL_AUTOCHECKPOINT_PAGES = 10_000
_MIGRATION_LOCK = zlib.crc32(b"engage-migrations")
# Without a ping, a pooled connection is replaced after this long whatever its socket says
# (a firewall or NAT that forgets an idle connection without closing it).
POOL_RECYCLE_SECONDS = 300


def normalize_url(url: str) -> str:
    """Route PostgreSQL URLs to psycopg 3 (`postgresql://` and `postgres://` included)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(
    url: str, *, sqlite_immediate: bool = False, ping: bool = True, **kwargs: Any
) -> Engine:
    """An engine for `url`.

    `sqlite_immediate=True` starts every SQLite transaction with BEGIN IMMEDIATE (takes the
    write lock up front: one writer at a time, no upgrade deadlocks); PostgreSQL ignores it.
    `ping=False` (PostgreSQL): no round trip at checkout; a connection the server has closed
    (a restart, an idle timeout) is replaced before use all the same, by its socket.
    """
    url = normalize_url(url)
    # Bound values are PHI lookups (phone numbers, names): never in SQL logs or in the
    # text of a database error.
    kwargs.setdefault("hide_parameters", True)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("options", _session_options(parsed))
        if ping:
            kwargs.setdefault("pool_pre_ping", True)
            return create_engine(url, **kwargs)
        kwargs.setdefault("pool_recycle", POOL_RECYCLE_SECONDS)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "checkout", _drop_dead_connections)
        return engine
    engine = create_engine(url, **kwargs)
    begin = "BEGIN IMMEDIATE" if sqlite_immediate else "BEGIN"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_AUTOCHECKPOINT_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql(begin)

    return engine


def _session_options(url: URL) -> str:
    """libpq options for every session (after any the URL gives): TimeZone=UTC, whatever
    the server's own zone. psycopg then returns times in UTC, which the models'
    UTCDateTime takes as they are instead of converting each one."""
    given = url.query.get("options")
    given = " ".join(given) if isinstance(given, tuple) else given
    return f"{given} -c TimeZone=UTC" if given else "-c TimeZone=UTC"


def _drop_dead_connections(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Refuse a pooled connection that cannot be used, without a round trip: closed or
    broken on our side, or, idle, with something to read on its socket. An idle PostgreSQL
    connection is sent nothing unless the server ends it (a FATAL message on a restart or
    an idle timeout, or the socket closed when a backend dies), so readable means gone.
    DisconnectionError makes the pool discard it and check out another (SQLAlchemy's
    "custom pessimistic ping")."""
    if (
        dbapi_connection.closed
        or dbapi_connection.info.transaction_status != TransactionStatus.IDLE
    ):
        raise DisconnectionError("the connection is closed or not idle")
    poller = select.poll()
    poller.register(dbapi_connection.fileno(), select.POLLIN | select.POLLPRI)
    if poller.poll(0):  # POLLHUP and POLLERR are reported whatever was asked
        raise DisconnectionError("the server closed the connection")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configured from Python: the package's own migrations, no ini file."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine_or_url: Engine | str, revision: str = "head") -> None:
    """Migrate the database to `revision` in one transaction.

    On PostgreSQL an advisory lock keeps two processes from migrating at once.
    """
    with migrating(engine_or_url) as connection:
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine_or_url: Engine | str, revision: str) -> None:
    """Migrate the database back to `revision`, as upgrade() does."""
    with migrating(engine_or_url) as connection:
        command.downgrade(alembic_config(connection), revision)


@contextmanager
def migrating(engine_or_url: Engine | str) -> Iterator[Connection]:
    """A connection in the transaction a migration runs in.

    SQLite rebuilds a table to drop a constraint (Alembic's batch mode): it drops the table
    and renames a copy to its name, which a foreign key pointing at the table (checked even
    when deferred) takes as its rows deleted. So, as SQLite's own procedure for such
    changes says, foreign keys are off during the migration (it can only be switched
    outside a transaction) and `PRAGMA foreign_key_check` must find nothing before commit.
    """
    engine, owned = _engine(engine_or_url)
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
            try:
                with connection.begin():
                    if not sqlite:
                        connection.execute(
                            text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK}
                        )
                    yield connection
                    if sqlite:
                        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                        if broken:
                            raise RuntimeError(f"migration broke foreign keys: {broken[:5]}")
            finally:
                if sqlite:
                    connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")
    finally:
        if owned:
            engine.dispose()


def current_revision(engine_or_url: Engine | str) -> str | None:
    """The revision the database is at; None for an empty database."""
    engine, owned = _engine(engine_or_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        if owned:
            engine.dispose()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _engine(engine_or_url: Engine | str) -> tuple[Engine, bool]:
    if isinstance(engine_or_url, Engine):
        return engine_or_url, False
    return make_engine(engine_or_url), True
