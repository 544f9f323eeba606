"""Stored definition sets and template approvals (keyword-only query functions)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from engine.definitions import DefinitionSet, load_sources
from engine.store import models as m


@dataclass(frozen=True)
class SyncResult:
    version: str
    previous: str | None
    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def unchanged(self) -> bool:
        return self.version == self.previous


def sync_definitions(*, session: Session, defs: DefinitionSet, now: datetime) -> SyncResult:
    """Make `defs` the active set in one transaction; earlier versions stay stored."""
    active = session.scalars(select(m.Definition).where(m.Definition.active)).all()
    before = {row.path: row.version for row in active}
    previous = session.scalar(select(m.DefinitionSet.version).where(m.DefinitionSet.active))
    session.execute(update(m.Definition).where(m.Definition.active).values(active=False))
    session.execute(update(m.DefinitionSet).where(m.DefinitionSet.active).values(active=False))
    stored = {
        (row.kind, row.def_id, row.version): row
        for row in session.scalars(
            select(m.Definition).where(m.Definition.version.in_([f.version for f in defs.files]))
        )
    }
    for f in defs.files:
        row = stored.get((f.kind, f.def_id, f.version))
        if row is None:
            row = m.Definition(
                kind=f.kind,
                def_id=f.def_id,
                version=f.version,
                path=f.path,
                content=f.content,
                loaded_at=now,
            )
            session.add(row)
        row.path = f.path
        row.active = True
    set_row = session.scalar(select(m.DefinitionSet).where(m.DefinitionSet.version == defs.version))
    if set_row is None:
        set_row = m.DefinitionSet(version=defs.version, loaded_at=now, summary={})
        session.add(set_row)
    set_row.active = True
    set_row.summary = {
        "campaigns": sorted(defs.campaigns),
        "templates": sorted(f"{t}.{loc}" for t, loc in defs.templates),
        "policies": sorted(p.id for p in defs.policies),
        "policy_version": defs.policy_version,
    }
    after = {f.path: f.version for f in defs.files}
    return SyncResult(
        version=defs.version,
        previous=previous,
        added=tuple(sorted(set(after) - set(before))),
        changed=tuple(sorted(p for p in after if p in before and before[p] != after[p])),
        removed=tuple(sorted(set(before) - set(after))),
    )


def active_version(*, session: Session) -> str | None:
    """The version of the active set (one indexed row), to notice another `engage sync`."""
    return session.scalar(select(m.DefinitionSet.version).where(m.DefinitionSet.active))


def active_definitions(*, session: Session) -> DefinitionSet | None:
    """The active set as stored by the last successful sync, or None before any sync."""
    rows = session.scalars(select(m.Definition).where(m.Definition.active)).all()
    if not rows:
        return None
    return load_sources({row.path: row.content for row in rows}, root="database")


def approved_versions(*, session: Session) -> set[str]:
    """Template versions whose latest review decision is an approval."""
    latest: dict[str, str] = {}
    rows = session.execute(
        select(m.Approval.version, m.Approval.decision).order_by(
            m.Approval.approved_at, m.Approval.id
        )
    )
    for version, decision in rows:
        latest[version] = decision
    return {version for version, decision in latest.items() if decision == "approve"}


def record_review(
    *,
    session: Session,
    template_id: str,
    locale: str,
    version: str,
    decision: str,
    by: str,
    now: datetime,
    comment: str | None = None,
) -> m.Approval:
    row = m.Approval(
        template_id=template_id,
        locale=locale,
        version=version,
        decision=decision,
        approved_by=by,
        approved_at=now,
        comment=comment,
    )
    session.add(row)
    return row
