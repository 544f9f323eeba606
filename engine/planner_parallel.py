"""A planner tick split over processes, each planning one range of patient ids.

Python runs one thread of bytecode at a time, and a tick is CPU work (decrypt, audience,
render, decide, seal), so a large population is planned by several processes. They are
spawned, not forked (the worker runs threads; a fork would copy their locks), and each
rebuilds the tick from picklable parts: the database URL, the keyring, the definition
set's sources (the same content hash, checked), the tick's time and horizon, the template
versions approved when the tick started and its active campaigns. Each process writes its
batches exactly as the single-process planner does (one transaction per batch, ON
CONFLICT DO NOTHING), so a crash loses nothing that the next tick will not plan; the
parent merges their reports and writes the tick's one audit entry.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Collection
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from engine.crypto import Keyring
from engine.definitions import load_sources
from engine.gc_tuning import freeze_startup_heap
from engine.planner import NEVER, StopSignal, Tick, plan_patients
from engine.planner_report import CampaignPlan, PlanReport
from engine.planner_rows import RowContext
from engine.store import db
from engine.store import models as m
from engine.store.queries import IdRange

# Below this many patients per process, starting processes costs more than it saves.
MIN_PATIENTS_PER_PROCESS = 25_000


def id_ranges(
    session_factory: sessionmaker[Session],
    processes: int,
    *,
    min_per_process: int | None = None,
) -> list[IdRange]:
    """Up to `processes` id ranges holding about as many patients each; one range (plan
    in this process) for a small population or a database other processes cannot open."""
    if processes <= 1 or database_url(session_factory) is None:
        return [(None, None)]
    p = m.Patient
    live = select(p.id).where(p.erased_at.is_(None))
    with session_factory() as session:
        count = session.scalar(select(func.count()).select_from(live.subquery())) or 0
        least = MIN_PATIENTS_PER_PROCESS if min_per_process is None else min_per_process
        parts = min(processes, count // max(least, 1))
        if parts <= 1:
            return [(None, None)]
        bounds = [
            session.scalar(live.order_by(p.id).offset(k * count // parts).limit(1))
            for k in range(1, parts)
        ]
    edges: list[int | None] = [None, *bounds, None]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


def database_url(session_factory: sessionmaker[Session]) -> str | None:
    """The URL another process can connect with (password included); None in memory."""
    bind = session_factory.kw.get("bind")
    if bind is None:
        return None
    url = bind.url
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return None
    return str(url.render_as_string(hide_password=False))


@dataclass(frozen=True)
class RangeTick:
    """Everything a process needs to plan one id range of a tick (all picklable)."""

    database_url: str
    keyring: Keyring
    sources: dict[str, str]
    root: str
    version: str
    now: datetime
    horizon: timedelta
    not_after: datetime
    approved_versions: Collection[str]
    public_url: str
    campaign_ids: tuple[str, ...]
    ids: IdRange
    batch_size: int


def plan_ranges(tick: Tick, ranges: list[IdRange], batch_size: int) -> None:
    """Plan each range in its own process and add their reports to `tick.report`."""
    defs, session_factory = tick.rows.defs, tick.session_factory
    url = database_url(session_factory)
    assert url is not None  # id_ranges gives one range (no processes) otherwise
    specs = [
        RangeTick(
            database_url=url,
            keyring=tick.keyring,
            sources={f.path: f.content for f in defs.files},
            root=defs.root,
            version=defs.version,
            now=tick.report.now,
            horizon=tick.report.horizon,
            not_after=tick.not_after,
            approved_versions=frozenset(tick.rows.approved_versions),
            public_url=tick.rows.public_url,
            campaign_ids=tuple(c.id for c in tick.campaigns),
            ids=ids,
            batch_size=batch_size,
        )
        for ids in ranges
    ]
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    with ProcessPoolExecutor(
        max_workers=len(specs), mp_context=context, initializer=_child, initargs=(stop,)
    ) as pool:
        if tick.stop.is_set():
            stop.set()
        pending = {pool.submit(plan_range, spec) for spec in specs}
        try:
            while pending:
                done, pending = wait(pending, timeout=STOP_POLL)
                if tick.stop.is_set():
                    stop.set()  # the children finish the batch in hand
                for future in done:
                    merge(tick.report, future.result())
        except BaseException:  # a child failed, or Ctrl-C: do not wait for whole ranges
            stop.set()
            raise


# How often the parent passes a stop on to its children (seconds).
STOP_POLL = 0.2
_stop: StopSignal = NEVER  # in a child: the parent's stop, set by _child


def _child(stop: StopSignal) -> None:
    """In each child: stop when the parent says so, not on a signal of its own. A SIGTERM
    or Ctrl-C sent to the whole process group reaches the parent, which stops the tick
    between batches; the children would otherwise die in the middle of one."""
    global _stop
    _stop = ParentStop(stop, os.getppid())
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ParentStop:
    """The parent's stop, or the parent gone. A child whose parent died (SIGKILL, the OOM
    killer) is adopted by another process; it then stops after the batch in hand instead
    of planning the rest of its range alone, unseen by any tick's report."""

    def __init__(self, stop: StopSignal, parent: int) -> None:
        self._stop, self._parent = stop, parent

    def is_set(self) -> bool:
        return self._stop.is_set() or self.parent_gone()

    def parent_gone(self) -> bool:
        return os.getppid() != self._parent


def exit_if_orphaned() -> None:
    """In a child whose parent is gone, once its batch is committed: exit, since no one is
    left to take its report and a pool process would otherwise wait for work forever."""
    if isinstance(_stop, ParentStop) and _stop.parent_gone():
        os._exit(0)


def merge(report: PlanReport, part: PlanReport) -> None:
    report.patients_seen += part.patients_seen
    report.stopped = report.stopped or part.stopped
    for campaign_id, share in part.campaigns.items():
        report.campaigns.setdefault(campaign_id, CampaignPlan()).merge(share)


def plan_range(spec: RangeTick) -> PlanReport:
    """Run in a child process: plan the patients of one id range."""
    defs = load_sources(spec.sources, root=spec.root)
    if defs.version != spec.version:  # the same sources always give the same hash
        raise RuntimeError(f"definitions {defs.version} rebuilt, expected {spec.version}")
    engine = db.make_engine(spec.database_url)
    try:
        report = PlanReport(now=spec.now, horizon=spec.horizon)
        for campaign_id in spec.campaign_ids:
            report.campaigns[campaign_id] = CampaignPlan()
        tick = Tick(
            rows=RowContext(defs, spec.now, spec.approved_versions, spec.public_url),
            session_factory=db.make_session_factory(engine),
            keyring=spec.keyring,
            not_after=spec.not_after,
            campaigns=tuple(defs.campaigns[c] for c in spec.campaign_ids),
            report=report,
            stop=_stop,
        )
        freeze_startup_heap()  # the definitions and the engine: this process's whole life
        plan_patients(tick, spec.batch_size, ids=spec.ids)
    finally:
        engine.dispose()
    exit_if_orphaned()
    return report
