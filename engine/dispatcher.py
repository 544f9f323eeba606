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

2. Send, outside any transaction, under a per-sender rate limit (engine.dispatch_send):
   as coroutines on an async transport's event loop (engine.transports.twilio_async),
   else in a thread pool. Right before its provider call each row passes the send gate
   (engine.dispatch_gate): a guarded mark `send_started_at` that an opt-out acknowledged
   since the claim makes fail, so the row is withheld instead of sent.

3. Record, in short transactions as sends complete (engine.dispatch_record): everything
   completed since the last record transaction, at most RECORD_CHUNK rows and at most
   RECORD_EVERY seconds after the oldest completed.

`dispatch_until_idle` pipelines the batches (engine.dispatch_pipeline): the next claim
runs while the previous batch's sends are in flight, so the provider calls do not wait
for the database. Claims run in the calling thread; records too on SQLite (writers take
turns there anyway), in one record thread of their own on PostgreSQL.

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
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime
from typing import Any, cast

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from engine import failpoints
from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.dispatch_claim import Claimed, claim_due
from engine.dispatch_gate import SendGate
from engine.dispatch_pipeline import DispatchReport, Pipeline, record_window
from engine.dispatch_reconcile import ReconcileReport, reconcile_stale
from engine.dispatch_record import DEFAULT_MAX_ATTEMPTS, RecordContext
from engine.dispatch_send import (
    Lanes,
    RateLimiter,
    SendOutcome,
    send_batch_async,
    send_claimed,
)
from engine.transports.base import AsyncTransport, Transport, is_async

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
# Under a rate limit a claim takes about this many seconds of sending, not `limit` rows: a
# batch of 500 at 50 messages/s waited 10 s for its slots (its decisions that much older)
# and, at a stop, was mostly claimed for nothing.
CLAIM_HORIZON = 2.0


def dispatch_batch(
    *,
    now: datetime,
    **kwargs: Any,
) -> DispatchReport:
    """Claim up to `limit` due rows once (at `now`), send the allowed ones, record every
    result. Takes dispatch_until_idle's keyword arguments but `clock` and `max_batches`.
    The claim happens even when `stop` is set: the rows claimed are then released."""
    return dispatch_until_idle(clock=lambda: now, max_batches=1, _even_if_stopping=True, **kwargs)


def dispatch_until_idle(
    *,
    clock: Callable[[], datetime],
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    transport: Transport,
    worker_id: str,
    stop: threading.Event | None = None,
    max_batches: int | None = None,
    limit: int = DEFAULT_BATCH,
    concurrency: int = DEFAULT_CONCURRENCY,
    limiter: RateLimiter | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    rng: random.Random | None = None,
    _even_if_stopping: bool = False,
) -> DispatchReport:
    """Run batches (each claimed at `clock()`) until one finds no due row, or `stop` is
    set, or `max_batches` were claimed.

    Pipelined (engine.dispatch_pipeline): the next batch is claimed while the previous
    one's sends are still in flight (once at most max(concurrency, limit // 2) are left),
    so the provider calls do not wait for claims. Sends run as coroutines on an async
    transport's loop, else in a thread pool. This thread claims; completed sends are
    recorded here on SQLite, by one record thread on PostgreSQL. Under a rate limit a
    claim takes at most what the rate sends in CLAIM_HORIZON seconds (claim_size).
    """
    started = time.perf_counter()
    stop = stop or threading.Event()
    limiter = limiter or RateLimiter(None)
    limit = claim_size(limit, concurrency=concurrency, rate=limiter.rate)
    gate = SendGate(session_factory, worker_id, clock)
    with ExitStack() as resources:
        resources.callback(gate.close)
        if is_async(transport):
            lanes = Lanes(concurrency)
            a = cast(AsyncTransport, transport)

            def submit(batch: list[Claimed]) -> list[Future[SendOutcome]]:
                futures: list[Future[SendOutcome]] = [Future() for _ in batch]
                a.submit(send_batch_async(batch, futures, transport=a, limiter=limiter,
                                          stop=stop, lanes=lanes, gate=gate))  # fmt: skip
                return futures
        else:
            pool = resources.enter_context(
                ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="send")
            )

            def submit(batch: list[Claimed]) -> list[Future[SendOutcome]]:
                return [
                    pool.submit(
                        send_claimed, c, transport=transport, limiter=limiter, stop=stop, gate=gate
                    )
                    for c in batch
                ]

        run = Pipeline(session_factory, submit, worker_id, low_water=max(concurrency, limit // 2),
                       record_every=record_window(limiter.rate))  # fmt: skip
        total = run.until_idle(
            claim=lambda now: _claim(session_factory, keyring=keyring, defs=defs,
                                     worker_id=worker_id, now=now, limit=limit),
            context=lambda now: RecordContext(worker_id, now, defs, keyring, max_attempts, rng),
            clock=clock, stop=stop, max_batches=max_batches, first=_even_if_stopping,
        )  # fmt: skip
    total.seconds = time.perf_counter() - started
    return total


def claim_size(limit: int, *, concurrency: int, rate: float | None) -> int:
    """Rows per claim: `limit`, or under a rate limit what the rate sends in CLAIM_HORIZON
    seconds (at least a group of `concurrency`, at most `limit`)."""
    if not rate:
        return limit
    return min(limit, max(concurrency, math.ceil(rate * CLAIM_HORIZON)))


def _claim(
    session_factory: sessionmaker[Session], **kwargs: object
) -> tuple[list[Claimed], Counter[str]]:
    """The claim transaction, tried again when PostgreSQL breaks a deadlock with another
    writer (e.g. an inbound STOP cancelling the same rows) or SQLite stays locked."""
    for attempt in range(1, CLAIM_TRIES + 1):
        try:
            with session_factory.begin() as session:
                claimed = claim_due(session=session, **kwargs)  # type: ignore[arg-type]
                failpoints.hit("claim.before_commit")
            failpoints.hit("claim.after_commit")
            return claimed
        except OperationalError as exc:
            if attempt == CLAIM_TRIES:
                raise
            log.warning(
                "dispatch.claim_retry",
                extra={"fields": {"attempt": attempt, "error": type(exc.orig).__name__}},
            )
    raise AssertionError("unreachable")
