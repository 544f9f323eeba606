"""Reads behind the REST API and /metrics (keyword-only; nothing here decrypts or commits).

Lists page by id (keyset): `after` is the last id of the previous page and each function
returns up to `limit + 1` rows, so the caller knows whether another page follows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, String, cast, func, select
from sqlalchemy.orm import Session

from engine.outbox_status import QUEUED
from engine.store import models as m
from engine.store.outbox_queries import EXPLAINED, deciding_rule

# Rows read per round while filtering decisions by deciding rule (done in Python).
RULE_SCAN_BATCH = 500


def patient_rows(
    *, session: Session, external_id: str | None, after: int | None, limit: int
) -> list[m.Patient]:
    p = m.Patient
    stmt = select(p).order_by(p.id).limit(limit + 1)
    if external_id is not None:
        stmt = stmt.where(p.external_id == external_id)
    if after is not None:
        stmt = stmt.where(p.id > after)
    return list(session.scalars(stmt))


DECISION_COLUMNS = (
    m.Outbox.id,
    m.Outbox.campaign_id,
    m.Outbox.campaign_version,
    m.Outbox.purpose,
    m.Outbox.occurrence,
    m.Patient.external_id,
    m.Outbox.anchor,
    m.Outbox.outcome,
    m.Outbox.status,
    m.Outbox.due_at,
    m.Outbox.send_at,
    m.Outbox.decided_at,
    m.Outbox.policy_set,
    m.Outbox.template_id,
    m.Outbox.template_version,
    m.Outbox.locale,
    m.Outbox.reasons,
)


def row_rule(status: str, reasons: list[Any] | None) -> str | None:
    """The rule a row is down to, for rows not sent for a reason (else None)."""
    return deciding_rule(status, reasons) if status in EXPLAINED else None


def decision_rows(
    *,
    session: Session,
    campaign: str | None,
    outcome: str | None,
    rule: str | None,
    patient_id: int | None,
    after: int | None,
    limit: int,
) -> list[Row[Any]]:
    """Outbox rows (with the patient's external id), filtered; by deciding rule in Python,
    after a textual pre-filter in SQL that keeps only rows whose reasons name the rule."""
    o = m.Outbox
    stmt = select(*DECISION_COLUMNS).join(m.Patient, m.Patient.id == o.patient_id).order_by(o.id)
    if campaign is not None:
        stmt = stmt.where(o.campaign_id == campaign)
    if outcome is not None:
        stmt = stmt.where(o.outcome == outcome)
    if patient_id is not None:
        stmt = stmt.where(o.patient_id == patient_id)
    if rule is None:
        page = stmt.where(o.id > after) if after is not None else stmt
        return list(session.execute(page.limit(limit + 1)))
    stmt = stmt.where(
        o.status.in_(EXPLAINED), cast(o.reasons, String).contains(json.dumps(rule), autoescape=True)
    )
    found: list[Row[Any]] = []
    while len(found) <= limit:
        page = stmt.where(o.id > after) if after is not None else stmt
        batch = list(session.execute(page.limit(RULE_SCAN_BATCH)))
        found.extend(r for r in batch if row_rule(r.status, r.reasons) == rule)
        if len(batch) < RULE_SCAN_BATCH:
            break
        after = batch[-1].id
    return found[: limit + 1]


def message_rows(
    *, session: Session, status: str | None, campaign: str | None, after: int | None, limit: int
) -> list[Row[Any]]:
    o = m.Outbox
    stmt = select(
        o.id,
        o.campaign_id,
        o.status,
        o.provider_status,
        o.segments,
        o.encoding,
        o.send_at,
        o.sent_at,
        o.error_code,
        o.attempts,
    ).order_by(o.id)
    if status is not None:
        stmt = stmt.where(o.status == status)
    if campaign is not None:
        stmt = stmt.where(o.campaign_id == campaign)
    if after is not None:
        stmt = stmt.where(o.id > after)
    return list(session.execute(stmt.limit(limit + 1)))


# --- metrics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxGauges:
    """The outbox as /metrics shows it at one scrape."""

    by_campaign_status: dict[tuple[str, str], int]
    by_outcome: dict[str, int]
    due_backlog_seconds: float
    last_decided_at: datetime | None


def outbox_gauges(*, session: Session, now: datetime) -> OutboxGauges:
    """Counts by campaign and status and by outcome (two GROUP BYs), how long the oldest due
    queued row has waited, and the time of the latest decision."""
    o = m.Outbox
    by_status = session.execute(
        select(o.campaign_id, o.status, func.count()).group_by(o.campaign_id, o.status)
    )
    by_outcome = session.execute(select(o.outcome, func.count()).group_by(o.outcome))
    oldest_due = session.scalar(
        select(func.min(o.send_at)).where(o.status == QUEUED, o.send_at <= now)
    )
    last = session.scalar(select(func.max(o.decided_at)))
    return OutboxGauges(
        by_campaign_status={(c, s): n for c, s, n in by_status},
        by_outcome={outcome: n for outcome, n in by_outcome},
        due_backlog_seconds=_seconds_since(oldest_due, now),
        last_decided_at=last,
    )


def _seconds_since(moment: datetime | None, now: datetime) -> float:
    return max(0.0, (now - moment).total_seconds()) if moment else 0.0
