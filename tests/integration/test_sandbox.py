"""The sandbox server over real HTTP: Twilio's shapes, signed callbacks, faults, control."""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import pytest
import requests
from click import Group
from click.testing import CliRunner
from flask import Flask, request
from twilio.request_validator import RequestValidator
from werkzeug.serving import make_server

from engine.cli_sandbox import register
from engine.sandbox.config import SANDBOX_FROM_NUMBER
from tests.integration.conftest import SandboxHandle

TO = "+15551230001"


def api(sandbox: SandboxHandle, path: str = "Messages.json") -> str:
    return f"{sandbox.url}/2010-04-01/Accounts/{sandbox.account_sid}/{path}"


def create(sandbox: SandboxHandle, **form: str) -> requests.Response:
    data = {"To": TO, "From": SANDBOX_FROM_NUMBER, "Body": "Refill due Friday.", **form}
    return requests.post(
        api(sandbox), data=data, auth=(sandbox.account_sid, sandbox.auth_token), timeout=5
    )


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll for something another thread does (callbacks arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@dataclass
class Receiver:
    url: str
    calls: list[tuple[str, dict[str, str], str]] = field(default_factory=list)

    def statuses(self) -> list[str]:
        return [form["MessageStatus"] for _, form, _ in self.calls]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """The engine's side of status callbacks: records what arrives at /twilio/status."""
    app = Flask("receiver")
    box = Receiver(url="")

    @app.post("/twilio/status")
    def status() -> tuple[str, int]:
        box.calls.append(
            (request.url, request.form.to_dict(), request.headers["X-Twilio-Signature"])
        )
        return "", 204

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    box.url = f"http://127.0.0.1:{server.server_port}/twilio/status"
    yield box
    server.shutdown()
    thread.join()


def test_create_answers_with_twilios_message_resource(sandbox: SandboxHandle) -> None:
    response = create(sandbox, Body="x" * 161)

    assert response.status_code == 201
    body = response.json()
    assert re.fullmatch(r"SM[0-9a-f]{32}", body["sid"])
    assert body["account_sid"] == sandbox.account_sid
    assert (body["to"], body["from"], body["status"], body["direction"]) == (
        TO,
        SANDBOX_FROM_NUMBER,
        "queued",
        "outbound-api",
    )
    assert body["num_segments"] == "2"  # 161 GSM-7 characters
    assert body["price"] is None and body["error_code"] is None and body["date_sent"] is None
    assert parsedate_to_datetime(body["date_created"]).utcoffset().total_seconds() == 0
    assert body["date_created"].endswith(" +0000")
    assert body["uri"] == f"/2010-04-01/Accounts/{sandbox.account_sid}/Messages/{body['sid']}.json"
    assert "media" in body["subresource_uris"]


def test_fetch_shows_the_status_moving_on(sandbox_factory) -> None:
    sandbox = sandbox_factory(delivered_delay_ms=0)
    sid = create(sandbox).json()["sid"]
    auth = (sandbox.account_sid, sandbox.auth_token)

    fetched = requests.get(api(sandbox, f"Messages/{sid}.json"), auth=auth, timeout=5).json()
    missing = requests.get(api(sandbox, f"Messages/SM{'0' * 32}.json"), auth=auth, timeout=5)

    assert fetched["status"] == "delivered" and fetched["date_sent"] is not None
    assert missing.status_code == 404 and missing.json()["code"] == 20404


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"To": "12345"}, 21211),
        ({"To": ""}, 21604),
        ({"From": ""}, 21603),
        ({"Body": ""}, 21602),
        ({"Body": "x" * 1601}, 21617),
        ({"From": TO}, 21266),
        ({"To": "+15005550004"}, 21610),  # Twilio's magic test numbers fail the same way
        ({"To": "+15005550009"}, 21614),
    ],
)
def test_bad_requests_get_twilios_error_format(
    sandbox: SandboxHandle, form: dict[str, str], code: int
) -> None:
    response = create(sandbox, **form)

    assert response.status_code == 400
    assert response.json() == {
        "code": code,
        "message": response.json()["message"],
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": 400,
    }
    assert sandbox.messages() == []


def test_wrong_credentials_get_401_with_a_challenge(sandbox: SandboxHandle) -> None:
    response = requests.post(
        api(sandbox), data={"To": TO}, auth=(sandbox.account_sid, "nope"), timeout=5
    )

    assert response.status_code == 401
    assert response.json()["code"] == 20003
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_rejected_requests_are_counted_but_not_accepted(sandbox: SandboxHandle) -> None:
    create(sandbox)
    create(sandbox, Body="")
    create(sandbox, To="+15551230002")

    assert sandbox.create_requests_per_to() == {TO: 2, "+15551230002": 1}
    assert sandbox.accepted_per_to() == {TO: 1, "+15551230002": 1}
    sandbox.reset()
    assert sandbox.messages() == [] and sandbox.create_requests_per_to() == {}


def test_list_filters_by_twilios_parameter_names_and_pages(sandbox: SandboxHandle) -> None:
    for i in range(5):
        create(sandbox, Body=f"n{i}")
    create(sandbox, To="+15551230002")
    auth = (sandbox.account_sid, sandbox.auth_token)
    params = {"To": TO, "DateSent>": "2000-01-01T00:00:00Z", "PageSize": "2"}

    pages, url = [], api(sandbox)
    while url:
        body = requests.get(url, params=params if not pages else None, auth=auth, timeout=5).json()
        pages.append([m["body"] for m in body["messages"]])
        url = body["next_page_uri"] and f"{sandbox.url}{body['next_page_uri']}"

    assert pages == [["n4", "n3"], ["n2", "n1"], ["n0"]]  # newest first, as Twilio lists
    future = {"To": TO, "DateSent>": "2999-01-01"}
    assert requests.get(api(sandbox), params=future, auth=auth, timeout=5).json()["messages"] == []
    past = {"DateSent<": "2000-01-01"}
    assert requests.get(api(sandbox), params=past, auth=auth, timeout=5).json()["messages"] == []
    bad = requests.get(api(sandbox), params={"DateSent>": "soon"}, auth=auth, timeout=5)
    assert bad.status_code == 400


def test_status_callbacks_are_signed_like_twilios(
    sandbox: SandboxHandle, receiver: Receiver
) -> None:
    sid = create(sandbox, StatusCallback=f"{receiver.url}?ref=7").json()["sid"]

    wait_for(lambda: len(receiver.calls) == 3)

    assert receiver.statuses() == ["queued", "sent", "delivered"]
    validator = RequestValidator(sandbox.auth_token)
    for url, form, signature in receiver.calls:
        assert url == f"{receiver.url}?ref=7"
        assert form["MessageSid"] == sid and form["To"] == TO
        assert form["AccountSid"] == sandbox.account_sid
        assert validator.validate(url, form, signature)
        assert not validator.validate(url, {**form, "MessageStatus": "read"}, signature)
        assert not RequestValidator("another-token").validate(url, form, signature)


@pytest.mark.parametrize(
    ("code", "statuses"),
    [(30003, ["queued", "sent", "undelivered"]), (30001, ["queued", "failed"])],
)
def test_injected_delivery_failures_end_the_callbacks(
    sandbox: SandboxHandle, receiver: Receiver, code: int, statuses: list[str]
) -> None:
    sandbox.set_faults(delivery_fail_numbers={TO: code})
    create(sandbox, StatusCallback=receiver.url)

    wait_for(lambda: len(receiver.calls) == len(statuses))

    assert receiver.statuses() == statuses
    assert receiver.calls[-1][1]["ErrorCode"] == str(code)
    assert sandbox.messages()[0]["error_code"] == code


def test_callbacks_to_a_receiver_that_is_down_are_dropped(sandbox_factory) -> None:
    sandbox = sandbox_factory(callback_retry_ms=5, callback_attempts=2)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/twilio/status"

    create(sandbox, StatusCallback=closed)

    wait_for(lambda: sandbox.callbacks()["dropped"] == 3)
    assert sandbox.callbacks()["posted"] == 0


def test_no_callback_work_without_a_status_callback(sandbox: SandboxHandle) -> None:
    create(sandbox)
    assert sandbox.sandbox.callbacks._thread is None


def test_fault_settings_are_validated_and_shown(sandbox: SandboxHandle) -> None:
    shown = sandbox.set_faults(error_codes={"21610": 0.5}, latency_ms=[1, 3], seed=3)

    assert shown["error_codes"] == {"21610": 0.5} and shown["latency_ms"] == [1.0, 3.0]
    assert sandbox.client.faults() == shown
    with pytest.raises(ValueError, match="unknown fault"):
        sandbox.set_faults(explode_rate=1.0)
    with pytest.raises(ValueError, match="probability"):
        sandbox.set_faults(http_500_rate=2)
    assert sandbox.client.faults() == shown  # a refused setting changes nothing


def test_latency_delays_the_answer(sandbox: SandboxHandle) -> None:
    sandbox.set_faults(latency_ms=150)
    started = time.monotonic()
    assert create(sandbox).status_code == 201
    assert time.monotonic() - started >= 0.15


def test_garbage_is_a_200_that_is_not_json(sandbox: SandboxHandle) -> None:
    sandbox.set_faults(garbage_rate=1.0)
    response = create(sandbox)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_keep_alive_survives_a_request_body_the_app_never_read(sandbox: SandboxHandle) -> None:
    parts = urlsplit(sandbox.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    path = urlsplit(api(sandbox)).path
    headers = {"Content-Type": "application/x-www-form-urlencoded"}

    # No credentials: refused before the form is parsed; the body must still be consumed.
    connection.request("POST", path, "To=%2B15551230001&Body=hello", headers)
    first = connection.getresponse()
    first.read()
    connection.request("GET", "/sandbox/faults")
    second = connection.getresponse()
    second.read()

    assert (first.status, second.status) == (401, 200)
    assert first.getheader("Connection") != "close"
    connection.close()


def test_cli_refuses_bad_fault_json_before_serving() -> None:
    group = Group()
    register(group)

    result = CliRunner().invoke(group, ["sandbox", "--faults", '{"http_500_rate": 3}'], obj=None)

    assert result.exit_code == 2
    assert "probability" in result.output
