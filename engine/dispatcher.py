"""Dispatch: claim due outbox rows, decide them again, send them, record what happened.

One batch (`dispatch_batch`) is three steps:

1. Claim, in one transaction (engine.dispatch_claim). PostgreSQL: the due rows (queued or
   deferred, send_at <= now, campaign not paused) are locked `FOR UPDATE SKIP LOCKED`, so
   concurrent workers take disjoint rows. SQLite: the engine must be made with
   `sqlite_immediate=True`; the claim is then a BEGIN IMMEDIATE writer transaction and
   claimers take turns. In the same transaction each row is decided again with current
   consent, suppressions, history, approvals and time; denied rows become blocked,
   deferred ones get their new send_at (or expire), and allowed ones become `sending`
   with claimed_by/claimed_at. The transaction commits before any provider call.

2. Send, outside any transaction, in a thread pool, under a per-sender rate limit
   (engine.dispatch_send).

3. Record, in short transactions as sends complete (engine.dispatch_record).

Frequency caps under concurrency. Before reading history, the claim locks the batch's
patients (`SELECT ... FOR NO KEY UPDATE`, ordered by id; on SQLite the writer lock does
this). Two workers deciding for one patient therefore take turns; the first commits its
`sending` rows, which count in history from their claim time (histories_for), so the
second sees them. Within a batch, each message allowed is added to the patient's history
before the next row of that patient is decided. No cap is ever exceeded by concurrency;
a message that then fails only makes the others wait longer (caps err on the safe side).

At most once at the provider boundary. A row is `sending` (committed) before the call.
A retry after an unclear failure first asks the provider whether the earlier attempt went
out. A row left `sending` by a dead worker is settled by `reconcile_stale`
(engine.dispatch_reconcile): sent when the provider holds it, queued when the provider
confirms it holds nothing, else `unknown` with the reason. Nothing is blindly resent.

Paused campaigns' rows are not claimed, and not cancelled: they wait for the resume.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, fields
from datetime import datetime

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from engine import audit
from engine import outbox_status as status
from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.dispatch_claim import Claimed, claim_due
from engine.dispatch_reconcile import ReconcileReport, reconcile_stale
from engine.dispatch_record import DEFAULT_MAX_ATTEMPTS, RecordContext, record_outcomes
from engine.dispatch_send import RateLimiter, SendOutcome, send_claimed
from engine.transports.base import Transport

__all__ = [
    "DispatchReport",
    "RateLimiter",
    "ReconcileReport",
    "dispatch_batch",
    "dispatch_until_idle",
    "reconcile_stale",
]

log = logging.getLogger("engine.dispatch")

CLAIM_TRIES = 3
DEFAULT_BATCH = 100
DEFAULT_CONCURRENCY = 16


@dataclass
class DispatchReport:
    """Counts for one or more batches (rows examined by the claim, and send results)."""

    claimed: int = 0
    blocked: int = 0
    deferred: int = 0
    expired: int = 0
    sent: int = 0
    failed: int = 0
    opted_out: int = 0
    retried: int = 0
    released: int = 0
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


def dispatch_batch(
    *,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    transport: Transport,
    worker_id: str,
    now: datetime,
    limit: int = DEFAULT_BATCH,
    concurrency: int = DEFAULT_CONCURRENCY,
    limiter: RateLimiter | None = None,
    stop: threading.Event | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    rng: random.Random | None = None,
) -> DispatchReport:
    """Claim up to `limit` due rows, send the allowed ones, record every result."""
    started = time.perf_counter()
    claimed, counts = _claim(
        session_factory, keyring=keyring, defs=defs, worker_id=worker_id, now=now, limit=limit
    )
    report = DispatchReport(
        claimed=len(claimed),
        blocked=counts[status.BLOCKED],
        deferred=counts[status.DEFERRED],
        expired=counts[status.EXPIRED],
        batches=1,
    )
    if claimed:
        ctx = RecordContext(worker_id, now, defs, keyring, max_attempts, rng)
        _send_and_record(
            claimed,
            transport=transport,
            limiter=limiter or RateLimiter(None),
            stop=stop or threading.Event(),
            concurrency=concurrency,
            session_factory=session_factory,
            ctx=ctx,
            report=report,
        )
    if report.examined:
        _audit_batch(session_factory, report, worker_id=worker_id, now=now)
    report.seconds = time.perf_counter() - started
    if report.examined:
        log.info("dispatch.batch", extra={"fields": {"worker": worker_id, **report.fields()}})
    return report


def _audit_batch(
    session_factory: sessionmaker[Session], report: DispatchReport, *, worker_id: str, now: datetime
) -> None:
    """One audit entry per batch with its counts by final status, not one per message: the
    chain's head row would otherwise serialize the senders."""
    counts = {k: v for k, v in report.fields().items() if k not in ("batches", "seconds")}
    with session_factory.begin() as session:
        audit.record(
            session=session,
            actor=f"worker:{worker_id}",
            action="dispatch_batch",
            now=now,
            details={k: int(v) for k, v in counts.items()},
        )


def dispatch_until_idle(
    *,
    clock: Callable[[], datetime],
    stop: threading.Event | None = None,
    max_batches: int | None = None,
    **kwargs: object,
) -> DispatchReport:
    """Run batches (each at `clock()`) until one finds no due row, or `stop` is set."""
    total = DispatchReport()
    stop = stop or threading.Event()
    while not stop.is_set() and (max_batches is None or total.batches < max_batches):
        report = dispatch_batch(now=clock(), stop=stop, **kwargs)  # type: ignore[arg-type]
        total.merge(report)
        if report.examined == 0:
            break
    return total


def _claim(
    session_factory: sessionmaker[Session], **kwargs: object
) -> tuple[list[Claimed], Counter[str]]:
    """The claim transaction, tried again when PostgreSQL breaks a deadlock with another
    writer (e.g. an inbound STOP cancelling the same rows) or SQLite stays locked."""
    for attempt in range(1, CLAIM_TRIES + 1):
        try:
            with session_factory.begin() as session:
                return claim_due(session=session, **kwargs)  # type: ignore[arg-type]
        except OperationalError as exc:
            if attempt == CLAIM_TRIES:
                raise
            log.warning(
                "dispatch.claim_retry",
                extra={"fields": {"attempt": attempt, "error": type(exc.orig).__name__}},
            )
    raise AssertionError("unreachable")


def _send_and_record(
    claimed: list[Claimed],
    *,
    transport: Transport,
    limiter: RateLimiter,
    stop: threading.Event,
    concurrency: int,
    session_factory: sessionmaker[Session],
    ctx: RecordContext,
    report: DispatchReport,
) -> None:
    """Send in a pool; record whatever has completed each time something completes.

    A transport that raises anything but ProviderError leaves its row `sending`: whether
    the text went out is unknown, which is reconciliation's job.
    """
    workers = max(1, min(concurrency, len(claimed)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="send") as pool:
        pending: set[Future[SendOutcome]] = {
            pool.submit(send_claimed, c, transport=transport, limiter=limiter, stop=stop)
            for c in claimed
        }
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            outcomes = list(_completed(done, ctx.worker_id, report))
            if outcomes:
                with session_factory.begin() as session:
                    report.add(record_outcomes(session=session, outcomes=outcomes, ctx=ctx))


def _completed(
    done: Iterable[Future[SendOutcome]], worker_id: str, report: DispatchReport
) -> Iterable[SendOutcome]:
    for future in done:
        error = future.exception()
        if error is None:
            yield future.result()
            continue
        report.stranded += 1
        log.error(
            "dispatch.transport_crashed",
            extra={"fields": {"worker": worker_id, "error": type(error).__name__}},
        )
