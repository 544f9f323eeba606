"""Reads for the marketers' pages: live counts per campaign, campaign funnels, blocks by
rule, sends per day and opt-outs (keyword-only; aggregated in SQL, on SQLite and
PostgreSQL alike; nothing here writes).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Date, Text, case, cast, distinct, func, literal, select
from sqlalchemy.orm import Session

from engine.outbox_status import BLOCKED, DELIVERED, EXPIRED
from engine.store import models as m
from engine.store.outbox_queries import EXPLAINED, deciding_rule

OPT_OUT_WINDOW = timedelta(days=7)


def _count_where(condition: Any) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# --- the campaign list ------------------------------------------------------------------------


def counts_by_campaign(*, session: Session) -> dict[str, dict[str, int]]:
    """Outbox rows per campaign and status: {campaign: {status: n}}."""
    o = m.Outbox
    stmt = select(o.campaign_id, o.status, func.count()).group_by(o.campaign_id, o.status)
    found: dict[str, dict[str, int]] = {}
    for campaign_id, status, n in session.execute(stmt):
        found.setdefault(campaign_id, {})[status] = n
    return found


@dataclass(frozen=True)
class PauseState:
    paused: bool
    by: str | None
    at: datetime | None


def pause_states(*, session: Session) -> dict[str, PauseState]:
    """Each campaign an operator ever paused or resumed, with who did it last and when."""
    s = m.CampaignState
    rows = session.execute(select(s.campaign_id, s.paused, s.updated_by, s.updated_at))
    return {cid: PauseState(bool(paused), by, at) for cid, paused, by, at in rows}


# --- for previews and dry-runs ----------------------------------------------------------------


def first_patients(*, session: Session, limit: int = 20) -> list[tuple[str, str]]:
    """(external id, locale) of the first patients not erased, to preview against."""
    p = m.Patient
    stmt = select(p.external_id, p.locale).where(p.erased_at.is_(None)).order_by(p.id).limit(limit)
    return [(external_id, locale) for external_id, locale in session.execute(stmt)]


def patient_zones(*, session: Session) -> list[str]:
    """The time zones patients live in (to interpret a dry-run time in one of them)."""
    p = m.Patient
    stmt = select(p.timezone).where(p.timezone.is_not(None)).distinct().order_by(p.timezone)
    return [zone for zone in session.scalars(stmt) if zone]


# --- dashboards -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Funnel:
    """How far a campaign's occurrences got.

    eligible: outbox rows (occurrences planned); allowed: not blocked or expired (queued or
    sent at some point); sent: accepted by the provider; delivered: confirmed by the
    carrier; clicked: self-scheduling links opened; booked: links used to book.
    """

    eligible: int = 0
    allowed: int = 0
    sent: int = 0
    delivered: int = 0
    clicked: int = 0
    booked: int = 0

    def steps(self) -> list[tuple[str, int]]:
        return [
            ("Eligible", self.eligible),
            ("Allowed", self.allowed),
            ("Sent", self.sent),
            ("Delivered", self.delivered),
            ("Clicked", self.clicked),
            ("Booked", self.booked),
        ]


def funnels(*, session: Session, campaign_ids: Iterable[str] | None = None) -> dict[str, Funnel]:
    """Each campaign's funnel, in two grouped queries (outbox rows, then their links)."""
    o, link = m.Outbox, m.SchedulingLink
    where = [] if campaign_ids is None else [o.campaign_id.in_(list(campaign_ids))]
    rows = select(
        o.campaign_id,
        func.count(),
        _count_where(o.status.not_in((BLOCKED, EXPIRED))),
        _count_where(o.sent_at.is_not(None)),
        _count_where(o.status == DELIVERED),
    ).where(*where)
    links = (
        select(
            o.campaign_id,
            _count_where(link.opened_at.is_not(None)),
            _count_where(link.booked_slot_id.is_not(None)),
        )
        .join(o, o.id == link.outbox_id)
        .where(*where)
    )
    clicks = {
        cid: (int(clicked), int(booked))
        for cid, clicked, booked in session.execute(links.group_by(o.campaign_id))
    }
    return {
        cid: Funnel(int(n), int(allowed), int(sent), int(delivered), *clicks.get(cid, (0, 0)))
        for cid, n, allowed, sent, delivered in session.execute(rows.group_by(o.campaign_id))
    }


def funnel(*, session: Session, campaign_id: str) -> Funnel:
    return funnels(session=session, campaign_ids=[campaign_id]).get(campaign_id, Funnel())


@dataclass(frozen=True)
class RuleCount:
    status: str  # blocked, deferred, expired, cancelled
    rule: str  # the deciding rule (outbox_queries.deciding_rule)
    count: int


def rule_counts(*, session: Session, campaign_id: str) -> list[RuleCount]:
    """Rows not sent, by status and the rule their status is down to, most first.

    SQL groups the rows by their reasons (rows decided alike share them); the deciding rule
    is then read once per group."""
    o = m.Outbox
    reasons = cast(o.reasons, Text)
    stmt = (
        select(o.status, reasons, func.count())
        .where(o.campaign_id == campaign_id, o.status.in_(EXPLAINED))
        .group_by(o.status, reasons)
    )
    found: Counter[tuple[str, str]] = Counter()
    for status, text, n in session.execute(stmt):
        found[(status, deciding_rule(status, json.loads(text) if text else []))] += n
    ordered = sorted(found.items(), key=lambda item: (-item[1], item[0]))
    return [RuleCount(status, rule, n) for (status, rule), n in ordered]


def sends_per_day(*, session: Session, campaign_id: str) -> list[tuple[date, int]]:
    """Messages accepted by the provider per UTC day, oldest first (days without a send
    are left out)."""
    o = m.Outbox
    if _postgres(session):
        day: Any = cast(func.timezone("UTC", o.sent_at), Date)
    else:
        day = func.date(o.sent_at)  # stored as UTC text
    stmt = (
        select(day, func.count())
        .where(o.campaign_id == campaign_id, o.sent_at.is_not(None))
        .group_by(day)
        .order_by(day)
    )
    return [
        (value if isinstance(value, date) else date.fromisoformat(value), n)
        for value, n in session.execute(stmt)
    ]


@dataclass(frozen=True)
class OptOuts:
    """Patients who texted an opt-out within the window after a message of the campaign,
    out of the patients it sent to."""

    opted_out: int
    sent_to: int
    window: timedelta = OPT_OUT_WINDOW

    @property
    def rate(self) -> float | None:
        return self.opted_out / self.sent_to if self.sent_to else None


def opt_outs(*, session: Session, campaign_id: str, window: timedelta = OPT_OUT_WINDOW) -> OptOuts:
    o, i = m.Outbox, m.InboundMessage
    if _postgres(session):
        within = i.received_at.between(o.sent_at, o.sent_at + literal(window))
    else:
        gap = func.julianday(i.received_at) - func.julianday(o.sent_at)
        within = gap.between(0, window.total_seconds() / 86_400)
    sent = o.campaign_id == campaign_id, o.sent_at.is_not(None)
    opted_out = (
        select(func.count(distinct(o.patient_id)))
        .join(i, i.patient_id == o.patient_id)
        .where(*sent, i.classification == "opt_out", within)
    )
    sent_to = select(func.count(distinct(o.patient_id))).where(*sent)
    return OptOuts(int(session.scalar(opted_out) or 0), int(session.scalar(sent_to) or 0), window)
