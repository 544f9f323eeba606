"""Stopping workers in the middle of a tick: a planner tick killed, then one stopped with
SIGTERM, and the next tick plans exactly the rest; a dispatch tick stopped with SIGTERM at
the moment the provider has accepted a text (failpoint `send.after_call:N:term`), and the
next worker sends exactly the rest. Nothing is planned or texted twice.

PostgreSQL, real processes. Figures are printed on the terminal and attached to the test
report.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from engine import outbox_status as st
from engine.core.domain import Prescription
from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.store import models as m
from engine.store import queries
from tests.integration import dispatch_fixtures as fx
from tests.integration import fault_fixtures as ff
from tests.integration import outbox_builders as b
from tests.integration.conftest import SandboxHandle

now, sf, defs = fx.now, fx.sf, fx.defs
pool_factory = ff.pool_factory

PATIENTS = 3_000
PLAN_ARGS = ("--plan-interval", "600", "--dispatch-interval", "600")  # ticks once, at start
SEND_ARGS = (
    "--plan-interval", "0", "--dispatch-interval", "0.2", "--batch-size", "100",
    "--concurrency", "16", "--rate", "400",
)  # fmt: skip


def add_refills(
    session_factory: sessionmaker[Session], keyring: Keyring, now: datetime, count: int
) -> None:
    """`count` patients (written consent) whose statin refill is due today, where it is
    about noon: one refill reminder each is due now (10:00 local) and alive."""
    zone = b.midday_zone(now)
    today = now.astimezone(ZoneInfo(zone)).date()
    with session_factory.begin() as session:
        pids = b.add_patients(
            session, keyring, [f"+1414{n:07d}" for n in range(count)], timezone=zone,
            prefix="R", granted_at=now - timedelta(days=30),
        )  # fmt: skip
        refill = Prescription("", "atorvastatin", "statin", today)
        queries.upsert_prescriptions(
            session=session,
            keyring=keyring,
            items=[(pid, replace(refill, rx_id=f"rx{pid}")) for pid in pids],
        )


def outbox_rows(session_factory: sessionmaker[Session]) -> int:
    with session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(m.Outbox)) or 0)


def plan_once(env: dict[str, str]) -> dict[str, int]:
    """`engage plan --json`: the next tick, as an operator would run it."""
    out = subprocess.run(
        [sys.executable, ff.ENTRY, "plan", "--json"], env=env, capture_output=True, timeout=120
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    data = json.loads(out.stdout)
    return {k: int(data[k]) for k in ("inserted", "already_present")}


@pytest.mark.parametrize("db_backend", ["postgresql"])
def test_stopped_ticks_resume_exactly_where_they_stopped(
    engine: Engine,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    defs: DefinitionSet,
    sandbox_factory: Callable[..., SandboxHandle],
    pool_factory: Callable[..., ff.WorkerPool],
    now: datetime,
    request: pytest.FixtureRequest,
) -> None:
    sandbox = sandbox_factory(delivered_delay_ms=0)
    add_refills(session_factory, keyring, now, PATIENTS)
    started = time.monotonic()
    pool = pool_factory(sandbox, *PLAN_ARGS)

    # A planner tick killed once some of its batches are in, then one stopped by SIGTERM.
    pool.start("plan")
    ff.wait_for(lambda: outbox_rows(session_factory) > 0, 60, "a first planned batch")
    pool.kill("plan")
    pool.procs.clear()
    after_kill = outbox_rows(session_factory)
    pool.start("plan")
    ff.wait_for(lambda: outbox_rows(session_factory) > after_kill, 60, "the next tick under way")
    asked = time.monotonic()
    pool.procs["plan"].send_signal(signal.SIGTERM)
    term_code = pool.procs.pop("plan").wait(timeout=60)
    term_seconds = time.monotonic() - asked
    after_term = outbox_rows(session_factory)
    tick = plan_once(pool.env)
    planned = outbox_rows(session_factory)

    # A dispatch tick stopped by SIGTERM right after the provider accepted its 200th text.
    pool.args = SEND_ARGS
    pool.start("send", failpoints="send.after_call:200:term")
    send_code = pool.procs["send"].wait(timeout=60)
    pool.procs.clear()
    at_stop = ff.statuses(session_factory)
    texts_at_stop = len(sandbox.messages())
    pool.start("send")
    ff.wait_for(lambda: ff.settled(session_factory), 60, "the rest sent")
    assert set(pool.stop_all().values()) == {0}

    texts = Counter((msg["to"], msg["body"]) for msg in sandbox.messages())
    final = ff.statuses(session_factory)
    figures = {
        "patients": PATIENTS,
        "rows_after_kill": after_kill,
        "rows_after_sigterm": after_term,
        "sigterm_exit": term_code,
        "sigterm_to_exit_s": round(term_seconds, 1),
        "next_tick": tick,
        "planned": planned,
        "dispatch_sigterm_exit": send_code,
        "sent_at_stop": at_stop[st.SENT],
        "texts_at_stop": texts_at_stop,
        "left_sending": at_stop[st.SENDING],
        "texts": sum(texts.values()),
        "duplicates": sum(n - 1 for n in texts.values()),
        "by_status": dict(final),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    line = ff.report(request, "sigterm", figures)
    assert 0 < after_kill < after_term <= planned, line
    assert term_code == 0 and send_code == 0, line
    assert tick == {"inserted": planned - after_term, "already_present": after_term}, line
    assert planned == PATIENTS, line  # one reminder per patient, none twice
    assert at_stop[st.SENDING] == 0 and at_stop[st.SENT] == texts_at_stop >= 200, line
    assert final == {st.SENT: PATIENTS} and set(texts.values()) == {1}, line
    assert len(texts) == PATIENTS, line
