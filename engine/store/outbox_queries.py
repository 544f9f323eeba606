"""Outbox reads and writes shared by the planner, the dispatcher and `engage status`
(keyword-only; nothing here commits: the caller owns the transaction)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    Text,
    bindparam,
    cast,
    column,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from engine.core.domain import History, SentMessage
from engine.outbox_status import (
    BLOCKED,
    CANCELLED,
    COUNTS_AS_SENT,
    DEFERRED,
    EXPIRED,
    FAILED,
    QUEUED,
    SENDING,
    SENT,
    UNKNOWN,
    WAITING,
)
from engine.store import models as m
from engine.store.queries import among, id_groups

HISTORY_WINDOW = timedelta(days=7)
# Statuses whose reasons say why a row was not (or not yet) sent.
EXPLAINED = (BLOCKED, DEFERRED, EXPIRED, CANCELLED)


def body_field(idempotency_key: str) -> str:
    """The field name (associated data) sealing an outbox row's body with the patient's key."""
    return f"outbox/{idempotency_key}/body"


def _unindexed(column: Any) -> Any:
    """`column || ''`: the same value, but no index on it can serve the condition. Without
    statistics SQLite otherwise reads a batch's rows through the (status, send_at) index,
    visiting every row of that status in the outbox for each batch (quadratic in the
    number of rows); with it, the patient index is used."""
    return column.concat("")


def histories_for(
    *,
    session: Session,
    patient_ids: Iterable[int],
    now: datetime,
    window: timedelta = HISTORY_WINDOW,
) -> dict[int, History]:
    """Messages sent or committed to be sent to each patient in the window before `now`.

    A row counts from its sent_at, or, while it is being sent, from its claim time. A row
    waiting for a retry after an attempt without a clear answer counts from its
    `unsettled_since`: the provider may have accepted that attempt.
    """
    return recent_for(session=session, patient_ids=patient_ids, now=now, window=window)[0]


def recent_for(
    *,
    session: Session,
    patient_ids: Iterable[int],
    now: datetime,
    window: timedelta = HISTORY_WINDOW,
) -> tuple[dict[int, History], dict[int, list[SentMessage]]]:
    """The patients' histories (as histories_for) and their rows planned to be sent
    (queued), at their send_at, in the window; read in one query per id group.

    The planner counts queued rows as sent, as it counts the messages it allows earlier in
    the same tick, so a decision does not depend on which tick planned its neighbours.
    """
    o = m.Outbox.__table__.c  # Core columns: rows skip the ORM's loading
    ids = list(patient_ids)
    since = now - window
    sent: dict[int, list[SentMessage]] = defaultdict(list)
    queued: dict[int, list[SentMessage]] = defaultdict(list)
    status_column = _unindexed(o.status)
    # Deferred rows count only while an earlier attempt of theirs is unsettled.
    counted = status_column.in_([*sorted(COUNTS_AS_SENT), QUEUED]) | (
        (status_column == DEFERRED) & o.unsettled_since.is_not(None)
    )
    for criterion, wanted in id_groups(session, o.patient_id, ids):
        stmt = select(
            o.patient_id, o.purpose, o.status, o.sent_at, o.claimed_at, o.send_at, o.unsettled_since
        )
        stmt = stmt.where(criterion, counted)
        for pid, purpose, status, sent_at, claimed_at, send_at, unsettled in session.execute(stmt):
            if pid not in wanted:
                continue
            if status in (QUEUED, DEFERRED) and unsettled is not None:
                if unsettled > since:
                    sent[pid].append(SentMessage(unsettled, purpose))
                continue
            if status == QUEUED:
                if send_at is not None and send_at > since:
                    queued[pid].append(SentMessage(send_at, purpose))
                continue
            at = sent_at or claimed_at
            if at is not None and at > since:
                sent[pid].append(SentMessage(at, purpose))
    empty = History()
    histories = {
        pid: History(tuple(sorted(sent[pid], key=lambda s: s.at))) if pid in sent else empty
        for pid in ids
    }
    return histories, queued


def _dialect(session: Session) -> Any:
    return postgresql if session.get_bind().dialect.name == "postgresql" else sqlite


def insert_scheduling_links(*, session: Session, links: Sequence[Mapping[str, Any]]) -> None:
    """Store self-scheduling links (their token hashes, never the tokens)."""
    if links:
        session.execute(m.SchedulingLink.__table__.insert(), list(links))


ANALYZE_LOCK_TIMEOUT = "2s"


def refresh_statistics(*, session: Session) -> bool:
    """PostgreSQL: ANALYZE the outbox and the scheduling links (a sample of 30,000 rows
    each), so that claims and webhook lookups are planned for the rows a large tick just
    wrote, not for the table as autovacuum last sampled it; it gets there a minute or more
    later. Meanwhile, after a million-row tick, dispatching at full speed from the two
    cores ran at 218 messages/s for its slowest 2 s and webhooks answered with p99 0.4 s,
    against 943 messages/s and 42 ms with the tables analyzed. Whether it ran: SQLite's
    queries are written to need no statistics. It waits at most ANALYZE_LOCK_TIMEOUT for its
    lock (a VACUUM in progress holds it; autovacuum gives way, an anti-wraparound one or an
    operator's does not), then fails instead of holding up the tick."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    session.execute(text(f"SET LOCAL lock_timeout = '{ANALYZE_LOCK_TIMEOUT}'"))
    session.execute(text(f"ANALYZE {m.Outbox.__tablename__}, {m.SchedulingLink.__tablename__}"))
    return True


def expire_overdue(*, session: Session, now: datetime) -> int:
    """Rows still waiting (queued, deferred) whose expiry has passed become `expired`, with
    an `expired` reason appended; returns how many."""
    o = m.Outbox
    reason = {
        "rule": "expired",
        "policy": "engage",
        "effect": "deny",
        "message": f"not sent before it expired (found at {now.isoformat()})",
        "cite": None,
    }
    stmt = (
        update(o)
        .where(o.status.in_(WAITING), o.expires_at <= now)
        .values(status=EXPIRED, reasons=_appended(session, o.reasons, reason))
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount or 0


def _appended(session: Session, column: Any, item: Mapping[str, Any]) -> ColumnElement[Any]:
    """`column` (a JSON list) with `item` appended, in SQL."""
    text = json.dumps([item])
    if session.get_bind().dialect.name == "postgresql":
        joined = cast(column, JSONB).op("||")(cast(literal(text), JSONB))
        return cast(joined, JSON)
    return func.json_insert(func.coalesce(column, "[]"), "$[#]", func.json(json.dumps(item)))


# --- bulk writes of the dispatcher -----------------------------------------------------------


def update_rows(*, session: Session, changes: Sequence[Mapping[str, Any]]) -> None:
    """Write each change (new values by column name, `id` naming the row) onto its outbox
    row; rows whose changes name the same columns are written by one statement.

    PostgreSQL: one UPDATE joined to the rows as a JSON recordset (one round trip and one
    parameter, however many rows); SQLite: an executemany. Callers hold the rows' locks.
    """
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = defaultdict(list)
    for change in changes:
        groups[tuple(sorted(change))].append(change)
    postgres = session.get_bind().dialect.name == "postgresql"
    connection = session.connection()
    for keys, rows in groups.items():
        stmt = _update_statement(keys, postgres)
        if postgres:
            connection.execute(stmt, {"rows": _json_text(rows)})
        else:
            connection.execute(stmt, [{f"new_{k}": r[k] for k in keys} for r in rows])


@cache
def _update_statement(keys: tuple[str, ...], postgres: bool) -> Any:
    """update_rows' statement for changes naming `keys` (built once per set of columns)."""
    t = m.Outbox.__table__
    names = [k for k in keys if k != "id"]
    if postgres:
        v = _recordset(keys)
        return update(t).where(t.c.id == v.c.id).values({k: v.c[k] for k in names})
    stmt = update(t).where(t.c.id == bindparam("new_id"))
    return stmt.values({k: bindparam(f"new_{k}") for k in names})


def mark_sent(
    *, session: Session, worker_id: str, now: datetime, sends: Sequence[tuple[int, str, str]]
) -> set[int]:
    """PostgreSQL: the provider accepted these (row id, provider sid, provider status):
    rows still `sending` under `worker_id` become `sent`, locked in id order first (no
    deadlock with another writer locking several), in one statement; the ids written."""
    rows = [{"id": i, "provider_sid": sid, "provider_status": ps} for i, sid, ps in sends]
    params = {
        "ids": sorted(row["id"] for row in rows),
        "worker": worker_id,
        "now": now,
        "rows": _json_text(rows),
    }
    return set(session.connection().execute(_mark_sent_statement(), params).scalars())


@cache
def _mark_sent_statement() -> Any:
    o = m.Outbox.__table__
    mine = (o.c.status == SENDING, o.c.claimed_by == bindparam("worker"))
    held = select(o.c.id).where(among(o.c.id, "ids"), *mine).order_by(o.c.id).with_for_update()
    held = held.cte("held")
    v = _recordset(("id", "provider_sid", "provider_status"))
    return (
        update(o)
        .where(o.c.id == held.c.id, v.c.id == held.c.id, *mine)
        .values(
            status=SENT,
            provider_sid=v.c.provider_sid,
            provider_status=v.c.provider_status,
            sent_at=bindparam("now", type_=m.UTCDateTime()),
            attempts=o.c.attempts + 1,
            unsettled_since=None,
        )
        .returning(o.c.id)
    )


def _recordset(keys: Sequence[str]) -> Any:
    """`json_to_recordset(:rows) AS v(<keys typed as the outbox's columns>)`."""
    t = m.Outbox.__table__
    rows = func.json_to_recordset(cast(bindparam("rows", type_=Text), JSON))
    typed = rows.table_valued(*(column(k, t.c[k].type) for k in keys))
    return typed.render_derived(name="v", with_types=True)


def _json_text(rows: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps(rows, default=_json_value, separators=(",", ":"))


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):  # aware, microseconds kept: claim times compare equal
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given for a UTC column")
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} cannot be written through a JSON recordset")


# --- campaign pause ------------------------------------------------------------------------


def paused_campaigns(*, session: Session) -> set[str]:
    """Campaigns an operator paused: neither planned nor dispatched."""
    s = m.CampaignState
    return set(session.scalars(select(s.campaign_id).where(s.paused)))


def is_paused(*, session: Session, campaign_id: str) -> bool:
    s = m.CampaignState
    return bool(session.scalar(select(s.paused).where(s.campaign_id == campaign_id)))


def set_paused(*, session: Session, campaign_id: str, paused: bool, by: str, now: datetime) -> bool:
    """Pause or resume a campaign (upsert); True when its state changed."""
    was = is_paused(session=session, campaign_id=campaign_id)
    values = {"paused": paused, "updated_at": now, "updated_by": by}
    stmt = (
        _dialect(session)
        .insert(m.CampaignState)
        .values(campaign_id=campaign_id, **values)
        .on_conflict_do_update(index_elements=["campaign_id"], set_=values)
    )
    session.execute(stmt)
    return was != paused


# --- status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnknownRow:
    """A row a crash left `sending` that the provider could not account for."""

    id: int
    campaign_id: str
    patient: str
    claimed_at: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class OutboxStatus:
    by_status: Mapping[str, int]
    by_rule: Mapping[tuple[str, str], int]
    failed_by_error: Mapping[int | None, int]
    unknown: Sequence[UnknownRow]


def deciding_rule(status: str, reasons: Sequence[Mapping[str, Any]] | None) -> str:
    """The rule a row's status is down to: the first deny (blocked) or defer (deferred,
    expired after a deferral) reason, else the last reason (e.g. `expired`)."""
    reasons = reasons or []
    wanted = "deny" if status == BLOCKED else "defer"
    for reason in reasons:
        if reason.get("effect") == wanted:
            return str(reason.get("rule"))
    return str(reasons[-1].get("rule")) if reasons else "?"


def outbox_status(*, session: Session, campaign_id: str | None = None) -> OutboxStatus:
    """Counts by status, by deciding rule and by provider error, and every unknown row."""
    o = m.Outbox
    where = [] if campaign_id is None else [o.campaign_id == campaign_id]
    by_status = dict(
        session.execute(select(o.status, func.count()).where(*where).group_by(o.status)).all()
    )
    by_rule: Counter[tuple[str, str]] = Counter()
    stmt = select(o.status, o.reasons).where(*where, o.status.in_(EXPLAINED))
    for status, reasons in session.execute(stmt.execution_options(yield_per=1000)):
        by_rule[(status, deciding_rule(status, reasons))] += 1
    failed = select(o.error_code, func.count()).where(*where, o.status == FAILED)
    unknown = (
        select(o.id, o.campaign_id, m.Patient.external_id, o.claimed_at, o.last_error)
        .join(m.Patient, m.Patient.id == o.patient_id)
        .where(*where, o.status == UNKNOWN)
        .order_by(o.id)
    )
    return OutboxStatus(
        by_status=by_status,
        by_rule=dict(by_rule),
        failed_by_error=dict(session.execute(failed.group_by(o.error_code)).all()),
        unknown=[UnknownRow(*row) for row in session.execute(unknown)],
    )


def campaigns_with_rows(*, session: Session) -> set[str]:
    return set(session.scalars(select(m.Outbox.campaign_id).distinct()))
