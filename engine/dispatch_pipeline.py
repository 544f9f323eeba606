"""The dispatcher's pipeline: claim, submit, collect and record, batch after batch.

The next batch is claimed while the previous one's sends are in flight; completed sends
come back through a queue and are recorded together. On PostgreSQL the record
transactions run in a thread of their own (another connection), so their round trips
overlap the claims'; on SQLite, whose writers take turns anyway, in the claiming thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime

from sqlalchemy import Connection
from sqlalchemy.orm import Session, sessionmaker

from engine import audit
from engine import outbox_status as status
from engine.dispatch_claim import Claimed
from engine.dispatch_record import RecordContext, record_outcomes
from engine.dispatch_send import SendOutcome

log = logging.getLogger("engine.dispatch")

RECORD_CHUNK = 100  # completed sends recorded in one transaction at most
# Seconds a completed send waits at most for its record transaction. (0.2 s recorded more
# rows at once under a rate limit but cost PostgreSQL dispatch at full speed about 12%:
# 1,151-1,193 against 1,318-1,342 messages/s.)
RECORD_EVERY = 0.05
# Under a rate limit a record transaction waits for about this many completed sends, at
# most RECORD_EVERY_LIMITED seconds: at 50 messages/s, records every 0.05 s wrote two or
# three rows each, and their transactions were a sixth of the dispatcher's CPU.
RECORD_ROWS_LIMITED = 10
RECORD_EVERY_LIMITED = 0.2
RECORDS_QUEUED = 4  # record transactions waiting for the record thread at most


def record_window(rate: float | None) -> float:
    """Seconds a completed send waits at most for its record transaction: RECORD_EVERY,
    or under a rate limit the time RECORD_ROWS_LIMITED sends take (up to
    RECORD_EVERY_LIMITED). A STOP that finds one of the patient's texts started waits for
    its record (engine.dispatch_gate.wait_for_sends), so the window stays short."""
    if not rate:
        return RECORD_EVERY
    return min(RECORD_EVERY_LIMITED, max(RECORD_EVERY, RECORD_ROWS_LIMITED / rate))


@dataclass
class DispatchReport:
    """Counts for one or more batches (rows examined by the claim, and send results)."""

    claimed: int = 0
    blocked: int = 0
    deferred: int = 0
    expired: int = 0
    sent: int = 0
    failed: int = 0
    unknown: int = 0  # gave up after attempts without an answer: may have gone out
    opted_out: int = 0
    retried: int = 0
    released: int = 0
    withheld: int = 0  # refused by the send gate: an opt-out since the claim
    settled: int = 0  # looked up only: the earlier attempt did not go out; decided again
    claim_lost: int = 0
    stranded: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def examined(self) -> int:
        return self.claimed + self.blocked + self.deferred + self.expired

    def add(self, counts: Counter[str] | dict[str, int]) -> None:
        for key, value in counts.items():
            setattr(self, key, getattr(self, key) + value)

    def merge(self, other: DispatchReport) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def fields(self) -> dict[str, float]:
        out: dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class Flight:
    """One claimed batch whose sends are not all recorded yet."""

    report: DispatchReport
    ctx: RecordContext
    started: float
    left: int


class Pipeline:
    """Claims, submits and records for dispatch_until_idle: the calling thread claims and
    collects; sends complete on other threads and come back through a queue; records are
    written in this thread or, on PostgreSQL, in order by one record thread."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        submit: Callable[[list[Claimed]], list[Future[SendOutcome]]],
        worker_id: str,
        *,
        low_water: int,
        record_every: float = RECORD_EVERY,
    ) -> None:
        self.session_factory = session_factory
        self.submit = submit
        self.worker_id = worker_id
        self.low_water = low_water
        self.record_every = record_every
        self.done: queue.SimpleQueue[Future[SendOutcome]] = queue.SimpleQueue()
        self.flying: dict[Future[SendOutcome], Flight] = {}
        self.finished: list[tuple[Flight, SendOutcome | None]] = []
        self.waiting_since = 0.0  # when the oldest of `finished` completed
        self.launched = 0
        self.total = DispatchReport()
        self._total_lock = threading.Lock()
        self.records: deque[Future[None]] = deque()
        bind = session_factory.kw.get("bind")
        self.recorder = (
            ThreadPoolExecutor(1, thread_name_prefix="record")
            if getattr(getattr(bind, "dialect", None), "name", None) == "postgresql"
            else None
        )
        self._connection: Connection | None = None  # the record thread's own, kept

    def until_idle(
        self,
        *,
        claim: Callable[[datetime], tuple[list[Claimed], Counter[str]]],
        context: Callable[[datetime], RecordContext],
        clock: Callable[[], datetime],
        stop: threading.Event,
        max_batches: int | None,
        first: bool = False,
    ) -> DispatchReport:
        """Claim while there is work; `first`: claim once even when `stop` is set."""
        try:
            self._run(claim, context, clock, stop, max_batches, first)
        finally:  # what was sent is recorded, whatever went wrong meanwhile
            if self.recorder is not None:
                self.recorder.shutdown(wait=True)
            if self._connection is not None:
                self._connection.close()
        while self.records:
            self.records.popleft().result()
        return self.total

    def _run(
        self,
        claim: Callable[[datetime], tuple[list[Claimed], Counter[str]]],
        context: Callable[[datetime], RecordContext],
        clock: Callable[[], datetime],
        stop: threading.Event,
        max_batches: int | None,
        first: bool,
    ) -> None:
        claiming = True
        while claiming or self.flying or self.finished:
            if claiming and len(self.flying) <= self.low_water:
                stopping = stop.is_set() and not (first and self.launched == 0)
                if stopping or (max_batches is not None and self.launched >= max_batches):
                    claiming = False
                else:
                    now = clock()
                    claiming = self._launch(*claim(now), context(now))
                continue
            self._collect(self.waiting_since + self.record_every if self.finished else None)
            if self.finished and (
                len(self.finished) >= RECORD_CHUNK
                or not self.flying
                or time.perf_counter() - self.waiting_since >= self.record_every
            ):
                self._record()

    def _launch(self, claimed: list[Claimed], counts: Counter[str], ctx: RecordContext) -> bool:
        """Submit a claimed batch; False when the claim examined nothing (idle)."""
        report = DispatchReport(
            claimed=len(claimed),
            blocked=counts[status.BLOCKED],
            deferred=counts[status.DEFERRED],
            expired=counts[status.EXPIRED],
            batches=1,
        )
        self.launched += 1
        if not report.examined:
            with self._total_lock:
                self.total.merge(report)
            return False
        flight = Flight(report, ctx, time.perf_counter(), len(claimed))
        if not claimed:
            with self.session_factory.begin() as session:
                audit_batch(session, report, worker_id=self.worker_id, now=ctx.now)
            self._close(flight)
        for future in self.submit(claimed):
            self.flying[future] = flight
            future.add_done_callback(self.done.put)
        return True

    def _collect(self, deadline: float | None) -> None:
        """Wait for a send to complete (until `deadline`, a perf_counter time, at most),
        then take all done. With a record window longer than RECORD_EVERY (a rate limit,
        where a claim is due a second or more ahead), sleep through the window instead of
        waking for each completion."""
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        if timeout and self.record_every > RECORD_EVERY:
            time.sleep(timeout)
            timeout = 0.0
        try:
            future = self.done.get(timeout=timeout if self.flying else 0)
        except queue.Empty:
            return
        if not self.finished:
            self.waiting_since = time.perf_counter()
        while True:
            flight = self.flying.pop(future)
            error = future.exception()
            if error is None:
                self.finished.append((flight, future.result()))
            else:
                flight.report.stranded += 1
                self.finished.append((flight, None))
                log.error(
                    "dispatch.transport_crashed",
                    extra={"fields": {"worker": self.worker_id, "error": type(error).__name__}},
                )
            try:
                future = self.done.get_nowait()
            except queue.Empty:
                return

    def _record(self) -> None:
        """Record every finished send in one transaction, with the audit entries of the
        batches that are then complete."""
        finished, self.finished = self.finished, []
        by_flight: dict[int, tuple[Flight, list[SendOutcome]]] = {}
        for flight, outcome in finished:
            entry = by_flight.setdefault(id(flight), (flight, []))
            flight.left -= 1
            if outcome is not None:
                entry[1].append(outcome)
        complete = [flight for flight, _ in by_flight.values() if flight.left == 0]
        groups = list(by_flight.values())
        if self.recorder is None:
            self._write(groups, complete)
            return
        while self.records and (self.records[0].done() or len(self.records) >= RECORDS_QUEUED):
            self.records.popleft().result()  # raises what a record transaction raised
        self.records.append(self.recorder.submit(self._write, groups, complete))

    def _write(
        self, groups: list[tuple[Flight, list[SendOutcome]]], complete: list[Flight]
    ) -> None:
        with self._session() as session:
            try:
                with session.begin():
                    for flight, outcomes in groups:
                        if outcomes:
                            counts = record_outcomes(
                                session=session, outcomes=outcomes, ctx=flight.ctx
                            )
                            flight.report.add(counts)
                    for flight in complete:
                        audit_batch(
                            session, flight.report, worker_id=self.worker_id, now=flight.ctx.now
                        )
            except BaseException:
                self._drop_connection()
                raise
        for flight in complete:
            self._close(flight)

    def _session(self) -> Session:
        """A session for one record transaction. In the record thread, on a connection of
        its own kept between transactions (no pool checkout, and no ping, per record)."""
        if self.recorder is None:
            return self.session_factory()
        if self._connection is None:
            self._connection = self.session_factory.kw["bind"].connect()
        return self.session_factory(bind=self._connection)

    def _drop_connection(self) -> None:
        """After an error the kept connection may be broken: the next record takes a new one."""
        if self._connection is not None:
            self._connection.invalidate()
            self._connection.close()
            self._connection = None

    def _close(self, flight: Flight) -> None:
        flight.report.seconds = time.perf_counter() - flight.started
        with self._total_lock:
            self.total.merge(flight.report)
        log.info("dispatch.batch", extra={"fields": {"worker": self.worker_id,
                                                     **flight.report.fields()}})  # fmt: skip


def audit_batch(session: Session, report: DispatchReport, *, worker_id: str, now: datetime) -> None:
    """One audit entry per batch with its counts by final status, not one per message: the
    chain's head row would otherwise serialize the senders."""
    counts = {k: v for k, v in report.fields().items() if k not in ("batches", "seconds")}
    audit.record(
        session=session,
        actor=f"worker:{worker_id}",
        action="dispatch_batch",
        now=now,
        details={k: int(v) for k, v in counts.items()},
    )
