"""`engage serve` as a real process: gunicorn workers on the test database answer a signed
Twilio webhook, keep page tokens and query strings out of the logs, and stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
from sqlalchemy import select
from twilio.request_validator import RequestValidator

from engine import outbox_status as status
from engine.store import models as m
from engine.store.db import make_engine, make_session_factory
from tests.integration.conftest import Engage
from tests.integration.test_cli import SAMPLE

TOKEN = "serve-test-auth-token-0123456789"
ADA = "+12125550101"  # S001 in the sample
EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
ENGAGE = Path(sys.executable).with_name("engage")
PAGE_TOKEN = "pAgEtOkEn0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def post_signed(self, path: str, form: dict[str, str]) -> tuple[int, bytes]:
        signature = RequestValidator(TOKEN).compute_signature(self.url + path, form)
        request = urllib.request.Request(
            self.url + path,
            data=urlencode(form).encode(),
            headers={"X-Twilio-Signature": signature},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code


def wait_healthy(served: Served, timeout: float = 8.0) -> None:
    """Poll /healthz until the workers answer (the process does the work)."""
    deadline = time.monotonic() + timeout
    while True:
        if served.proc.poll() is not None:
            raise AssertionError(f"engage serve exited:\n{served.log.read_text()}")
        try:
            if served.get("/healthz") == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no /healthz in {timeout} s:\n{served.log.read_text()}")
        time.sleep(0.05)


@pytest.fixture
def served(engage: Engage, tmp_path: Path) -> Iterator[Served]:
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, **engage.env, "TWILIO_AUTH_TOKEN": TOKEN}
    command = [str(ENGAGE), "serve", "--port", str(port), "--workers", "2", "--threads", "2"]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    handle = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_healthy(handle)
        yield handle
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_answers_a_signed_webhook_and_stops_on_sigterm(served: Served, db_url: str) -> None:
    form = {
        "MessageSid": "SM" + "5" * 32,
        "AccountSid": "ACtest",
        "From": ADA,
        "To": "+15005550006",
        "Body": "HELP",
    }
    assert served.post_signed("/twilio/inbound", form) == (200, EMPTY)
    assert served.get(f"/s/{PAGE_TOKEN}?ref=secret-query") in (200, 404)

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=10) == 0

    log = served.log.read_text()
    assert '"path": "/twilio/inbound", "status": 200' in log
    assert PAGE_TOKEN not in log and "secret-query" not in log and ADA not in log
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session:
            inbound = session.scalars(select(m.InboundMessage)).all()
            replies = session.scalars(select(m.Outbox).where(m.Outbox.campaign_id == "program"))
            assert [i.classification for i in inbound] == ["help"]
            assert [(r.status, r.idempotency_key) for r in replies] == [
                (status.QUEUED, f"program/{form['MessageSid']}/help")
            ]
    finally:
        engine.dispose()


def test_serve_refuses_a_database_without_schema(db_url: str, tmp_path: Path) -> None:
    run = Engage({"DATABASE_URL": db_url, "ENGAGE_VAR_DIR": str(tmp_path / "var")})
    result = run("serve", "--port", str(free_port()), code=2)
    assert "no schema" in result.stderr and "engage init" in result.stderr
