"""Claim due outbox rows and decide them again, all in one transaction.

The claim transaction locks the due rows (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite's
BEGIN IMMEDIATE writer lock does the same job by letting one claimer in at a time), then
locks their patients (`FOR NO KEY UPDATE`, in id order) before reading consent,
suppressions and history, so that two workers deciding for one patient take turns and
the second sees the first's `sending` rows. Rows to send are marked `sending` and
committed before any provider call.

The reads are engine.dispatch_reads' (Core rows, no ORM objects); each row's fresh
decision becomes a dict of its new values, and the batch's are written together
(outbox_queries.update_rows: one UPDATE per set of changed columns).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from engine import outbox_status as status
from engine.core import policy, sms
from engine.core.domain import (
    Decision,
    DecisionContext,
    History,
    MessageFacts,
    RuleResult,
    SentMessage,
)
from engine.crypto import DecryptionError, Keyring
from engine.definitions import DefinitionSet
from engine.dispatch_reads import (
    PROGRAM_CAMPAIGN,
    PROGRAM_REPLY_RULE,
    ClaimBatch,
    DueRow,
    due_rows,
    read_batch,
)
from engine.planner_rows import reason_json
from engine.store import outbox_queries
from engine.store.outbox_queries import body_field


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
    batch = read_batch(session, keyring, defs, patient_ids, now)
    claimed: list[Claimed] = []
    changes: list[dict[str, Any]] = []
    for row in rows:
        change, item = _claim_row(row, batch=batch, defs=defs, worker_id=worker_id, now=now)
        changes.append(change)
        counts[change["status"]] += 1
        if item is not None:
            claimed.append(item)
    outbox_queries.update_rows(session=session, changes=changes)
    return claimed, counts


def _claim_row(
    row: DueRow, *, batch: ClaimBatch, defs: DefinitionSet, worker_id: str, now: datetime
) -> tuple[dict[str, Any], Claimed | None]:
    """The row's new values after the fresh decision, and the Claimed item when it is to
    be sent now."""
    change: dict[str, Any] = {"id": row.id, "decided_at": now}
    if row.expired and row.unsettled_since is None:
        change.update(status=status.EXPIRED, reasons=[*row.reasons, _expired_reason(row, now)])
        return change, None
    decision, body = redecide(row, batch=batch, defs=defs, now=now)
    if row.unsettled_since is not None and (row.expired or _closes(row, decision)):
        item = _settle_first(row, change, batch=batch, body=body, worker_id=worker_id, now=now)
        return change, item
    change.update(outcome=decision.outcome, policy_set=defs.policy_version)
    reasons = row.reasons  # a program reply's marker must survive a retry
    if not is_program_reply(row):
        reasons = change["reasons"] = reasons_json(decision.reasons)
    if decision.outcome == "deny":
        change["status"] = status.BLOCKED
        return change, None
    if decision.outcome == "defer":
        if decision.send_at is None or decision.send_at >= row.expires_at:
            change["status"] = status.EXPIRED
            change["reasons"] = [*reasons, _expired_reason(row, decision.send_at or now)]
        else:
            change.update(status=status.DEFERRED, send_at=decision.send_at)
        return change, None
    record = batch.records[row.patient_id]
    assert body is not None and record.phone is not None  # redecide denies otherwise
    history = history_without_own_attempt(row, batch.histories)
    batch.histories[row.patient_id] = History((*history.sent, SentMessage(now, row.purpose)))
    change.update(_sending(worker_id, now))
    return change, Claimed(
        row.id, row.patient_id, record.phone, body, row.attempts, now, row.unsettled_since
    )


def _sending(worker_id: str, now: datetime) -> dict[str, Any]:
    """Claimed by this worker now; its send has not started (engine.dispatch_gate)."""
    return {
        "status": status.SENDING,
        "claimed_by": worker_id,
        "claimed_at": now,
        "send_started_at": None,
    }


def _closes(row: DueRow, decision: Decision) -> bool:
    """Whether this decision ends the row without a send (blocked, or deferred past its
    expiry)."""
    if decision.outcome == "deny":
        return True
    if decision.outcome == "defer":
        return decision.send_at is None or decision.send_at >= row.expires_at
    return False


def _settle_first(
    row: DueRow,
    change: dict[str, Any],
    *,
    batch: ClaimBatch,
    body: str | None,
    worker_id: str,
    now: datetime,
) -> Claimed | None:
    """A row whose earlier attempt may have gone out is not closed before the provider is
    asked: it is claimed for a lookup only. When the provider cannot be asked (the patient
    erased, the number or the text gone), it is `unknown`, surfaced for a person."""
    record = batch.records.get(row.patient_id)
    if body is None and record is not None:  # a decision that denies early reads no body
        body = _stored_body(row, batch.ciphers[row.patient_id])
    if record is None or record.phone is None or body is None:
        change["status"] = status.UNKNOWN
        change["last_error"] = (
            "an earlier attempt got no clear answer and the provider cannot be asked now "
            "(no number or text left): it may have gone out"
        )
        return None
    change.update(_sending(worker_id, now))
    return Claimed(
        row.id, row.patient_id, record.phone, body, row.attempts, now, row.unsettled_since, True
    )


def redecide(
    row: DueRow, *, batch: ClaimBatch, defs: DefinitionSet, now: datetime
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


def history_without_own_attempt(row: DueRow, histories: Mapping[int, History]) -> History:
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


def _stored_body(row: DueRow, cipher: Any) -> str | None:
    """The row's text, decrypted; None when it is missing or does not decrypt."""
    try:
        return cipher.decrypt_field(body_field(row.idempotency_key), row.body_enc)
    except DecryptionError:
        return None


def is_program_reply(row: DueRow) -> bool:
    """A confirmation queued by engine.inbound in answer to the patient's own text."""
    return row.campaign_id == PROGRAM_CAMPAIGN and any(
        r.get("rule") == PROGRAM_REPLY_RULE for r in row.reasons or ()
    )


def _program_reply(
    row: DueRow, *, batch: ClaimBatch, has_phone: bool
) -> tuple[Decision, str | None]:
    """Allow the one reply the patient asked for by texting a keyword; no policy re-check."""
    if not has_phone:
        return _engine_deny("no-phone", "the patient has no phone number"), None
    body = _stored_body(row, batch.ciphers[row.patient_id])
    if body is None:
        return _engine_deny("no-body", "the stored message body is missing or unreadable"), None
    message = "a reply to the patient's keyword (STOP/START/HELP), sent once"
    reason = RuleResult(PROGRAM_REPLY_RULE, "engage", "allow", message, "CTIA 5.1.1")
    return Decision("allow", None, (reason,)), body


def _message_facts(row: DueRow, body: str, defs: DefinitionSet) -> MessageFacts:
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


def _expired_reason(row: DueRow, when: datetime) -> dict[str, Any]:
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
