"""Several worker processes against one database and the sandbox (real twilio SDK, HTTP).

Workers are real processes: `engage worker` started with subprocess (through
outbox_builders.py, which registers the worker commands), killed with SIGKILL or stopped
with SIGTERM. They run on the wall clock, so patients live where it is about noon.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from engine import outbox_status as st
from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.settings import Settings
from engine.store import models as m
from tests.integration import dispatch_fixtures as fx
from tests.integration import outbox_builders as b
from tests.integration.conftest import SandboxHandle
from tests.integration.fault_fixtures import statuses, wait_for

# Fixtures shared with test_dispatcher.py, bound here so that pytest finds them.
now, latency, sandbox = fx.now, fx.latency, fx.sandbox
sf, defs = fx.sf, fx.defs

ENTRY = str(Path(b.__file__))
POSTGRES_ONLY = pytest.mark.parametrize("db_backend", ["postgresql"])


def seed(
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    now: datetime,
    count: int,
    *,
    per_patient: int = 1,
    legal_basis: str = "written",
) -> list[int]:
    """`count` patients (distinct numbers) with `per_patient` rows each, due now."""
    with session_factory.begin() as session:
        pids = b.add_patients(
            session,
            keyring,
            [f"+1212{n:07d}" for n in range(count)],
            legal_basis=legal_basis,
            timezone=b.midday_zone(now),
            granted_at=now - timedelta(days=30),
        )
        items = [
            (pid, b.body_text(n * 10 + k)) for n, pid in enumerate(pids) for k in range(per_patient)
        ]
        return b.add_rows(
            session,
            keyring,
            items,
            send_at=now - timedelta(minutes=1),
            expires_at=now + timedelta(days=3),
        )


class Workers:
    """`engage worker` processes with their logs under tmp_path."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, worker_id: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{worker_id}.log", "ab")  # noqa: SIM115 - the process owns it
        command = [sys.executable, ENTRY, "worker", "--id", worker_id, "--plan-interval", "0"]
        proc = subprocess.Popen([*command, *args], env=self.env, stdout=log, stderr=log)
        log.close()
        self.procs[worker_id] = proc
        return proc

    def kill(self, worker_id: str) -> None:
        proc = self.procs.pop(worker_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self, timeout: float = 30) -> dict[str, int]:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {wid: proc.wait(timeout=timeout) for wid, proc in self.procs.items()}
        self.procs.clear()
        return codes

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
            for p in sorted(self.logs.glob("*.log"))
        )

    def kill_all(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(timeout=10)
        self.procs.clear()


@pytest.fixture
def workers(
    settings: Settings, sandbox: SandboxHandle, db_url: str, tmp_path: Path
) -> Iterator[Workers]:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "ENGAGE_VAR_DIR": str(settings.var_dir),
        "ENGAGE_TRANSPORT": "sandbox",
        "TWILIO_API_BASE_URL": sandbox.url,
        "ENGAGE_STATUS_CALLBACK_URL": "",
        "ENGAGE_SEND_RATE": "0",
        "PYTHONPATH": str(b.ROOT),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    pool = Workers(env, logs)
    yield pool
    pool.kill_all()


def assert_each_sent_once(
    session_factory: sessionmaker[Session], sandbox: SandboxHandle, rows: int
) -> list[m.Outbox]:
    """Every row sent, the sandbox holding exactly one message per row, sids matching."""
    outbox = b.outbox(session_factory)
    messages = sandbox.messages()
    per_number = sandbox.accepted_per_to()
    assert len(outbox) == rows
    assert Counter(r.status for r in outbox) == {st.SENT: rows}
    assert len(messages) == rows and set(per_number.values()) == {1}
    assert {r.provider_sid for r in outbox} == {msg["sid"] for msg in messages}
    return outbox


# --- frequency caps under concurrency --------------------------------------------------------


def test_frequency_cap_holds_across_four_worker_processes(
    engine: Engine,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    settings: Settings,
    sandbox: SandboxHandle,
    db_url: str,
    db_backend: str,
    now: datetime,
) -> None:
    """Five allowed rows for one patient under the 1-a-day healthcare cap (express
    consent); four processes claim one row each at the same moment: one text goes out."""
    row_ids = seed(session_factory, keyring, now, 1, per_patient=5, legal_basis="express")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    config = sandbox.settings_for(settings)
    procs = [
        ctx.Process(
            target=b.dispatch_in_process,
            args=(db_url, config),
            kwargs={"at": now, "worker_id": f"p{n}", "barrier": barrier, "results": results},
        )
        for n in range(4)
    ]
    for proc in procs:
        proc.start()
    reports = dict(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    rows = b.outbox(session_factory, row_ids)
    assert Counter(r.status for r in rows) == {st.SENT: 1, st.DEFERRED: 4}
    assert sum(r["sent"] for r in reports.values()) == 1
    assert sum(r["deferred"] for r in reports.values()) == 4
    if db_backend == "postgresql":  # (SQLite's busy handler may sleep through the race)
        assert sum(1 for r in reports.values() if r["claimed"] + r["deferred"]) >= 2
    assert {r.send_at for r in rows if r.status == st.DEFERRED} == {now + timedelta(days=1)}
    assert list(sandbox.accepted_per_to().values()) == [1]


# --- throughput, no duplicates, nothing lost -------------------------------------------------


@POSTGRES_ONLY
def test_four_workers_send_ten_thousand_rows_exactly_once(
    engine: Engine,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    sandbox: SandboxHandle,
    workers: Workers,
    now: datetime,
) -> None:
    total = 10_000
    seed(session_factory, keyring, now, total)
    started = time.monotonic()
    for n in range(4):
        workers.start(
            f"w{n}", "--dispatch-interval", "0.2", "--batch-size", "200", "--concurrency", "16"
        )
    try:
        wait_for(lambda: statuses(session_factory)[st.SENT] == total, 80, "every row sent")
    except AssertionError:
        pytest.fail(f"{statuses(session_factory)}\n{workers.tail()}")
    elapsed = time.monotonic() - started
    assert set(workers.stop_all().values()) == {0}
    outbox = assert_each_sent_once(session_factory, sandbox, total)
    by_worker = Counter(r.claimed_by for r in outbox)
    assert len(by_worker) == 4  # every worker took a share
    span = (max(r.sent_at for r in outbox) - min(r.sent_at for r in outbox)).total_seconds()
    print(
        f"\n{total} rows, 4 workers: {total / elapsed:.0f} msg/s including start-up "
        f"({elapsed:.1f} s), {total / max(span, 0.001):.0f} msg/s between first and last "
        f"claim; per worker {dict(sorted(by_worker.items()))}"
    )


# --- crashes and shutdowns -------------------------------------------------------------------


@POSTGRES_ONLY
@pytest.mark.parametrize("latency", [(60.0, 160.0)])
def test_sigkill_mid_send_never_texts_twice(
    engine: Engine,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    sandbox: SandboxHandle,
    workers: Workers,
    now: datetime,
) -> None:
    """Kill -9 workers while sends are in flight, restart them: every row ends sent (or
    unknown), the sandbox got each text at most once, and reconciliation did the rest."""
    total = 300
    seed(session_factory, keyring, now, total)
    # Reconciliation assumes a claim older than --stale-after belongs to a dead worker: it
    # must exceed any live send (a loaded 2-core machine took over 2 s for one).
    args = ("--dispatch-interval", "0.1", "--batch-size", "10", "--concurrency", "4",
            "--stale-after", "8", "--reconcile-interval", "1")  # fmt: skip
    for n in range(3):
        workers.start(f"w{n}", *args)
    for n, threshold in enumerate((40, 110, 180)):
        wait_for(
            lambda t=threshold: statuses(session_factory)[st.SENT] >= t, 30, f"{threshold} sent"
        )
        workers.kill(f"w{n}")
        workers.start(f"w{n}-restarted", *args)
    settled = {st.SENT, st.UNKNOWN}
    try:
        wait_for(lambda: set(statuses(session_factory)) <= settled, 45, "every row settled")
    except AssertionError:
        pytest.fail(f"{statuses(session_factory)}\n{workers.tail()}")
    assert set(workers.stop_all().values()) == {0}
    outbox = b.outbox(session_factory)
    per_number = sandbox.accepted_per_to()
    assert set(per_number.values()) == {1}  # nobody texted twice
    sent = [r for r in outbox if r.status == st.SENT]
    assert {r.provider_sid for r in sent} == {msg["sid"] for msg in sandbox.messages()}
    assert len(sent) + sum(r.status == st.UNKNOWN for r in outbox) == total
    reconciled = [r for r in outbox if "left sending by" in (r.last_error or "")]
    assert reconciled, "no row was left sending by a killed worker"


@POSTGRES_ONLY
@pytest.mark.parametrize("latency", [(80.0, 80.0)])
def test_sigterm_finishes_in_flight_sends_and_releases_the_rest(
    engine: Engine,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    sandbox: SandboxHandle,
    workers: Workers,
    now: datetime,
) -> None:
    total = 150
    seed(session_factory, keyring, now, total)
    args = ("--dispatch-interval", "0.1", "--batch-size", "40", "--concurrency", "4")
    proc = workers.start("w0", *args)
    wait_for(lambda: statuses(session_factory)[st.SENT] >= 20, 30, "20 sent")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert time.monotonic() - started < 5  # it did not finish the whole queue first
    workers.procs.clear()
    counts = statuses(session_factory)
    assert set(counts) <= {st.SENT, st.QUEUED} and counts[st.QUEUED] > 0
    assert counts[st.SENT] == len(sandbox.messages())  # every accepted send was recorded
    with session_factory() as session:
        claimed = select(func.count()).where(
            m.Outbox.status == st.QUEUED, m.Outbox.claimed_by.is_not(None)
        )
        assert session.scalar(claimed) == 0
    workers.start("w1", *args)
    wait_for(lambda: statuses(session_factory)[st.SENT] == total, 30, "the rest sent")
    assert set(workers.stop_all().values()) == {0}
    assert_each_sent_once(session_factory, sandbox, total)
