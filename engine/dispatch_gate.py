"""The last check before a text leaves: a claimed row is marked started, guarded, just
before its provider call, and only a row so marked is sent.

Between the claim (which decided with the consent of that moment) and the provider call a
row can wait: for a concurrency slot, for the rate limit, behind the rest of its batch. An
opt-out acknowledged in that gap must win. So the sender asks the gate first, and the gate
sets `send_started_at` in one UPDATE that holds only while

- the row is still `sending` under this very claim (worker and claim time), not started;
- the patient is not erased;
- unless it is a program reply (the STOP confirmation itself, HELP, START): the number is
  not suppressed, and no revocation of the row's purpose was recorded since shortly
  before the claim (REVOCATION_MARGIN covers clocks that differ between hosts).

The STOP handler (engine.inbound) runs the mirror image in its transaction: it cancels
the patient's rows that are waiting or `sending` but not started (`withdrawable`). Both
statements lock the row, so one of them wins cleanly: either the STOP cancels the row and
the gate refuses it, or the send started first and the STOP, after committing, waits for
it to finish (`wait_for_sends`) before it answers. No text that was not already on its
way to the provider when the STOP was acknowledged goes out after it.

Requests for one row each are grouped: a thread of the gate's own writes every request
waiting at that moment in one transaction, so the gate costs a round trip per group, not
per message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, bindparam, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from engine import failpoints
from engine import outbox_status as status
from engine.dispatch_claim import PROGRAM_CAMPAIGN, Claimed
from engine.store import models as m
from engine.store.queries import among

log = logging.getLogger("engine.dispatch")

REVOCATION_MARGIN = timedelta(seconds=60)
GATE_BATCH = 500  # rows marked in one transaction at most
IN_FLIGHT_WAIT = 5.0  # seconds an opt-out waits at most for sends already started
IN_FLIGHT_POLL = 0.01


def withdrawable() -> ColumnElement[bool]:
    """Rows an opt-out or an erasure can still stop: waiting, or claimed but not started.

    Not a row whose earlier attempt got no answer (`unsettled_since`): that text may have
    gone out, so the row is left for the dispatcher, which never sends it again before
    asking the provider, and then records it sent, or blocked by the opt-out."""
    o = m.Outbox
    claimed_only = (o.status == status.SENDING) & o.send_started_at.is_(None)
    return (o.status.in_(sorted(status.WAITING)) | claimed_only) & o.unsettled_since.is_(None)


@cache
def _start_statement(postgres: bool) -> Any:
    """start_sends' UPDATE, built once per dialect (bound: ids, worker, claim, since,
    now); the ids as one array on PostgreSQL (queries.among)."""
    o, p, s, e = m.Outbox, m.Patient, m.Suppression, m.ConsentEvent
    erased = exists().where(p.id == o.patient_id, p.erased_at.is_not(None))
    suppressed = exists().where(p.id == o.patient_id, s.phone_index == p.phone_index)
    revoked = exists().where(
        e.patient_id == o.patient_id,
        e.purpose == o.purpose,
        e.status == "revoked",
        e.recorded_at > bindparam("since", type_=m.UTCDateTime()),
    )
    return (
        update(o)
        .where(among(o.id, "ids") if postgres else o.id.in_(bindparam("ids", expanding=True)))
        .where(o.status == status.SENDING)
        .where(o.claimed_by == bindparam("worker"))
        .where(o.claimed_at == bindparam("claim", type_=m.UTCDateTime()))
        .where(o.send_started_at.is_(None), ~erased)
        .where((o.campaign_id == PROGRAM_CAMPAIGN) | (~suppressed & ~revoked))
        .values(send_started_at=bindparam("now", type_=m.UTCDateTime()))
        .returning(o.id)
    )


def start_sends(
    *,
    session: Session | Connection,
    worker_id: str,
    claimed_at: datetime,
    outbox_ids: Collection[int],
    now: datetime,
) -> set[int]:
    """Mark these rows of one claim started where they still may go (see the module
    doc); the ids marked. Only those may be handed to the provider."""
    params = {
        "ids": sorted(outbox_ids),
        "worker": worker_id,
        "claim": claimed_at,
        "since": claimed_at - REVOCATION_MARGIN,
        "now": now,
    }
    connection = session.connection() if isinstance(session, Session) else session
    statement = _start_statement(connection.dialect.name == "postgresql")
    return set(connection.execute(statement, params).scalars())


class _Waiters:
    """The senders waiting for the gate's answer: concurrent futures (threads) and, per
    event loop, asyncio futures, answered with one wake-up of each loop."""

    def __init__(self) -> None:
        self.threads: list[Future[set[int]]] = []
        self.loops: dict[asyncio.AbstractEventLoop, list[asyncio.Future[set[int]]]]
        self.loops = defaultdict(list)

    def add(self, waiter: Future[set[int]] | asyncio.Future[set[int]]) -> None:
        if isinstance(waiter, asyncio.Future):
            self.loops[waiter.get_loop()].append(waiter)
        else:
            self.threads.append(waiter)

    def answer(self, started: set[int] | GateUnavailable) -> None:
        """The ids marked started, or the error that kept the gate from marking any."""
        for future in self.threads:
            if future.done():
                continue
            if isinstance(started, GateUnavailable):
                future.set_exception(started)
            else:
                future.set_result(started)
        for loop, waiting in self.loops.items():
            try:
                loop.call_soon_threadsafe(_resolve, waiting, started)
            except RuntimeError:  # the loop has closed: its senders are gone, none sent
                log.warning("dispatch.gate_loop_closed", extra={"fields": {"rows": len(waiting)}})


def _answer_all(batch: Sequence[tuple[list[Claimed], Any]], error: GateUnavailable) -> None:
    waiters = _Waiters()
    for _rows, waiter in batch:
        waiters.add(waiter)
    waiters.answer(error)


def _resolve(futures: list[asyncio.Future[set[int]]], started: set[int] | GateUnavailable) -> None:
    for future in futures:
        if future.done():  # its sender may have been cancelled meanwhile
            continue
        if isinstance(started, GateUnavailable):
            future.set_exception(started)
        else:
            future.set_result(started)


class GateUnavailable(Exception):
    """The marks could not be written (the database is unreachable): nothing may be sent;
    the rows are released, or, if that cannot be recorded either, reconciled later as
    never started."""


class SendGate:
    """Asks start_sends about rows before their provider call, grouping the requests of
    concurrent senders into one statement per claim (thread-safe; `admit` blocks its
    thread, `admit_group_async` its coroutine)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        worker_id: str,
        clock: Callable[[], datetime],
    ) -> None:
        bind = session_factory.kw["bind"]
        # PostgreSQL: each UPDATE commits by itself, one round trip instead of three (a
        # row's mark stands alone). SQLite: an IMMEDIATE transaction, as every writer.
        if bind.dialect.name == "postgresql":
            bind = bind.execution_options(isolation_level="AUTOCOMMIT")
        self.bind: Engine = bind
        self.worker_id = worker_id
        self.clock = clock
        self._pending: list[tuple[list[Claimed], Any]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.statements = 0

    def admit(self, claimed: Claimed) -> bool:
        """True when the row is marked started (send it now); False when it may not go.
        Raises GateUnavailable when the mark could not be written."""
        future: Future[set[int]] = Future()
        if not self._ask([claimed], future):
            return False
        return claimed.outbox_id in future.result()

    async def admit_group_async(self, rows: list[Claimed]) -> set[int]:
        """The ids of `rows` marked started, for a coroutine on the running loop (raises
        GateUnavailable as `admit` does)."""
        future: asyncio.Future[set[int]] = asyncio.get_running_loop().create_future()
        if not self._ask(rows, future):
            return set()
        return await future

    def _ask(self, rows: list[Claimed], waiter: Any) -> bool:
        with self._wake:
            if self._closed:
                return False
            self._pending.append((rows, waiter))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="send-gate", daemon=True)
                self._thread.start()
            self._wake.notify()
        return True

    def close(self) -> None:
        """Answer what is pending, then stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        connection: Connection | None = None  # the gate's own, kept between groups
        batch: list[tuple[list[Claimed], Any]] = []
        try:
            while True:
                with self._wake:
                    while not self._pending and not self._closed:
                        self._wake.wait()
                    if not self._pending:
                        return
                    batch, size = [], 0
                    while self._pending and size < GATE_BATCH:
                        batch.append(self._pending.pop(0))
                        size += len(batch[-1][0])
                connection = self._flush(batch, connection)
                batch = []
        except BaseException:
            log.critical("dispatch.gate_thread_failed", exc_info=True)
            raise
        finally:
            # Whatever ended the thread, no sender is left waiting: what it held and what
            # is still queued are answered "unavailable" (nothing marked, nothing sent),
            # and the next ask starts a new thread.
            with self._wake:
                orphans, self._pending = batch + self._pending, []
                self._thread = None
            _answer_all(orphans, GateUnavailable("send gate: its thread ended"))
            if connection is not None:
                connection.close()

    def _flush(
        self, batch: Sequence[tuple[list[Claimed], Any]], connection: Connection | None
    ) -> Connection | None:
        """Mark and answer one group; the connection to use for the next (None after an
        error: a fresh one is taken then)."""
        claims: dict[datetime, list[int]] = defaultdict(list)
        waiters = _Waiters()
        for rows, waiter in batch:
            for claimed in rows:
                claims[claimed.claimed_at].append(claimed.outbox_id)
            waiters.add(waiter)
        marked: set[int] = set()
        started: set[int] | GateUnavailable = marked
        try:
            now = self.clock()
            failpoints.hit("gate.before_mark")
            connection = connection or self.bind.connect()
            with connection.begin():
                for claimed_at, ids in claims.items():
                    marked |= start_sends(
                        session=connection,
                        worker_id=self.worker_id,
                        claimed_at=claimed_at,
                        outbox_ids=ids,
                        now=now,
                    )
                    self.statements += 1
        except Exception as exc:  # nothing marked: nothing sent (the rows are released)
            log.error(
                "dispatch.gate_failed",
                extra={"fields": {"worker": self.worker_id, "rows": len(batch),
                                  "error": type(exc).__name__}},
                exc_info=True,
            )  # fmt: skip
            started = GateUnavailable(f"send gate: {type(exc).__name__}")
            if connection is not None:
                connection.invalidate()
                connection.close()
            connection = None
        failpoints.hit("gate.after_mark")
        waiters.answer(started)
        return connection


def sends_in_flight(*, session: Session, patient_ids: Collection[int]) -> int:
    """The patients' rows claimed and not yet settled, program replies aside."""
    o = m.Outbox
    stmt = select(func.count()).where(
        o.patient_id.in_(sorted(patient_ids)),
        o.status == status.SENDING,
        o.campaign_id != PROGRAM_CAMPAIGN,
    )
    return int(session.scalar(stmt) or 0)


def wait_for_sends(
    *,
    session_factory: sessionmaker[Session],
    patient_ids: Collection[int],
    timeout: float = IN_FLIGHT_WAIT,
) -> int:
    """After an opt-out committed: wait until none of these patients' texts is still
    between claim and result (sends that had started go out; the rest are refused by the
    gate and go back to be decided again). Returns how many were still unsettled when
    `timeout` ran out (a worker that died mid-send; reconciliation settles those)."""
    if not patient_ids:
        return 0
    deadline = time.monotonic() + timeout
    while True:
        with session_factory() as session:
            left = sends_in_flight(session=session, patient_ids=patient_ids)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(IN_FLIGHT_POLL)
