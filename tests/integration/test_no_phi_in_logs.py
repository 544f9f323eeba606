"""No patient's name, phone number, email or birth date in any log line or error page, on
SQLite and PostgreSQL. A full run with every logger at DEBUG: import the samples, plan,
dispatch through the real twilio SDK to the sandbox (one number failing), inbound texts
(STOP, HELP, START, a stranger), delivery reports, every admin page and API endpoint for
every role, a booking, and errors fed with PHI. Then every captured log record (message,
arguments, extra fields, traceback) and every 4xx/5xx body is searched."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import phonenumbers
import pytest
from flask.testing import FlaskClient
from twilio.request_validator import RequestValidator
from werkzeug.test import TestResponse

from engine.accounts import ROLES
from engine.sandbox.config import SANDBOX_AUTH_TOKEN, SANDBOX_FROM_NUMBER
from engine.settings import Settings
from tests.integration.admin_fixtures import USERS, sign_in
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT, SAMPLE
from tests.integration.web_fixtures import World, build_world, guarded

# The sandbox plays Twilio in this process: what it logs is the provider's, not ours.
PROVIDER_LOGGERS = ("engine.sandbox",)
FAILING = "S004"  # the sandbox refuses this patient's number (error 21211)


STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class Capture(logging.Handler):
    """Every record any logger makes, as text: message, arguments, extras, traceback."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        extras = {k: v for k, v in vars(record).items() if k not in STANDARD}
        parts = [message, repr(extras)]
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
        self.records.append((record.name, "\n".join(parts)))


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[Capture]:
    """Every logger enabled at DEBUG and captured, whatever the CLI configures."""
    capture = Capture()
    handle = logging.Logger.handle

    def handle_and_capture(self: logging.Logger, record: logging.LogRecord) -> None:
        capture.emit(record)
        handle(self, record)

    monkeypatch.setattr(logging.Logger, "isEnabledFor", lambda self, level: True)
    monkeypatch.setattr(logging.Logger, "handle", handle_and_capture)
    monkeypatch.setattr("engine.worker.configure_logging", lambda *a, **k: None)
    yield capture


def phi_of_samples() -> re.Pattern[str]:
    """Each patient's identifiers in the forms they may take, as one word-bounded pattern."""
    found: set[str] = set()
    with (SAMPLE / "patients.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        words = [row["given_name"], row["family_name"], row.get("email") or ""]
        year, month, day = row["birth_date"].split("-")
        words += [f"{year}-{month}-{day}", f"{month}/{day}/{year}", f"{day}.{month}.{year}"]
        words += [f"{year}{month}{day}", f"{day}/{month}/{year}"]
        number = phonenumbers.parse(row["phone"], row["country"])
        formats = (
            phonenumbers.PhoneNumberFormat.E164,
            phonenumbers.PhoneNumberFormat.NATIONAL,
            phonenumbers.PhoneNumberFormat.INTERNATIONAL,
        )
        words += [row["phone"], str(number.national_number)]
        words += [phonenumbers.format_number(number, f) for f in formats]
        found.update(filter(None, words))
    longest_first = sorted(found, key=len, reverse=True)
    return re.compile(rf"(?<![\w+])(?:{'|'.join(map(re.escape, longest_first))})(?!\w)")


def _sign(client: FlaskClient, path: str, form: dict[str, str]) -> TestResponse:
    signature = RequestValidator(SANDBOX_AUTH_TOKEN).compute_signature(
        f"http://localhost{path}", form
    )
    return client.post(path, data=form, headers={"X-Twilio-Signature": signature})


def _texts(client: FlaskClient, patients: dict[str, str]) -> list[TestResponse]:
    texts = [
        ("SMin1", patients["S002"], "HELP"),
        ("SMin2", patients["S003"], "STOP"),
        ("SMin3", patients["S003"], "START"),
        ("SMin4", patients["S001"], "Is this Ada Lovelace's pharmacy? born 1961-05-04"),
        ("SMin5", "+12025550123", "hello"),
        ("SMin1", patients["S002"], "HELP"),  # a retry
    ]
    return [
        _sign(
            client,
            "/twilio/inbound",
            {"MessageSid": sid, "From": sender, "To": SANDBOX_FROM_NUMBER, "Body": body},
        )
        for sid, sender, body in texts
    ]


def _reports(client: FlaskClient, sandbox: Any) -> list[TestResponse]:
    answers = []
    for i, message in enumerate(sandbox.messages()):
        status = "undelivered" if i % 3 == 0 else "delivered"
        form = {"MessageSid": message["sid"], "MessageStatus": status, "To": message["to"]}
        if status == "undelivered":
            form["ErrorCode"] = "30003"
        answers.append(_sign(client, "/twilio/status", form))
    unknown = {"MessageSid": "SMunknown", "MessageStatus": "sent", "To": "+12125550101"}
    return [*answers, _sign(client, "/twilio/status", unknown)]


def _pages(world: World, app: Any) -> list[TestResponse]:
    """Every GET route as every role (signed in, and by token for the API)."""
    answers = []
    for role in ROLES:
        admin = sign_in(app, USERS[role])
        for rule, method, _ in guarded(app):
            if method != "GET" or rule.startswith("/s/") or "<path:" in rule:
                continue
            headers = world.bearer(role) if rule.startswith(("/api/", "/metrics")) else {}
            answers.append(admin.client.get(world.path(rule), headers=headers))
    return answers


def _book(world: World, client: FlaskClient) -> list[TestResponse]:
    token = world.values["token"]
    page = client.get(f"/s/{token}")
    csrf = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', page.text)
    assert csrf
    booked = client.post(f"/s/{token}", data={"csrf_token": csrf.group(1), "slot": "PC-1"})
    assert booked.status_code == 303, booked.text
    return [page, booked, client.get("/s/booked"), client.get(f"/s/{token}")]


def _errors(world: World, client: FlaskClient, patients: dict[str, str]) -> list[TestResponse]:
    """Requests that fail, carrying PHI where a careless error page would echo it."""
    it = world.bearer("it_admin")
    phone = patients["S001"]
    bad_consent = {"patient": phone, "purpose": "Ada Lovelace", "status": "x", "method": "m"}
    return [
        client.get(f"/api/v1/patients/{phone}", headers=it),
        client.get("/api/v1/patients/Lovelace", headers=it),
        client.get(f"/api/v1/decisions?patient={phone}", headers=it),
        client.get("/api/v1/patients?cursor=1961-05-04", headers=it),
        client.post("/api/v1/consents", headers=it, json=bad_consent),
        client.post("/api/v1/consents", headers=it, json={**bad_consent, "status": "granted"}),
        client.post("/api/v1/patients/S001/erase", headers=it, json={"confirm": "Ada"}),
        client.get(f"/admin/patients/{phone}"),
        client.get(f"/s/{phone}"),
        _sign(client, "/twilio/inbound", {"MessageSid": "", "From": phone, "Body": "STOP"}),
        client.post("/twilio/inbound", data={"MessageSid": "SMx", "From": phone, "Body": "Ada"}),
    ]


@pytest.fixture
def world(engage: Engage, settings: Settings, tmp_path: Path, sandbox: Any) -> World:
    engage.env.update(
        {
            "ENGAGE_TRANSPORT": "sandbox",
            "TWILIO_API_BASE_URL": sandbox.url,
            "ENGAGE_STATUS_CALLBACK_URL": "",
            "ENGAGE_SEND_RATE": "0",
        }
    )
    return build_world(engage, settings, tmp_path)


def _phones() -> dict[str, str]:
    with (SAMPLE / "patients.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {
        row["external_id"]: phonenumbers.format_number(
            phonenumbers.parse(row["phone"], row["country"]), phonenumbers.PhoneNumberFormat.E164
        )
        for row in rows
    }


def test_no_phi_in_any_log_line_or_error_page(
    world: World, captured: Capture, engage: Engage, sandbox: Any
) -> None:
    patients = _phones()
    sandbox.set_faults(fail_numbers={patients[FAILING]: 21211})
    engage("dispatch", "--once", "--at", AT)
    assert len(sandbox.messages()) >= 3
    app = world.app(transport="sandbox", twilio_api_base_url=sandbox.url, status_callback_url="")
    client = app.test_client()
    responses = _texts(client, patients) + _reports(client, sandbox)
    assert [r.status_code for r in responses] == [200] * len(responses)
    responses += _pages(world, app) + _book(world, client) + _errors(world, client, patients)
    engage("dispatch", "--once", "--at", AT)  # the STOP, HELP and booking confirmations
    engage("audit", "verify")
    phi = phi_of_samples()
    logged = [
        (name, text) for name, text in captured.records if not name.startswith(PROVIDER_LOGGERS)
    ]
    assert len(logged) > 100 and any(name.startswith("sqlalchemy") for name, _ in logged)
    leaks = sorted({(name, word) for name, text in logged for word in _found(phi, text)})
    # SQL statement logging (sqlalchemy.engine at INFO) shows bound parameters, which echo
    # what a request looked up (GET /api/v1/patients/+12125550101). Nothing stored leaks.
    sql_echoes = [leak for leak in leaks if leak[0].startswith("sqlalchemy.engine")]
    assert [leak for leak in leaks if leak not in sql_echoes] == []
    errors = [r for r in responses if r.status_code >= 400]
    assert {400, 403, 404, 410} <= {r.status_code for r in errors}
    shown = sorted(
        {(r.request.path, r.status_code, w) for r in errors for w in _found(phi, r.text)}
    )
    assert shown == []
    assert sql_echoes == []


def _found(phi: re.Pattern[str], text: str) -> set[str]:
    return {match.group(0) for match in phi.finditer(text)}
