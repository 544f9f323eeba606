"""Plan and dispatch benchmark: a campaign over N patients sent through the real twilio SDK.

    python -m bench sending --patients 100000 --db sqlite [--threads 16] [--client async]
    python -m bench sending --patients 100000 --db postgresql [--processes 1,2,4]

A synthetic population is imported (encryption on), the starter definitions synced and
approved, and the sandbox started in its own process. Then, at a time when the monthly
awareness campaign is due for everyone: one planner tick (every active campaign), and one
dispatcher sending every queued row through the twilio transport to the sandbox, with
`--threads` sends in flight (coroutines on the SDK's async client, or a thread pool with
`--client threaded`). In the same run, bare loops of the same SDK create calls at the same
concurrency (threads, and coroutines on the async client) give the ceilings; the ratio to
the bare loop of the same client kind says what the engine's own work costs, and the
ratio of their CPU per message says it with less noise on a shared machine.

On PostgreSQL, the planned database is then copied once per process count and the same
rows dispatched by 1, 2 and 4 dispatcher processes at once (real processes, started and
ready before the clock starts), each checked against the sandbox for duplicates.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from bench.dryrun import Figures, databases, prepare
from bench.sandbox import raw_async_loop, raw_sender, start_server
from engine.crypto import load_keys
from engine.dispatcher import DispatchReport, dispatch_until_idle
from engine.gc_tuning import freeze_startup_heap
from engine.outbox_status import SENT
from engine.planner import plan
from engine.sandbox.client import SandboxClient
from engine.sandbox.config import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN, SANDBOX_FROM_NUMBER
from engine.settings import Settings
from engine.store import db
from engine.store import models as m
from engine.store.defqueries import active_definitions
from engine.transports.base import Transport
from engine.transports.twilio import TwilioTransport
from engine.transports.twilio_async import AsyncTwilioTransport

AT = datetime.fromisoformat("2026-12-02T00:00:00+00:00")
BATCH = 500


def run(
    patients: int, database: str, workdir: Path, args: argparse.Namespace, figures: Figures
) -> None:
    server = start_server("process")
    try:
        env = {
            "ENGAGE_VAR_DIR": str(workdir),
            "TWILIO_API_BASE_URL": server.url,
            "TWILIO_ACCOUNT_SID": SANDBOX_ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": SANDBOX_AUTH_TOKEN,
            "TWILIO_FROM_NUMBER": SANDBOX_FROM_NUMBER,
            "ENGAGE_STATUS_CALLBACK_URL": "",
            "ENGAGE_TRANSPORT": "sandbox",
        }
        p = prepare(patients, database, workdir, figures, env)
        started = time.perf_counter()
        report = plan(p.defs, session_factory=p.sessions, keyring=p.keyring, now=AT,
                      public_url="https://rh.example")  # fmt: skip
        elapsed = time.perf_counter() - started
        figures.add("plan", f"{report.inserted / elapsed:,.0f} rows/s",
                    f"({report.inserted:,} outbox rows for {report.patients_seen:,} patients "
                    f"in {elapsed:.1f} s)")  # fmt: skip
        p.engine.dispose()
        planned = (
            _snapshot(database) if args.processes and database.startswith("postgres") else None
        )
        transport = _transport(p.settings, args.client, args.threads)
        sent, cpu = _dispatch(p.settings, transport, args.threads, server.url, figures,
                              label="dispatch")  # fmt: skip
        _bare_loops(server.url, args.threads, sent, args.client, figures, cpu)
        if planned is not None:
            _process_table(database, planned, env, args, server.url, figures)
    finally:
        server.stop()


def _transport(settings: Settings, client: str, threads: int) -> Transport:
    if client == "async":
        return AsyncTwilioTransport(settings, pool_size=threads)
    return TwilioTransport(settings, pool_size=threads)


def _dispatch(settings: Settings, transport: Transport, threads: int, url: str,
              figures: Figures, *, label: str) -> tuple[int, float]:  # fmt: skip
    """One dispatcher in this process until no row is due; returns the rows sent and the
    process's CPU seconds meanwhile."""
    keyring = load_keys(settings)
    # The claim is one writer transaction: BEGIN IMMEDIATE on SQLite (a no-op elsewhere).
    claims = db.make_engine(settings.database_url, sqlite_immediate=True)
    sessions = db.make_session_factory(claims)
    with sessions() as session:
        defs = active_definitions(session=session)
    freeze_startup_heap()  # as `engage dispatch` does once built
    load = os.getloadavg()[0]
    started, cpu = time.perf_counter(), time.process_time()
    result = dispatch_until_idle(
        clock=lambda: AT, session_factory=sessions, keyring=keyring, defs=defs,
        transport=transport, worker_id="bench", limit=BATCH, concurrency=threads, limiter=None,
    )  # fmt: skip
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    with sessions() as session:
        sent = session.scalar(select(func.count()).where(m.Outbox.status == SENT)) or 0
    received, duplicates = _received(url, sent)
    figures.add(label, f"{sent / elapsed:,.0f} messages/s",
                f"({sent:,} sent in {elapsed:.1f} s, {threads} in flight, {transport.name} "
                f"{type(transport).__name__}; {result.claimed:,} claimed, {result.deferred:,} "
                f"deferred, {result.blocked:,} blocked; {received:,} received, {duplicates} "
                f"extra; {cpu * 1e3 / max(sent, 1):.2f} ms CPU/message in this process; "
                f"load {load:.1f})")  # fmt: skip
    transport.close()  # type: ignore[attr-defined]
    claims.dispose()
    return sent, cpu


def _received(url: str, sent: int) -> tuple[int, int]:
    """Texts the sandbox accepted, and how many more than rows marked sent (a row texted
    twice; equal bodies to one number can be two patients sharing a phone). Resets it."""
    sandbox = SandboxClient(url)
    received = len(sandbox.messages())
    sandbox.reset()
    sandbox.close()
    return received, received - sent


def _bare_loops(
    url: str, threads: int, sent: int, client: str, figures: Figures, cpu: float
) -> None:
    """The same create calls without the engine, threaded and async, same concurrency. The
    ratio of CPU per message (this process's) is the steadier one on a shared machine."""
    dispatched = figures.rows[-1][1]
    rate = float(dispatched.split()[0].replace(",", ""))
    bare = {"threaded": _bare_threaded(url, threads, sent)}
    SandboxClient(url).reset()
    seconds, bare_cpu = raw_async_loop(url, threads, sent)
    bare["async"] = sent / seconds
    SandboxClient(url).reset()
    for kind, value in bare.items():
        cpu_note = f", {bare_cpu * 1e3 / sent:.2f} ms CPU/message" if kind == "async" else ""
        figures.add(f"bare SDK loop, {kind}", f"{value:,.0f} messages/s",
                    f"({sent:,} create calls, {threads} in flight{cpu_note})")  # fmt: skip
    figures.add("dispatch / bare", f"{rate / bare[client]:.2f}", f"(the {client} bare loop)")
    if client == "async":
        figures.add("dispatch / bare, CPU", f"{bare_cpu / max(cpu, 1e-9):.2f}",
                    "(the bare async loop's CPU per message over the dispatcher's)")  # fmt: skip


def _bare_threaded(url: str, threads: int, count: int) -> float:
    send = raw_sender(url, threads)
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, range(count)))
    return count / (time.perf_counter() - started)


# --- several dispatcher processes on PostgreSQL ---------------------------------------------


def _admin(database: str) -> Any:
    url = make_url(db.normalize_url(database)).set(database="postgres")
    return create_engine(url, isolation_level="AUTOCOMMIT")


def _snapshot(database: str) -> str:
    """A template copy of the planned database (dropped with the bench's own database)."""
    name = make_url(database).database
    copy = f"{name}_planned"
    admin = _admin(database)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{copy}" TEMPLATE "{name}"'))
    admin.dispose()
    return copy


def _process_table(database: str, planned: str, env: dict[str, str], args: argparse.Namespace,
                   url: str, figures: Figures) -> None:  # fmt: skip
    admin = _admin(database)
    run_name = f"{planned}_run"
    run_url = make_url(database).set(database=run_name).render_as_string(hide_password=False)
    try:
        for count in args.processes:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{run_name}" WITH (FORCE)'))
                conn.execute(text(f'CREATE DATABASE "{run_name}" TEMPLATE "{planned}"'))
            _processes(count, {**env, "DATABASE_URL": run_url}, args.threads, args.client, url,
                       figures)  # fmt: skip
    finally:
        with admin.connect() as conn:
            for name in (run_name, planned):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _processes(count: int, env: dict[str, str], threads: int, client: str, url: str,
               figures: Figures) -> None:  # fmt: skip
    spawn = multiprocessing.get_context("spawn")
    ready, go, out = spawn.Barrier(count + 1), spawn.Event(), spawn.Queue()
    procs = [
        spawn.Process(target=_worker, args=(env, f"bench-{i}", threads, client, ready, go, out))
        for i in range(count)
    ]
    for proc in procs:
        proc.start()
    ready.wait(timeout=120)
    load = os.getloadavg()[0]
    started = time.time()
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    elapsed = max(end for _, end, _ in results) - started
    settings = Settings.from_env(env)
    engine = db.make_engine(settings.database_url)
    with engine.connect() as conn:
        sent = conn.scalar(select(func.count()).where(m.Outbox.status == SENT)) or 0
    engine.dispose()
    received, duplicates = _received(url, sent)
    per = ", ".join(f"{r.sent:,}" for _, _, r in results)
    figures.add(f"dispatch, {count} process{'es' if count > 1 else ''}",
                f"{sent / elapsed:,.0f} messages/s",
                f"({sent:,} sent in {elapsed:.1f} s; per process {per}; {received:,} received, "
                f"{duplicates} extra; load {load:.1f})")  # fmt: skip


def _worker(env: dict[str, str], worker_id: str, threads: int, client: str, ready: Any,
            go: Any, out: Any) -> None:  # fmt: skip
    """One dispatcher process: ready, wait for `go`, dispatch until idle, report."""
    settings = Settings.from_env(env)
    claims = db.make_engine(settings.database_url, sqlite_immediate=True)
    sessions = db.make_session_factory(claims)
    with sessions() as session:
        defs = active_definitions(session=session)
    transport = _transport(settings, client, threads)
    keyring = load_keys(settings)
    freeze_startup_heap()
    ready.wait()
    go.wait()
    report: DispatchReport = dispatch_until_idle(
        clock=lambda: AT, session_factory=sessions, keyring=keyring, defs=defs,
        transport=transport, worker_id=worker_id, limit=BATCH, concurrency=threads,
    )  # fmt: skip
    out.put((0.0, time.time(), report))
    transport.close()  # type: ignore[attr-defined]
    claims.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="plan and dispatch benchmark")
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--threads", type=int, default=16, help="sends in flight")
    parser.add_argument("--client", choices=["async", "threaded"], default="async")
    parser.add_argument(
        "--processes", default="1,2,4", help="PostgreSQL: dispatcher process counts ('' none)"
    )
    args = parser.parse_args(argv)
    args.processes = [int(n) for n in args.processes.split(",") if n]
    figures = Figures([])
    print(f"bench sending: {args.patients:,} patients on {args.db}", flush=True)
    with tempfile.TemporaryDirectory(prefix="engage-bench-") as tmp:
        for url in databases(args.db, Path(tmp)):
            run(args.patients, url, Path(tmp), args, figures)
    figures.print_table()
