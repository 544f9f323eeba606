"""Fixtures and checks for the fault-injection suite (tests/integration/test_faults_*.py).

Everything is real: `engage worker` processes (started as test_workers.py starts them,
through outbox_builders.py), the sandbox server over HTTP with the real twilio SDK, and
PostgreSQL. Workers die by SIGKILL at named failpoints (engine/failpoints.py,
ENGAGE_FAILPOINTS) or at random moments, and are started again.

What every test checks at the end (`Verdict`): no text twice at the sandbox, no row left
between states (each final: sent, failed, expired, blocked... or `unknown`, and every
unknown row listed by `engage status --json`), every text the sandbox holds is recorded
on its row with its sid, and no patient under the 1-a-day cap got two texts.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from engine import outbox_status as st
from engine.crypto import Keyring
from engine.settings import Settings
from engine.store import models as m
from tests.conftest import add_figures
from tests.integration import outbox_builders as b
from tests.integration.conftest import SandboxHandle

ENTRY = str(Path(b.__file__))


# --- the population ----------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """Rows seeded for a test: each row's number and text, and the patients under the
    healthcare 1-a-day cap (express consent) with several rows each."""

    rows: dict[int, tuple[str, str]]  # outbox id -> (number, text)
    capped_numbers: frozenset[str]

    @property
    def by_text(self) -> dict[tuple[str, str], int]:
        return {v: k for k, v in self.rows.items()}


def seed(
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    now: datetime,
    total: int,
    *,
    capped_patients: int = 0,
    rows_per_capped: int = 4,
    stagger: timedelta = timedelta(seconds=3),
) -> Seeded:
    """`total` rows due now: `capped_patients` patients with express consent (1 text a day)
    and `rows_per_capped` rows each, the k-th due k * `stagger` later and all expiring in
    2 h (the cap defers every row but the first past its expiry: they end `expired`); one
    row each for the other patients (written consent)."""
    plain = total - capped_patients * rows_per_capped
    zone, rows = b.midday_zone(now), {}
    capped = [f"+1313{n:07d}" for n in range(capped_patients)]
    numbers = [f"+1212{n:07d}" for n in range(plain)]
    first_due = now - timedelta(minutes=1)
    with session_factory.begin() as session:
        groups = (
            (numbers, "written", 1, now + timedelta(days=1), "W"),
            (capped, "express", rows_per_capped, now + timedelta(hours=2), "X"),
        )
        for phones, basis, per, expires, prefix in groups:
            if not phones:
                continue
            pids = b.add_patients(
                session, keyring, phones, legal_basis=basis, timezone=zone, prefix=prefix,
                granted_at=now - timedelta(days=30),
            )  # fmt: skip
            items = [
                (pid, b.body_text(len(rows) + n * per + k))
                for n, pid in enumerate(pids)
                for k in range(per)
            ]
            ids = [
                row_id
                for k in range(per)
                for row_id in b.add_rows(
                    session, keyring, items[k::per], expires_at=expires,
                    key_prefix=f"{prefix}{k}", send_at=first_due + k * stagger,
                )
            ]  # fmt: skip
            items = [item for k in range(per) for item in items[k::per]]
            phone_of = dict(zip(pids, phones, strict=True))
            rows.update(zip(ids, ((phone_of[pid], text) for pid, text in items), strict=True))
    return Seeded(rows, frozenset(capped))


def statuses(session_factory: sessionmaker[Session]) -> Counter[str]:
    with session_factory() as session:
        o = m.Outbox
        return Counter(
            dict(session.execute(select(o.status, func.count()).group_by(o.status)).all())
        )


def attempts_beyond_first(session_factory: sessionmaker[Session]) -> int:
    """Provider calls made again after a failure (attempts past each row's first)."""
    with session_factory() as session:
        o = m.Outbox
        extra = func.sum(func.greatest(o.attempts - 1, 0))
        return int(session.scalar(select(extra)) or 0)


def settled(session_factory: sessionmaker[Session]) -> bool:
    """No row waiting, queued for a retry or being sent."""
    return not set(statuses(session_factory)) - st.FINAL


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition`; the processes do the work."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# --- worker processes ----------------------------------------------------------------------


@dataclass
class Death:
    slot: str
    code: int
    failpoint: str | None


class WorkerPool:
    """`engage worker` processes in named slots, each with its log under `logs`; a slot's
    process can be armed with failpoints, killed, and started again."""

    def __init__(self, env: dict[str, str], logs: Path, args: tuple[str, ...]) -> None:
        self.env, self.logs, self.args = env, logs, args
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: Counter[str] = Counter()
        self.deaths: list[Death] = []

    def start(self, slot: str, *, failpoints: str = "", extra: tuple[str, ...] = ()) -> None:
        self.starts[slot] += 1
        log_path = self.log_path(slot)
        log = open(log_path, "ab")  # noqa: SIM115 - the process owns it
        env = {**self.env, "ENGAGE_FAILPOINTS": failpoints}
        worker_id = f"{slot}-{self.starts[slot]}"
        command = [sys.executable, ENTRY, "worker", "--id", worker_id, *self.args, *extra]
        self.procs[slot] = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        log.close()

    def log_path(self, slot: str) -> Path:
        return self.logs / f"{slot}.{self.starts[slot]}.log"

    def reap(self) -> list[Death]:
        """The slots whose process has ended since the last look (their procs removed)."""
        ended = []
        for slot, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[slot]
            ended.append(Death(slot, code, fired_failpoint(self.log_path(slot))))
        self.deaths += ended
        return ended

    def kill(self, slot: str) -> None:
        self.procs[slot].send_signal(signal.SIGKILL)
        self.procs[slot].wait(timeout=10)

    def stop_all(self, timeout: float = 30) -> dict[str, int]:
        """SIGTERM every process once it has started, then their exit codes. A process
        restarted a moment ago may still be importing, before any handler is installed,
        and would die of the signal (-15) having done nothing."""
        self.wait_started(timeout)
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {slot: proc.wait(timeout=timeout) for slot, proc in self.procs.items()}
        self.procs.clear()
        return codes

    def wait_started(self, timeout: float) -> None:
        """Until each running process has logged `worker.start` (its signal handlers are
        installed by then) or exited, at most `timeout` seconds in all."""
        deadline = time.monotonic() + timeout
        needle = '"event": "worker.start"'
        for slot, proc in self.procs.items():
            log_path = self.log_path(slot)
            while proc.poll() is None and time.monotonic() < deadline:
                if needle in log_path.read_text(errors="replace"):
                    break
                time.sleep(0.05)

    def kill_all(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(timeout=10)
        self.procs.clear()

    def tail(self, lines: int = 12) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
            for p in sorted(self.logs.glob("*.log"))
        )

    def log_events(self, event: str) -> int:
        """How many log lines of all processes carry this event."""
        needle = f'"event": "{event}"'
        return sum(p.read_text(errors="replace").count(needle) for p in self.logs.glob("*.log"))


def fired_failpoint(log_path: Path) -> str | None:
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if line.startswith('{"event": "failpoint"'):
            return str(json.loads(line)["name"])
    return None


def worker_env(settings: Settings, sandbox: SandboxHandle, db_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": db_url,
        "ENGAGE_VAR_DIR": str(settings.var_dir),
        "ENGAGE_TRANSPORT": "sandbox",
        "TWILIO_API_BASE_URL": sandbox.url,
        "ENGAGE_STATUS_CALLBACK_URL": "",
        "ENGAGE_SEND_RATE": "0",
        "ENGAGE_PLAN_PROCESSES": "1",
        "ENGAGE_WORKER_NICE": "0",
        "PYTHONPATH": str(b.ROOT),
    }


@pytest.fixture
def pool_factory(
    settings: Settings, db_url: str, tmp_path: Path
) -> Iterator[Callable[..., WorkerPool]]:
    """make(sandbox, *worker args) -> a WorkerPool; every process is killed afterwards."""
    pools: list[WorkerPool] = []

    def make(sandbox: SandboxHandle, *args: str) -> WorkerPool:
        logs = tmp_path / f"logs{len(pools)}"
        logs.mkdir()
        pool = WorkerPool(worker_env(settings, sandbox, db_url), logs, args)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.kill_all()


def engage_status(env: dict[str, str]) -> dict[str, Any]:
    """`engage status --json`, run as an operator would."""
    out = subprocess.run(
        [sys.executable, ENTRY, "status", "--json"], env=env, capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    return dict(json.loads(out.stdout))


# --- the verdict ---------------------------------------------------------------------------


@dataclass
class Verdict:
    """What the sandbox holds against what the outbox says."""

    rows: int = 0
    messages: int = 0  # texts the sandbox accepted
    duplicates: int = 0  # texts beyond the first for one row
    lost: int = 0  # rows not final (nor unknown) when everything should have settled
    unrecorded: int = 0  # texts at the sandbox whose row says neither sent nor unknown
    wrong_sid: int = 0  # sent rows whose sid the sandbox does not hold
    unknown: int = 0
    unsurfaced: int = 0  # unknown rows missing from `engage status`
    cap_exceeded: int = 0  # capped patients with more than one text
    by_status: dict[str, int] = field(default_factory=dict)

    def problems(self) -> dict[str, int]:
        keys = ("duplicates", "lost", "unrecorded", "wrong_sid", "unsurfaced", "cap_exceeded")
        return {k: getattr(self, k) for k in keys if getattr(self, k)}

    def figures(self) -> dict[str, int]:
        """The counts every fault test reports, under the names its line prints."""
        return {
            "texts": self.messages,
            "duplicates": self.duplicates,
            "lost": self.lost,
            "unrecorded": self.unrecorded,
            "unknown": self.unknown,
            "unknown_unsurfaced": self.unsurfaced,
            "cap_exceeded": self.cap_exceeded,
        }


def verdict(
    session_factory: sessionmaker[Session],
    sandbox: SandboxHandle,
    seeded: Seeded,
    status: dict[str, Any],
) -> Verdict:
    messages = sandbox.messages()
    texts = Counter((msg["to"], msg["body"]) for msg in messages)
    sids = {(msg["to"], msg["body"]): msg["sid"] for msg in messages}
    rows = {r.id: r for r in b.outbox(session_factory)}
    v = Verdict(rows=len(rows), messages=len(messages))
    v.duplicates = sum(n - 1 for n in texts.values())
    v.by_status = dict(sorted(Counter(r.status for r in rows.values()).items()))
    v.lost = sum(r.status not in st.FINAL for r in rows.values())
    by_text = seeded.by_text
    for key in texts:
        row = rows.get(by_text.get(key, -1))
        if row is None or row.status not in (st.SENT, st.UNKNOWN):
            v.unrecorded += 1
    for row_id, key in seeded.rows.items():
        row = rows[row_id]
        if row.status == st.SENT and row.provider_sid != sids.get(key):
            v.wrong_sid += 1
    unknown = {r.id for r in rows.values() if r.status == st.UNKNOWN}
    v.unknown = len(unknown)
    v.unsurfaced = len(unknown - {u["id"] for u in status["unknown"]})
    per_number = Counter(msg["to"] for msg in messages)
    v.cap_exceeded = sum(1 for n in seeded.capped_numbers if per_number[n] > 1)
    return v


def report(request: pytest.FixtureRequest, name: str, figures: dict[str, Any]) -> str:
    """Attach the figures to the test report (junit XML properties) and their line to the
    run's "figures" summary (tests/conftest.py); returns the line for assertion messages."""
    line = f"[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    for key, value in figures.items():
        request.node.user_properties.append((key, value))
    add_figures(request, line)
    return line


def random_moments(seed: int, count: int, start: float, end: float) -> list[float]:
    """`count` moments (seconds after the start) for kills at no particular code point."""
    rng = random.Random(seed)
    return sorted(rng.uniform(start, end) for _ in range(count))


# --- a PostgreSQL cluster of the test's own, to restart ------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivateCluster:
    """A PostgreSQL 15 cluster in a temporary directory on a free port, run as the
    `postgres` OS user when the tests run as root (initdb refuses root). Restarting it
    leaves the machine's shared server alone."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.data, self.log = root / "data", root / "server.log"
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def run(self, *command: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [*self.as_owner, *command], capture_output=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise RuntimeError(f"{Path(command[0]).name} exited {done.returncode}: {out}")

    def init(self) -> None:
        self.run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                 "--no-sync", "-E", "UTF8", "--locale", "C")  # fmt: skip

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o",
                 options, "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """`fast`: a clean shutdown; `immediate`: as a crash (recovery at the next start)."""
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str = "engage") -> str:
        """A new database on the cluster; its URL."""
        eng = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with eng.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
        return self.url(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def private_postgres() -> Iterator[PrivateCluster]:
    """A running private cluster; the test FAILS (never skips) when it cannot start."""
    root = Path(tempfile.mkdtemp(prefix="engage-pg-"))
    cluster = PrivateCluster(root, free_port())
    try:
        if cluster.as_owner:
            owner = pwd.getpwnam("postgres")
            os.chown(root, owner.pw_uid, owner.pw_gid)
        cluster.init()
        cluster.start()
    except (OSError, KeyError, RuntimeError, subprocess.SubprocessError) as exc:
        log = cluster.log.read_text(errors="replace")[-1500:] if cluster.log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"cannot start a private PostgreSQL 15 cluster in {root}: {exc}\n{log}")
    yield cluster
    with contextlib.suppress(RuntimeError):  # already down
        cluster.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)
