"""What a claim reads, in its transaction: the due rows (locked), the batch's patients
(locked), and their keys, consent, suppressions, history and the approved templates.

Rows are read as Core rows of the columns the claim needs, not as ORM objects: no identity
map, no change tracking, and the `reasons` of a row are parsed only where they are kept.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import bindparam, case, null, or_, select, text
from sqlalchemy.orm import Session

from engine.core.domain import ConsentState, History
from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.store import codec, consent_queries, outbox_queries, queries
from engine.store import models as m
from engine.store.defqueries import approved_versions

# Program replies (STOP/START/HELP confirmations, engine.inbound): one row per inbound
# message, sent without the consent and suppression re-check (CTIA 5.1.1: the opt-out
# confirmation goes to a number that has just revoked).
PROGRAM_CAMPAIGN = "program"
PROGRAM_REPLY_RULE = "program-reply"


class DueRow(Protocol):
    """A due row as the claim reads it (a Core row of `_due_columns`)."""

    @property
    def id(self) -> int: ...
    @property
    def patient_id(self) -> int: ...
    @property
    def campaign_id(self) -> str: ...
    @property
    def template_id(self) -> str | None: ...
    @property
    def template_version(self) -> str | None: ...
    @property
    def locale(self) -> str | None: ...
    @property
    def purpose(self) -> str: ...
    @property
    def idempotency_key(self) -> str: ...
    @property
    def body_enc(self) -> bytes | None: ...
    @property
    def expires_at(self) -> datetime: ...
    @property
    def attempts(self) -> int: ...
    @property
    def unsettled_since(self) -> datetime | None: ...
    @property
    def expired(self) -> bool:
        """The expiry has come at the claim's time."""

    @property
    def reasons(self) -> list[dict[str, Any]] | None:
        """Read only where they are kept: an expired row, a program reply (else None)."""


@dataclass(frozen=True)
class ClaimBatch:
    """What the re-check needs about the batch's patients, read after locking them."""

    records: Mapping[int, codec.PatientRecord]
    ciphers: Mapping[int, Any]
    consents: Mapping[int, Mapping[str, ConsentState]]
    suppressed: Collection[int]
    histories: dict[int, History]
    approved: Collection[str]


def due_rows(*, session: Session, now: datetime, limit: int) -> list[DueRow]:
    """Queued or deferred rows whose time has come, of campaigns not paused, oldest first,
    read in order from the partial index `ix_outbox_due` (no sort of every waiting row).

    PostgreSQL skips rows another worker holds; SQLite has one writer at a time anyway
    (SQLAlchemy would silently drop SKIP LOCKED there). SQLite's planner, without
    statistics, prefers the (status, send_at) index and sorts: it is told which to use.
    """
    o, cs = m.Outbox.__table__.c, m.CampaignState.__table__.c
    columns = _due_columns(now)
    if session.get_bind().dialect.name == "sqlite":
        ids = session.scalars(_SQLITE_DUE, {"now": now, "limit": limit}).all()
        if not ids:
            return []
        stmt = select(*columns).where(o.id.in_(ids)).order_by(o.send_at, o.id)
        return list(session.execute(stmt))
    paused = select(cs.campaign_id).where(cs.paused.is_(True))
    stmt = (
        select(*columns)
        .where(text(m.WAITING_SQL), o.send_at <= now)
        .where(o.campaign_id.not_in(paused))
        .order_by(o.send_at, o.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=m.Outbox.__table__)
    )
    return list(session.execute(stmt))


_SQLITE_DUE = text(
    f"SELECT id FROM outbox INDEXED BY ix_outbox_due WHERE {m.WAITING_SQL} "
    "AND send_at <= :now AND campaign_id NOT IN "
    "(SELECT campaign_id FROM campaign_states WHERE paused) "
    "ORDER BY send_at, id LIMIT :limit"
).bindparams(bindparam("now", type_=m.UTCDateTime()))


def _due_columns(now: datetime) -> tuple[Any, ...]:
    """The columns of DueRow. `expired` is compared by the database, so that `reasons` is
    read exactly where the claim keeps them and adds to them; elsewhere the fresh decision
    replaces them, and they are not parsed."""
    o = m.Outbox.__table__.c
    expired = o.expires_at <= bindparam("now_", now, type_=m.UTCDateTime())
    keep = or_(expired, o.campaign_id == PROGRAM_CAMPAIGN)
    return (
        o.id, o.patient_id, o.campaign_id, o.template_id, o.template_version, o.locale,
        o.purpose, o.idempotency_key, o.body_enc, o.expires_at, o.attempts,
        o.unsettled_since, expired.label("expired"),
        case((keep, o.reasons), else_=null()).label("reasons"),
    )  # fmt: skip


def read_batch(
    session: Session,
    keyring: Keyring,
    defs: DefinitionSet,
    patient_ids: Sequence[int],
    now: datetime,
) -> ClaimBatch:
    """Lock the batch's patients, then read them (decrypted), their keys, consent,
    suppressions and history."""
    patients = lock_patients(session=session, patient_ids=patient_ids)
    ciphers = queries.ciphers_for(session=session, keyring=keyring, patient_ids=patient_ids)
    records = {p.id: codec.open_patient(p, ciphers[p.id]) for p in patients if p.id in ciphers}
    return ClaimBatch(
        records=records,
        ciphers=ciphers,
        consents=consent_queries.consent_states_for_many(
            session=session, patient_ids=patient_ids, purposes=list(defs.purposes)
        ),
        suppressed=consent_queries.suppressed_patients(session=session, patient_ids=patient_ids),
        histories=outbox_queries.histories_for(session=session, patient_ids=patient_ids, now=now),
        approved=approved_versions(session=session),
    )


def lock_patients(*, session: Session, patient_ids: Sequence[int]) -> list[Any]:
    """The patients' rows (Core rows: the codec reads the same names as on ORM objects),
    locked on PostgreSQL to serialize decisions per patient (frequency caps) across
    workers; on SQLite the claim's writer lock does that.

    FOR NO KEY UPDATE conflicts with itself but not with the KEY SHARE lock that inserting
    an outbox row (foreign key) takes, so the planner is never blocked by a dispatcher.
    Locks are taken in id order: two claimers cannot deadlock on them.
    """
    table = m.Patient.__table__
    if session.get_bind().dialect.name != "postgresql":
        return list(session.execute(select(table).where(table.c.id.in_(patient_ids))))
    stmt = (
        select(table)
        .where(queries.among(table.c.id, "patient_ids"))
        .order_by(table.c.id)
        .with_for_update(key_share=True)
    )
    return list(session.execute(stmt, {"patient_ids": sorted(patient_ids)}))
