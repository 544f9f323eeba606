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

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from engine import outbox_status as status
from engine.dispatch_claim import PROGRAM_CAMPAIGN, Claimed
from engine.store import models as m

log = logging.getLogger("engine.dispatch")

REVOCATION_MARGIN = timedelta(seconds=60)
GATE_BATCH = 500  # rows marked in one transaction at most
IN_FLIGHT_WAIT = 5.0  # seconds an opt-out waits at most for sends already started
IN_FLIGHT_POLL = 0.01


def withdrawable() -> ColumnElement[bool]:
    """Rows an opt-out or an erasure can still stop: waiting, or claimed but not started."""
    o = m.Outbox
    claimed_only = (o.status == status.SENDING) & o.send_started_at.is_(None)
    return o.status.in_(sorted(status.WAITING)) | claimed_only


def start_sends(
    *,
    session: Session,
    worker_id: str,
    claimed_at: datetime,
    outbox_ids: Collection[int],
    now: datetime,
) -> set[int]:
    """Mark these rows of one claim started where they still may go (see the module
    doc); the ids marked. Only those may be handed to the provider."""
    o, p, s, e = m.Outbox, m.Patient, m.Suppression, m.ConsentEvent
    erased = exists().where(p.id == o.patient_id, p.erased_at.is_not(None))
    suppressed = exists().where(p.id == o.patient_id, s.phone_index == p.phone_index)
    revoked = exists().where(
        e.patient_id == o.patient_id,
        e.purpose == o.purpose,
        e.status == "revoked",
        e.recorded_at > claimed_at - REVOCATION_MARGIN,
    )
    stmt = (
        update(o)
        .where(o.id.in_(sorted(outbox_ids)), o.status == status.SENDING)
        .where(o.claimed_by == worker_id, o.claimed_at == claimed_at)
        .where(o.send_started_at.is_(None), ~erased)
        .where((o.campaign_id == PROGRAM_CAMPAIGN) | (~suppressed & ~revoked))
        .values(send_started_at=now)
        .returning(o.id)
    )
    return set(session.scalars(stmt))


class SendGate:
    """Asks start_sends about each row before its provider call, grouping the requests
    of concurrent senders into one transaction (thread-safe; `admit` never blocks)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        worker_id: str,
        clock: Callable[[], datetime],
    ) -> None:
        self.session_factory = session_factory
        self.worker_id = worker_id
        self.clock = clock
        self._pending: list[tuple[Claimed, Future[bool]]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.transactions = 0

    def admit(self, claimed: Claimed) -> Future[bool]:
        """A future that becomes True when the row is marked started (send it now), False
        when it may not go (or the mark could not be written)."""
        future: Future[bool] = Future()
        with self._wake:
            if self._closed:
                future.set_result(False)
                return future
            self._pending.append((claimed, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="send-gate", daemon=True)
                self._thread.start()
            self._wake.notify()
        return future

    def close(self) -> None:
        """Answer what is pending, then stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return
                batch = self._pending[:GATE_BATCH]
                del self._pending[:GATE_BATCH]
            self._flush(batch)

    def _flush(self, batch: Sequence[tuple[Claimed, Future[bool]]]) -> None:
        claims: dict[datetime, list[int]] = defaultdict(list)
        for claimed, _ in batch:
            claims[claimed.claimed_at].append(claimed.outbox_id)
        try:
            now = self.clock()
            started: set[int] = set()
            with self.session_factory.begin() as session:
                for claimed_at, ids in claims.items():
                    started |= start_sends(
                        session=session,
                        worker_id=self.worker_id,
                        claimed_at=claimed_at,
                        outbox_ids=ids,
                        now=now,
                    )
            self.transactions += 1
        except Exception as exc:  # not marked: not sent (the rows are released)
            log.error(
                "dispatch.gate_failed",
                extra={"fields": {"worker": self.worker_id, "rows": len(batch),
                                  "error": type(exc).__name__}},
                exc_info=True,
            )  # fmt: skip
            started = set()
        for claimed, future in batch:
            future.set_result(claimed.outbox_id in started)


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
