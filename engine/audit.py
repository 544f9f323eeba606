"""The audit log: one hash-chained line of who did what, when.

Each entry's hash is the SHA-256 of the previous entry's hash and the entry's own canonical
JSON (time, actor, action, subject, details), so an edited, removed, inserted or reordered
entry breaks every hash after it. Appenders first bump the single `audit_head` row, which
serializes them on both databases (a row lock on PostgreSQL, the write lock on SQLite), so
the chain never forks. Details must never hold PHI: ids and counts, not names or numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from engine.store import models as m

GENESIS = "0" * 64


def entry_hash(
    prev_hash: str | None,
    *,
    at: datetime,
    actor: str,
    action: str,
    subject: str | None,
    details: Mapping[str, Any],
) -> str:
    body = json.dumps(
        {
            "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
            "actor": actor,
            "action": action,
            "subject": subject,
            "details": details,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(f"{prev_hash or GENESIS}\n{body}".encode()).hexdigest()


def record(
    *,
    session: Session,
    actor: str,
    action: str,
    now: datetime,
    subject: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> m.AuditEntry:
    """Append one entry in the caller's transaction (it lands or vanishes with the change)."""
    details = json.loads(json.dumps(dict(details or {}), default=str))
    session.execute(
        update(m.AuditHead)
        .where(m.AuditHead.id == 1)
        .values(entries=m.AuditHead.entries + 1)
        .execution_options(synchronize_session=False)
    )
    prev = session.scalar(select(m.AuditHead.last_hash).where(m.AuditHead.id == 1))
    digest = entry_hash(prev, at=now, actor=actor, action=action, subject=subject, details=details)
    entry = m.AuditEntry(
        at=now,
        actor=actor,
        action=action,
        subject=subject,
        details=details,
        prev_hash=prev,
        hash=digest,
    )
    session.add(entry)
    session.execute(
        update(m.AuditHead)
        .where(m.AuditHead.id == 1)
        .values(last_hash=digest)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return entry


@dataclass(frozen=True)
class Verification:
    entries: int
    first_bad: int | None = None  # the id of the first entry that does not check out
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None and self.problem is None


def verify(*, session: Session) -> Verification:
    """Walk the chain in id order and recompute every hash."""
    prev: str | None = None
    count = 0
    rows = session.execute(select(m.AuditEntry).order_by(m.AuditEntry.id)).scalars()
    for entry in rows:
        count += 1
        if entry.prev_hash != prev:
            return Verification(count, entry.id, "its prev_hash does not match the entry before")
        expected = entry_hash(
            prev,
            at=entry.at,
            actor=entry.actor,
            action=entry.action,
            subject=entry.subject,
            details=entry.details,
        )
        if entry.hash != expected:
            return Verification(count, entry.id, "its content does not match its hash")
        prev = entry.hash
    head = session.get(m.AuditHead, 1)
    if head is not None and (head.last_hash != prev or head.entries != count):
        return Verification(count, None, "entries after the last one shown were removed")
    return Verification(count)
