"""Key rotation: re-wrap every data key with a new master key, upgrade every blind index.

Both run in batches, each batch its own short transaction, so the web app and workers keep
running (docs/operations.md gives the order of steps). Both check first that every key the
stored data needs is loaded, and change nothing when one is missing or wrong. Audit entries
name key ids (a hash prefix) and counts, never key material.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from engine import audit
from engine.crypto import DecryptionError, Keyring, index_version
from engine.store import models as m

DEFAULT_BATCH = 500
# Every stored blind index: (table, column). Suppressions outlive erased patients' numbers,
# which is why indexes are upgraded from their old value, not recomputed from the number.
INDEX_COLUMNS: tuple[tuple[Any, str], ...] = (
    (m.Patient, "phone_index"),
    (m.Suppression, "phone_index"),
    (m.InboundMessage, "from_index"),
)


class KeyRotationError(Exception):
    """The stored data needs a key that is not loaded, or a loaded key does not open it."""


@dataclass
class RewrapReport:
    to_key_id: str
    rewrapped: Counter[str] = field(default_factory=Counter)  # by the old key id
    batches: int = 0

    @property
    def total(self) -> int:
        return sum(self.rewrapped.values())


@dataclass
class IndexReport:
    from_versions: Counter[str] = field(default_factory=Counter)
    upgraded: Counter[str] = field(default_factory=Counter)  # by table
    merged: int = 0  # suppressions already present at the new version
    batches: int = 0


def data_key_counts(*, session: Session) -> dict[str, int]:
    """Live (not destroyed) data keys by the id of the master key wrapping them."""
    k = m.PatientKey
    stmt = (
        select(k.master_key_id, func.count())
        .where(k.wrapped_key.is_not(None))
        .group_by(k.master_key_id)
    )
    return {key_id: n for key_id, n in session.execute(stmt)}


def index_version_counts(*, session: Session) -> dict[str, dict[str, int]]:
    """Stored blind indexes by table and version prefix (`v1`, `v2`, ...)."""
    found: dict[str, dict[str, int]] = {}
    for table, column in INDEX_COLUMNS:
        col = getattr(table, column)
        prefix = func.substr(col, 1, 4)
        stmt = select(prefix, func.count()).where(col.is_not(None)).group_by(prefix)
        counts: Counter[str] = Counter()
        for head, n in session.execute(stmt):
            counts[head.split(":", 1)[0]] += n
        found[table.__tablename__] = dict(counts)
    return found


def check_master_keys(*, session: Session, keyring: Keyring) -> None:
    """KeyRotationError unless every live data key is wrapped by a loaded master key that
    opens it (one sample per key id)."""
    counts = data_key_counts(session=session)
    missing = sorted(set(counts) - keyring.master_key_ids)
    if missing:
        raise KeyRotationError(
            f"{sum(counts[i] for i in missing)} data key(s) are wrapped by master key(s) "
            f"{', '.join(missing)}, which are not loaded (loaded: "
            f"{', '.join(sorted(keyring.master_key_ids))}); configure the old key as "
            "ENGAGE_MASTER_KEY(_FILE) or ENGAGE_PREVIOUS_MASTER_KEY_FILES"
        )
    k, p = m.PatientKey, m.Patient
    for key_id in counts:
        sample = session.execute(
            select(p.external_id, k.wrapped_key)
            .join(k, k.patient_id == p.id)
            .where(k.master_key_id == key_id, k.wrapped_key.is_not(None))
            .limit(1)
        ).first()
        if sample is None:
            continue
        try:
            keyring.unwrap(sample[1], patient_id=sample[0], master_key_id=key_id)
        except DecryptionError as exc:
            raise KeyRotationError(
                f"master key {key_id} is loaded but does not open the data keys it names"
            ) from exc


def rewrap_data_keys(
    *,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    now: Callable[[], datetime],
    actor: str,
    batch_size: int = DEFAULT_BATCH,
) -> RewrapReport:
    """Re-wrap every live data key not wrapped by `keyring`'s current master key with it.

    A row erased meanwhile stays destroyed (the update requires the old wrapped key).
    """
    with session_factory() as session:
        check_master_keys(session=session, keyring=keyring)
    report = RewrapReport(to_key_id=keyring.master_key_id)
    after = 0
    while True:
        with session_factory.begin() as session:
            rows = _rewrap_batch(session, keyring, after, batch_size, report)
        if not rows:
            break
        report.batches += 1
        after = rows[-1]
    with session_factory.begin() as session:
        audit.record(
            session=session,
            actor=actor,
            action="keys_rotated",
            now=now(),
            subject=f"master:{keyring.master_key_id}",
            details={
                "kind": "master",
                "to": keyring.master_key_id,
                "from": dict(sorted(report.rewrapped.items())),
                "rewrapped": report.total,
                "batches": report.batches,
            },
        )
    return report


def _rewrap_batch(
    session: Session, keyring: Keyring, after: int, limit: int, report: RewrapReport
) -> list[int]:
    k, p = m.PatientKey, m.Patient
    rows = session.execute(
        select(k.id, p.external_id, k.wrapped_key, k.master_key_id)
        .join(p, p.id == k.patient_id)
        .where(
            k.id > after,
            k.wrapped_key.is_not(None),
            k.master_key_id != keyring.master_key_id,
        )
        .order_by(k.id)
        .limit(limit)
    ).all()
    for row_id, external_id, wrapped, old_id in rows:
        try:
            dek = keyring.unwrap(wrapped, patient_id=external_id, master_key_id=old_id)
        except DecryptionError as exc:
            raise KeyRotationError(f"data key row {row_id}: {exc}; this batch was undone") from exc
        done = session.execute(
            update(k)
            .where(k.id == row_id, k.master_key_id == old_id, k.wrapped_key == wrapped)
            .values(
                wrapped_key=keyring.wrap(dek, patient_id=external_id),
                master_key_id=keyring.master_key_id,
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if done:
            report.rewrapped[old_id] += 1
    return [row[0] for row in rows]


def check_index_versions(*, session: Session, keyring: Keyring) -> None:
    """KeyRotationError when a stored index is newer than the loaded chain (a chain file
    missing its last keys)."""
    for table, versions in index_version_counts(session=session).items():
        for label in versions:
            if index_version(f"{label}:") > keyring.index_version:
                raise KeyRotationError(
                    f"{table} holds {label} phone indexes but the index key chain has only "
                    f"{keyring.index_version} key(s): load the whole chain"
                )


def upgrade_indexes(
    *,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    now: Callable[[], datetime],
    actor: str,
    batch_size: int = DEFAULT_BATCH,
) -> IndexReport:
    """Bring every stored blind index to the keyring's index version, batch by batch."""
    with session_factory() as session:
        check_index_versions(session=session, keyring=keyring)
    report = IndexReport()
    current = f"v{keyring.index_version}:"
    for table, column in INDEX_COLUMNS:
        after = 0
        while True:
            with session_factory.begin() as session:
                last = _upgrade_batch(
                    session, keyring, table, column, current, after, batch_size, report
                )
            if last is None:
                break
            report.batches += 1
            after = last
    with session_factory.begin() as session:
        audit.record(
            session=session,
            actor=actor,
            action="keys_rotated",
            now=now(),
            subject=f"index:v{keyring.index_version}",
            details={
                "kind": "index",
                "to_version": keyring.index_version,
                "from_versions": dict(sorted(report.from_versions.items())),
                "upgraded": dict(sorted(report.upgraded.items())),
                "merged_suppressions": report.merged,
            },
        )
    return report


def _upgrade_batch(
    session: Session,
    keyring: Keyring,
    table: Any,
    column: str,
    current: str,
    after: int,
    limit: int,
    report: IndexReport,
) -> int | None:
    """Upgrade one batch; the last row id seen, or None when none was left."""
    col = getattr(table, column)
    rows = session.execute(
        select(table.id, col)
        .where(table.id > after, col.is_not(None), ~col.startswith(current))
        .order_by(table.id)
        .limit(limit)
    ).all()
    if not rows:
        return None
    new = {row_id: keyring.upgrade_index(old) for row_id, old in rows}
    taken: set[str] = set()
    if table is m.Suppression:  # unique: a process still on the old chain may have added one
        taken = set(session.scalars(select(col).where(col.in_(set(new.values())))))
    values: dict[str, Any] = {}
    if hasattr(table, "updated_at"):  # a new index is not a change of the person's data
        values["updated_at"] = table.updated_at
    for row_id, old in rows:
        report.from_versions[old.split(":", 1)[0]] += 1
        if new[row_id] in taken:
            session.delete(session.get(table, row_id))
            report.merged += 1
            continue
        session.execute(
            update(table)
            .where(table.id == row_id, col == old)
            .values({column: new[row_id], **values})
            .execution_options(synchronize_session=False)
        )
        report.upgraded[table.__tablename__] += 1
    return int(rows[-1][0])
