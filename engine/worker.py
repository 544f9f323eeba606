"""The worker process: APScheduler fires the ticks; the database holds the work.

Ticks (BackgroundScheduler, in-memory job store, UTC, coalesced, one instance each):
the planner every `plan_interval`, the dispatcher every `dispatch_interval` (each tick
drains the due rows), reconciliation of stale `sending` rows every `reconcile_interval`
and once at start, the retention purge every `retention_interval` (a day). Several
workers may run against one PostgreSQL database.

SIGTERM / SIGINT: stop claiming, let in-flight sends finish and record them, put rows
claimed but not yet sent back to queued, exit 0.

Logs are JSON lines (event, worker, counts, durations) and never carry a name, a number or
a message text.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import IO, Any

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import Histogram
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from engine import failpoints
from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.dispatch_reconcile import STALE_AFTER, ReconcileReport, reconcile_stale
from engine.dispatch_record import DEFAULT_MAX_ATTEMPTS
from engine.dispatch_send import RateLimiter
from engine.dispatcher import (
    DEFAULT_BATCH,
    DEFAULT_CONCURRENCY,
    DispatchReport,
    dispatch_until_idle,
)
from engine.settings import Settings
from engine.store.defqueries import active_definitions, active_version
from engine.transports.base import Transport

# With PROMETHEUS_MULTIPROC_DIR shared with the web app, /metrics includes these.
TICK_SECONDS = Histogram(
    "engage_tick_duration_seconds",
    "Duration of the worker's ticks, by tick (plan, dispatch, reconcile) and outcome.",
    ["tick", "outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
log = logging.getLogger("engine.worker")


def utcnow() -> datetime:
    return datetime.now(UTC)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"[-64:]


# --- logging -------------------------------------------------------------------------------


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        data.update(getattr(record, "fields", None) or {})
        if record.exc_info and record.exc_info[1] is not None:
            data["error"] = type(record.exc_info[1]).__name__
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class _SkippedTickFilter(logging.Filter):
    """A tick that finds the previous one still draining is expected, not a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in record.getMessage()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record is emitted (click's test runner and
    daemons swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the process (called by the CLI, never at import); calling
    it again only changes the level."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(JsonLogFormatter())
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # The twilio SDK logs every request at INFO, query strings (To numbers) included.
    for noisy in ("twilio", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("apscheduler.scheduler").addFilter(_SkippedTickFilter())


# --- the worker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    dispatch_interval: float = 2.0
    plan_interval: float | None = 60.0  # None: this process does not plan
    reconcile_interval: float = 60.0
    stale_after: timedelta = STALE_AFTER
    batch_size: int = DEFAULT_BATCH
    concurrency: int = DEFAULT_CONCURRENCY
    rate_per_second: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    plan_horizon: timedelta = timedelta(minutes=5)
    misfire_grace_seconds: int = 30
    retention_interval: float | None = 24 * 3600.0  # None: this process does not purge


class Worker:
    """The ticks of one worker process, each callable on its own (tests, `--once`)."""

    def __init__(
        self,
        *,
        config: WorkerConfig,
        settings: Settings,
        session_factory: sessionmaker[Session],
        keyring: Keyring,
        transport: Transport,
        clock: Callable[[], datetime] = utcnow,
        plan_session_factory: sessionmaker[Session] | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.session_factory = session_factory
        # The planner streams patients on one connection while it writes on another; on
        # SQLite that needs ordinary deferred transactions, not the claim's BEGIN IMMEDIATE.
        self.plan_session_factory = plan_session_factory or session_factory
        self.keyring = keyring
        self.transport = transport
        self.clock = clock
        self.stop = threading.Event()
        self.limiter = RateLimiter(config.rate_per_second, wait=self.stop.wait)
        self._defs: DefinitionSet | None = None
        self._defs_version: str | None = None
        self._defs_lock = threading.Lock()

    def fields(self, **more: object) -> dict[str, object]:
        return {"worker": self.config.worker_id, **more}

    def definitions(self) -> DefinitionSet | None:
        """The active set, reloaded when `engage sync` made another one active."""
        with self._defs_lock, self.session_factory() as session:
            version = active_version(session=session)
            if version != self._defs_version:
                self._defs = active_definitions(session=session)
                self._defs_version = version
                log.info("worker.definitions", extra={"fields": self.fields(version=version)})
            return self._defs

    def dispatch_tick(self) -> DispatchReport:
        """Drain the due rows (batch after batch) unless stopping."""
        defs = self.definitions()
        if defs is None or self.stop.is_set():
            return DispatchReport()
        failpoints.hit("worker.dispatch_tick")
        report = dispatch_until_idle(
            clock=self.clock,
            stop=self.stop,
            session_factory=self.session_factory,
            keyring=self.keyring,
            defs=defs,
            transport=self.transport,
            worker_id=self.config.worker_id,
            limit=self.config.batch_size,
            concurrency=self.config.concurrency,
            limiter=self.limiter,
            max_attempts=self.config.max_attempts,
        )
        failpoints.hit("worker.dispatch_idle")
        if report.examined:
            log.info("dispatch.tick", extra={"fields": self.fields(**report.fields())})
        return report

    def reconcile_tick(self) -> ReconcileReport:
        failpoints.hit("worker.reconcile_tick")
        return reconcile_stale(
            session_factory=self.session_factory,
            keyring=self.keyring,
            transport=self.transport,
            now=self.clock(),
            stale_after=self.config.stale_after,
            max_attempts=self.config.max_attempts,
            worker_id=self.config.worker_id,
        )

    def plan_tick(self) -> None:
        """Plan the occurrences due soon (engine.planner, imported when first needed)."""
        try:
            from engine import planner
        except ImportError as exc:
            log.warning("plan.unavailable", extra={"fields": self.fields(error=str(exc))})
            return
        defs = self.definitions()
        if defs is None or self.stop.is_set():
            return
        failpoints.hit("worker.plan_tick")
        report = planner.plan(
            defs,
            session_factory=self.plan_session_factory,
            keyring=self.keyring,
            now=self.clock(),
            horizon=self.config.plan_horizon,
            public_url=self.settings.public_url,
            actor=f"worker:{self.config.worker_id}",
            processes=self.settings.plan_processes,
            stop=self.stop,
        )
        failpoints.hit("worker.planned")
        counts = {"inserted": report.inserted, "expired": report.expired, "stopped": report.stopped}
        seconds = round(report.duration, 3)
        log.info("plan.tick", extra={"fields": self.fields(**counts, seconds=seconds)})

    def retention_tick(self) -> None:
        """Purge what policies/retention.yaml says is due (engine.retention), audited."""
        from engine.retention import purge_due

        defs = self.definitions()
        if defs is None or self.stop.is_set():
            return
        with self.session_factory.begin() as session:
            counts = purge_due(session=session, defs=defs, now=self.clock(), actor="system:worker")
        log.info("retention.tick", extra={"fields": self.fields(**counts.fields())})

    def guarded(self, name: str, tick: Callable[[], object]) -> Callable[[], None]:
        """A tick that logs a database outage and lets the next tick try again."""

        def run() -> None:
            started = time.perf_counter()
            outcome = "ok"
            try:
                tick()
            except SQLAlchemyError as exc:
                outcome = "failed"
                seconds = round(time.perf_counter() - started, 3)
                fields = self.fields(tick=name, error=type(exc).__name__, seconds=seconds)
                log.error("worker.tick_failed", extra={"fields": fields})
            finally:
                TICK_SECONDS.labels(name, outcome).observe(time.perf_counter() - started)

        return run

    def scheduler(self) -> BackgroundScheduler:
        c = self.config
        scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": c.misfire_grace_seconds,
            },
        )
        start = datetime.now(UTC)
        jobs: list[tuple[str, Callable[[], object], float | None, bool]] = [
            ("plan", self.plan_tick, c.plan_interval, True),
            ("dispatch", self.dispatch_tick, c.dispatch_interval, True),
            ("reconcile", self.reconcile_tick, c.reconcile_interval, False),  # ran at start
            ("retention", self.retention_tick, c.retention_interval, False),
        ]
        for name, tick, seconds, at_once in jobs:
            if seconds:
                first = start if at_once else start + timedelta(seconds=seconds)
                scheduler.add_job(
                    self.guarded(name, tick), "interval", seconds=seconds, id=name,
                    name=name, next_run_time=first,
                )  # fmt: skip
        return scheduler

    def run(self) -> int:
        """Run the ticks until `stop` is set; then drain and return 0."""
        log.info("worker.start", extra={"fields": self.fields(transport=self.transport.name)})
        self.guarded("reconcile", self.reconcile_tick)()
        scheduler = self.scheduler()
        scheduler.start()
        try:
            while not self.stop.wait(1.0):
                pass
        finally:
            self.stop.set()
            scheduler.shutdown(wait=True)
        log.info("worker.stop", extra={"fields": self.fields()})
        return 0

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the worker gracefully (main thread only)."""

        def handle(signum: int, _frame: FrameType | None) -> None:
            log.info("worker.signal", extra={"fields": self.fields(signal=signum)})
            self.stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
