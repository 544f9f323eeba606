"""The webhook load for `bench webhooks`: the request schedule, the open-loop load generator
(run as a second process) and the latency figures.

A schedule item is [at, kind, path, body, signature]. In the during-dispatch mode the
delivery reports are left as [at, "status", "", "", ""] and filled in by the generator
when their time comes, for rows the dispatcher has just sent (LiveReports).
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import and_, bindparam, or_, select
from twilio.request_validator import RequestValidator

from bench.dryrun import Figures
from engine import outbox_status as status
from engine.gc_tuning import bulk_collector, freeze_startup_heap
from engine.sandbox.config import SANDBOX_ACCOUNT_SID, SANDBOX_FROM_NUMBER
from engine.store import db
from engine.store import models as m
from engine.store.queries import among

TOKEN = "bench-webhooks-auth-token-0123456789"
WARMUP_SECONDS = 3.0
TO = "+15005550006"
FINAL_AFTER = 100  # a sid's final report comes this many delivery reports after its `sent`
Report = tuple[str, str, dict[str, str]]  # kind, path, form


# --- the schedule ----------------------------------------------------------------------------


def schedule(
    sent: list[tuple[int, str]], senders: list[str], base_url: str, rate: float, seconds: float,
    *, live: bool = False,
) -> list[list[object]]:  # fmt: skip
    """[at, kind, path, body, signature] for every request, `rate` per second; with `live`,
    the delivery reports are placeholders the generator fills in."""
    rng = random.Random(7)
    validator = RequestValidator(TOKEN)
    total = int((WARMUP_SECONDS + seconds) * rate)
    callbacks = status_callbacks(sent, rng)
    stopped: list[str] = []
    out: list[list[object]] = []
    for i in range(total):
        if rng.random() < 0.8 and (sent or live):
            if live:
                out.append([i / rate, "status", "", "", ""])
                continue
            kind, path, form = next(callbacks)
        else:
            kind, path, form = _inbound(rng, senders, stopped)
        signature = validator.compute_signature(base_url + path, form)
        out.append([i / rate, kind, path, urlencode(form), signature])
    return out


def status_report(outbox_id: int, sid: str, state: str, rng: random.Random) -> Report:
    form = {"MessageSid": sid, "SmsSid": sid, "AccountSid": SANDBOX_ACCOUNT_SID,
            "From": SANDBOX_FROM_NUMBER, "To": TO, "ApiVersion": "2010-04-01",
            "MessageStatus": state, "SmsStatus": state}  # fmt: skip
    if state == "undelivered":
        form["ErrorCode"] = rng.choice(["30003", "30005", "30006"])
    kind = "status sent" if state == "sent" else "status final"
    return kind, f"/twilio/status?ref={outbox_id}", form


def _final(rng: random.Random) -> str:
    return "undelivered" if rng.random() < 0.03 else "delivered"


def status_callbacks(sent: list[tuple[int, str]], rng: random.Random) -> Iterator[Report]:
    """Per sid its `sent` report, and its final report FINAL_AFTER reports later; once the
    sids run out they repeat (as Twilio's retries do)."""
    for k in itertools.count():
        final = _final(rng)
        yield status_report(*sent[k % len(sent)], "sent", rng)
        yield status_report(*sent[(k - FINAL_AFTER) % len(sent)], final, rng)


def _inbound(rng: random.Random, senders: list[str], stopped: list[str]) -> Report:
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


# --- delivery reports for rows being sent now -------------------------------------------------


class SentFeed(threading.Thread):
    """Rows the dispatcher has just recorded as sent, newest last: every POLL seconds it reads
    a window of the rows due, in the dispatcher's claim order, from the first one not yet
    settled (still waiting or sending) on."""

    POLL, WINDOW = 0.5, 3000

    def __init__(self, database_url: str, order: list[int], at: str) -> None:
        super().__init__(daemon=True)
        self.engine = db.make_engine(database_url)
        self.order, self.at, self.low = order, datetime.fromisoformat(at), 0
        self.rows: deque[tuple[int, str, float]] = deque()  # (outbox id, sid, seen at)
        self.seen: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        o = m.Outbox
        waiting = or_(o.status == status.SENDING,
                      and_(o.status.in_(status.WAITING), o.send_at <= self.at))  # fmt: skip
        # One statement, compiled once: the window's ids as one array on PostgreSQL (an IN
        # list of 3,000 parameters took this process's GIL long enough to delay the load).
        postgres = self.engine.dialect.name == "postgresql"
        ids = among(o.id, "ids") if postgres else o.id.in_(bindparam("ids", expanding=True))
        stmt = select(o.id, o.provider_sid, waiting).where(ids)
        while not self.done.wait(self.POLL) and self.low < len(self.order):
            window = self.order[self.low : self.low + self.WINDOW]
            with self.engine.connect() as conn:
                rows = {i: (sid, bool(w)) for i, sid, w in conn.execute(stmt, {"ids": window})}
            now = time.perf_counter()
            for i in window:
                sid, pending = rows.get(i, (None, False))
                if sid and not pending and i not in self.seen:
                    self.seen.add(i)
                    self.rows.append((i, sid, now))
            for i in window:
                if rows.get(i, (None, False))[1]:
                    break
                self.low += 1
        self.engine.dispose()


class LiveReports:
    """Delivery reports like status_callbacks, for the newest rows of a SentFeed; when the
    feed has nothing new, a row already reported is reported again (a retry)."""

    def __init__(self, feed: SentFeed) -> None:
        self.feed, self.rng = feed, random.Random(7)
        self.reported: list[tuple[int, str]] = []
        self.calls, self.repeated = 0, 0
        self.age: list[float] = []  # seconds from the feed seeing a row to its `sent` report

    def next(self) -> Report:
        self.calls += 1
        if self.calls % 2 == 0 and self.reported:
            row = self.reported[max(0, len(self.reported) - FINAL_AFTER)]
            return status_report(*row, _final(self.rng), self.rng)
        try:
            outbox_id, sid, seen = self.feed.rows.pop()
        except IndexError:
            if not self.reported:
                raise SystemExit("no row was sent before the load started") from None
            self.repeated += 1
            return status_report(*self.rng.choice(self.reported[-1000:]), "sent", self.rng)
        self.age.append(time.perf_counter() - seen)
        self.reported.append((outbox_id, sid))
        return status_report(outbox_id, sid, "sent", self.rng)


# --- the load generator (a second process) --------------------------------------------------


def generate(config_path: str) -> None:
    """Send the schedule open-loop to 127.0.0.1:port as the JSON config at `config_path`
    says; writes {start (wall clock), results: [kind, at, send lag, latency from the
    scheduled time, HTTP status] per request, and, live, the feed's figures}."""
    config: dict[str, Any] = json.loads(Path(config_path).read_text())
    items = json.loads(Path(config["schedule"]).read_text())
    port, validator = int(config["port"]), RequestValidator(TOKEN)
    live = None
    if config.get("order"):
        feed = SentFeed(config["database_url"], json.loads(Path(config["order"]).read_text()),
                        config["at"])  # fmt: skip
        feed.start()
        live = LiveReports(feed)
        time.sleep(2 * SentFeed.POLL)
    # The schedule out of the collector's passes, and fewer passes while sending: a pass
    # stops every thread of this process, and its delay counts in the latency.
    freeze_startup_heap()
    start = time.perf_counter() + 0.2
    out: dict[str, Any] = {"start": time.time() + 0.2}
    with bulk_collector(), ThreadPoolExecutor(int(config["threads"])) as pool:
        futures = []
        for item in items:
            if item[1] == "status" and live is not None:
                kind, path, form = live.next()
                signature = validator.compute_signature(config["base_url"] + path, form)
                item = [item[0], kind, path, urlencode(form), signature]
            delay = start + float(item[0]) - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(_send, port, item, start))
        out["results"] = [f.result() for f in futures]
    if live is not None:
        live.feed.done.set()
        out.update(fresh=len(live.reported), repeated=live.repeated, age=live.age)
    Path(config["output"]).write_text(json.dumps(out))


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


# --- figures -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of all values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(values: list[float], qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> str:
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
    figures.add("webhook latency, all", ms(latency),
                f"({len(measured):,} requests in {seconds:.0f} s after {WARMUP_SECONDS:.0f} s "
                f"warm-up; {errors} not 200)")  # fmt: skip
    kinds = {"delivery reports": "status", "inbound texts": "inbound",
             "inbound STOP": "inbound STOP", "inbound HELP": "inbound HELP"}  # fmt: skip
    for label, prefix in kinds.items():
        values = [float(str(r[3])) for r in measured if str(r[0]).startswith(prefix)]
        figures.add(f"  {label}", ms(values), f"({len(values):,})")
    figures.add(
        "time inside the server",
        ms(server),
        "(gunicorn's access log; the rest of the latency is queueing and loopback)",
    )
    slices = [
        [float(str(r[3])) for r in measured if int((float(str(r[1])) - WARMUP_SECONDS) // 5) == n]
        for n in range(math.ceil(seconds / 5))
    ]
    figures.add("  p99 by 5 s of the window", " / ".join(
        f"{percentile(s, 0.99) * 1e3:.0f}" if s else "-" for s in slices) + " ms")  # fmt: skip
    lag = [float(str(r[2])) for r in measured]
    figures.add(
        "load generator send lag",
        ms(lag, (0.5, 0.99)),
        "(time from the scheduled instant to the request leaving; counted in latency)",
    )


def server_times(log: Path, skip: int) -> list[float]:
    """Seconds inside gunicorn per webhook, from its access lines, after `skip` warm-up."""
    lines = (json.loads(line) for line in log.read_text().splitlines() if '"http.request"' in line)
    return [e["ms"] / 1e3 for e in lines if e.get("path", "").startswith("/twilio/")][skip:]


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds of these processes (0 for one that is gone)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


class CpuMeter:
    """CPU seconds of a process and its children (gunicorn workers), and of the machine."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.server, self.machine = self._server(), machine_ticks()

    def _server(self) -> float:
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return cpu_seconds([self.pid, *map(int, children)])

    def report(self, requests: int, figures: Figures) -> None:
        server = self._server() - self.server
        busy, total = (a - b for a, b in zip(machine_ticks(), self.machine, strict=True))
        figures.add("server CPU per request", f"{server * 1e3 / max(1, requests):.2f} ms",
                    "(gunicorn master and workers)")  # fmt: skip
        figures.add("machine busy during the load", f"{busy / total:.0%} of {os.cpu_count()} "
                    f"cores", f"(load average {os.getloadavg()[0]:.1f} at the end)")  # fmt: skip
