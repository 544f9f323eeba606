"""Crash recovery: rows left `sending` by a worker that died are never blindly resent.

A row whose claim is older than `stale_after` (longer than any send can take) and that
never passed the send gate (no `send_started_at`, engine.dispatch_gate) was never handed
to the provider: it is queued again to be decided afresh. One that passed is settled by
asking the provider what it accepted for that number since the claim:

    the provider holds the same text to the same number  -> sent, with that sid
    the provider can tell and holds nothing like it       -> queued (it never went out)
    the provider cannot tell, or the lookup fails         -> unknown, with the reason
                                                             (surfaced, never resent)

The provider is asked outside any transaction; the verdicts are written guarded by the
claim they were made for, so a second reconciler or a late worker cannot double-settle.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from engine import failpoints
from engine import outbox_status as status
from engine.crypto import DecryptionError, Keyring
from engine.dispatch_record import DEFAULT_MAX_ATTEMPTS, sids_taken
from engine.dispatch_send import LOOKUP_MARGIN, describe, earliest, matching_records
from engine.store import codec, queries
from engine.store import models as m
from engine.store.outbox_queries import body_field
from engine.transports.base import ProviderError, SentRecord, Transport

log = logging.getLogger("engine.dispatch")

STALE_AFTER = timedelta(minutes=2)


@dataclass
class ReconcileReport:
    examined: int = 0
    sent: int = 0
    requeued: int = 0
    unknown: int = 0
    failed: int = 0
    outbox_ids: list[int] = field(default_factory=list)

    def fields(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("examined", "sent", "requeued", "unknown", "failed")}


@dataclass(frozen=True)
class StaleRow:
    outbox_id: int
    claimed_at: datetime
    claimed_by: str | None
    to: str | None
    body: str | None
    problem: str | None = None
    started: bool = True
    unsettled_since: datetime | None = None  # an earlier attempt without an answer

    @property
    def since(self) -> datetime:
        """Ask the provider for texts from the earliest attempt that may have gone out."""
        return min(self.claimed_at, self.unsettled_since or self.claimed_at)


@dataclass(frozen=True)
class _Answer:
    matches: tuple[SentRecord, ...] | None  # None: the provider could not tell
    why: str = ""


def reconcile_stale(
    *,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    transport: Transport,
    now: datetime,
    stale_after: timedelta = STALE_AFTER,
    limit: int = 500,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    worker_id: str = "",
) -> ReconcileReport:
    """Settle rows left `sending` for longer than `stale_after` (see the module doc).

    `stale_after` must exceed the transport's request timeout, or a slow live send could
    be taken for a dead one.
    """
    with session_factory.begin() as session:
        stale = stale_rows(
            session=session, keyring=keyring, now=now, stale_after=stale_after, limit=limit
        )
    if not stale:
        return ReconcileReport()
    failpoints.hit("reconcile.after_select")
    answers = [(row, _ask(transport, row)) for row in stale]
    failpoints.hit("reconcile.after_ask")
    with session_factory.begin() as session:
        report = _settle(session, answers, now=now, max_attempts=max_attempts)
        failpoints.hit("reconcile.before_commit")
    failpoints.hit("reconcile.after_commit")
    fields = {"worker": worker_id, **report.fields()}
    log.info("dispatch.reconciled", extra={"fields": fields})
    return report


def stale_rows(
    *, session: Session, keyring: Keyring, now: datetime, stale_after: timedelta, limit: int
) -> list[StaleRow]:
    """Rows `sending` since before now - stale_after, with their number and text opened."""
    o = m.Outbox
    stmt = (
        select(o)
        .where(o.status == status.SENDING, o.claimed_at < now - stale_after)
        .order_by(o.claimed_at, o.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True, of=o)
    rows = list(session.scalars(stmt))
    ids = sorted({r.patient_id for r in rows})
    ciphers = queries.ciphers_for(session=session, keyring=keyring, patient_ids=ids)
    patients = {p.id: p for p in session.scalars(select(m.Patient).where(m.Patient.id.in_(ids)))}
    return [_open(row, patients.get(row.patient_id), ciphers.get(row.patient_id)) for row in rows]


def _open(row: m.Outbox, patient: m.Patient | None, cipher: object) -> StaleRow:
    assert row.claimed_at is not None
    base = StaleRow(
        row.id, row.claimed_at, row.claimed_by, None, None, unsettled_since=row.unsettled_since
    )
    if row.send_started_at is None:
        return replace(base, started=False)
    if patient is None or cipher is None:
        return _with_problem(base, "the patient's data key is destroyed: cannot ask the provider")
    try:
        phone = codec.open_patient(patient, cipher).phone  # type: ignore[arg-type]
        body = cipher.decrypt_field(body_field(row.idempotency_key), row.body_enc)  # type: ignore[attr-defined]
    except DecryptionError:
        return _with_problem(base, "the number or text does not decrypt")
    if not phone or body is None:
        return _with_problem(base, "no number or text stored")
    return replace(base, to=phone, body=body)


def _with_problem(row: StaleRow, problem: str) -> StaleRow:
    return replace(row, to=None, body=None, problem=problem)


def _ask(transport: Transport, row: StaleRow) -> _Answer:
    if not row.started:
        return _Answer(())  # never handed over: nothing to ask
    if row.problem or row.to is None or row.body is None:
        return _Answer(None, row.problem or "nothing to ask about")
    try:
        records = transport.sent_since(to=row.to, since=row.since - LOOKUP_MARGIN)
    except ProviderError as exc:
        return _Answer(None, f"provider lookup failed ({describe(exc)})")
    if records is None:
        return _Answer(None, f"transport {transport.name} cannot list sent messages")
    return _Answer(matching_records(records, to=row.to, body=row.body))


def _settle(
    session: Session,
    answers: Sequence[tuple[StaleRow, _Answer]],
    *,
    now: datetime,
    max_attempts: int,
) -> ReconcileReport:
    report = ReconcileReport()
    o = m.Outbox
    for stale, answer in answers:
        same_claim = (o.status == status.SENDING, o.claimed_at == stale.claimed_at)
        stmt = select(o).where(o.id == stale.outbox_id, *same_claim)
        if session.get_bind().dialect.name == "postgresql":  # against the send gate's mark
            stmt = stmt.with_for_update(of=o)
        row = session.scalar(stmt)
        if row is None:  # settled meanwhile by its worker or another reconciler
            continue
        if not stale.started and row.send_started_at is not None:
            continue  # its worker was alive after all, and sent it: settled next time
        report.examined += 1
        report.outbox_ids.append(row.id)
        verdict = _verdict(session, row, stale, answer, now=now, max_attempts=max_attempts)
        setattr(report, verdict, getattr(report, verdict) + 1)
    session.flush()
    return report


def _verdict(
    session: Session,
    row: m.Outbox,
    stale: StaleRow,
    answer: _Answer,
    *,
    now: datetime,
    max_attempts: int,
) -> str:
    claim = f"left sending by {stale.claimed_by or '?'} since {stale.claimed_at.isoformat()}"
    if answer.matches is None:
        row.status = status.UNKNOWN
        row.last_error = f"{claim}; {answer.why}; not resent"
        return "unknown"
    taken = sids_taken(session=session, sids=[r.provider_sid for r in answer.matches], but=row.id)
    record = earliest(answer.matches, taken=taken)
    if record is not None:
        row.status, row.provider_sid = status.SENT, record.provider_sid
        row.provider_status, row.sent_at = record.status, record.created_at
        row.attempts += 1
        row.unsettled_since = None
        row.last_error = f"{claim}; the provider holds it: reconciled as sent"
        return "sent"
    if not stale.started:
        row.status, row.claimed_by, row.send_at = status.QUEUED, None, now
        row.claimed_at = row.claimed_at if row.attempts else None
        row.last_error = f"{claim}; never handed to the provider: requeued"
        return "requeued"
    row.attempts += 1
    row.unsettled_since = None  # asked since the earliest attempt: none went out
    if row.attempts >= max_attempts:
        row.status = status.FAILED
        row.last_error = f"{claim}; the provider holds nothing; gave up after {row.attempts}"
        return "failed"
    row.status, row.claimed_by, row.claimed_at, row.send_at = status.QUEUED, None, None, now
    row.last_error = f"{claim}; the provider holds nothing: requeued"
    return "requeued"
