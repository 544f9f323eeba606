"""The edges wired together for one process: database, keys, active definitions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property

import click
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from engine.crypto import KeyConfigError, Keyring, load_keys
from engine.definitions import DefinitionSet
from engine.settings import Settings
from engine.store import db
from engine.store.defqueries import active_definitions, active_version


class UsageProblem(click.ClickException):
    """A request the user can fix: unknown id, missing setup. Exit status 2."""

    exit_code = 2


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Loaded:
    """The active set, its version, and when (monotonic seconds) that version was last read
    from the database; swapped as one object, so readers never see a set with another
    version."""

    version: str
    defs: DefinitionSet
    checked: float


@dataclass
class Runtime:
    settings: Settings
    # False for the web server: no `SELECT 1` at each pool checkout (engine.store.db).
    ping_on_checkout: bool = True
    monotonic: Callable[[], float] = time.monotonic
    _loaded: _Loaded | None = field(default=None, init=False)
    _defs_lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    @cached_property
    def engine(self) -> Engine:
        if self.settings.database_url.startswith("sqlite:///"):
            self.settings.var_dir.mkdir(parents=True, exist_ok=True)
        return db.make_engine(self.settings.database_url, ping=self.ping_on_checkout)

    @cached_property
    def session_factory(self) -> sessionmaker[Session]:
        return db.make_session_factory(self.engine)

    @cached_property
    def write_sessions(self) -> sessionmaker[Session]:
        """Sessions for short read-then-write requests (webhooks, bookings): on SQLite they
        begin IMMEDIATE, so concurrent requests queue for the write lock instead of failing
        to upgrade a read transaction; on PostgreSQL the same as `session_factory`."""
        if self.engine.dialect.name != "sqlite":
            return self.session_factory
        engine = db.make_engine(
            self.settings.database_url, sqlite_immediate=True, ping=self.ping_on_checkout
        )
        return db.make_session_factory(engine)

    @cached_property
    def keyring(self) -> Keyring:
        try:
            return load_keys(self.settings)
        except KeyConfigError as exc:
            raise UsageProblem(f"{exc} (run `engage init` to create keys)") from exc

    def require_schema(self) -> None:
        if db.current_revision(self.engine) is None:
            raise UsageProblem("the database has no schema yet: run `engage init`")

    def definitions(self, session: Session, *, max_age: float = 0.0) -> DefinitionSet:
        """The active set stored by the last `engage sync`, reloaded (in a long-running
        server too) as soon as another set becomes active.

        With `max_age` (seconds), the active version is read from the database only when
        it was last read more than `max_age` ago: a set activated (committed) at time T is
        used by every call from T + `max_age` on, and a call never uses a set that stopped
        being active more than `max_age` before it. Without, every call reads it.
        """
        loaded = self._loaded
        if loaded is None:
            self.require_schema()
        elif max_age > 0 and self.monotonic() - loaded.checked < max_age:
            return loaded.defs
        checked = self.monotonic()  # before the read: the age counts from the question
        version = active_version(session=session)  # one indexed row, no lock held
        if version is None:
            raise UsageProblem("no definitions are active: run `engage sync`")
        with self._defs_lock:  # held only to swap, and to load a new set (one thread compiles)
            loaded = self._loaded
            if loaded is not None and loaded.checked > checked:
                return loaded.defs  # another thread read the version after this one did
            if loaded is None or loaded.version != version:
                defs = active_definitions(session=session)
                if defs is None:
                    raise UsageProblem("no definitions are active: run `engage sync`")
                loaded = _Loaded(version, defs, checked)
            self._loaded = _Loaded(version, loaded.defs, checked)
            return loaded.defs
