"""No text after an acknowledged STOP, as a property: hypothesis interleaves planning,
claims by several workers, gate checks, provider calls and records with STOP and START
from the patients, on SQLite and PostgreSQL, against the sandbox over real HTTP.

A STOP is acknowledged when its transaction has committed and none of the patient's texts
is between claim and result any more (what the webhook waits for before it answers). From
then until a START, the sandbox may receive nothing for that number but the confirmation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as s
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from engine import outbox_status as st
from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.dispatch_claim import Claimed, claim_due
from engine.dispatch_gate import sends_in_flight, start_sends
from engine.dispatch_record import RecordContext, record_outcomes
from engine.dispatch_send import SendOutcome
from engine.inbound import InboundSms, handle_inbound
from engine.settings import Settings
from engine.store import models as m
from engine.transports.base import OutboundMessage, ProviderError
from engine.transports.twilio import TwilioTransport
from tests.integration import dispatch_fixtures as fx
from tests.integration import outbox_builders as b
from tests.integration.conftest import SandboxHandle

now, latency, sandbox, sf, defs = fx.now, fx.latency, fx.sandbox, fx.sf, fx.defs

PATIENTS = 3
WORKERS = ("w1", "w2")
_numbers = itertools.count(1)


@dataclass(frozen=True)
class Env:
    """What one test run's machines share: the database, keys, definitions and sandbox."""

    sf: sessionmaker[Session]
    keyring: Keyring
    defs: DefinitionSet
    transport: TwilioTransport
    sandbox: SandboxHandle
    start: datetime


class StopRace(RuleBasedStateMachine):
    env: ClassVar[Env]

    def __init__(self) -> None:
        super().__init__()
        self.phones = [f"+1646555{next(_numbers):04d}" for _ in range(PATIENTS)]
        with self.env.sf.begin() as session:
            self.pids = b.add_patients(
                session, self.env.keyring, self.phones, timezone=b.midday_zone(self.env.start),
                prefix=f"R{self.phones[0][-4:]}-", granted_at=self.env.start - timedelta(days=30),
            )  # fmt: skip
        self.ticks = itertools.count(1)
        self.claimed: dict[str, list[Claimed]] = {w: [] for w in WORKERS}
        self.done: dict[str, list[SendOutcome]] = {w: [] for w in WORKERS}
        self.stopping: set[int] = set()  # STOP committed, not yet acknowledged
        self.acked: dict[int, int] = {}  # patient index -> messages seen at the ack

    def clock(self) -> datetime:  # every claim gets a time of its own
        return self.env.start + timedelta(microseconds=next(self.ticks))

    @rule(patient=s.integers(0, PATIENTS - 1), count=s.integers(1, 2))
    def plan(self, patient: int, count: int) -> None:
        with self.env.sf.begin() as session:
            items = [(self.pids[patient], b.body_text(n)) for n in range(count)]
            b.add_rows(session, self.env.keyring, items, key_prefix=f"r{next(self.ticks)}",
                       send_at=self.env.start - timedelta(minutes=1),
                       expires_at=self.env.start + timedelta(hours=10))  # fmt: skip

    @rule(worker=s.sampled_from(WORKERS), limit=s.integers(1, 4))
    def claim(self, worker: str, limit: int) -> None:
        with self.env.sf.begin() as session:
            claimed, _ = claim_due(session=session, keyring=self.env.keyring, defs=self.env.defs,
                                   worker_id=worker, now=self.clock(), limit=limit)  # fmt: skip
        self.claimed[worker].extend(claimed)

    @rule(worker=s.sampled_from(WORKERS), pick=s.integers(0, 7))
    def send(self, worker: str, pick: int) -> None:
        """The gate, then (if it admits the row) the provider call."""
        if not self.claimed[worker]:
            return
        row = self.claimed[worker].pop(pick % len(self.claimed[worker]))
        with self.env.sf.begin() as session:
            admitted = start_sends(session=session, worker_id=worker,
                                   claimed_at=row.claimed_at, outbox_ids=[row.outbox_id],
                                   now=row.claimed_at)  # fmt: skip
        if not admitted:
            self.done[worker].append(SendOutcome(row, withheld=True))
            return
        message = OutboundMessage(row.to, row.body, str(row.outbox_id))
        try:
            self.done[worker].append(SendOutcome(row, result=self.env.transport.send(message)))
        except ProviderError as exc:
            self.done[worker].append(SendOutcome(row, error=exc))

    @rule(worker=s.sampled_from(WORKERS))
    def record(self, worker: str) -> None:
        outcomes, self.done[worker] = self.done[worker], []
        if outcomes:
            ctx = RecordContext(worker, self.clock(), self.env.defs, self.env.keyring)
            with self.env.sf.begin() as session:
                record_outcomes(session=session, outcomes=outcomes, ctx=ctx)

    @rule(patient=s.integers(0, PATIENTS - 1), keyword=s.sampled_from(["STOP", "START"]))
    def text(self, patient: int, keyword: str) -> None:
        message = InboundSms(f"SM{next(_numbers):032d}", self.phones[patient],
                             "+15005550006", keyword)  # fmt: skip
        with self.env.sf.begin() as session:
            handle_inbound(
                session=session,
                keyring=self.env.keyring,
                defs=self.env.defs,
                message=message,
                now=self.clock(),
            )
        if keyword == "STOP":
            if patient not in self.acked:
                self.stopping.add(patient)
        else:
            self.stopping.discard(patient)
            self.acked.pop(patient, None)

    @invariant()
    def acknowledge(self) -> None:
        """A STOP is answered once none of the patient's texts is in flight."""
        for patient in sorted(self.stopping):
            with self.env.sf() as session:
                busy = sends_in_flight(session=session, patient_ids=[self.pids[patient]])
            if not busy:
                self.stopping.discard(patient)
                self.acked[patient] = len(self.env.sandbox.messages(to=self.phones[patient]))

    @invariant()
    def nothing_after_an_acknowledged_stop(self) -> None:
        confirmation = self.env.defs.program.text("stop", "en")
        for patient, seen in self.acked.items():
            later = self.env.sandbox.messages(to=self.phones[patient])[seen:]
            assert all(msg["body"] == confirmation for msg in later), later

    def teardown(self) -> None:  # leave no due row to the next example's claims
        with self.env.sf.begin() as session:
            session.execute(
                update(m.Outbox)
                .where(m.Outbox.patient_id.in_(self.pids))
                .values(status=st.CANCELLED)
            )


def test_no_text_reaches_a_patient_after_their_stop_is_acknowledged(
    sf: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    sandbox: SandboxHandle,
    settings: Settings,
    now: datetime,
) -> None:
    transport = TwilioTransport(sandbox.settings_for(settings), read_timeout=2.0)
    try:
        StopRace.env = Env(sf, keyring, defs, transport, sandbox, now)
        run_state_machine_as_test(StopRace, settings=_SETTINGS)
    finally:
        transport.close()


_SETTINGS: Any = hypothesis_settings(
    max_examples=30,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
