"""Claim due outbox rows and decide them again, all in one transaction.

The claim transaction locks the due rows (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite's
BEGIN IMMEDIATE writer lock does the same job by letting one claimer in at a time), then
locks their patients (`FOR NO KEY UPDATE`, in id order) before reading consent,
suppressions and history, so that two workers deciding for one patient take turns and
the second sees the first's `sending` rows. Rows to send are marked `sending` and
committed before any provider call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session

from engine import outbox_status as status
from engine.core import policy, sms
from engine.core.domain import (
    ConsentState,
    Decision,
    DecisionContext,
    History,
    MessageFacts,
    RuleResult,
    SentMessage,
)
from engine.crypto import DecryptionError, Keyring
from engine.definitions import DefinitionSet
from engine.planner_rows import reason_json
from engine.store import codec, consent_queries, outbox_queries, queries
from engine.store import models as m
from engine.store.defqueries import approved_versions
from engine.store.outbox_queries import body_field

# Program replies (STOP/START/HELP confirmations, engine.inbound): one row per inbound
# message, sent without the consent and suppression re-check (CTIA 5.1.1: the opt-out
# confirmation goes to a number that has just revoked).
PROGRAM_CAMPAIGN = "program"
PROGRAM_REPLY_RULE = "program-reply"


@dataclass(frozen=True)
class Claimed:
    """A row marked `sending` by this worker, with what the provider call needs.

    `previous_claim_at` is set when an earlier attempt failed without a clear answer (the
    row's `unsettled_since`): the provider is asked whether that attempt went out after
    all before sending again. With `lookup_only`, the fresh decision would close the row
    (blocked, expired): it is only asked, and the row is decided again once the answer is
    in, so that a text that went out is never recorded as not sent.
    """

    outbox_id: int
    patient_id: int
    to: str
    body: str
    attempts: int
    claimed_at: datetime
    previous_claim_at: datetime | None = None
    lookup_only: bool = False


@dataclass(frozen=True)
class _Batch:
    """What the re-check needs about the batch's patients, read after locking them."""

    records: Mapping[int, codec.PatientRecord]
    ciphers: Mapping[int, Any]
    consents: Mapping[int, Mapping[str, ConsentState]]
    suppressed: Collection[int]
    histories: dict[int, History]
    approved: Collection[str]


def claim_due(
    *,
    session: Session,
    keyring: Keyring,
    defs: DefinitionSet,
    worker_id: str,
    now: datetime,
    limit: int,
) -> tuple[list[Claimed], Counter[str]]:
    """Lock up to `limit` due rows, re-decide each, mark the allowed ones `sending`.

    Returns the rows to send and a count of every status set. The caller commits.
    """
    rows = due_rows(session=session, now=now, limit=limit)
    counts: Counter[str] = Counter()
    if not rows:
        return [], counts
    patient_ids = sorted({row.patient_id for row in rows})
    lock_patients(session=session, patient_ids=patient_ids)
    batch = _read_batch(session, keyring, defs, patient_ids, now)
    claimed: list[Claimed] = []
    for row in rows:
        item = _claim_row(row, batch=batch, defs=defs, worker_id=worker_id, now=now)
        counts[row.status] += 1
        if item is not None:
            claimed.append(item)
    session.flush()
    return claimed, counts


def due_rows(*, session: Session, now: datetime, limit: int) -> list[m.Outbox]:
    """Queued or deferred rows whose time has come, of campaigns not paused, oldest first,
    read in order from the partial index `ix_outbox_due` (no sort of every waiting row).

    PostgreSQL skips rows another worker holds; SQLite has one writer at a time anyway
    (SQLAlchemy would silently drop SKIP LOCKED there). SQLite's planner, without
    statistics, prefers the (status, send_at) index and sorts: it is told which to use.
    """
    o, cs = m.Outbox, m.CampaignState
    if session.get_bind().dialect.name == "sqlite":
        ids = session.scalars(_SQLITE_DUE, {"now": now, "limit": limit}).all()
        if not ids:
            return []
        return list(session.scalars(select(o).where(o.id.in_(ids)).order_by(o.send_at, o.id)))
    paused = select(cs.campaign_id).where(cs.paused.is_(True))
    stmt = (
        select(o)
        .where(text(m.WAITING_SQL), o.send_at <= now)
        .where(o.campaign_id.not_in(paused))
        .order_by(o.send_at, o.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=o)
    )
    return list(session.scalars(stmt))


_SQLITE_DUE = text(
    f"SELECT id FROM outbox INDEXED BY ix_outbox_due WHERE {m.WAITING_SQL} "
    "AND send_at <= :now AND campaign_id NOT IN "
    "(SELECT campaign_id FROM campaign_states WHERE paused) "
    "ORDER BY send_at, id LIMIT :limit"
).bindparams(bindparam("now", type_=m.UTCDateTime()))


def lock_patients(*, session: Session, patient_ids: Sequence[int]) -> None:
    """Serialize decisions per patient (frequency caps) across workers on PostgreSQL.

    FOR NO KEY UPDATE conflicts with itself but not with the KEY SHARE lock that inserting
    an outbox row (foreign key) takes, so the planner is never blocked by a dispatcher.
    Locks are taken in id order: two claimers cannot deadlock on them.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    stmt = (
        select(m.Patient.id)
        .where(m.Patient.id.in_(sorted(patient_ids)))
        .order_by(m.Patient.id)
        .with_for_update(key_share=True)
    )
    session.execute(stmt).all()


def _read_batch(
    session: Session,
    keyring: Keyring,
    defs: DefinitionSet,
    patient_ids: Sequence[int],
    now: datetime,
) -> _Batch:
    ciphers = queries.ciphers_for(session=session, keyring=keyring, patient_ids=patient_ids)
    # Core rows: the codec reads the same names, at a fraction of an ORM object's cost.
    table = m.Patient.__table__
    patients = session.execute(select(table).where(table.c.id.in_(patient_ids)))
    records = {p.id: codec.open_patient(p, ciphers[p.id]) for p in patients if p.id in ciphers}
    return _Batch(
        records=records,
        ciphers=ciphers,
        consents=consent_queries.consent_states_for_many(
            session=session, patient_ids=patient_ids, purposes=list(defs.purposes)
        ),
        suppressed=consent_queries.suppressed_patients(session=session, patient_ids=patient_ids),
        histories=outbox_queries.histories_for(session=session, patient_ids=patient_ids, now=now),
        approved=approved_versions(session=session),
    )


def _claim_row(
    row: m.Outbox, *, batch: _Batch, defs: DefinitionSet, worker_id: str, now: datetime
) -> Claimed | None:
    """Apply the fresh decision to the row; the Claimed item when it is to be sent now."""
    row.decided_at = now
    expired = now >= row.expires_at
    if expired and row.unsettled_since is None:
        row.status = status.EXPIRED
        row.reasons = [*row.reasons, _expired_reason(row, now)]
        return None
    decision, body = redecide(row, batch=batch, defs=defs, now=now)
    if row.unsettled_since is not None and (expired or _closes(row, decision)):
        return _settle_first(row, batch=batch, body=body, worker_id=worker_id, now=now)
    row.outcome, row.policy_set = decision.outcome, defs.policy_version
    if not is_program_reply(row):  # its marker must survive a retry
        row.reasons = reasons_json(decision.reasons)
    if decision.outcome == "deny":
        row.status = status.BLOCKED
        return None
    if decision.outcome == "defer":
        if decision.send_at is None or decision.send_at >= row.expires_at:
            row.status = status.EXPIRED
            row.reasons = [*row.reasons, _expired_reason(row, decision.send_at or now)]
        else:
            row.status, row.send_at = status.DEFERRED, decision.send_at
        return None
    record = batch.records[row.patient_id]
    assert body is not None and record.phone is not None  # redecide denies otherwise
    history = history_without_own_attempt(row, batch.histories)
    batch.histories[row.patient_id] = History((*history.sent, SentMessage(now, row.purpose)))
    row.status, row.claimed_by, row.claimed_at = status.SENDING, worker_id, now
    row.send_started_at = None  # this claim's send has not started (engine.dispatch_gate)
    return Claimed(
        row.id, row.patient_id, record.phone, body, row.attempts, now, row.unsettled_since
    )


def _closes(row: m.Outbox, decision: Decision) -> bool:
    """Whether this decision ends the row without a send (blocked, or deferred past its
    expiry)."""
    if decision.outcome == "deny":
        return True
    if decision.outcome == "defer":
        return decision.send_at is None or decision.send_at >= row.expires_at
    return False


def _settle_first(
    row: m.Outbox, *, batch: _Batch, body: str | None, worker_id: str, now: datetime
) -> Claimed | None:
    """A row whose earlier attempt may have gone out is not closed before the provider is
    asked: it is claimed for a lookup only. When the provider cannot be asked (the patient
    erased, the number or the text gone), it is `unknown`, surfaced for a person."""
    record = batch.records.get(row.patient_id)
    if body is None and record is not None:  # a decision that denies early reads no body
        body = _stored_body(row, batch.ciphers[row.patient_id])
    if record is None or record.phone is None or body is None:
        row.status = status.UNKNOWN
        row.last_error = (
            "an earlier attempt got no clear answer and the provider cannot be asked now "
            "(no number or text left): it may have gone out"
        )
        return None
    row.status, row.claimed_by, row.claimed_at = status.SENDING, worker_id, now
    row.send_started_at = None
    return Claimed(
        row.id, row.patient_id, record.phone, body, row.attempts, now, row.unsettled_since, True
    )


def redecide(
    row: m.Outbox, *, batch: _Batch, defs: DefinitionSet, now: datetime
) -> tuple[Decision, str | None]:
    """The policy's answer for this row now, and its decrypted body.

    Beyond the rules: an erased patient, a suppressed number, a missing phone or body and
    a template version no longer approved all deny.
    """
    record = batch.records.get(row.patient_id)
    if record is None:
        return _engine_deny("patient-erased", "the patient's data key is destroyed"), None
    if is_program_reply(row):
        return _program_reply(row, batch=batch, has_phone=record.phone is not None)
    if row.patient_id in batch.suppressed:
        message = "the patient's number is on the suppression list (STOP or erasure)"
        return _engine_deny("suppressed", message, "47 CFR 64.1200(a)(10)"), None
    if record.phone is None:
        return _engine_deny("no-phone", "the patient has no phone number"), None
    body = _stored_body(row, batch.ciphers[row.patient_id])
    if body is None:
        return _engine_deny("no-body", "the stored message body is missing or unreadable"), None
    facts = _message_facts(row, body, defs)
    consents = batch.consents.get(row.patient_id, {})
    history = history_without_own_attempt(row, batch.histories)
    decision = policy.decide(
        defs.policy_set, DecisionContext(record.patient, consents, facts, history, now)
    )
    if row.template_version not in batch.approved:
        reason = RuleResult(
            "template-approval",
            "engage",
            "deny",
            f"template {row.template_id} version {row.template_version} is not approved",
        )
        decision = replace(decision, outcome="deny", send_at=None, trace=(*decision.trace, reason))
    return decision, body


def history_without_own_attempt(row: m.Outbox, histories: Mapping[int, History]) -> History:
    """The patient's history for deciding `row` again: without the row's own earlier
    attempt, which the history counts as sent until the provider has said (a row is not
    capped by itself)."""
    history = histories.get(row.patient_id, History())
    if row.unsettled_since is None:
        return history
    own = SentMessage(row.unsettled_since, row.purpose)
    if own not in history.sent:
        return history
    sent = list(history.sent)
    sent.remove(own)
    return History(tuple(sent))


def _stored_body(row: m.Outbox, cipher: Any) -> str | None:
    """The row's text, decrypted; None when it is missing or does not decrypt."""
    try:
        return cipher.decrypt_field(body_field(row.idempotency_key), row.body_enc)
    except DecryptionError:
        return None


def is_program_reply(row: m.Outbox) -> bool:
    """A confirmation queued by engine.inbound in answer to the patient's own text."""
    return row.campaign_id == PROGRAM_CAMPAIGN and any(
        r.get("rule") == PROGRAM_REPLY_RULE for r in row.reasons or ()
    )


def _program_reply(row: m.Outbox, *, batch: _Batch, has_phone: bool) -> tuple[Decision, str | None]:
    """Allow the one reply the patient asked for by texting a keyword; no policy re-check."""
    if not has_phone:
        return _engine_deny("no-phone", "the patient has no phone number"), None
    body = _stored_body(row, batch.ciphers[row.patient_id])
    if body is None:
        return _engine_deny("no-body", "the stored message body is missing or unreadable"), None
    message = "a reply to the patient's keyword (STOP/START/HELP), sent once"
    reason = RuleResult(PROGRAM_REPLY_RULE, "engage", "allow", message, "CTIA 5.1.1")
    return Decision("allow", None, (reason,)), body


def _message_facts(row: m.Outbox, body: str, defs: DefinitionSet) -> MessageFacts:
    """Facts from the stored row and body. PHI is assumed when the template version that
    rendered the body is no longer loaded (fail closed)."""
    encoding, segments, length = sms.measure(body)
    template = defs.templates.get((row.template_id or "", row.locale or ""))
    if template is not None and template.version == row.template_version:
        contains_phi = defs.template_contains_phi(template)
    else:
        contains_phi = True
    return MessageFacts(
        purpose=row.purpose,
        campaign=row.campaign_id,
        template=row.template_id or "",
        locale=row.locale or "en",
        segments=segments,
        encoding=encoding,
        length=length,
        contains_phi=contains_phi,
        has_opt_out_text=sms.has_opt_out_text(body),
    )


def _engine_deny(rule: str, message: str, cite: str | None = None) -> Decision:
    return Decision("deny", None, (RuleResult(rule, "engage", "deny", message, cite),))


def _expired_reason(row: m.Outbox, when: datetime) -> dict[str, Any]:
    """Why a row is dropped: it cannot go out (now, or at its deferral) before expiry."""
    return {
        "rule": "expired",
        "policy": "engage",
        "effect": "deny",
        "message": f"not sendable before its expiry at {row.expires_at.isoformat()} "
        f"(checked for {when.isoformat()})",
        "cite": None,
    }


def reasons_json(reasons: Sequence[RuleResult]) -> list[dict[str, Any]]:
    """Reasons as stored in outbox.reasons (a fresh list: the row's own)."""
    return [reason_json(r) for r in reasons]
