"""Fixtures for the dispatcher and worker tests (imported by those modules): the sandbox
with a chosen latency, the twilio transport pointed at it, sessions whose
SQLite transactions begin IMMEDIATE, active and approved definitions, and `ob`, which
seeds outbox rows and dispatches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session, sessionmaker

from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.dispatcher import DispatchReport, dispatch_batch
from engine.sandbox.config import FaultConfig
from engine.settings import Settings
from engine.store import models as m
from engine.store.db import make_engine, make_session_factory
from engine.transports.twilio import TwilioTransport
from engine.transports.twilio_async import AsyncTwilioTransport
from tests.integration import outbox_builders as b
from tests.integration.conftest import SandboxHandle


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def latency() -> tuple[float, float]:
    """Milliseconds the sandbox takes per request (min, max); override by parametrizing."""
    return (0.0, 0.0)


@pytest.fixture
def sandbox(
    sandbox_factory: Callable[..., SandboxHandle], latency: tuple[float, float]
) -> SandboxHandle:
    """conftest's sandbox, answering after `latency`; a `timeout` fault hangs for 3 s."""
    faults = FaultConfig(latency_ms=latency)
    return sandbox_factory(faults=faults, hang_seconds=3.0, delivered_delay_ms=0)


@pytest.fixture(params=["threaded", "async"])
def transport(
    request: pytest.FixtureRequest, settings: Settings, sandbox: SandboxHandle
) -> Iterator[TwilioTransport | AsyncTwilioTransport]:
    """The twilio SDK against the sandbox, on its blocking client (the dispatcher sends from
    a thread pool) and on its async one (coroutines); it gives up waiting for an answer
    after 2 s (an answer from a sandbox sharing the cores with another test's processes
    can take over 0.5 s)."""
    kind = TwilioTransport if request.param == "threaded" else AsyncTwilioTransport
    t = kind(sandbox.settings_for(settings), read_timeout=2.0)
    yield t
    t.close()


@pytest.fixture
def sf(engine: Engine, db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions whose SQLite transactions begin IMMEDIATE, as the dispatcher requires."""
    dispatch_engine = make_engine(db_url, sqlite_immediate=True)
    yield make_session_factory(dispatch_engine)
    dispatch_engine.dispose()


@pytest.fixture
def defs(sf: sessionmaker[Session], now: datetime) -> DefinitionSet:
    d = b.definitions()
    with sf.begin() as session:
        b.setup_definitions(session, d, now)
    return d


class Outbox:
    """Seeds patients and rows, dispatches, and reads rows back, for one test."""

    def __init__(
        self,
        sf: sessionmaker[Session],
        keyring: Keyring,
        defs: DefinitionSet,
        transport: Any,
        now: datetime,
    ) -> None:
        self.sf, self.keyring, self.defs, self.transport, self.now = (
            sf,
            keyring,
            defs,
            transport,
            now,
        )
        self.zone = b.midday_zone(now)
        self._patients = 0

    def rows(
        self,
        phones: list[str],
        *,
        per_patient: int = 1,
        legal_basis: str = "written",
        **row_args: Any,
    ) -> list[int]:
        """Patients with these phones, each with `per_patient` queued rows due a minute ago."""
        prefix = f"T{self._patients}-"
        self._patients += len(phones)
        row_args.setdefault("send_at", self.now - timedelta(minutes=1))
        row_args.setdefault("expires_at", self.now + timedelta(hours=10))
        with self.sf.begin() as session:
            pids = b.add_patients(
                session,
                self.keyring,
                phones,
                legal_basis=legal_basis,
                timezone=self.zone,
                prefix=prefix,
                granted_at=self.now - timedelta(days=30),
            )
            items = [
                (pid, b.body_text(i * 100 + n))
                for i, pid in enumerate(pids)
                for n in range(per_patient)
            ]
            return b.add_rows(session, self.keyring, items, key_prefix=prefix, **row_args)

    def dispatch(self, at: datetime | None = None, **kwargs: Any) -> DispatchReport:
        return dispatch_batch(
            session_factory=self.sf,
            keyring=self.keyring,
            defs=self.defs,
            transport=kwargs.pop("transport", self.transport),
            worker_id="w1",
            now=at or self.now,
            **kwargs,
        )

    def get(self, outbox_id: int) -> m.Outbox:
        return b.outbox(self.sf, [outbox_id])[0]

    def set(self, outbox_id: int, **values: Any) -> None:
        with self.sf.begin() as session:
            session.execute(update(m.Outbox).where(m.Outbox.id == outbox_id).values(**values))


@pytest.fixture
def ob(
    sf: sessionmaker[Session], keyring: Keyring, defs: DefinitionSet, transport: Any, now: datetime
) -> Outbox:
    return Outbox(sf, keyring, defs, transport, now)


def phone(n: int) -> str:
    return f"+1212555{n:04d}"
