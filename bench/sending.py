"""Plan and dispatch benchmark: a campaign over N patients sent through the real twilio SDK.

    python -m bench sending --patients 100000 --db sqlite [--threads 16]
    python -m bench sending --patients 100000 --db postgresql

A synthetic population is imported (encryption on), the starter definitions synced and
approved, and the sandbox started in its own process. Then, at a time when the monthly
awareness campaign is due for everyone: one planner tick (every active campaign), and one
dispatcher process sending every queued row with a thread pool through TwilioTransport to
the sandbox. In the same run, a bare loop of the same SDK create calls with the same number
of threads gives the ceiling; the ratio says what the engine's own work costs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select

from bench.dryrun import Figures, databases, prepare
from bench.sandbox import raw_sender, start_server
from engine.dispatcher import dispatch_until_idle
from engine.outbox_status import SENT
from engine.planner import plan
from engine.sandbox.client import SandboxClient
from engine.sandbox.config import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN, SANDBOX_FROM_NUMBER
from engine.store import db
from engine.store import models as m
from engine.transports.twilio import TwilioTransport

AT = datetime.fromisoformat("2026-12-02T00:00:00+00:00")


def run(patients: int, database: str, workdir: Path, threads: int, figures: Figures) -> None:
    server = start_server("process")
    try:
        env = {
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
        _dispatch(p, server.url, threads, figures)
        p.engine.dispose()
    finally:
        server.stop()


def _dispatch(p, url: str, threads: int, figures: Figures) -> None:  # type: ignore[no-untyped-def]
    transport = TwilioTransport(p.settings, pool_size=threads)
    # The claim is one writer transaction: BEGIN IMMEDIATE on SQLite (a no-op elsewhere).
    claims = db.make_engine(p.settings.database_url, sqlite_immediate=True)
    started = time.perf_counter()
    result = dispatch_until_idle(
        clock=lambda: AT, session_factory=db.make_session_factory(claims), keyring=p.keyring,
        defs=p.defs, transport=transport, worker_id="bench", limit=500, concurrency=threads,
        limiter=None,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    with p.sessions() as session:
        sent = session.scalar(select(func.count()).where(m.Outbox.status == SENT))
    sandbox = SandboxClient(url)
    # Every accepted create is one text; more than the rows marked sent means a row was
    # texted twice. (Equal bodies to one number can be two patients sharing a phone.)
    received = len(sandbox.messages())
    duplicates = received - sent
    rate = sent / elapsed
    figures.add("dispatch", f"{rate:,.0f} messages/s",
                f"({sent:,} sent in {elapsed:.1f} s, {threads} threads; {result.claimed:,} "
                f"claimed, {result.deferred:,} deferred, {result.blocked:,} blocked; "
                f"{received:,} received, {duplicates} extra)")  # fmt: skip
    transport.close()
    claims.dispose()
    sandbox.reset()
    bare = _bare_loop(url, threads, sent)
    figures.add("bare SDK loop", f"{bare:,.0f} messages/s",
                f"({sent:,} client.messages.create calls, {threads} threads)")  # fmt: skip
    figures.add("dispatch / bare", f"{rate / bare:.2f}")


def _bare_loop(url: str, threads: int, count: int) -> float:
    send = raw_sender(url, threads)
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, range(count)))
    return count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="plan and dispatch benchmark")
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    figures = Figures([])
    print(f"bench sending: {args.patients:,} patients on {args.db}", flush=True)
    with tempfile.TemporaryDirectory(prefix="engage-bench-") as tmp:
        for url in databases(args.db, Path(tmp)):
            run(args.patients, url, Path(tmp), args.threads, figures)
    figures.print_table()
