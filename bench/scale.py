"""Planning at scale: plan time at several population sizes, against a bare bulk insert.

    python -m bench scale [--patients 10000,100000,1000000] [--db sqlite,postgresql]
                          [--processes 2] [--sample 400] [--cache DIR]

For each database and population size: the synthetic population is seeded (bench.seed,
cached with --cache or $ENGAGE_BENCH_CACHE), the starter definitions synced and approved
(every policy rule active, encryption on). Then, in this order:

1. a bare bulk insert: as many outbox rows as the population has patients, one per
   patient in patient order as a tick writes them, built 1,000 at a time (not timed),
   written 1,000 per transaction by the planner's own insert path (COPY on PostgreSQL,
   multi-row INSERT on SQLite), then deleted again (and on PostgreSQL vacuumed, so that
   autovacuum does not take up the dead rows during the tick);
2. one planner tick at 2026-12-02T00:00Z, when the monthly awareness campaign is due for
   every adult, in a fresh process whose memory, and its children's, is sampled;
3. a correctness check: for a random sample of patients, every occurrence is decided
   again by the straightforward path (bench.scale_check) and must equal the stored row.

The ratio is the planner's rows per second over the bare insert's rows per second.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select

from bench.dryrun import Figures, Prepared, databases, prepare
from bench.scale_check import check_sample
from engine.crypto import load_keys
from engine.planner import plan
from engine.settings import Settings
from engine.store import db
from engine.store import models as m
from engine.store.outbox_insert import insert_outbox_rows

AT = datetime(2026, 12, 2, tzinfo=UTC)
PUBLIC_URL = "https://rh.example"


@dataclass
class Row:
    """One line of the growth table."""

    database: str
    patients: int
    rows: int
    seconds: float
    bare_rate: float
    processes: int
    total_mib: float
    single_mib: float
    cpu_seconds: float
    sample: str

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def bare_insert(p: Prepared, count: int) -> float:
    """Rows per second of a bare bulk insert of `count` outbox rows (then deleted): rows
    are built 1,000 at a time and only the inserts are timed. Like a tick's, the rows are
    one per patient in patient order (the outbox's unique index leads with the patient)."""
    with p.sessions() as session:
        ids = session.scalars(select(m.Patient.id).order_by(m.Patient.id)).all()
    body = random.Random(1).randbytes(140)
    reason = {"rule": "consent-required", "policy": "consent", "effect": "deny",
              "message": "no active consent for adherence", "cite": "47 CFR 64.1200"}  # fmt: skip
    base = {"campaign_id": "bare", "campaign_version": "v", "template_id": "t",
            "template_version": "v", "locale": "en", "purpose": "adherence",
            "occurrence": "monthly@2026-12-02", "anchor": "", "outcome": "allow",
            "status": "queued", "due_at": AT, "send_at": AT, "decided_at": AT,
            "expires_at": AT + timedelta(hours=10), "segments": 1, "encoding": "GSM-7",
            "policy_set": "p", "attempts": 0, "body_enc": body}  # fmt: skip
    seconds = 0.0
    for start in range(0, count, 1000):
        rows = [
            {
                **base,
                "idempotency_key": f"bare-{i:012d}",
                "patient_id": ids[i % len(ids)],
                "reasons": [reason] if i % 4 == 0 else [],
            }
            for i in range(start, min(start + 1000, count))
        ]
        started = time.perf_counter()
        with p.sessions.begin() as session:
            insert_outbox_rows(session=session, rows=rows)
        seconds += time.perf_counter() - started
    with p.sessions.begin() as session:
        session.execute(delete(m.Outbox).where(m.Outbox.campaign_id == "bare"))
    if p.engine.dialect.name == "postgresql":
        # Not timed: without it autovacuum takes up the million dead rows during the tick.
        with p.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM outbox")
    return count / seconds


class PeakMemory:
    """Samples the resident memory of this process and its descendants every 0.1 s: the
    peak of their sum, and of the largest single one. (ru_maxrss would count what a spawned
    process inherited from its parent before exec.) Finding the descendants reads every
    process's /proc entry (about 1.3 ms on the bench machine, a few per cent of a core at
    this rate), so the tree is walked once a second and only its members are read between
    walks; a tick's processes live for the whole tick."""

    def __init__(self) -> None:
        self.total = self.single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pids: list[int] = []
        walked = -TREE_EVERY
        while not self._stop.wait(0.1):
            if time.monotonic() - walked >= TREE_EVERY:
                pids, walked = _tree(os.getpid()), time.monotonic()
            sizes = [_rss_kib(pid) for pid in pids]
            self.total = max(self.total, sum(sizes))
            self.single = max(self.single, *sizes)

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.total / 1024, self.single / 1024


TREE_EVERY = 1.0  # seconds between walks of the process tree


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _rss_kib(pid: int) -> int:
    """Resident memory (statm's second field, as VmRSS counts it); 0 for a process gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_KIB
    except (OSError, IndexError, ValueError):
        return 0


def plan_in_child(database_url: str, var_dir: str, root: str, processes: int) -> dict[str, float]:
    """Run in a fresh process: one planner tick; its figures and peak RSS (own, children)."""
    from engine.definitions import load_definitions

    settings = Settings.from_env({"ENGAGE_VAR_DIR": var_dir, "DATABASE_URL": database_url})
    engine = db.make_engine(database_url)
    defs = load_definitions(root)
    started = time.perf_counter()
    cpu_before = _cpu_seconds()
    sessions = db.make_session_factory(engine)
    memory = PeakMemory()
    report = plan(defs, session_factory=sessions, keyring=load_keys(settings), now=AT,
                  public_url=PUBLIC_URL, processes=processes)  # fmt: skip
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    total, single = memory.stop()
    engine.dispose()
    return {
        "rows": report.inserted,
        "patients": report.patients_seen,
        "seconds": seconds,
        "processes": report.processes,
        "total_mib": total,
        "single_mib": single,
        "cpu_seconds": cpu,
    }


def _cpu_seconds() -> float:
    """User and system CPU time of this process and of its children that have ended (the
    planner's range processes are joined before the tick returns). Unlike the wall time,
    it does not count waiting for a core on a busy machine."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def in_fresh_process(function: Any, *args: Any) -> Any:
    """`function(*args)` in a spawned process that may start processes of its own."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_call, args=(results, function, args))
    child.start()
    result = results.get()
    child.join()
    if isinstance(result, BaseException):
        raise result
    return result


def _call(results: Any, function: Any, args: tuple[Any, ...]) -> None:
    try:
        results.put(function(*args))
    except BaseException as exc:
        results.put(RuntimeError(f"{type(exc).__name__}: {exc}"))
        raise


def run(args: argparse.Namespace, kind: str, patients: int, workdir: Path, out: list[Row]) -> None:
    figures = Figures([])
    for url in databases(kind, workdir):
        p = prepare(patients, url, workdir, figures, load="seed", cache=args.cache)
        bare = bare_insert(p, patients)
        figures.add("bare bulk insert", f"{bare:,.0f} rows/s", f"({patients:,} rows)")
        result = in_fresh_process(
            plan_in_child, url, str(p.settings.var_dir), p.defs.root, args.processes
        )
        rate = result["rows"] / result["seconds"]
        figures.add("plan", f"{rate:,.0f} rows/s",
                    f"({int(result['rows']):,} rows for {int(result['patients']):,} patients "
                    f"in {result['seconds']:.1f} s, {result['cpu_seconds']:.1f} s of CPU, "
                    f"{result['processes']} processes; peak RSS {result['total_mib']:,.0f} MiB; "
                    f"load average {os.getloadavg()[0]:.1f})")  # fmt: skip
        with p.sessions() as session:
            stored = session.scalar(select(func.count()).select_from(m.Outbox))
        assert stored == result["rows"], f"{stored} rows stored, {result['rows']} reported"
        sample = check_sample(p, size=args.sample, at=AT, public_url=PUBLIC_URL)
        figures.add("sample check", sample.text)
        out.append(Row(kind, patients, int(result["rows"]), result["seconds"], bare,
                       result["processes"], result["total_mib"], result["single_mib"],
                       result["cpu_seconds"], sample.text))  # fmt: skip
        p.engine.dispose()
        if sample.mismatches:
            raise SystemExit(f"planner and straightforward path differ: {sample.mismatches[:3]}")


def print_table(rows: list[Row]) -> None:
    print("\nplan at scale (one tick, every starter rule, encryption on)")
    head = (f"{'database':<10} {'patients':>9} {'rows':>9} {'seconds':>8} {'rows/s':>8} "
            f"{'us/row':>7} {'bare rows/s':>11} {'ratio':>6} {'procs':>5} {'peak RSS':>9} "
            f"{'largest':>9} {'CPU us/row':>10}  sample")  # fmt: skip
    print(head)
    for r in rows:
        print(f"{r.database:<10} {r.patients:>9,} {r.rows:>9,} {r.seconds:>8.1f} "
              f"{r.rate:>8,.0f} {1e6 / r.rate:>7.0f} {r.bare_rate:>11,.0f} "
              f"{r.rate / r.bare_rate:>6.2f} {r.processes:>5} {r.total_mib:>5,.0f} MiB "
              f"{r.single_mib:>5,.0f} MiB {1e6 * r.cpu_seconds / r.rows:>10,.0f}  "
              f"{r.sample}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__)
    parser.add_argument("--patients", default="10000,100000")
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sample", type=int, default=400)
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    rows: list[Row] = []
    for kind in args.db.split(","):
        for patients in (int(n) for n in args.patients.split(",")):
            print(f"bench scale: {patients:,} patients on {kind}", flush=True)
            with tempfile.TemporaryDirectory(prefix="engage-bench-") as tmp:
                run(args, kind, patients, Path(tmp), rows)
    print_table(rows)
