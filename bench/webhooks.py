"""Webhook benchmark: `engage serve` (gunicorn, its own process) answering signed Twilio
webhooks at a fixed arrival rate, and how soon a STOP cancels a patient's pending rows.

    python -m bench webhooks [--rate 200] [--seconds 60] [--patients 20000]
                             [--database-url postgresql+psycopg://postgres@127.0.0.1/test
                              | sqlite] [--workers 2] [--threads 4] [--stop-patients 100]

Setup: a synthetic population imported, one planner tick at AT, 2 x N patients with an
allowed row held back and three more rows piled on (queued, queued, deferred, all due at
CLAIM_AT), then every row due at AT sent through the sandbox so that real rows carry
provider sids. Load: a second Python process sends a precomputed schedule open-loop (each
request at its time whatever earlier ones are doing, latency counted from that scheduled
time): 80% delivery reports (sent, then delivered or undelivered, for those sids), 20%
inbound texts (free text, HELP, a few STOP and START; 10% from unknown numbers). Meanwhile
this process sends STOP from N patients, one at a time, and checks right after each
response that none of that patient's rows is still pending. At the end a dispatcher claim
at CLAIM_AT (rolled back) must find nothing for those N and something for the N others.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy import func, select
from twilio.request_validator import RequestValidator

from bench.dryrun import Figures, Prepared, postgres_database, prepare
from bench.sandbox import start_server
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
TOKEN = "bench-webhooks-auth-token-0123456789"
WARMUP_SECONDS = 3.0
PILED = (status.QUEUED, status.QUEUED, status.DEFERRED)  # added to each held-back row
TO = "+15005550006"
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


# --- setup ---------------------------------------------------------------------------------


@dataclass
class Population:
    phones: dict[int, str]  # patient row id -> E.164, for patients with a number of their own
    sent: list[tuple[int, str]]  # (outbox id, provider sid) of rows sent
    stop_group: list[int]
    control_group: list[int]


def setup(p: Prepared, groups: int, figures: Figures) -> Population:
    report = plan(p.defs, session_factory=p.sessions, keyring=p.keyring, now=AT,
                  public_url="https://rh.example")  # fmt: skip
    phones = _own_phones(p)
    held = _hold_back(p, phones, 2 * groups)
    transport = TwilioTransport(p.settings, pool_size=16)
    claims = db.make_engine(p.settings.database_url, sqlite_immediate=True)
    dispatch_until_idle(
        clock=lambda: AT, session_factory=db.make_session_factory(claims), keyring=p.keyring,
        defs=p.defs, transport=transport, worker_id="bench-setup", limit=500, concurrency=16,
        limiter=None,
    )  # fmt: skip
    transport.close()
    claims.dispose()
    o = m.Outbox
    with p.sessions() as session:
        stmt = select(o.id, o.provider_sid).where(o.status == status.SENT)
        sent = [(i, sid) for i, sid in session.execute(stmt) if sid]
    figures.add("setup", f"{len(phones):,} patients with a number of their own",
                f"({report.inserted:,} rows planned, {len(sent):,} sent with provider sids, "
                f"{len(held):,} patients with {1 + len(PILED)} pending rows each)")  # fmt: skip
    return Population(phones, sent, held[:groups], held[groups:])


def _own_phones(p: Prepared) -> dict[int, str]:
    """E.164 numbers of patients who share their number with nobody (a STOP from a shared
    number cancels every patient on it)."""
    pt = m.Patient
    with p.sessions() as session:
        single = select(pt.phone_index).group_by(pt.phone_index).having(func.count() == 1)
        ids = list(session.scalars(select(pt.id).where(pt.phone_index.in_(single)).order_by(pt.id)))
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
        stmt = select(o).where(o.status == status.QUEUED, o.send_at <= AT).order_by(o.id)
        rows = [r for r in session.scalars(stmt) if r.patient_id in phones]
        rows = random.Random(11).sample(rows, min(count, len(rows)))
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


# --- the schedule ----------------------------------------------------------------------------


def schedule(pop: Population, base_url: str, rate: float, seconds: float) -> list[list[object]]:
    """[at, kind, path, body, signature] for every request, `rate` per second."""
    rng = random.Random(7)
    grouped = set(pop.stop_group) | set(pop.control_group)
    senders = [phone for pid, phone in pop.phones.items() if pid not in grouped]
    validator = RequestValidator(TOKEN)
    total = int((WARMUP_SECONDS + seconds) * rate)
    callbacks = _status_callbacks(pop.sent, rng)
    stopped: list[str] = []
    out: list[list[object]] = []
    for i in range(total):
        if rng.random() < 0.8 and pop.sent:
            kind, path, form = next(callbacks)
        else:
            kind, path, form = _inbound(rng, senders, stopped)
        signature = validator.compute_signature(base_url + path, form)
        out.append([i / rate, kind, path, urlencode(form), signature])
    return out


def _status_callbacks(
    sent: list[tuple[int, str]], rng: random.Random
) -> Iterator[tuple[str, str, dict[str, str]]]:
    """Per sid its `sent` report, and its final report 100 reports later; once the sids
    run out they repeat (as Twilio's retries do)."""
    for k in itertools.count():
        final = "undelivered" if rng.random() < 0.03 else "delivered"
        for state, (outbox_id, sid) in (("sent", sent[k % len(sent)]),
                                        (final, sent[(k - 100) % len(sent)])):  # fmt: skip
            form = {"MessageSid": sid, "SmsSid": sid, "AccountSid": SANDBOX_ACCOUNT_SID,
                    "From": SANDBOX_FROM_NUMBER, "To": TO, "ApiVersion": "2010-04-01",
                    "MessageStatus": state, "SmsStatus": state}  # fmt: skip
            if state == "undelivered":
                form["ErrorCode"] = rng.choice(["30003", "30005", "30006"])
            kind = "status sent" if state == "sent" else "status final"
            yield kind, f"/twilio/status?ref={outbox_id}", form


def _inbound(
    rng: random.Random, senders: list[str], stopped: list[str]
) -> tuple[str, str, dict[str, str]]:
    roll = rng.random()
    if roll < 0.6:
        kind, body = "text", rng.choice(["Thanks!", "ok", "Who is this?", "Gracias", "Yes"])
    elif roll < 0.88:
        kind, body = "HELP", "HELP"
    elif roll < 0.96 or not stopped:
        kind, body = "STOP", rng.choice(["STOP", "Stop", "unsubscribe"])
    else:
        kind, body = "START", "START"
    if kind == "START":
        sender = stopped.pop(rng.randrange(len(stopped)))
    elif rng.random() < 0.1:
        sender = f"+1555{rng.randrange(10**7):07d}"  # a number that belongs to no patient
    else:
        sender = rng.choice(senders)
    if kind == "STOP":
        stopped.append(sender)
    sid = "SM" + uuid.UUID(int=rng.getrandbits(128)).hex
    form = {"MessageSid": sid, "SmsMessageSid": sid, "SmsSid": sid, "AccountSid":
            SANDBOX_ACCOUNT_SID, "From": sender, "To": TO, "Body": body, "NumMedia": "0",
            "NumSegments": "1", "ApiVersion": "2010-04-01"}  # fmt: skip
    return f"inbound {kind}", "/twilio/inbound", form


# --- the load generator (a second process) --------------------------------------------------


def generate(argv: list[str]) -> None:
    """Send the schedule in `argv[0]` to 127.0.0.1:`argv[2]` open-loop; results to argv[1]:
    [kind, at, send lag, latency from the scheduled time, HTTP status] per request."""
    items = json.loads(Path(argv[0]).read_text())
    port, threads = int(argv[2]), int(argv[3])
    start = time.perf_counter() + 0.2
    with ThreadPoolExecutor(threads) as pool:
        futures = []
        for item in items:
            delay = start + float(item[0]) - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(_send, port, item, start))
        results = [f.result() for f in futures]
    Path(argv[1]).write_text(json.dumps(results))


def _send(port: int, item: list[object], start: float) -> list[object]:
    at, kind, path, body, signature = item
    due, sent = start + float(str(at)), time.perf_counter()
    code = request(port, str(path), str(body), str(signature))
    return [kind, at, sent - due, time.perf_counter() - due, code]


def request(port: int, path: str, body: str | None = None, signature: str = "") -> int:
    """POST `body` (GET without one) on a fresh connection, as Twilio's requests come; the
    HTTP status, 0 when the connection failed."""
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature,
               "User-Agent": "TwilioProxy/1.1"}  # fmt: skip
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET" if body is None else "POST", path, body, headers)
        response = connection.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        connection.close()


# --- running it ----------------------------------------------------------------------------


@contextmanager
def serving(p: Prepared, port: int, workdir: Path, workers: int, threads: int) -> Iterator[int]:
    """`engage serve` on `port` until the block ends (SIGTERM); yields its pid."""
    env = {**os.environ, "DATABASE_URL": p.settings.database_url,
           "ENGAGE_VAR_DIR": str(p.settings.var_dir), "TWILIO_AUTH_TOKEN": TOKEN}  # fmt: skip
    command = [str(Path(sys.executable).with_name("engage")), "serve", "--port", str(port),
               "--workers", str(workers), "--threads", str(threads)]  # fmt: skip
    with (workdir / "serve.log").open("wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while request(port, "/healthz") != 200:
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
    time.sleep(WARMUP_SECONDS + min(5.0, seconds / 10))
    gap = seconds * 0.6 / max(1, len(pop.stop_group))
    validator, o = RequestValidator(TOKEN), m.Outbox
    out = []
    for n, pid in enumerate(pop.stop_group):
        form = {"MessageSid": f"SMbenchstop{n:021d}", "AccountSid": SANDBOX_ACCOUNT_SID,
                "From": pop.phones[pid], "To": TO, "Body": "STOP"}  # fmt: skip
        signature = validator.compute_signature(base_url + "/twilio/inbound", form)
        started = time.perf_counter()
        code = request(port, "/twilio/inbound", urlencode(form), signature)
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
    campaign row it examined (it marks every row it examines decided at CLAIM_AT)."""
    claims = db.make_engine(p.settings.database_url, sqlite_immediate=True)
    session = db.make_session_factory(claims)()
    o, out = m.Outbox, {"stop": Counter[str](), "control": Counter[str]()}
    try:
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


# --- figures -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of all values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ms(values: list[float], qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> str:
    if not values:
        return "-"
    parts = [f"p{round(q * 100)} {percentile(values, q) * 1e3:.1f}" for q in qs]
    return " / ".join([*parts, f"max {max(values) * 1e3:.1f} ms"])


def latency_figures(
    results: list[list[object]], server: list[float], seconds: float, figures: Figures
) -> None:
    measured = [r for r in results if float(r[1]) >= WARMUP_SECONDS]  # type: ignore[arg-type]
    errors = sum(1 for r in measured if r[4] != 200)
    latency = [float(r[3]) for r in measured]  # type: ignore[arg-type]
    figures.add("webhook latency, all", _ms(latency),
                f"({len(measured):,} requests in {seconds:.0f} s after {WARMUP_SECONDS:.0f} s "
                f"warm-up; {errors} not 200)")  # fmt: skip
    kinds = {"delivery reports": "status", "inbound texts": "inbound",
             "inbound STOP": "inbound STOP", "inbound HELP": "inbound HELP"}  # fmt: skip
    for label, prefix in kinds.items():
        values = [float(str(r[3])) for r in measured if str(r[0]).startswith(prefix)]
        figures.add(f"  {label}", _ms(values), f"({len(values):,})")
    figures.add(
        "time inside the server",
        _ms(server),
        "(gunicorn's access log; the rest of the latency is queueing and loopback)",
    )
    lag = [float(str(r[2])) for r in measured]
    figures.add(
        "load generator send lag",
        _ms(lag, (0.5, 0.99)),
        "(time from the scheduled instant to the request leaving; counted in latency)",
    )


def stop_figures(
    stops: list[tuple[float, float, int]], counts: dict[str, Counter[str]], figures: Figures
) -> None:
    if not stops:
        return
    left = sum(1 for s in stops if s[2] != 0)
    figures.add(
        "STOP response",
        _ms([s[0] for s in stops], (0.5,)),
        f"({len(stops)} patients with {1 + len(PILED)} pending rows each, under load)",
    )
    figures.add(
        "STOP to cancel confirmed",
        _ms([s[1] for s in stops], (0.5,)),
        f"(response, then a query: patients with a row still pending: {left})",
    )
    stop, control = counts["stop"], counts["control"]
    examined = f"{sum(stop.values())} rows of the STOP patients examined"
    figures.add("claim after the STOPs", examined, f"(control group: {sum(control.values())} "
                f"examined: {dict(sorted(control.items()))})")  # fmt: skip


def server_times(log: Path, skip: int) -> list[float]:
    """Seconds inside gunicorn per webhook, from its access lines, after `skip` warm-up."""
    lines = (json.loads(line) for line in log.read_text().splitlines() if '"http.request"' in line)
    return [e["ms"] / 1e3 for e in lines if e.get("path", "").startswith("/twilio/")][skip:]


class CpuMeter:
    """CPU seconds of a process and its children (gunicorn workers), and of the machine."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.server, self.machine = self._server(), self._machine()

    def _server(self) -> float:
        pids = [self.pid, *Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]
        ticks = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _machine() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(values) - values[3] - values[4], sum(values)

    def report(self, requests: int, figures: Figures) -> None:
        server = self._server() - self.server
        busy, total = (a - b for a, b in zip(self._machine(), self.machine, strict=True))
        figures.add("server CPU per request", f"{server * 1e3 / max(1, requests):.2f} ms",
                    f"(gunicorn master and workers; machine busy {busy / total:.0%} of "
                    f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")  # fmt: skip


# --- main ----------------------------------------------------------------------------------

GENERATE = "import sys; from bench.webhooks import generate; generate(sys.argv[1:])"


def run(args: argparse.Namespace, database: str, workdir: Path, figures: Figures) -> None:
    sandbox = start_server("process")
    try:
        env = {"TWILIO_API_BASE_URL": sandbox.url, "TWILIO_ACCOUNT_SID": SANDBOX_ACCOUNT_SID,
               "TWILIO_AUTH_TOKEN": "sandbox-token", "TWILIO_FROM_NUMBER": SANDBOX_FROM_NUMBER,
               "ENGAGE_STATUS_CALLBACK_URL": "", "ENGAGE_TRANSPORT": "sandbox"}  # fmt: skip
        p = prepare(args.patients, database, workdir, figures, env)
        pop = setup(p, args.stop_patients, figures)
    finally:
        sandbox.stop()
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    items = schedule(pop, base_url, args.rate, args.seconds)
    paths = [workdir / "schedule.json", workdir / "results.json"]
    paths[0].write_text(json.dumps(items))
    with serving(p, port, workdir, args.workers, args.threads) as pid:
        meter = CpuMeter(pid)
        command = [sys.executable, "-c", GENERATE, *map(str, paths), str(port), "64"]
        generator = subprocess.Popen(command, cwd=ROOT)
        stops = stop_to_cancel(p, pop, base_url, port, args.seconds)
        if generator.wait() != 0:
            raise SystemExit("the load generator failed")
        meter.report(len(items) + len(stops), figures)
    server = server_times(workdir / "serve.log", int(WARMUP_SECONDS * args.rate))
    latency_figures(json.loads(paths[1].read_text()), server, args.seconds, figures)
    stop_figures(stops, claim_check(p, pop), figures)
    p.engine.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench webhooks", description=__doc__)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--database-url", default=os.environ.get("ENGAGE_TEST_POSTGRES_URL",
                        DEFAULT_POSTGRES), help="a PostgreSQL server (a scratch database is "
                        "made there and dropped after), or `sqlite` (a fresh file)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--stop-patients", type=int, default=100)
    args = parser.parse_args(argv)
    sqlite = args.database_url.startswith("sqlite")
    figures = Figures([])
    print(f"bench webhooks: {args.rate:g}/s for {args.seconds:g} s, {args.patients:,} patients "
          f"on {'sqlite' if sqlite else 'postgresql'}, engage serve --workers {args.workers} "
          f"--threads {args.threads}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="engage-bench-") as tmp:
        workdir = Path(tmp)
        urls = [f"sqlite:///{workdir / 'bench.db'}"] if sqlite else None
        urls = urls or postgres_database(args.database_url)
        for url in urls:
            run(args, url, workdir, figures)
    figures.print_table()
