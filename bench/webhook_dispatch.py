"""Dispatch running under `bench webhooks --during-dispatch`: `engage dispatch --once --at AT`
processes (the production command, sandbox transport: the twilio SDK's async client
against the sandbox server) draining a large campaign while the webhook load runs, and
the messages per second they sustain in the measured window.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, func, select

from bench.dryrun import Figures, Prepared
from bench.webhook_load import cpu_seconds
from engine import outbox_status as status
from engine.sandbox.config import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN, SANDBOX_FROM_NUMBER
from engine.store import db
from engine.store import models as m

BATCH, CONCURRENCY = 500, 16  # as bench sending
SAMPLE_EVERY = 2.0  # seconds between counts of the rows sent
DONE = (status.SENT, status.DELIVERED, status.UNDELIVERED, status.FAILED)


def claim_order(p: Prepared, at: datetime) -> list[int]:
    """Ids of the rows due at `at`, in the order dispatcher claims take them."""
    o = m.Outbox
    stmt = (
        select(o.id).where(o.status.in_(status.WAITING), o.send_at <= at).order_by(o.send_at, o.id)
    )
    with p.sessions() as session:
        return list(session.scalars(stmt))


@dataclass
class Dispatch:
    """The dispatcher processes, and (wall clock, rows done) samples taken while they ran."""

    procs: list[subprocess.Popen[bytes]]
    samples: list[tuple[float, int]] = field(default_factory=list)
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    reports: list[dict[str, float]] = field(default_factory=list)

    def running(self) -> int:
        return sum(1 for proc in self.procs if proc.poll() is None)

    def figures(self, start: float, end: float, figures: Figures) -> None:
        """Messages per second in [start, end] (wall clock), from the nearest samples."""
        inside = [s for s in self.samples if start - SAMPLE_EVERY <= s[0] <= end + SAMPLE_EVERY]
        if len(inside) < 2:
            figures.add("dispatch during the load", "-", "(too few samples)")
            return
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(inside)]
        sent, opted_out, released = (
            sum(int(r.get(k, 0)) for r in self.reports) for k in ("sent", "opted_out", "released")
        )
        figures.add("dispatch during the load", f"{(n1 - n0) / (t1 - t0):,.0f} messages/s",
                    f"({n1 - n0:,} rows sent in {t1 - t0:.1f} s by {len(self.procs)} `engage "
                    f"dispatch` processes, {CONCURRENCY} in flight each; slowest "
                    f"{SAMPLE_EVERY:g} s: {min(rates):,.0f}/s; in all {sent:,} sent, {opted_out} "
                    f"opted out before the send, {released} released at the stop)")  # fmt: skip
        cpu = self.cpu_end - self.cpu_start
        total = self.samples[-1][1] - self.samples[0][1]
        figures.add("dispatcher CPU per message", f"{cpu * 1e3 / max(1, total):.2f} ms",
                    f"(the {len(self.procs)} processes, over their whole run)")  # fmt: skip


def _sent(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).where(m.Outbox.status.in_(DONE))) or 0)


def _sample(engine: Engine, run: Dispatch, stop: threading.Event) -> None:
    while not stop.wait(SAMPLE_EVERY):
        run.samples.append((time.time(), _sent(engine)))


@contextmanager
def dispatching(
    p: Prepared, sandbox_url: str, processes: int, at: datetime, workdir: Path, rate: float = 0
) -> Iterator[Dispatch]:
    """`processes` dispatchers sending the rows due at `at` until the block ends (SIGTERM:
    they stop claiming, finish their sends and exit), each at most `rate` messages per
    second (0: no limit). Yields once they are sending."""
    env = {**os.environ, "DATABASE_URL": p.settings.database_url,
           "ENGAGE_VAR_DIR": str(p.settings.var_dir), "ENGAGE_TRANSPORT": "sandbox",
           "TWILIO_API_BASE_URL": sandbox_url, "TWILIO_ACCOUNT_SID": SANDBOX_ACCOUNT_SID,
           "TWILIO_AUTH_TOKEN": SANDBOX_AUTH_TOKEN, "TWILIO_FROM_NUMBER": SANDBOX_FROM_NUMBER,
           "ENGAGE_STATUS_CALLBACK_URL": ""}  # fmt: skip
    command = [str(Path(sys.executable).with_name("engage")), "dispatch", "--once",
               "--at", at.isoformat(), "--batch-size", str(BATCH),
               "--concurrency", str(CONCURRENCY), "--rate", f"{rate:g}"]  # fmt: skip
    logs = [(workdir / f"dispatch-{i}.log").open("wb") for i in range(processes)]
    run = Dispatch(
        [
            subprocess.Popen([*command, "--id", f"bench-{i}"], env=env, stdout=log, stderr=log)
            for i, log in enumerate(logs)
        ]
    )
    engine, stop = db.make_engine(p.settings.database_url), threading.Event()
    sampler = threading.Thread(target=_sample, args=(engine, run, stop), daemon=True)
    try:
        run.cpu_start = cpu_seconds([proc.pid for proc in run.procs])
        deadline = time.monotonic() + 120
        while _sent(engine) == 0:
            if run.running() < processes or time.monotonic() > deadline:
                raise SystemExit(f"the dispatchers did not start sending; see {workdir}")
            time.sleep(0.2)
        run.samples.append((time.time(), _sent(engine)))
        sampler.start()
        yield run
        run.samples.append((time.time(), _sent(engine)))
        run.cpu_end = cpu_seconds([proc.pid for proc in run.procs])
    finally:
        stop.set()
        for proc in run.procs:
            proc.send_signal(signal.SIGTERM)
        for proc, log in zip(run.procs, logs, strict=True):
            proc.wait(timeout=120)
            log.close()
        sampler.join(timeout=10)
        engine.dispose()
    run.reports = [_report(workdir / f"dispatch-{i}.log") for i in range(processes)]


def _report(log: Path) -> dict[str, float]:
    """The `dispatched` counts `engage dispatch --once` printed last, if it did."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith('{"reconciled"'):
            return dict(json.loads(line)["dispatched"])
    return {}
