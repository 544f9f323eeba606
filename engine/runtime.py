"""The edges wired together for one process: database, keys, active definitions."""

from __future__ import annotations

import threading
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


@dataclass
class Runtime:
    settings: Settings
    # (version, set), swapped as one object: readers never see a set with another version.
    _loaded: tuple[str, DefinitionSet] | None = field(default=None, init=False)
    _defs_lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    @cached_property
    def engine(self) -> Engine:
        if self.settings.database_url.startswith("sqlite:///"):
            self.settings.var_dir.mkdir(parents=True, exist_ok=True)
        return db.make_engine(self.settings.database_url)

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
        engine = db.make_engine(self.settings.database_url, sqlite_immediate=True)
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

    def definitions(self, session: Session) -> DefinitionSet:
        """The active set stored by the last `engage sync`, reloaded (in a long-running
        server too) as soon as another set becomes active."""
        loaded = self._loaded
        if loaded is None:
            self.require_schema()
        version = active_version(session=session)  # one indexed row, no lock held
        if version is None:
            raise UsageProblem("no definitions are active: run `engage sync`")
        if loaded is not None and loaded[0] == version:
            return loaded[1]
        with self._defs_lock:  # only to load: one thread compiles, the others reuse it
            loaded = self._loaded
            if loaded is None or loaded[0] != version:
                defs = active_definitions(session=session)
                if defs is None:
                    raise UsageProblem("no definitions are active: run `engage sync`")
                loaded = (version, defs)
                self._loaded = loaded
            return loaded[1]
