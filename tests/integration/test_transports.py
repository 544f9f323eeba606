"""Transports against the sandbox: the real twilio SDK over real HTTP, no mocks."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.sandbox.config import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN
from engine.settings import Settings
from engine.transports.base import OutboundMessage, ProviderError
from engine.transports.console import ConsoleTransport
from engine.transports.registry import TRANSPORTS, make_transport
from engine.transports.twilio import BaseUrlHttpClient, TransportConfigError, TwilioTransport
from tests.integration.conftest import SandboxHandle

TO = "+15551230001"


def msg(
    to: str = TO,
    body: str = "Time to refill your prescription. Reply STOP to opt out.",
    reference: str = "outbox-1",
) -> OutboundMessage:
    return OutboundMessage(to=to, body=body, reference=reference)


@pytest.fixture
def transport(twilio_settings: Settings) -> TwilioTransport:
    return TwilioTransport(twilio_settings)


def test_send_fetch_and_list_go_through_the_configured_base_url(
    transport: TwilioTransport, sandbox: SandboxHandle
) -> None:
    before = datetime.now(UTC)
    result = transport.send(msg())

    assert result.provider_sid.startswith("SM") and len(result.provider_sid) == 34
    assert result.status == "queued"
    [recorded] = sandbox.messages()
    assert (recorded["sid"], recorded["to"], recorded["body"]) == (
        result.provider_sid,
        TO,
        msg().body,
    )
    fetched = transport.messages(result.provider_sid).fetch()
    assert (fetched.sid, fetched.to, fetched.body) == (result.provider_sid, TO, msg().body)
    [found] = transport.sent_since(to=TO, since=before)
    assert (found.provider_sid, found.to, found.body) == (result.provider_sid, TO, msg().body)
    assert found.created_at.tzinfo is not None


def test_rewrite_keeps_path_and_query_and_leaves_other_hosts_alone() -> None:
    client = BaseUrlHttpClient("http://127.0.0.1:9/prefix/")
    rewritten = client.rewrite(
        "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json?To=%2B1&Page=1"
    )
    assert (
        rewritten
        == "http://127.0.0.1:9/prefix/2010-04-01/Accounts/AC1/Messages.json?To=%2B1&Page=1"
    )
    assert client.rewrite("https://api.us1.dublin.twilio.com/x") == "http://127.0.0.1:9/prefix/x"
    assert client.rewrite("https://example.org/x") == "https://example.org/x"
    assert BaseUrlHttpClient(None).rewrite("https://api.twilio.com/x") == "https://api.twilio.com/x"


def test_sent_since_finds_only_that_number_from_that_second_on(
    transport: TwilioTransport, sandbox: SandboxHandle
) -> None:
    first = transport.send(msg())
    transport.send(msg(to="+15551230002"))
    created = transport.messages(first.provider_sid).fetch().date_created
    assert created is not None

    # Twilio's dates have whole seconds: a `since` later within the same second still matches.
    same_second = transport.sent_since(to=TO, since=created + timedelta(microseconds=999_999))
    assert [r.provider_sid for r in same_second] == [first.provider_sid]
    assert transport.sent_since(to=TO, since=created + timedelta(seconds=1)) == []
    assert transport.sent_since(to="+15559999999", since=created - timedelta(days=1)) == []


def test_sent_since_filters_precisely_when_the_provider_compares_dates_by_day(
    sandbox_factory, tmp_path: Path
) -> None:
    coarse = sandbox_factory(date_sent_day_granular=True)
    transport = TwilioTransport(coarse.settings_for(_bare_settings(tmp_path)))
    sid = transport.send(msg()).provider_sid
    created = transport.messages(sid).fetch().date_created
    later = created + timedelta(seconds=1)
    if later.date() != created.date():
        pytest.skip("sent in the last second of a UTC day")

    # The provider itself still lists the message for a later time that day...
    assert [m.sid for m in transport.messages.list(to=TO, date_sent_after=later)] == [sid]
    # ...and the transport drops it, because it was created before `since`.
    assert transport.sent_since(to=TO, since=later) == []
    assert [r.provider_sid for r in transport.sent_since(to=TO, since=created)] == [sid]


def test_sent_since_follows_next_page_uri_through_the_sandbox(
    twilio_settings: Settings, sandbox: SandboxHandle
) -> None:
    transport = TwilioTransport(twilio_settings, page_size=3)
    before = datetime.now(UTC)
    sids = {transport.send(msg(body=f"reminder {i}")).provider_sid for i in range(8)}

    found = transport.sent_since(to=TO, since=before)

    assert {r.provider_sid for r in found} == sids
    assert len(found) == 8
    pages = list(transport.messages.page(to=TO, page_size=3).next_page().next_page())
    assert len(pages) == 2  # 8 = 3 + 3 + 2, all fetched from the sandbox


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (21610, "opted_out"),
        (21211, "invalid_number"),
        (21614, "invalid_number"),
        (21612, "invalid_number"),
        (30007, "filtered"),
        (30034, "filtered"),
        (21408, "invalid_number"),
        (21606, "permanent"),
    ],
)
def test_twilio_error_codes_map_to_provider_error_kinds(
    transport: TwilioTransport, sandbox: SandboxHandle, code: int, kind: str
) -> None:
    sandbox.set_faults(fail_numbers={TO: code})

    with pytest.raises(ProviderError) as caught:
        transport.send(msg())

    assert (caught.value.code, caught.value.http_status, caught.value.kind) == (code, 400, kind)
    assert sandbox.messages() == []


def test_validation_errors_come_back_as_twilio_codes(transport: TwilioTransport) -> None:
    with pytest.raises(ProviderError) as invalid:
        transport.send(msg(to="555-0100"))
    with pytest.raises(ProviderError) as empty:
        transport.send(msg(body="  "))
    assert (invalid.value.code, invalid.value.kind) == (21211, "invalid_number")
    assert (empty.value.code, empty.value.kind) == (21602, "permanent")


def test_provider_error_messages_do_not_carry_the_phone_number(transport: TwilioTransport) -> None:
    with pytest.raises(ProviderError) as caught:
        transport.send(msg(to="+1555"))
    assert "+1555" not in caught.value.message and "[number]" in caught.value.message


@pytest.mark.parametrize(
    ("faults", "code", "status"),
    [
        ({"http_500_rate": 1.0}, 20500, 500),
        ({"http_503_rate": 1.0}, 20503, 503),
        ({"http_429_rate": 1.0}, 20429, 429),
        ({"error_codes": {"30001": 1.0}}, 30001, 400),
        ({"garbage_rate": 1.0}, None, None),
    ],
)
def test_server_trouble_is_transient_and_records_nothing(
    transport: TwilioTransport,
    sandbox: SandboxHandle,
    faults: dict,
    code: int | None,
    status: int | None,
) -> None:
    sandbox.set_faults(faults)

    with pytest.raises(ProviderError) as caught:
        transport.send(msg())

    assert (caught.value.code, caught.value.http_status, caught.value.kind) == (
        code,
        status,
        "transient",
    )
    assert sandbox.messages() == []


def test_a_hanging_provider_raises_within_the_read_timeout(
    twilio_settings: Settings, sandbox: SandboxHandle
) -> None:
    transport = TwilioTransport(twilio_settings, read_timeout=0.3)
    sandbox.set_faults(timeout_rate=1.0)  # the sandbox holds the request 2 s

    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        transport.send(msg())
    elapsed = time.monotonic() - started

    assert elapsed < 1.5
    assert (caught.value.http_status, caught.value.kind) == (None, "transient")
    assert caught.value.message.startswith("no answer:")
    assert sandbox.messages() == []


def test_dropped_after_accept_is_found_again_by_sent_since(
    transport: TwilioTransport, sandbox: SandboxHandle
) -> None:
    before = datetime.now(UTC)
    sandbox.set_faults(drop_after_accept_rate=1.0)

    with pytest.raises(ProviderError) as caught:
        transport.send(msg(body="Your appointment is tomorrow."))

    assert caught.value.http_status is None  # no answer: the outcome is unknown
    assert caught.value.message.startswith("no answer:")
    sandbox.set_faults()
    [found] = transport.sent_since(to=TO, since=before)
    assert found.body == "Your appointment is tomorrow."
    assert sandbox.accepted_per_to() == {TO: 1}


def test_a_provider_that_is_down_is_transient(
    transport: TwilioTransport, sandbox: SandboxHandle
) -> None:
    transport.send(msg())  # leaves a kept-alive connection in the pool
    sandbox.server.stop()

    with pytest.raises(ProviderError) as caught:
        transport.send(msg())

    assert (caught.value.code, caught.value.http_status, caught.value.kind) == (
        None,
        None,
        "transient",
    )
    assert caught.value.message.startswith("not sent:")


def test_list_errors_surface_as_provider_errors(
    transport: TwilioTransport, sandbox: SandboxHandle
) -> None:
    sandbox.set_faults(http_500_rate=1.0, scope="all")

    with pytest.raises(ProviderError) as caught:
        transport.sent_since(to=TO, since=datetime.now(UTC))

    assert (caught.value.http_status, caught.value.kind) == (500, "transient")


def test_wrong_credentials_are_refused_with_401(
    twilio_settings: Settings, sandbox: SandboxHandle
) -> None:
    transport = TwilioTransport(twilio_settings.with_(twilio_auth_token="not-the-token"))

    with pytest.raises(ProviderError) as caught:
        transport.send(msg())

    assert (caught.value.code, caught.value.http_status, caught.value.kind) == (
        20003,
        401,
        "permanent",
    )
    assert sandbox.create_requests_per_to() == {}


def test_seeded_faults_repeat_exactly(transport: TwilioTransport, sandbox: SandboxHandle) -> None:
    faults = {"seed": 7, "error_codes": {"21610": 0.25}, "http_500_rate": 0.2}

    def outcomes() -> list[str]:
        sandbox.set_faults(faults)
        out = []
        for i in range(40):
            try:
                transport.send(msg(to=f"+1555000{i:04d}"))
                out.append("ok")
            except ProviderError as exc:
                out.append(str(exc.code))
        return out

    first, second = outcomes(), outcomes()

    assert first == second
    assert {"ok", "21610", "20500"} <= set(first)


def test_concurrent_sends_from_a_thread_pool_each_land_once(
    twilio_settings: Settings, sandbox: SandboxHandle
) -> None:
    transport = TwilioTransport(twilio_settings, pool_size=16)
    numbers = [f"+1555100{i:04d}" for i in range(200)]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda n: transport.send(msg(to=n)), numbers))

    assert len({r.provider_sid for r in results}) == 200
    assert sandbox.accepted_per_to() == dict.fromkeys(numbers, 1)


def test_messaging_service_is_used_instead_of_from_when_configured(
    twilio_settings: Settings, sandbox: SandboxHandle
) -> None:
    service = "MG" + "1" * 32
    transport = TwilioTransport(twilio_settings.with_(twilio_messaging_service_sid=service))

    result = transport.send(msg())

    assert result.status == "accepted"
    [recorded] = sandbox.messages()
    assert recorded["messaging_service_sid"] == service


def test_status_callback_url_carries_the_outbox_reference(
    twilio_settings: Settings, sandbox: SandboxHandle
) -> None:
    settings = twilio_settings.with_(status_callback_url="http://127.0.0.1:9/twilio/status")
    TwilioTransport(settings).send(msg(reference="42"))
    TwilioTransport(twilio_settings).send(msg(to="+15551230002"))

    first, second = sandbox.messages()
    assert first["status_callback"] == "http://127.0.0.1:9/twilio/status?ref=42"
    assert second["status_callback"] is None


def test_twilio_transport_needs_credentials_and_a_sender(twilio_settings: Settings) -> None:
    with pytest.raises(TransportConfigError):
        TwilioTransport(twilio_settings.with_(twilio_auth_token=None))
    with pytest.raises(TransportConfigError):
        TwilioTransport(twilio_settings.with_(twilio_from_number=None))


def test_console_transport_prints_and_cannot_reconcile() -> None:
    out = io.StringIO()
    console = ConsoleTransport(out)

    first, second = console.send(msg()), console.send(msg(reference="outbox-2"))

    assert first.provider_sid.startswith("CONSOLE") and first.provider_sid != second.provider_sid
    assert f"to {TO}" in out.getvalue() and msg().body in out.getvalue()
    assert console.sent_since(to=TO, since=datetime.now(UTC)) is None


def test_registry_builds_each_transport_by_name(sandbox_factory, tmp_path: Path) -> None:
    default_credentials = sandbox_factory(
        account_sid=SANDBOX_ACCOUNT_SID, auth_token=SANDBOX_AUTH_TOKEN
    )
    base = _bare_settings(tmp_path)

    assert set(TRANSPORTS) == {"twilio", "sandbox", "console"}
    assert make_transport(base.with_(transport="console")).name == "console"
    sandbox_transport = make_transport(
        base.with_(transport="sandbox", twilio_api_base_url=default_credentials.url)
    )
    try:
        assert sandbox_transport.name == "sandbox"
        sandbox_transport.send(msg())
    finally:
        sandbox_transport.close()  # type: ignore[attr-defined]
    assert len(default_credentials.messages()) == 1
    with pytest.raises(TransportConfigError):
        make_transport(base.with_(transport="twilio"))
    with pytest.raises(ValueError, match="unknown transport"):
        make_transport(base.with_(transport="carrier-pigeon"))


def test_settings_read_twilio_configuration_from_the_environment() -> None:
    env = {
        "TWILIO_ACCOUNT_SID": "AC123",
        "TWILIO_AUTH_TOKEN": "secret",
        "TWILIO_API_BASE_URL": "http://127.0.0.1:8099/",
        "TWILIO_FROM_NUMBER": "+15005550006",
        "ENGAGE_PUBLIC_URL": "https://engage.example.org/",
        "ENGAGE_SEND_RATE": "12.5",
    }
    settings = Settings.from_env(env)

    assert settings.twilio_account_sid == "AC123"
    assert settings.twilio_auth_token == "secret"
    assert settings.twilio_api_base_url == "http://127.0.0.1:8099"
    assert settings.twilio_from_number == "+15005550006"
    assert settings.twilio_messaging_service_sid is None
    assert settings.status_callback_url == "https://engage.example.org/twilio/status"
    assert settings.send_rate_per_second == 12.5
    assert Settings.from_env({"ENGAGE_STATUS_CALLBACK_URL": ""}).status_callback_url == ""


def _bare_settings(tmp_path: Path) -> Settings:
    var = tmp_path / "var"
    return Settings(
        var_dir=var,
        database_url=f"sqlite:///{var / 'engage.db'}",
        master_key_file=var / "master.key",
        index_key_file=var / "index.key",
    )
