"""Webhook benchmark: `engage serve` (gunicorn, its own process) answering signed Twilio
webhooks at a fixed arrival rate, and how soon a STOP cancels a patient's pending rows;
optionally while dispatcher processes send a large campaign.

    python -m bench webhooks [--rate 200] [--seconds 60] [--patients 20000]
                             [--database-url postgresql+psycopg://postgres@127.0.0.1/test
                              | sqlite] [--workers 2] [--threads 4] [--keep-alive N]
                             [--stop-patients 100]
                             [--during-dispatch [--dispatchers 2]]

Setup: a synthetic population imported (seeded above 100,000 patients), one planner tick
at AT, 2 x N patients with an allowed row held back and three more rows piled on (queued,
queued, deferred, all due at CLAIM_AT), then every row due at AT sent through the sandbox
so that real rows carry provider sids. Load (bench.webhook_load): a second Python process
sends a precomputed schedule open-loop (each request at its time whatever earlier ones
are doing, latency counted from that scheduled time): 80% delivery reports (sent, then
delivered or undelivered, for those sids), 20% inbound texts (free text, HELP, a few STOP
and START; 10% from unknown numbers). Meanwhile this process sends STOP from N patients,
one at a time, and checks right after each response that none of that patient's rows is
still pending. At the end a dispatcher claim at CLAIM_AT (rolled back) must find nothing
for those N and something for the N others.

--during-dispatch: the planner tick runs in 2 processes and nothing is sent in the setup;
instead `engage dispatch` processes (bench.webhook_dispatch) start sending the rows due at
AT, and the load starts once they are sending and runs while they go on. Its delivery
reports are for rows the dispatchers have just recorded as sent (the load generator reads
them from the database as they come), so they land next to the dispatchers' own writes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy import func, select, update
from twilio.request_validator import RequestValidator

from bench import webhook_load as load
from bench.dryrun import Figures, Prepared, postgres_database, prepare
from bench.sandbox import start_server
from bench.webhook_dispatch import claim_order, dispatching
from engine import outbox_status as status
from engine.dispatch_claim import PROGRAM_CAMPAIGN, claim_due
from engine.dispatcher import dispatch_until_idle
from engine.planner import plan
from engine.sandbox.config import SANDBOX_ACCOUNT_SID, SANDBOX_FROM_NUMBER
from engine.store import codec, db, queries
from engine.store import models as m
from engine.store.outbox_queries import body_field
from engine.transports.twilio import TwilioTransport

ROOT = Path(__file__).resolve().parents[1]
AT = datetime.fromisoformat("2026-12-02T00:00:00+00:00")
CLAIM_AT = AT + timedelta(days=1)
PILED = (status.QUEUED, status.QUEUED, status.DEFERRED)  # added to each held-back row
PHONES_UP_TO = 50_000  # patients whose number is decrypted (the texts' senders come from them)
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


# --- setup ---------------------------------------------------------------------------------


@dataclass
class Population:
    phones: dict[int, str]  # patient row id -> E.164, for patients with a number of their own
    sent: list[tuple[int, str]]  # (outbox id, provider sid) of rows sent
    stop_group: list[int]
    control_group: list[int]

    def senders(self) -> list[str]:
        grouped = set(self.stop_group) | set(self.control_group)
        return [phone for pid, phone in self.phones.items() if pid not in grouped]


def setup(p: Prepared, groups: int, figures: Figures, *, send: bool = True) -> Population:
    """Plan at AT and hold rows back; with `send`, send every row due at AT."""
    started = time.perf_counter()
    report = plan(p.defs, session_factory=p.sessions, keyring=p.keyring, now=AT,
                  public_url="https://rh.example", processes=1 if send else 2)  # fmt: skip
    planned = time.perf_counter() - started
    phones = _own_phones(p)
    held = _hold_back(p, phones, 2 * groups)
    sent: list[tuple[int, str]] = []
    if send:
        _send_due(p)
        o = m.Outbox
        with p.sessions() as session:
            stmt = select(o.id, o.provider_sid).where(o.status == status.SENT)
            sent = [(i, sid) for i, sid in session.execute(stmt) if sid]
    figures.add("setup", f"{len(phones):,} patients with a number of their own",
                f"({report.inserted:,} rows planned in {planned:.1f} s, {len(sent):,} sent with "
                f"provider sids, {len(held):,} patients with {1 + len(PILED)} pending rows "
                f"each)")  # fmt: skip
    return Population(phones, sent, held[:groups], held[groups:])


def _send_due(p: Prepared) -> None:
    transport = TwilioTransport(p.settings, pool_size=16)
    claims = db.make_engine(p.settings.database_url, sqlite_immediate=True)
    dispatch_until_idle(
        clock=lambda: AT, session_factory=db.make_session_factory(claims), keyring=p.keyring,
        defs=p.defs, transport=transport, worker_id="bench-setup", limit=500, concurrency=16,
        limiter=None,
    )  # fmt: skip
    transport.close()
    claims.dispose()


def _own_phones(p: Prepared) -> dict[int, str]:
    """E.164 numbers of patients who share their number with nobody (a STOP from a shared
    number cancels every patient on it); of PHONES_UP_TO of them at most."""
    pt = m.Patient
    with p.sessions() as session:
        single = select(pt.phone_index).group_by(pt.phone_index).having(func.count() == 1)
        ids = list(session.scalars(select(pt.id).where(pt.phone_index.in_(single)).order_by(pt.id)))
        if len(ids) > PHONES_UP_TO:
            ids = sorted(random.Random(5).sample(ids, PHONES_UP_TO))
        phones: dict[int, str] = {}
        for chunk in queries.chunks(ids, 1000):
            ciphers = queries.ciphers_for(session=session, keyring=p.keyring, patient_ids=chunk)
            for row in session.scalars(select(pt).where(pt.id.in_(chunk))):
                record = codec.open_patient(row, ciphers[row.id])
                if record.phone:
                    phones[row.id] = record.phone
    return phones


def _hold_back(p: Prepared, phones: dict[int, str], count: int) -> list[int]:
    """`count` patients whose allowed row waits until CLAIM_AT, with PILED rows added."""
    o = m.Outbox
    with p.sessions.begin() as session:
        rows: list[m.Outbox] = []
        for chunk in queries.chunks(sorted(phones), 1000):
            stmt = select(o).where(o.status == status.QUEUED, o.send_at <= AT,
                                   o.patient_id.in_(chunk))  # fmt: skip
            rows.extend(session.scalars(stmt))
        rows = random.Random(11).sample(sorted(rows, key=lambda r: r.id), min(count, len(rows)))
        ciphers = queries.ciphers_for(
            session=session, keyring=p.keyring, patient_ids=[r.patient_id for r in rows]
        )
        for row in rows:
            cipher, send_at = ciphers[row.patient_id], CLAIM_AT - timedelta(minutes=1)
            body = cipher.decrypt_field(body_field(row.idempotency_key), row.body_enc)
            row.send_at = send_at
            for n, state in enumerate(PILED):
                key = f"bench/{row.id}/{n}"
                copied = {c: getattr(row, c) for c in _COPIED}
                session.add(m.Outbox(
                    **copied, idempotency_key=key, occurrence=f"{row.occurrence}+{n}"[:64],
                    status=state, send_at=send_at,
                    body_enc=cipher.encrypt_field(body_field(key), body),
                ))  # fmt: skip
    return [r.patient_id for r in rows]


_COPIED = ("campaign_id", "campaign_version", "template_id", "template_version", "locale",
           "purpose", "patient_id", "anchor", "outcome", "due_at", "expires_at", "segments",
           "encoding", "reasons", "policy_set", "decided_at")  # fmt: skip


# --- the server and the STOP checks -----------------------------------------------------------


@contextmanager
def serving(
    p: Prepared, port: int, workdir: Path, workers: int, threads: int,
    keep_alive: int | None = None,
) -> Iterator[int]:  # fmt: skip
    """`engage serve` on `port` until the block ends (SIGTERM); yields its pid."""
    env = {**os.environ, "DATABASE_URL": p.settings.database_url,
           "ENGAGE_VAR_DIR": str(p.settings.var_dir), "TWILIO_AUTH_TOKEN": load.TOKEN}  # fmt: skip
    command = [str(Path(sys.executable).with_name("engage")), "serve", "--port", str(port),
               "--workers", str(workers), "--threads", str(threads)]  # fmt: skip
    if keep_alive is not None:
        command += ["--keep-alive", str(keep_alive)]
    with (workdir / "serve.log").open("wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while load.request(port, "/healthz") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"engage serve did not start; see {workdir / 'serve.log'}")
            time.sleep(0.1)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def stop_to_cancel(
    p: Prepared, pop: Population, base_url: str, port: int, seconds: float
) -> list[tuple[float, float, int]]:
    """STOP from each patient of the stop group, spread over the middle of the load:
    (response seconds, seconds until the query confirmed, rows still pending) each."""
    time.sleep(load.WARMUP_SECONDS + min(5.0, seconds / 10))
    gap = seconds * 0.6 / max(1, len(pop.stop_group))
    validator, o = RequestValidator(load.TOKEN), m.Outbox
    out = []
    for n, pid in enumerate(pop.stop_group):
        form = {"MessageSid": f"SMbenchstop{n:021d}", "AccountSid": SANDBOX_ACCOUNT_SID,
                "From": pop.phones[pid], "To": load.TO, "Body": "STOP"}  # fmt: skip
        signature = validator.compute_signature(base_url + "/twilio/inbound", form)
        started = time.perf_counter()
        code = load.request(port, "/twilio/inbound", urlencode(form), signature)
        answered = time.perf_counter()
        with p.sessions() as session:  # the confirmation of this STOP is not counted
            pending = session.scalar(select(func.count()).where(
                o.patient_id == pid, o.status.in_(status.WAITING), o.campaign_id != PROGRAM_CAMPAIGN
            ))  # fmt: skip
        out.append(
            (answered - started, time.perf_counter() - started, pending if code == 200 else -1)
        )
        time.sleep(max(0.0, gap - (time.perf_counter() - started)))
    return out


def claim_check(p: Prepared, pop: Population) -> dict[str, Counter[str]]:
    """A dispatcher claim at CLAIM_AT, rolled back: by group, the status it gave each
    campaign row it examined (it marks every row it examines decided at CLAIM_AT). Other
    patients' waiting rows are first moved out of its way (rolled back too)."""
    claims = db.make_engine(p.settings.database_url, sqlite_immediate=True)
    session = db.make_session_factory(claims)()
    o, out = m.Outbox, {"stop": Counter[str](), "control": Counter[str]()}
    grouped = [*pop.stop_group, *pop.control_group]
    try:
        session.execute(update(o).where(o.status.in_(status.WAITING), o.patient_id.not_in(grouped))
                        .values(send_at=CLAIM_AT + timedelta(days=30)))  # fmt: skip
        claim_due(session=session, keyring=p.keyring, defs=p.defs, worker_id="bench-check",
                  now=CLAIM_AT, limit=1_000_000)  # fmt: skip
        for group, ids in (("stop", pop.stop_group), ("control", pop.control_group)):
            stmt = (
                select(o.status, func.count())
                .where(o.patient_id.in_(ids), o.decided_at == CLAIM_AT)
                .where(o.campaign_id != PROGRAM_CAMPAIGN)
                .group_by(o.status)
            )
            out[group].update(dict(session.execute(stmt).all()))
    finally:
        session.rollback()
        session.close()
        claims.dispose()
    return out


def stop_figures(
    stops: list[tuple[float, float, int]], counts: dict[str, Counter[str]], figures: Figures
) -> None:
    if not stops:
        return
    left = sum(1 for s in stops if s[2] != 0)
    figures.add(
        "STOP response",
        load.ms([s[0] for s in stops], (0.5,)),
        f"({len(stops)} patients with {1 + len(PILED)} pending rows each, under load)",
    )
    figures.add(
        "STOP to cancel confirmed",
        load.ms([s[1] for s in stops], (0.5,)),
        f"(response, then a query: patients with a row still pending: {left})",
    )
    stop, control = counts["stop"], counts["control"]
    examined = f"{sum(stop.values())} rows of the STOP patients examined"
    if stop:
        examined += f" {dict(sorted(stop.items()))}"
    figures.add("claim after the STOPs", examined, f"(control group: {sum(control.values())} "
                f"examined: {dict(sorted(control.items()))})")  # fmt: skip


# --- main ----------------------------------------------------------------------------------

GENERATE = "import sys; from bench.webhook_load import generate; generate(sys.argv[1])"


def run(args: argparse.Namespace, database: str, workdir: Path, figures: Figures) -> None:
    # During dispatch the sandbox stands in for Twilio, whose servers are not on our two
    # cores: it gets what the web server and the dispatchers leave. The dispatchers run at
    # the worker's default niceness (ENGAGE_WORKER_NICE=10), the web server at 0.
    sandbox = start_server("process", nice=15 if args.during_dispatch else 0)
    try:
        env = {"TWILIO_API_BASE_URL": sandbox.url, "TWILIO_ACCOUNT_SID": SANDBOX_ACCOUNT_SID,
               "TWILIO_AUTH_TOKEN": "sandbox-token", "TWILIO_FROM_NUMBER": SANDBOX_FROM_NUMBER,
               "ENGAGE_STATUS_CALLBACK_URL": "", "ENGAGE_TRANSPORT": "sandbox"}  # fmt: skip
        p = prepare(args.patients, database, workdir, figures, env)
        pop = setup(p, args.stop_patients, figures, send=not args.during_dispatch)
        if args.during_dispatch:
            stops = _load(args, p, pop, sandbox.url, workdir, figures)
    finally:
        sandbox.stop()
    if not args.during_dispatch:
        stops = _load(args, p, pop, sandbox.url, workdir, figures)
    stop_figures(stops, claim_check(p, pop), figures)
    p.engine.dispose()


def _load(
    args: argparse.Namespace, p: Prepared, pop: Population, sandbox_url: str, workdir: Path,
    figures: Figures,
) -> list[tuple[float, float, int]]:  # fmt: skip
    """The webhook load against `engage serve` (with dispatchers sending, if asked), and
    the STOPs sent meanwhile; puts the load's figures in `figures`."""
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    live = args.during_dispatch
    items = load.schedule(pop.sent, pop.senders(), base_url, args.rate, args.seconds, live=live)
    config = {"schedule": str(workdir / "schedule.json"), "output": str(workdir / "out.json"),
              "port": port, "threads": 64, "base_url": base_url, "at": AT.isoformat(),
              "database_url": p.settings.database_url}  # fmt: skip
    Path(config["schedule"]).write_text(json.dumps(items))
    if live:
        config["order"] = str(workdir / "order.json")
        Path(config["order"]).write_text(json.dumps(claim_order(p, AT)))
    (workdir / "load.json").write_text(json.dumps(config))
    dispatch = (
        dispatching(p, sandbox_url, args.dispatchers, AT, workdir, args.send_rate)
        if live
        else nullcontext()
    )
    served = serving(p, port, workdir, args.workers, args.threads, args.keep_alive)
    with served as pid, dispatch as run:
        meter = load.CpuMeter(pid)
        command = [sys.executable, "-c", GENERATE, str(workdir / "load.json")]
        generator = subprocess.Popen(command, cwd=ROOT)
        stops = stop_to_cancel(p, pop, base_url, port, args.seconds)
        if generator.wait() != 0:
            raise SystemExit("the load generator failed")
        meter.report(len(items) + len(stops), figures)
    out = json.loads(Path(config["output"]).read_text())
    server = load.server_times(workdir / "serve.log", int(load.WARMUP_SECONDS * args.rate))
    load.latency_figures(out["results"], server, args.seconds, figures)
    if run is not None:
        start = out["start"] + load.WARMUP_SECONDS
        run.figures(start, start + args.seconds, figures)
        age = load.ms(out["age"], (0.5,))
        figures.add("delivery reports' rows", f"{out['fresh']:,} just sent",
                    f"(read from the database {age} before their `sent` report; "
                    f"{out['repeated']:,} reports repeated for want of a new row)")  # fmt: skip
    return stops


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m bench webhooks", description=__doc__, formatter_class=raw
    )
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--database-url", default=os.environ.get("ENGAGE_TEST_POSTGRES_URL",
                        DEFAULT_POSTGRES), help="a PostgreSQL server (a scratch database is "
                        "made there and dropped after), or `sqlite` (a fresh file)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--keep-alive", type=int, default=None,
                        help="engage serve --keep-alive (default: its own, 2)")  # fmt: skip
    parser.add_argument("--stop-patients", type=int, default=100)
    parser.add_argument("--during-dispatch", action="store_true",
                        help="run the load while dispatchers send the campaign")  # fmt: skip
    parser.add_argument("--dispatchers", type=int, default=2, help="with --during-dispatch")
    parser.add_argument("--send-rate", type=float, default=0.0,
                        help="with --during-dispatch: messages per second per dispatcher at "
                        "most (engage dispatch --rate); 0: no limit")  # fmt: skip
    args = parser.parse_args(argv)
    sqlite = args.database_url.startswith("sqlite")
    figures = Figures([])
    during = f", {args.dispatchers} dispatchers sending" if args.during_dispatch else ""
    print(f"bench webhooks: {args.rate:g}/s for {args.seconds:g} s, {args.patients:,} patients "
          f"on {'sqlite' if sqlite else 'postgresql'}, engage serve --workers {args.workers} "
          f"--threads {args.threads}{during}; load average {os.getloadavg()[0]:.1f}",
          flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="engage-bench-") as tmp:
        workdir = Path(tmp)
        urls = [f"sqlite:///{workdir / 'bench.db'}"] if sqlite else None
        urls = urls or postgres_database(args.database_url)
        for url in urls:
            run(args, url, workdir, figures)
    figures.print_table()
