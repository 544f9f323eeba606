"""Column types shared by the models and the queries that bind values of them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Dialect, TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """An aware datetime stored as UTC and always read back aware in UTC.

    SQLite has no time zone type and returns naive values; PostgreSQL returns the
    session's zone. Naive datetimes are refused on write: they are always a bug here.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given for a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is UTC:  # PostgreSQL's, in a UTC session (db.py)
            return value
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any] | None:
        """On SQLite, the stored text straight to an aware datetime in one C call: the
        generic path (SQLAlchemy's parser, then `replace(tzinfo=UTC)`) costs about 1 µs
        per value read, five times as much, on every datetime every query reads."""
        generic = super().result_processor(dialect, coltype)
        if dialect.name != "sqlite" or generic is None:
            return generic

        def process(value: Any) -> datetime | None:
            if value is None:
                return None
            if isinstance(value, str) and len(value) in _SQLITE_FORMS:
                return _parse(value + "+00:00")
            return generic(value)  # anything else: as SQLAlchemy reads it (or refuses it)

        return process


_parse = datetime.fromisoformat
_SQLITE_FORMS = (19, 26)  # "YYYY-MM-DD HH:MM:SS" (CURRENT_TIMESTAMP) and ".ffffff" (SQLAlchemy)


def utcnow() -> datetime:
    return datetime.now(UTC)
