"""Bulk insert of planned outbox rows: the planner's hot write path.

SQLAlchemy's executemany spends more time handling each row's 28 parameters than the
database spends storing them, so here the statement is built once per row count and
values are converted by the columns' own bind processors (SQLite stores the same text,
PostgreSQL receives the same types, as through the ORM), then:

- SQLite: multi-row INSERT ... ON CONFLICT (patient_id, idempotency_key) DO NOTHING
  RETURNING;
- PostgreSQL: binary COPY straight into the outbox in a savepoint, with ids drawn from its
  sequence; only when another planner inserted one of the keys meanwhile, COPY into a
  temporary staging table dropped at commit, then one
  INSERT ... SELECT ... ON CONFLICT (patient_id, idempotency_key) DO NOTHING RETURNING.

Either way rows go in (patient, key) order, the order of the unique index (migration
0010): two planners inserting the same keys take their locks in the same order and cannot
deadlock, a key inserted by another planner first is skipped, never doubled, and a
planner's rows, streamed in patient order, go in at the index's end. existing_keys looks
rows up in the same index before a batch is decided.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from operator import itemgetter
from typing import Any

from psycopg.errors import UniqueViolation
from psycopg.types.json import Json
from sqlalchemy import JSON, BigInteger, Dialect, Integer, LargeBinary, String
from sqlalchemy.orm import Session

from engine.store import models as m
from engine.store.queries import chunks

TABLE = m.Outbox.__table__
COLUMNS: tuple[str, ...] = tuple(c.name for c in TABLE.columns if c.name != "id")
DEFAULTS: Mapping[str, Any] = {"anchor": "", "attempts": 0, "reasons": []}
SQLITE_MAX_VARIABLES = 32_766  # SQLite >= 3.32
SQLITE_ROWS = SQLITE_MAX_VARIABLES // len(COLUMNS)
_NAMES = ", ".join(COLUMNS)
UNIQUE: tuple[str, ...] = ("patient_id", "idempotency_key")  # the outbox's unique index
_UNIQUE = ", ".join(UNIQUE)
_SKIP_PRESENT = f"ON CONFLICT ({_UNIQUE}) DO NOTHING"
_KEY = COLUMNS.index("idempotency_key")
# The sequence is looked up once per statement (an InitPlan): called per row, the lookup
# took 3 ms of the server's CPU per thousand ids against under 1.
_NEXT_IDS = (
    "SELECT nextval((SELECT pg_get_serial_sequence('outbox', 'id'))::regclass) "
    "FROM generate_series(1, %s)"
)


def insert_outbox_rows(*, session: Session, rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Insert rows, skipping any whose patient has its idempotency key already; the new
    rows' ids by key (a key names one patient).

    Columns a row leaves out take their defaults; created_at and updated_at are now.
    """
    if not rows:
        return {}
    connection = session.connection()
    dialect = connection.dialect
    convert = _converters(dialect)
    ordered = sorted(rows, key=itemgetter(*UNIQUE))
    values = convert.rows(ordered, m.utcnow())
    driver = connection.connection.driver_connection
    if dialect.name == "postgresql":
        return _copy_insert(driver, values)
    found: dict[str, int] = {}
    cursor = driver.cursor()
    try:
        start = 0
        for count in sqlite_parts(len(values)):
            part = values[start : start + count]
            cursor.execute(_sqlite_statement(count), [v for row in part for v in row])
            found.update(cursor.fetchall())
            start += count
    finally:
        cursor.close()
    return found


def sqlite_parts(count: int) -> list[int]:
    """The row counts of the statements inserting `count` rows on SQLite: as many of
    SQLITE_ROWS as fit, then the rest by powers of two, largest first.

    A connection then prepares at most a dozen distinct statements however batch sizes
    vary. One per remainder would each be prepared anew (8 ms for a thousand rows) and
    kept in the driver's statement cache: 128 statements of about 460 rows held 175 MiB."""
    parts = [SQLITE_ROWS] * (count // SQLITE_ROWS)
    rest = count % SQLITE_ROWS
    while rest:
        part = 1 << (rest.bit_length() - 1)
        parts.append(part)
        rest -= part
    return parts


@dataclass(frozen=True)
class Converters:
    """How a dialect takes outbox rows: every column's value when a row leaves it out
    (`base`), and for the columns whose values need converting their index in COLUMNS,
    bind processor and whether values repeat across rows (times, reasons)."""

    base: Mapping[str, Any]
    processed: tuple[tuple[int, Callable[[Any], Any], bool], ...]

    def rows(self, rows: Sequence[Mapping[str, Any]], now: datetime) -> list[tuple[Any, ...]]:
        """The rows' values in COLUMNS order, converted. Times and reasons repeat across
        the rows of a batch (a tick's time, a rule's memoized reasons): each distinct
        value, or reasons list object, of a column is converted once per batch."""
        base = {**self.base, "created_at": now, "updated_at": now}
        pick = itemgetter(*COLUMNS)
        memos: list[dict[Any, Any]] = [{} for _ in self.processed]
        out = []
        for row in rows:
            values = list(pick({**base, **row}))
            for (i, processor, shared), memo in zip(self.processed, memos, strict=True):
                value = values[i]
                if value is None:
                    continue
                if not shared:
                    values[i] = processor(value)
                    continue
                key = value if isinstance(value, datetime) else id(value)
                converted = memo.get(key)
                if converted is None:
                    converted = memo[key] = processor(value)
                values[i] = converted
            out.append(tuple(values))
        return out


@cache
def _converters(dialect: Dialect) -> Converters:
    processed = []
    for i, name in enumerate(COLUMNS):
        kind = TABLE.c[name].type
        if dialect.name == "sqlite" and isinstance(kind, LargeBinary):
            continue  # sqlite3 stores bytes as the same BLOB its Binary wrapper would give
        processor = kind._cached_bind_processor(dialect)
        if processor is not None:
            shared = isinstance(kind, m.UTCDateTime | JSON)
            if isinstance(kind, JSON) and dialect.name == "postgresql":
                processor = _json_text(processor)
            processed.append((i, processor, shared))
    return Converters(dict.fromkeys(COLUMNS) | DEFAULTS, tuple(processed))


def _json_text(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """PostgreSQL: a JSON value as the text psycopg's Json would have sent, which is also
    the json type's binary form (COPY_TYPES). Reasons repeat across a batch's rows and are
    serialized once per batch (Converters.rows)."""

    def convert(value: Any) -> Any:
        bound = processor(value)
        return (bound.dumps or json.dumps)(bound.obj) if isinstance(bound, Json) else bound

    return convert


def _copy_type(column: Any) -> str:
    """The type psycopg writes a column's values as in a binary COPY. The server reads
    each field with its column's own input function, so text stands for varchar, and for
    json (whose binary form is its text); JSON values arrive serialized (_json_text)."""
    kind = column.type
    if isinstance(kind, m.UTCDateTime):
        return "timestamptz"
    if isinstance(kind, LargeBinary):
        return "bytea"
    if isinstance(kind, BigInteger):
        return "int8"
    if isinstance(kind, Integer):
        return "int4"
    if isinstance(kind, String | JSON):
        return "text"
    raise TypeError(f"outbox.{column.name}: no binary COPY type for {kind!r}")


COPY_TYPES: tuple[str, ...] = tuple(_copy_type(TABLE.c[name]) for name in COLUMNS)
"""The binary COPY's types of COLUMNS (rather than its text form: bodies went as hex text
and times as ISO text, each parsed again by the server)."""
_COPY_TYPES_WITH_ID = (_copy_type(TABLE.c.id), *COPY_TYPES)


@cache
def _sqlite_statement(count: int) -> str:
    one = "(" + ", ".join("?" * len(COLUMNS)) + ")"
    return (
        f"INSERT INTO outbox ({_NAMES}) VALUES {', '.join([one] * count)} "
        f"{_SKIP_PRESENT} RETURNING idempotency_key, id"
    )


def _copy_insert(driver: Any, values: list[tuple[Any, ...]]) -> dict[str, int]:
    """COPY the rows straight into the outbox, with ids drawn from its sequence, in a
    savepoint. A key another planner inserted since the caller looked (a unique
    violation, after waiting for that planner's commit) rolls the savepoint back, and the
    rows go through the staging table instead, whose INSERT skips such keys. Staging every
    batch cost PostgreSQL 24 ms of CPU per thousand rows against 18 for the direct COPY
    (a 100k tick: 50-55 against 54-62 µs of server CPU per row, alternating runs)."""
    with driver.cursor() as cursor:
        cursor.execute(_NEXT_IDS, (len(values),))
        ids = [row[0] for row in cursor.fetchall()]
        cursor.execute("SAVEPOINT outbox_copy")
        try:
            with cursor.copy(f"COPY outbox (id, {_NAMES}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_COPY_TYPES_WITH_ID)
                for id_, row in zip(ids, values, strict=True):
                    copy.write_row((id_, *row))
        except UniqueViolation:
            cursor.execute("ROLLBACK TO SAVEPOINT outbox_copy")
            return _staged_insert(cursor, values)
        cursor.execute("RELEASE SAVEPOINT outbox_copy")
    return {row[_KEY]: id_ for id_, row in zip(ids, values, strict=True)}


def _staged_insert(cursor: Any, values: list[tuple[Any, ...]]) -> dict[str, int]:
    cursor.execute(
        "CREATE TEMPORARY TABLE IF NOT EXISTS outbox_stage ON COMMIT DROP AS "
        f"SELECT {_NAMES} FROM outbox WITH NO DATA"
    )
    cursor.execute("TRUNCATE outbox_stage")
    with cursor.copy(f"COPY outbox_stage ({_NAMES}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(COPY_TYPES)
        for row in values:
            copy.write_row(row)
    cursor.execute(
        f"INSERT INTO outbox ({_NAMES}) SELECT {_NAMES} FROM outbox_stage "
        f"ORDER BY {_UNIQUE} {_SKIP_PRESENT} "
        "RETURNING idempotency_key, id"
    )
    return dict(cursor.fetchall())


def existing_keys(*, session: Session, keys: Iterable[tuple[int, str]]) -> set[str]:
    """The idempotency keys among `keys`, (patient row id, key) pairs, that already have an
    outbox row: each pair is looked up in the unique (patient_id, idempotency_key) index.

    The pairs are joined as a relation, not matched by `(patient_id, key) IN (...)`, which
    SQLite answers by scanning the whole index (50 ms for 2,000 pairs against 500,000
    rows, 1.4 ms joined). PostgreSQL gets them as two arrays, one round trip; SQLite as
    VALUES lists of EXISTING_KEYS_SIZES pairs (the last one padded), so a connection
    prepares a handful of statements however batch sizes vary."""
    wanted = sorted(set(keys))
    if not wanted:
        return set()
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        patients, keys_ = zip(*wanted, strict=True)
        # Never prepared: psycopg prepares a statement a connection runs often, and
        # PostgreSQL then settles on one generic plan. Chosen while the outbox was empty
        # (a tick's first batches), that plan hashed the pairs and scanned the whole
        # outbox, and kept doing so as the tick filled it. Planned each time, the lookup
        # uses the unique index.
        with connection.connection.driver_connection.cursor() as cursor:
            params = (list(patients), list(keys_))
            cursor.execute(_EXISTING_KEYS_PG, params, prepare=False)
            return {key for (key,) in cursor}
    found: set[str] = set()
    for chunk in _padded_chunks(wanted):
        params = tuple(v for pair in chunk for v in pair)
        found.update(
            key for (key,) in connection.exec_driver_sql(_existing_keys_sqlite(len(chunk)), params)
        )
    return found


EXISTING_KEYS_SIZES = (512, 128, 32)
# The arrays go in binary (%b): psycopg writes a text array by checking every element for
# characters to quote, 1.7-2.4 ms of CPU per thousand pairs against 0.5.
_EXISTING_KEYS_PG = (
    "SELECT o.idempotency_key FROM unnest(%b::bigint[], %b::text[]) AS k (patient_id, key) "
    "JOIN outbox o ON o.patient_id = k.patient_id AND o.idempotency_key = k.key"
)


def _padded_chunks(pairs: Sequence[tuple[int, str]]) -> Iterator[Sequence[tuple[int, str]]]:
    """`pairs` in chunks of the largest size, the rest in one of the smallest size that
    holds it, padded by repeating its last pair (a repeat finds the same row again)."""
    for chunk in chunks(pairs, EXISTING_KEYS_SIZES[0]):
        size = min(s for s in EXISTING_KEYS_SIZES if s >= len(chunk))
        yield [*chunk, *[chunk[-1]] * (size - len(chunk))]


@cache
def _existing_keys_sqlite(count: int) -> str:
    values = ", ".join(["(?, ?)"] * count)
    return (
        f"SELECT o.idempotency_key FROM (VALUES {values}) AS k "
        "JOIN outbox o ON o.patient_id = k.column1 AND o.idempotency_key = k.column2"
    )
