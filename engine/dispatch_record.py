"""Record what the provider said about claimed rows, in short transactions.

Every update is guarded by `status = sending AND claimed_by = this worker`: a row that
reconciliation has taken over meanwhile is left alone (and logged).

    accepted                          -> sent, provider sid, sent_at
    21610 opted out                   -> failed; consent revoked for every purpose
                                         (method carrier_opt_out) and the number suppressed
    invalid number, filtered, other   -> failed, no retry
    transient (429, 5xx, 30001/30008,
    no answer)                        -> queued at now + backoff, attempts + 1;
                                         after max_attempts: failed, or unknown when
                                         the last attempt got no answer at all
    worker stopping before the call,
    or the send gate unreachable      -> queued again, claim released
    a lookup-only claim (a row to be
    closed whose earlier attempt got
    no answer): the provider holds it -> sent; it does not -> queued, decided again
    withheld by the send gate         -> queued again at now + REVOCATION_MARGIN, to be
                                         decided afresh (blocked, if the opt-out stands);
                                         left alone when the opt-out cancelled it already
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from engine import audit, failpoints
from engine import outbox_status as status
from engine.core.domain import ConsentEvent
from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.dispatch_gate import REVOCATION_MARGIN
from engine.dispatch_send import SendOutcome, describe, earliest, retry_at
from engine.store import consent_queries, outbox_queries
from engine.store import models as m
from engine.store.codec import PatientErased
from engine.transports.base import ProviderError

log = logging.getLogger("engine.dispatch")

DEFAULT_MAX_ATTEMPTS = 6
OPT_OUT_METHOD = "carrier_opt_out"
WITHHELD_REASON = {
    "rule": "withheld-at-send",
    "policy": "engage",
    "effect": "defer",
    "message": "consent was revoked or the number suppressed after the claim: not sent, "
    "to be decided again",
    "cite": "47 CFR 64.1200(a)(10)",
}


@dataclass(frozen=True)
class RecordContext:
    worker_id: str
    now: datetime
    defs: DefinitionSet
    keyring: Keyring
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    rng: random.Random | None = None


def record_outcomes(
    *, session: Session, outcomes: Sequence[SendOutcome], ctx: RecordContext
) -> dict[str, int]:
    """Write each outcome onto its row; returns counts by what happened."""
    accepted = [x for x in outcomes if x.result is not None and not x.found and not x.released]
    counts = record_accepted(session=session, outcomes=accepted, ctx=ctx) if accepted else {}
    others = [x for x in outcomes if x.result is None or x.found or x.released or x.withheld]
    if not others:
        return counts
    ids = [x.claimed.outbox_id for x in others]
    o = m.Outbox
    mine = (o.status == status.SENDING, o.claimed_by == ctx.worker_id)
    rows = {row.id: row for row in session.scalars(select(o).where(o.id.in_(ids), *mine))}
    opted_out: dict[int, int] = {}
    for outcome in others:
        row = rows.get(outcome.claimed.outbox_id)
        if row is not None and row.claimed_at != outcome.claimed.claimed_at:
            row = None  # claimed again since (reconciled, requeued, claimed): not this claim's
        if row is None and outcome.withheld:
            what = "withheld"  # cancelled by the opt-out that made the gate refuse it
        elif row is None:
            log.warning(
                "dispatch.claim_lost",
                extra={"fields": {"worker": ctx.worker_id, "outbox_id": outcome.claimed.outbox_id}},
            )
            what = "claim_lost"
        else:
            what = _apply(session, row, outcome, ctx)
            if what == "opted_out":
                opted_out[row.patient_id] = outcome.error.code if outcome.error else 0
        counts[what] = counts.get(what, 0) + 1
    for patient_id, code in opted_out.items():
        revoke_for_carrier_opt_out(session=session, patient_id=patient_id, code=code, ctx=ctx)
    session.flush()
    failpoints.hit("record.after_others")
    return counts


def record_accepted(
    *, session: Session, outcomes: Sequence[SendOutcome], ctx: RecordContext
) -> dict[str, int]:
    """The common case, without loading the rows: the provider accepted these texts.

    Only rows still ours are written (`sending`, claimed by this worker), locked in id
    order first (FOR UPDATE; SQLite's writer lock does the same): on PostgreSQL in the
    same statement as the update (outbox_queries.mark_sent), on SQLite by a select before
    it, so that the guarded UPDATE cannot miss one of them."""
    sends = [
        (x.claimed.outbox_id, x.result.provider_sid, x.result.status)
        for x in outcomes
        if x.result is not None
    ]
    if session.get_bind().dialect.name == "postgresql":
        failpoints.hit("record.before_accepted")
        mine = outbox_queries.mark_sent(
            session=session, worker_id=ctx.worker_id, now=ctx.now, sends=sends
        )
    else:
        mine = _lock_mine(session, [row_id for row_id, _, _ in sends], ctx.worker_id)
        failpoints.hit("record.before_accepted")
        _write_sent(session, [s for s in sends if s[0] in mine], ctx)
    if mine:
        failpoints.hit("record.after_accepted")
    for x in outcomes:
        if x.claimed.outbox_id not in mine:
            log.warning(
                "dispatch.claim_lost",
                extra={"fields": {"worker": ctx.worker_id, "outbox_id": x.claimed.outbox_id}},
            )
    lost = len(outcomes) - len(mine)
    return {"sent": len(mine), **({"claim_lost": lost} if lost else {})}


def _lock_mine(session: Session, ids: Sequence[int], worker_id: str) -> set[int]:
    o = m.Outbox
    stmt = select(o.id).where(o.id.in_(sorted(ids)), o.status == status.SENDING)
    return set(session.scalars(stmt.where(o.claimed_by == worker_id).order_by(o.id)))


def _write_sent(
    session: Session, sends: Sequence[tuple[int, str, str | None]], ctx: RecordContext
) -> None:
    if not sends:
        return
    o = m.Outbox
    session.connection().execute(
        update(o)
        .where(o.id == bindparam("oid"), o.status == status.SENDING)
        .where(o.claimed_by == ctx.worker_id)
        .values(
            status=status.SENT,
            provider_sid=bindparam("sid"),
            provider_status=bindparam("pstatus"),
            sent_at=ctx.now,
            attempts=o.attempts + 1,
            unsettled_since=None,
        ),
        [{"oid": oid, "sid": sid, "pstatus": ps} for oid, sid, ps in sends],
    )


def _apply(session: Session, row: m.Outbox, outcome: SendOutcome, ctx: RecordContext) -> str:
    if outcome.withheld:
        row.status, row.claimed_by = status.QUEUED, None
        row.claimed_at = outcome.claimed.previous_claim_at
        row.send_at = ctx.now + REVOCATION_MARGIN
        row.reasons = [*row.reasons, WITHHELD_REASON]
        return "withheld"
    if outcome.released:
        row.status, row.claimed_by = status.QUEUED, None
        row.claimed_at = outcome.claimed.previous_claim_at
        return "released"
    if outcome.found:
        return _found(session, row, outcome, ctx)
    if outcome.settled:  # the provider holds no earlier attempt: decide it again now
        row.status, row.claimed_by, row.claimed_at = status.QUEUED, None, None
        row.unsettled_since, row.send_at = None, ctx.now
        return "settled"
    row.attempts += 1
    if outcome.result is not None:
        row.status, row.provider_sid = status.SENT, outcome.result.provider_sid
        row.provider_status, row.sent_at = outcome.result.status, ctx.now
        row.unsettled_since = None
        return "sent"
    error = outcome.error
    assert error is not None
    row.error_code, row.last_error = error.code, describe(error)
    if error.kind != "transient":  # a clear answer, after any earlier attempt was looked up
        row.status, row.unsettled_since = status.FAILED, None
        return "opted_out" if error.kind == "opted_out" else "failed"
    # It may have gone out: the next attempt asks the provider for texts since the
    # earliest attempt not yet settled.
    row.unsettled_since = row.unsettled_since or row.claimed_at
    if row.attempts >= ctx.max_attempts:
        return _give_up(row, error)
    row.status, row.claimed_by = status.QUEUED, None
    row.send_at = retry_at(ctx.now, row.attempts - 1, ctx.rng)
    return "retried"


def _give_up(row: m.Outbox, error: ProviderError) -> str:
    """No more attempts. When the last one got no answer at all (a timeout, a cut
    connection, a body that was not the provider's; or the lookup before it failed), the
    text may have gone out: `unknown`, surfaced for a person, not `failed`."""
    if error.http_status is None:
        row.status = status.UNKNOWN
        row.last_error = (
            f"gave up after {row.attempts} attempts; the last got no answer, so the text "
            f"may have gone out: {row.last_error}"
        )
        return "unknown"
    row.status = status.FAILED
    row.last_error = f"gave up after {row.attempts} attempts; last: {row.last_error}"
    return "failed"


def _found(session: Session, row: m.Outbox, outcome: SendOutcome, ctx: RecordContext) -> str:
    """An earlier attempt reached the provider after all: record it, do not send again."""
    taken = sids_taken(session=session, sids=[r.provider_sid for r in outcome.found], but=row.id)
    record = earliest(outcome.found, taken=taken)
    row.unsettled_since = None
    if record is None:  # every match belongs to another row: this one never went out
        row.status, row.claimed_by, row.claimed_at = status.QUEUED, None, None
        row.send_at = ctx.now
        return "released"
    row.status, row.provider_sid = status.SENT, record.provider_sid
    row.provider_status, row.sent_at = record.status, record.created_at
    row.last_error = f"an earlier attempt was accepted after all (found {record.provider_sid})"
    return "sent"


def sids_taken(*, session: Session, sids: Sequence[str], but: int) -> set[str]:
    """Which of these provider sids other outbox rows already hold."""
    if not sids:
        return set()
    o = m.Outbox
    stmt = select(o.provider_sid).where(o.provider_sid.in_(sorted(set(sids))), o.id != but)
    return {sid for (sid,) in session.execute(stmt) if sid}


def revoke_for_carrier_opt_out(
    *, session: Session, patient_id: int, code: int, ctx: RecordContext, actor: str | None = None
) -> None:
    """The carrier says the number opted out (Twilio 21610: it replied STOP to this sender).

    Record the revocation of every purpose in the consent ledger and suppress the number,
    as an inbound STOP would (CTIA Messaging Principles 5.1.1; 47 CFR 64.1200(a)(10)).
    """
    patient = session.get(m.Patient, patient_id)
    if patient is None:
        return
    events = [
        (
            patient_id,
            ConsentEvent(
                patient=patient.external_id,
                purpose=purpose,
                status="revoked",
                occurred_at=ctx.now,
                channel="sms",
                method=OPT_OUT_METHOD,
                evidence=f"provider error {code}: recipient unsubscribed from this sender",
                recorded_by=f"dispatcher:{ctx.worker_id}",
            ),
        )
        for purpose in ctx.defs.purposes
    ]
    try:
        rows = consent_queries.record_consent_events(
            session=session, keyring=ctx.keyring, items=events, source="dispatcher"
        )
    except PatientErased:
        log.info("dispatch.opt_out_erased", extra={"fields": {"patient_id": patient_id}})
        rows = []
    audit.record(
        session=session,
        actor=actor or f"worker:{ctx.worker_id}",
        action="consent_opt_out",
        subject=f"patient:{patient.external_id}",
        details={"method": OPT_OUT_METHOD, "code": code, "events": len(rows)},
        now=ctx.now,
    )
    if patient.phone_index:
        consent_queries.suppress_phone_index(
            session=session, phone_index=patient.phone_index, reason=OPT_OUT_METHOD
        )
