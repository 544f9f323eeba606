"""The audit log: one hash-chained line of who did what, when.

Each entry's hash is the SHA-256 of the previous entry's hash and the entry's own canonical
JSON (time, actor, action, subject, details), so an edited, removed, inserted or reordered
entry breaks every hash after it. Appenders first bump the single `audit_head` row, which
serializes them on both databases (a row lock on PostgreSQL, the write lock on SQLite), so
the chain never forks. Details must never hold PHI: ids and counts, not names or numbers.
"""

from __future__ import annotations

import getpass
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain, pairwise
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
    """The result of walking the chain; on failure, the first entry that does not check out
    (`first_bad`, with its time and action) and what is wrong with it."""

    entries: int
    first_bad: int | None = None
    problem: str | None = None
    at: datetime | None = None
    action: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None and self.problem is None


def verify(*, session: Session) -> Verification:
    """Walk the chain in id order, recompute every hash and compare the end with the head.

    An edited entry fails its own hash; a deleted one leaves the next entry following a hash
    no entry has; an inserted one is skipped by the chain (the entry after it follows the
    one before it); a reordered one follows an entry that comes later. Entries removed from
    the end show as a head that counts more entries than the log holds.
    """
    rows = session.scalars(
        select(m.AuditEntry).order_by(m.AuditEntry.id).execution_options(yield_per=1000)
    )
    count = 0
    last: m.AuditEntry | None = None
    before_last: m.AuditEntry | None = None
    for entry, following in pairwise(chain(rows, [None])):
        assert entry is not None
        count += 1
        found = _problem(session, entry, following, last, before_last)
        if found is not None:
            bad, problem = found
            checked = count if bad is entry else count - 1
            return Verification(checked, bad.id, problem, bad.at, bad.action)
        before_last, last = last, entry
    return _check_head(session, count, last)


def _problem(
    session: Session,
    entry: m.AuditEntry,
    following: m.AuditEntry | None,
    last: m.AuditEntry | None,
    before_last: m.AuditEntry | None,
) -> tuple[m.AuditEntry, str] | None:
    """(the bad entry, what is wrong) when `entry` does not follow `last`, else None."""
    expected = last.hash if last else None
    own = entry.hash == _recompute(entry)
    if entry.prev_hash == expected:
        if own:
            return None
        if following is not None and following.prev_hash == expected:
            return entry, "inserted: the chain skips it (the entry after it follows the one before)"
        return entry, "edited: its content does not match its hash"
    if last is not None and own and entry.prev_hash == (before_last.hash if before_last else None):
        return last, "inserted: the chain skips it (the entry after it follows the one before)"
    if entry.prev_hash is None:
        return entry, "out of place: it claims to be the first entry"
    target = session.scalar(select(m.AuditEntry.id).where(m.AuditEntry.hash == entry.prev_hash))
    if target is not None and target > entry.id:
        return entry, f"reordered: it follows entry {target}, which comes after it"
    if target is not None:
        return entry, f"out of place: it follows entry {target}, not the entry just before it"
    if not own:
        return entry, "edited: its content does not match its hash, nor its place in the chain"
    after = f"after entry {last.id}" if last else "at the start"
    return entry, (
        f"deleted: the entry it follows is missing ({after}), or was edited and re-hashed"
    )


def _recompute(entry: m.AuditEntry) -> str:
    return entry_hash(
        entry.prev_hash,
        at=entry.at,
        actor=entry.actor,
        action=entry.action,
        subject=entry.subject,
        details=entry.details,
    )


def _check_head(session: Session, count: int, last: m.AuditEntry | None) -> Verification:
    """The head row must end where the chain ends: same last hash, same number of entries."""
    head = session.get(m.AuditHead, 1)
    if head is None:
        return Verification(count, None, "the audit_head row is missing")
    last_hash = last.hash if last else None
    if head.last_hash == last_hash and head.entries == count:
        return Verification(count)
    if head.last_hash is not None:
        end = session.scalar(select(m.AuditEntry.id).where(m.AuditEntry.hash == head.last_hash))
        if end is not None:
            extra = session.scalars(
                select(m.AuditEntry).where(m.AuditEntry.id > end).order_by(m.AuditEntry.id)
            ).first()
            if extra is not None:
                problem = f"inserted: appended after the head's last entry ({end})"
                return Verification(count, extra.id, problem, extra.at, extra.action)
    where = f"after entry {last.id}" if last else "every entry"
    missing = head.entries - count
    if missing > 0:
        return Verification(count, None, f"deleted: {missing} entries {where} are missing")
    return Verification(count, None, f"the head does not match the last entry ({where})")


def cli_actor(by: str | None = None) -> str:
    """`cli:<by>`, or `cli:<the operating-system user>` for commands without --by."""
    if by:
        return f"cli:{by}"
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"
