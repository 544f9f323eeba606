"""Use cases for what Twilio posts to us: a patient's text, a delivery report.

Nothing here commits: the caller runs each in one transaction, so an opt-out's
revocations, suppression, cancellations and confirmation land together or not at all.
Replies go through the outbox (engine.dispatch_claim sends program replies without the
consent re-check). A number that belongs to no patient gets its confirmation inline in
the TwiML answer instead: an outbox row needs a patient, and numbers are never stored in
clear.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from engine import audit
from engine import outbox_status as status
from engine.core import sms
from engine.core.domain import ConsentEvent
from engine.core.inbound import (
    KEYWORD_METHODS,
    Classification,
    classify,
    regrantable,
)
from engine.crypto import Keyring, PatientCipher
from engine.definitions import DefinitionSet
from engine.dispatch_claim import PROGRAM_CAMPAIGN, PROGRAM_REPLY_RULE
from engine.dispatch_gate import withdrawable
from engine.store import consent_queries
from engine.store import models as m
from engine.store.outbox_queries import body_field

log = logging.getLogger("engine.inbound")

KEYWORD_METHOD = "sms_keyword"
REPLY_LIFETIME = timedelta(days=1)
_REPLY_FOR = {"opt_out": "stop", "opt_in": "start", "help": "help"}


@dataclass(frozen=True)
class InboundSms:
    message_sid: str
    from_number: str  # E.164, as Twilio sends it
    to_number: str
    body: str
    opt_out_type: str | None = None


@dataclass(frozen=True)
class InboundResult:
    """What was done; `inline_reply` is the text to answer in TwiML (unknown numbers)."""

    classification: Classification
    duplicate: bool = False
    patients: int = 0
    queued_reply: str | None = None
    inline_reply: str | None = None
    # An opt-out's patients: texts of theirs already on the way to the provider are
    # waited for (engine.dispatch_gate.wait_for_sends) before the opt-out is answered.
    opted_out: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Patient:
    id: int
    external_id: str
    locale: str


@dataclass(frozen=True)
class _Sender:
    """The patients (not erased) who use the number that texted us, with their keys."""

    phone_index: str
    patients: list[_Patient]
    ciphers: dict[int, PatientCipher]


def handle_inbound(
    *, session: Session, keyring: Keyring, defs: DefinitionSet, message: InboundSms, now: datetime
) -> InboundResult:
    """Store the text once (by MessageSid) and act on it: opt-out, opt-in, help or nothing."""
    kind = classify(message.body, message.opt_out_type)
    sender = _sender(session, keyring, message.from_number)
    opted_out = tuple(p.id for p in sender.patients) if kind == "opt_out" else ()
    if not _store(session, message, sender, kind, now):
        return InboundResult(kind, duplicate=True, patients=len(sender.patients),
                             opted_out=opted_out)  # fmt: skip
    reply: str | None = None
    if kind == "opt_out":
        reply = _opt_out(session, keyring, defs, message, sender, now)
    elif kind == "opt_in":
        reply = _opt_in(session, keyring, defs, message, sender, now)
    elif kind == "help":
        reply = "help"
    if reply is None:
        return InboundResult(kind, patients=len(sender.patients), opted_out=opted_out)
    if not sender.patients:
        text = defs.program.text(reply, defs.program.default_locale)
        return InboundResult(kind, inline_reply=text)
    _queue_reply(session, defs, message, sender, reply, now)
    return InboundResult(
        kind, patients=len(sender.patients), queued_reply=reply, opted_out=opted_out
    )


_PATIENTS, _KEYS = m.Patient.__table__, m.PatientKey.__table__
# Built once: the number's patients whose data key still exists, with that key.
_SENDER = (
    select(_PATIENTS.c.id, _PATIENTS.c.external_id, _PATIENTS.c.locale, _KEYS.c.wrapped_key,
           _KEYS.c.master_key_id)
    .join_from(_PATIENTS, _KEYS, _KEYS.c.patient_id == _PATIENTS.c.id)
    .where(_PATIENTS.c.phone_index == bindparam("phone_index"), _PATIENTS.c.erased_at.is_(None),
           _KEYS.c.wrapped_key.is_not(None))
    .order_by(_PATIENTS.c.id)
)  # fmt: skip
# By dialect: a row the first time a MessageSid is seen only (a retry inserts nothing and
# RETURNING gives no row).
_STORE = {
    name: dialect.insert(m.InboundMessage.__table__)
    .on_conflict_do_nothing(index_elements=["provider_sid"])
    .returning(m.InboundMessage.__table__.c.id)
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_INSERT_REPLY = insert(m.Outbox.__table__)


def _sender(session: Session, keyring: Keyring, e164: str) -> _Sender:
    """The patients on the number, keys unwrapped: one query, where the ORM took two."""
    index = keyring.phone_index(e164)
    patients, ciphers = [], {}
    for pid, external_id, locale, wrapped, key_id in session.execute(
        _SENDER, {"phone_index": index}
    ):
        patients.append(_Patient(pid, external_id, locale))
        ciphers[pid] = keyring.cipher(wrapped, patient_id=external_id, master_key_id=key_id)
    return _Sender(index, patients, ciphers)


def _store(
    session: Session, message: InboundSms, sender: _Sender, kind: str, now: datetime
) -> bool:
    """Insert the message; False when this MessageSid was already stored (a Twilio retry).

    The body is sealed with the first patient's key; for an unknown number only the
    classification is kept.
    """
    first = sender.patients[0] if sender.patients else None
    body_enc = None
    if first is not None:
        field = f"inbound/{message.message_sid}/body"
        body_enc = sender.ciphers[first.id].encrypt_field(field, message.body)
    values = {
        "provider_sid": message.message_sid,
        "from_index": sender.phone_index,
        "to_number": printable(message.to_number)[:32],
        "patient_id": first.id if first else None,
        "body_enc": body_enc,
        "classification": kind,
        "received_at": now,
        "handled_at": now,
    }
    stmt = _STORE[session.get_bind().dialect.name]
    return session.execute(stmt, values).first() is not None


def _opt_out(
    session: Session,
    keyring: Keyring,
    defs: DefinitionSet,
    message: InboundSms,
    sender: _Sender,
    now: datetime,
) -> str | None:
    """Revoke every purpose, suppress the number, cancel pending rows (47 CFR 64.1200(a)(10)).

    The confirmation is due only when the number was not suppressed yet: one per opt-out.
    """
    newly = consent_queries.suppress_phone_index(
        session=session, phone_index=sender.phone_index, reason=KEYWORD_METHOD
    )
    every = dict.fromkeys(defs.purposes)
    events = _record(session, keyring, every, message, sender, "revoked", now)
    cancelled = _cancel_pending(session, [p.id for p in sender.patients], message.message_sid, now)
    counts = {"events": len(events), "suppressed": bool(newly), "cancelled": cancelled}
    _audit(session, "consent_opt_out", message, sender, now, **counts)
    return "stop" if newly else None


def _opt_in(
    session: Session,
    keyring: Keyring,
    defs: DefinitionSet,
    message: InboundSms,
    sender: _Sender,
    now: datetime,
) -> str | None:
    """Lift a keyword suppression and give back what the keyword opt-out revoked.

    Erasure suppressions are never lifted. The policies decide whether the previous
    grant's legal basis still suffices for each campaign.
    """
    s = m.Suppression
    lifted = session.execute(
        delete(s).where(s.phone_index == sender.phone_index, s.reason.in_(sorted(KEYWORD_METHODS)))
    ).rowcount
    regranted = 0
    for patient in sender.patients:
        events = consent_queries.consent_events_for(
            session=session, keyring=keyring, patient_id=patient.id
        )
        bases = regrantable(events, defs.purposes)
        one = _Sender(sender.phone_index, [patient], sender.ciphers)
        regranted += len(_record(session, keyring, bases, message, one, "granted", now))
    _audit(session, "consent_opt_in", message, sender, now, events=regranted, lifted=lifted)
    return "start" if lifted or regranted else None


def _audit(
    session: Session,
    action: str,
    message: InboundSms,
    sender: _Sender,
    now: datetime,
    **counts: int | bool,
) -> None:
    """One entry per handled opt-out or opt-in keyword: patients by external id, never the
    number or the text."""
    patients = [p.external_id for p in sender.patients]
    audit.record(
        session=session,
        actor="twilio",
        action=action,
        subject=f"patient:{patients[0]}" if patients else "unknown-number",
        details={"message": message.message_sid, "patients": patients, **counts},
        now=now,
    )


def _record(
    session: Session,
    keyring: Keyring,
    bases: Mapping[str, str | None],
    message: InboundSms,
    sender: _Sender,
    what: Literal["granted", "revoked"],
    now: datetime,
) -> list[m.ConsentEvent]:
    """One ledger event per patient and purpose; `bases` maps purpose -> legal basis."""
    items = [
        (
            patient.id,
            ConsentEvent(
                patient=patient.external_id,
                purpose=purpose,
                status=what,
                occurred_at=now,
                legal_basis=basis,
                method=KEYWORD_METHOD,
                evidence=f"inbound {message.message_sid}",
                recorded_by="inbound",
            ),
        )
        for patient in sender.patients
        for purpose, basis in bases.items()
    ]
    if not items:
        return []
    return consent_queries.record_consent_events(
        session=session, keyring=keyring, items=items, source="inbound"
    )


def _cancel_pending(session: Session, patient_ids: list[int], sid: str, now: datetime) -> int:
    """Every row of these patients not yet handed to the provider (waiting, or claimed and
    not started: engine.dispatch_gate) but an opt-out confirmation (which a repeated STOP
    must not cancel); other program replies (HELP, START) go too."""
    if not patient_ids:
        return 0
    o = m.Outbox
    stmt = select(o).where(o.patient_id.in_(patient_ids), withdrawable())
    confirmation = (o.campaign_id == PROGRAM_CAMPAIGN) & o.idempotency_key.like("program/%/stop")
    stmt = stmt.where(~confirmation)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(of=o)
    reason = {
        "rule": "opted-out",
        "policy": "engage",
        "effect": "deny",
        "message": f"the patient texted an opt-out keyword (inbound {sid})",
        "cite": "47 CFR 64.1200(a)(10)",
    }
    rows = list(session.scalars(stmt))
    for row in rows:
        row.status, row.decided_at = status.CANCELLED, now
        row.reasons = [*row.reasons, reason]
    return len(rows)


def _queue_reply(
    session: Session,
    defs: DefinitionSet,
    message: InboundSms,
    sender: _Sender,
    which: str,
    now: datetime,
) -> None:
    """One program reply to the number, addressed to its first patient, in their locale."""
    patient = sender.patients[0]
    text = defs.program.text(which, patient.locale)
    key = f"program/{message.message_sid}/{which}"
    encoding, segments, _ = sms.measure(text)
    reason = {
        "rule": PROGRAM_REPLY_RULE,
        "policy": "engage",
        "effect": "allow",
        "message": f"{which.upper()} reply to inbound {message.message_sid}",
        "cite": "CTIA Messaging Principles 5.1.1",
    }
    values = dict(
        idempotency_key=key,
        campaign_id=PROGRAM_CAMPAIGN,
        campaign_version=defs.version,
        locale=patient.locale,
        purpose=PROGRAM_CAMPAIGN,
        patient_id=patient.id,
        occurrence=f"inbound:{message.message_sid}",
        outcome="allow",
        status=status.QUEUED,
        due_at=now,
        send_at=now,
        expires_at=now + REPLY_LIFETIME,
        body_enc=sender.ciphers[patient.id].encrypt_field(body_field(key), text),
        segments=segments,
        encoding=encoding,
        reasons=[reason],
        policy_set=defs.policy_version,
        decided_at=now,
    )
    session.execute(_INSERT_REPLY, values)  # Core: no unit of work for one row


def printable(text: str) -> str:
    """`text` without control characters (PostgreSQL text refuses NUL) for a column."""
    return "".join(c for c in text if c.isprintable())
