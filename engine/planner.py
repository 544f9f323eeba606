"""Planner tick: due occurrences -> decisions -> outbox rows, one row per occurrence ever.

Patients are streamed as the dry-run streams them (engine.dryrun: iter_patients batches,
the audience filter, schedule.occurrences) and every occurrence is decided with the same
engine.evaluate.evaluate_occurrence, but against the real outbox history, for the time
it is due. Each batch is decided in a read transaction; its rows are written in a
transaction that starts with its INSERT (on SQLite, no read-then-write lock upgrade) and
commits, one per batch on PostgreSQL, one per SQLITE_WRITE_ROWS rows on SQLite. What a
tick reports is in engine.planner_report.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from typing import Protocol

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from engine import audit
from engine.core import schedule
from engine.core.domain import Campaign, ConsentState, History, SentMessage
from engine.crypto import Keyring, PatientCipher
from engine.definitions import DefinitionSet
from engine.dryrun import Candidate, anchors_of, in_audience
from engine.gc_tuning import bulk_collector
from engine.outbox_status import QUEUED
from engine.planner_report import CampaignPlan, PlanReport, summary, tally
from engine.planner_rows import Pending, PlannedRow, RowContext, planned_row, sealed_fields
from engine.store import consent_queries, outbox_insert, outbox_queries, queries
from engine.store.defqueries import approved_versions
from engine.store.queries import IdRange

DEFAULT_HORIZON = timedelta(minutes=5)
# A tick that inserted at least this many rows has PostgreSQL's statistics refreshed.
ANALYZE_AFTER_ROWS = 10_000
# Rows decided before they are written, on SQLite. Its commit copies every page the
# transaction dirtied into the WAL, and rows with random idempotency keys dirty about a
# page of that index each: writing four batches' rows at once, one commit instead of
# four, made a 1M-patient tick 74-75 s instead of 82-94. (PostgreSQL writes each batch:
# 4,000 rows at a time took its 1M tick 94.7 s against 91.0.)
SQLITE_WRITE_ROWS = 4000

log = logging.getLogger("engine.planner")


class StopSignal(Protocol):
    """What a tick checks between batches (a threading.Event, or a multiprocessing one)."""

    def is_set(self) -> bool: ...


class _Never:
    def is_set(self) -> bool:
        return False


NEVER: StopSignal = _Never()


@dataclass(frozen=True)
class Tick:
    rows: RowContext
    session_factory: sessionmaker[Session]
    keyring: Keyring
    not_after: datetime
    campaigns: tuple[Campaign, ...]
    report: PlanReport
    stop: StopSignal = NEVER


@dataclass(frozen=True)
class _Facts:
    """What decisions need about a batch's patients, read in one transaction."""

    consents: Mapping[int, Mapping[str, ConsentState]]
    sent: Mapping[int, History]
    queued: Mapping[int, list[SentMessage]]
    suppressed: Collection[int]
    ciphers: Mapping[int, PatientCipher]


def plan(
    defs: DefinitionSet,
    *,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    now: datetime,
    horizon: timedelta = DEFAULT_HORIZON,
    public_url: str,
    batch_size: int = 1000,
    actor: str = "planner",
    processes: int = 1,
    stop: StopSignal = NEVER,
) -> PlanReport:
    """Expire overdue rows, then plan every active campaign's occurrences due by
    now + horizon and alive at now that have no outbox row yet. A tick that inserted or
    expired rows leaves one audit entry summing up its decisions (`actor` did it).

    With `processes` > 1 and a large enough population, patients are split into that
    many id ranges planned by as many processes (engine.planner_parallel). Once `stop` is
    set the tick ends after the batch in hand (each batch commits on its own; the next
    tick plans the rest), and its report says `stopped`. A tick that inserted
    ANALYZE_AFTER_ROWS rows or more refreshes PostgreSQL's statistics of the outbox."""
    started = time.perf_counter()
    report = PlanReport(now=now, horizon=horizon)
    with session_factory.begin() as session:
        report.expired = outbox_queries.expire_overdue(session=session, now=now)
    with session_factory() as session:
        paused = outbox_queries.paused_campaigns(session=session)
        approved = approved_versions(session=session)
    campaigns = _active_campaigns(defs, paused, report)
    tick = Tick(
        rows=RowContext(defs, now, approved, public_url.rstrip("/")),
        session_factory=session_factory,
        keyring=keyring,
        not_after=now + horizon,
        campaigns=campaigns,
        report=report,
        stop=stop,
    )
    if campaigns:
        from engine import planner_parallel  # imported here: it imports this module

        ranges = planner_parallel.id_ranges(session_factory, processes)
        report.processes = len(ranges)
        if len(ranges) > 1:
            planner_parallel.plan_ranges(tick, ranges, batch_size)
        else:
            plan_patients(tick, batch_size)
    if report.inserted >= ANALYZE_AFTER_ROWS:
        _refresh_statistics(session_factory)
    report.duration = time.perf_counter() - started
    if report.inserted or report.expired:
        with session_factory.begin() as session:
            audit.record(
                session=session, actor=actor, action="plan_tick", now=now, details=summary(report)
            )
    return report


def _refresh_statistics(session_factory: sessionmaker[Session]) -> None:
    """After a large tick (outbox_queries.refresh_statistics); a failure is logged and
    costs nothing but the statistics (autovacuum still gets there)."""
    try:
        with session_factory.begin() as session:
            outbox_queries.refresh_statistics(session=session)
    except DBAPIError as exc:
        log.warning("planner.analyze_failed", extra={"fields": {"error": type(exc.orig).__name__}})


def _active_campaigns(
    defs: DefinitionSet, paused: Collection[str], report: PlanReport
) -> tuple[Campaign, ...]:
    active = []
    for campaign_id in sorted(defs.campaigns):
        campaign = defs.campaigns[campaign_id]
        if campaign.status != "active":
            report.skipped[campaign_id] = "paused in its definition"
        elif campaign_id in paused:
            report.skipped[campaign_id] = "paused"
        else:
            active.append(campaign)
            report.campaigns[campaign_id] = CampaignPlan()
    return tuple(active)


def plan_patients(tick: Tick, batch_size: int, ids: IdRange = (None, None)) -> None:
    """Plan the patients whose row ids are in `ids`, [low, high) (None: unbounded).

    Each batch of patients is decided on its own reads; the rows decided are written once
    there are write_after_rows of them, and before returning (stopped or not)."""
    sealed = sealed_fields(tick.rows.defs, tick.campaigns)
    write_after = write_after_rows(tick.session_factory, batch_size)
    decided: list[PlannedRow] = []
    with bulk_collector(), tick.session_factory() as reader:
        stream = _candidates(reader, tick.keyring, batch_size, ids, sealed)
        while True:
            if tick.stop.is_set():
                tick.report.stopped = True
                break
            batch = list(islice(stream, batch_size))
            if not batch:
                break
            tick.report.patients_seen += len(batch)
            decided += _plan_batch(tick, batch)
            if len(decided) >= write_after:
                _write(tick, decided)
                decided = []
        _write(tick, decided)


def write_after_rows(session_factory: sessionmaker[Session], batch_size: int) -> int:
    """How many decided rows a planner holds before writing them in one transaction: a
    batch's on PostgreSQL, SQLITE_WRITE_ROWS on SQLite (at least a batch's)."""
    if session_factory.kw["bind"].dialect.name == "sqlite":
        return max(batch_size, SQLITE_WRITE_ROWS)
    return batch_size


def _candidates(
    session: Session, keyring: Keyring, batch_size: int, ids: IdRange, sealed: frozenset[str]
) -> Iterator[Candidate]:
    patients = queries.iter_patients(
        session=session,
        keyring=keyring,
        batch_size=batch_size,
        ids=ids,
        sealed=sealed,
        release=True,
    )
    for data in patients:
        yield Candidate(data.id, data.patient, data.prescriptions, data.appointments, data.cipher)


def _plan_batch(tick: Tick, batch: list[Candidate]) -> list[PlannedRow]:
    """The batch's rows not yet in the outbox, decided."""
    pending = list(_due(tick, batch))
    if not pending:
        return []
    # A read-only transaction, committed (engine.store.queries.iter_patients: psycopg
    # keeps its prepared statements across a commit, not across a rollback).
    with tick.session_factory.begin() as session:
        present = outbox_insert.existing_keys(
            session=session, keys=((p.patient_row, p.occurrence.idempotency_key) for p in pending)
        )
        fresh = [p for p in pending if p.occurrence.idempotency_key not in present]
        for p in pending:
            if p.occurrence.idempotency_key in present:
                tick.report.campaigns[p.campaign.id].already_present += 1
        if not fresh:
            return []
        streamed = {c.row_id: c.cipher for c in batch if c.cipher is not None}
        facts = _read_facts(tick, session, sorted({p.patient_row for p in fresh}), streamed)
    return _decide(tick, fresh, facts)


def _write(tick: Tick, rows: list[PlannedRow]) -> None:
    """Insert the rows and their links in one transaction, and count them."""
    if not rows:
        return
    with tick.session_factory.begin() as session:
        ids = outbox_insert.insert_outbox_rows(session=session, rows=[r.values for r in rows])
        links = [{**r.link, "outbox_id": ids[r.key]} for r in rows if r.link and r.key in ids]
        outbox_queries.insert_scheduling_links(session=session, links=links)
    tally(tick.report, rows, ids)


def _due(tick: Tick, batch: list[Candidate]) -> Iterator[Pending]:
    """Occurrences due by the horizon and alive now, of every active campaign, in the
    dry-run's order: by campaign, anchor record, then due time."""
    now = tick.rows.now
    for campaign in tick.campaigns:
        audience = tick.rows.defs.audiences.get(campaign.id)
        summary = tick.report.campaigns[campaign.id].summary
        for candidate in batch:
            seen = False
            for anchor in anchors_of(campaign, candidate):
                if audience is not None and not in_audience(
                    audience, candidate, anchor, now, summary
                ):
                    continue
                seen = True
                found = schedule.occurrences(
                    campaign, candidate.patient, anchor, not_after=tick.not_after, alive_at=now
                )
                for occurrence in found:
                    yield Pending(candidate.row_id, candidate.patient, campaign, anchor, occurrence)
            summary.in_audience += seen


def _read_facts(
    tick: Tick, session: Session, ids: list[int], streamed: Mapping[int, PatientCipher]
) -> _Facts:
    """The batch's consents, histories and suppressions; the ciphers the stream unwrapped,
    of the patients whose key still exists (one erased since has none)."""
    now = tick.rows.now
    purposes = list(tick.rows.defs.purposes)
    sent, queued = outbox_queries.recent_for(session=session, patient_ids=ids, now=now)
    return _Facts(
        consents=consent_queries.consent_states_for_many(
            session=session, patient_ids=ids, purposes=purposes
        ),
        sent=sent,
        queued=queued,
        suppressed=consent_queries.suppressed_patients(session=session, patient_ids=ids),
        ciphers={
            pid: streamed[pid]
            for pid in queries.keyed_patients(session=session, patient_ids=ids)
            if pid in streamed
        },
    )


def _decide(tick: Tick, fresh: list[Pending], facts: _Facts) -> list[PlannedRow]:
    """Decide each patient's occurrences earliest first (ties in campaign id order); a row
    queued counts as sent for the next ones (frequency caps), as in the dry-run."""
    by_patient: dict[int, list[Pending]] = defaultdict(list)
    for p in fresh:
        by_patient[p.patient_row].append(p)
    rows: list[PlannedRow] = []
    for pid, items in by_patient.items():
        cipher = facts.ciphers.get(pid)
        if cipher is None:  # erased since it was streamed
            continue
        sent = [*facts.sent[pid].sent, *facts.queued.get(pid, ())]
        for item in sorted(items, key=lambda p: p.occurrence.due_at):
            row = planned_row(
                tick.rows,
                item=item,
                consents=facts.consents.get(pid, {}),
                history=History(tuple(sent)),
                suppressed=pid in facts.suppressed,
                cipher=cipher,
            )
            if row.status == QUEUED:
                sent.append(SentMessage(row.values["send_at"], item.campaign.purpose))
            rows.append(row)
    return rows
