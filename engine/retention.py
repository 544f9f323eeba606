"""Retention: purge what `policies/retention.yaml` says is past its period (GDPR Art. 5(1)(e)).

`purge_due` runs in the caller's transaction with the time passed in, and records one audit
entry per run with its counts. What it does per kind:

    message_bodies        outbox.body_enc nulled, from sending or the final status
    inbound_free_text     body of replies that were no keyword nulled, from receipt
    inbound_keyword_text  body of STOP/START/HELP replies nulled, from receipt
    scheduling_links      links deleted (with their clicks), from expiry
    decisions             final outbox rows deleted, from the decision
    consent_evidence      never purged: consent_events are append-only (a trigger refuses
                          DELETE) and are the proof that a message was allowed, needed while
                          the consent is in effect and six years after (45 CFR
                          164.316(b)(2)(i)); an erased patient's evidence is crypto-shredded
                          by erasure already. Only counted.

The audit log itself is append-only and kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from engine import audit
from engine.definitions import DefinitionSet
from engine.outbox_status import FINAL
from engine.store import models as m

FREE_TEXT = "other"  # engine.core.inbound: a reply that matched no keyword


@dataclass(frozen=True)
class RetentionCounts:
    """Rows purged per kind (or due, on a dry run); consent events are only counted."""

    message_bodies: int = 0
    inbound_free_text: int = 0
    inbound_keyword_text: int = 0
    scheduling_links: int = 0
    decisions: int = 0
    consent_events_past_period: int = 0
    policy: bool = True  # False: the active set has no retention.yaml, nothing was purged

    def fields(self) -> dict[str, Any]:
        return asdict(self)


def purge_due(
    *,
    session: Session,
    defs: DefinitionSet,
    now: datetime,
    dry_run: bool = False,
    actor: str = "system:retention",
) -> RetentionCounts:
    """Purge (or, dry, count) what is past its retention period at `now`; audited."""
    policy = defs.retention
    if policy is None:
        return RetentionCounts(policy=False)
    o, i, link, ev = m.Outbox, m.InboundMessage, m.SchedulingLink, m.ConsentEvent
    final = sorted(FINAL)
    bodies = [
        o.body_enc.is_not(None),
        o.status.in_(final),
        func.coalesce(o.sent_at, o.updated_at) < now - policy.message_bodies.keep,
    ]
    free_text = [
        i.body_enc.is_not(None),
        i.classification == FREE_TEXT,
        i.received_at < now - policy.inbound_free_text.keep,
    ]
    keyword_text = [
        i.body_enc.is_not(None),
        i.classification != FREE_TEXT,
        i.received_at < now - policy.inbound_keyword_text.keep,
    ]
    links = [link.expires_at < now - policy.scheduling_links.keep]
    decisions = [
        o.status.in_(final),
        func.coalesce(o.decided_at, o.created_at) < now - policy.decisions.keep,
    ]
    evidence = [ev.occurred_at < now - policy.consent_evidence.keep]
    if dry_run:
        return RetentionCounts(
            message_bodies=_count(session, o, bodies),
            inbound_free_text=_count(session, i, free_text),
            inbound_keyword_text=_count(session, i, keyword_text),
            scheduling_links=_count(session, link, links),
            decisions=_count(session, o, decisions),
            consent_events_past_period=_count(session, ev, evidence),
        )
    counts = RetentionCounts(
        message_bodies=_null(session, o, bodies, body_enc=None, updated_at=o.updated_at),
        inbound_free_text=_null(session, i, free_text, body_enc=None),
        inbound_keyword_text=_null(session, i, keyword_text, body_enc=None),
        scheduling_links=_delete(session, link, links),
        decisions=_delete_decisions(session, decisions),
        consent_events_past_period=_count(session, ev, evidence),
    )
    audit.record(
        session=session,
        actor=actor,
        action="retention_purged",
        now=now,
        details=counts.fields(),
    )
    return counts


def _count(session: Session, table: Any, where: list[Any]) -> int:
    return int(session.scalar(select(func.count()).select_from(table).where(*where)) or 0)


def _null(session: Session, table: Any, where: list[Any], **values: Any) -> int:
    stmt = update(table).where(*where).values(**values)
    return int(session.execute(stmt.execution_options(synchronize_session=False)).rowcount)


def _delete(session: Session, table: Any, where: list[Any]) -> int:
    stmt = delete(table).where(*where).execution_options(synchronize_session=False)
    return int(session.execute(stmt).rowcount)


def _delete_decisions(session: Session, where: list[Any]) -> int:
    """Delete old final outbox rows, first unhooking links that still name them."""
    o, link = m.Outbox, m.SchedulingLink
    old = select(o.id).where(*where).scalar_subquery()
    session.execute(
        update(link)
        .where(link.outbox_id.in_(old))
        .values(outbox_id=None)
        .execution_options(synchronize_session=False)
    )
    return _delete(session, o, where)
