"""Reads behind the compliance and IT pages of the admin app (keyword-only; nothing here
commits or writes)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy import JSON, ColumnElement, cast, exists, func, literal, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from engine.core import domain
from engine.crypto import Keyring
from engine.store import codec
from engine.store import models as m
from engine.store.queries import ciphers_for

PAGE_SIZE = 50
T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list, newest first; `next_before` continues it (None: the last page)."""

    items: Sequence[T]
    next_before: int | None


# --- template reviews ----------------------------------------------------------------------


def pending_drafts(*, session: Session) -> list[m.TemplateDraft]:
    """Browser edits waiting for a reviewer, oldest first (first come, first reviewed)."""
    d = m.TemplateDraft
    return list(
        session.scalars(select(d).where(d.status == "pending").order_by(d.created_at, d.id))
    )


def reviewed_versions(*, session: Session) -> dict[str, str]:
    """The latest review decision (approve|reject) of every template version reviewed."""
    latest: dict[str, str] = {}
    a = m.Approval
    for version, decision in session.execute(
        select(a.version, a.decision).order_by(a.approved_at, a.id)
    ):
        latest[version] = decision
    return latest


def last_approved_source(
    *, session: Session, template_id: str, locale: str, before: str
) -> tuple[str, str] | None:
    """(version, file text) of the variant's most recently approved version other than
    `before`, when its text is stored; None when there is none to compare with."""
    a, d = m.Approval, m.Definition
    row = session.execute(
        select(a.version, d.content)
        .join(d, (d.version == a.version) & (d.kind == "template"))
        .where(
            a.template_id == template_id,
            a.locale == locale,
            a.decision == "approve",
            a.version != before,
            d.def_id == f"{template_id}.{locale}",
        )
        .order_by(a.approved_at.desc(), a.id.desc())
        .limit(1)
    ).first()
    return (row[0], row[1]) if row else None


def stored_source(*, session: Session, def_id: str, version: str | None) -> str | None:
    """The text of a stored template version, if it was ever synced or approved."""
    if version is None:
        return None
    d = m.Definition
    stmt = select(d.content).where(d.kind == "template", d.def_id == def_id, d.version == version)
    return session.scalar(stmt.limit(1))


def template_reviews(*, session: Session, template_id: str) -> list[m.Approval]:
    a = m.Approval
    stmt = select(a).where(a.template_id == template_id).order_by(a.approved_at.desc(), a.id.desc())
    return list(session.scalars(stmt))


def template_drafts(*, session: Session, template_id: str) -> list[m.TemplateDraft]:
    d = m.TemplateDraft
    stmt = select(d).where(d.template_id == template_id).order_by(d.created_at.desc(), d.id.desc())
    return list(session.scalars(stmt))


def template_versions(*, session: Session, template_id: str) -> list[m.Definition]:
    """Every stored version of the template's variants, newest first."""
    d = m.Definition
    stmt = (
        select(d)
        .where(d.kind == "template", d.def_id.like(f"{template_id}.%"))
        .order_by(d.loaded_at.desc(), d.id.desc())
    )
    return [row for row in session.scalars(stmt) if row.def_id.rsplit(".", 1)[0] == template_id]


# --- decisions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionFilters:
    campaign: str | None = None
    status: str | None = None
    outcome: str | None = None
    rule: str | None = None
    patient: str | None = None  # an external id


@dataclass(frozen=True)
class DecisionRow:
    row: m.Outbox
    external_id: str


def _has_rule(session: Session, rule: str) -> ColumnElement[bool]:
    """Any of the row's reasons names `rule` (a JSON containment test per dialect)."""
    o = m.Outbox
    if session.get_bind().dialect.name == "postgresql":
        wanted = cast(literal(json.dumps([{"rule": rule}])), JSONB)
        return cast(cast(o.reasons, JSON), JSONB).op("@>")(wanted)
    each = func.json_each(o.reasons).table_valued("value").alias("reason")
    return exists(
        select(1).select_from(each).where(func.json_extract(each.c.value, "$.rule") == rule)
    )


def decisions(
    *, session: Session, filters: DecisionFilters, before: int | None = None, limit: int = PAGE_SIZE
) -> Page[DecisionRow]:
    """Outbox rows matching `filters`, newest first, `limit` of them with ids below `before`
    (keyset pagination: a page never shifts when rows are added meanwhile)."""
    o, p = m.Outbox, m.Patient
    stmt = select(o, p.external_id).join(p, p.id == o.patient_id)
    if filters.campaign:
        stmt = stmt.where(o.campaign_id == filters.campaign)
    if filters.status:
        stmt = stmt.where(o.status == filters.status)
    if filters.outcome:
        stmt = stmt.where(o.outcome == filters.outcome)
    if filters.patient:
        stmt = stmt.where(p.external_id == filters.patient)
    if filters.rule:
        stmt = stmt.where(_has_rule(session, filters.rule))
    if before is not None:
        stmt = stmt.where(o.id < before)
    found = session.execute(stmt.order_by(o.id.desc()).limit(limit + 1)).all()
    rows = [DecisionRow(row, external_id) for row, external_id in found[:limit]]
    return Page(rows, rows[-1].row.id if len(found) > limit else None)


def outbox_campaigns(*, session: Session) -> list[str]:
    return sorted(session.scalars(select(m.Outbox.campaign_id).distinct()))


# --- a patient's consent -------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    """One consent event as stored: the domain event (evidence opened) and where it came
    from."""

    event: domain.ConsentEvent
    source: str | None
    recorded_at: datetime


def consent_ledger(*, session: Session, keyring: Keyring, patient_id: int) -> list[LedgerEntry]:
    """The patient's ledger in recorded order, evidence decrypted (None once erased)."""
    e = m.ConsentEvent
    cipher = ciphers_for(session=session, keyring=keyring, patient_ids=[patient_id]).get(patient_id)
    external_id = session.scalar(select(m.Patient.external_id).where(m.Patient.id == patient_id))
    rows = session.scalars(select(e).where(e.patient_id == patient_id).order_by(e.id))
    return [
        LedgerEntry(
            codec.to_consent_event(row, external_id or "", cipher), row.source, row.recorded_at
        )
        for row in rows
    ]


def recent_decisions(*, session: Session, patient_id: int, limit: int = 20) -> list[m.Outbox]:
    o = m.Outbox
    stmt = select(o).where(o.patient_id == patient_id).order_by(o.id.desc()).limit(limit)
    return list(session.scalars(stmt))


# --- definitions -------------------------------------------------------------------------


def active_files(*, session: Session) -> list[m.Definition]:
    d = m.Definition
    return list(session.scalars(select(d).where(d.active).order_by(d.path)))


def definition_sets(*, session: Session, limit: int = 20) -> list[m.DefinitionSet]:
    s = m.DefinitionSet
    return list(session.scalars(select(s).order_by(s.loaded_at.desc(), s.id.desc()).limit(limit)))


# --- audit log ---------------------------------------------------------------------------


def audit_entries(
    *,
    session: Session,
    action: str | None = None,
    actor: str | None = None,
    before: int | None = None,
    limit: int = PAGE_SIZE,
) -> Page[m.AuditEntry]:
    """Entries newest first, `limit` of them with ids below `before`."""
    a = m.AuditEntry
    stmt = select(a)
    if action:
        stmt = stmt.where(a.action == action)
    if actor:
        stmt = stmt.where(a.actor == actor)
    if before is not None:
        stmt = stmt.where(a.id < before)
    found = list(session.scalars(stmt.order_by(a.id.desc()).limit(limit + 1)))
    return Page(found[:limit], found[limit - 1].id if len(found) > limit else None)


def audit_actions(*, session: Session) -> list[str]:
    return sorted(session.scalars(select(m.AuditEntry.action).distinct()))
