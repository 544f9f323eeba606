"""The async twilio transport against the sandbox: the real SDK's async client over real
HTTP, each answer classified exactly as the blocking transport classifies it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from engine.settings import Settings
from engine.transports.base import OutboundMessage, ProviderError, is_async
from engine.transports.registry import make_transport
from engine.transports.twilio import TwilioTransport
from engine.transports.twilio_async import AsyncTwilioTransport, BaseUrlAsyncHttpClient
from tests.integration.conftest import SandboxHandle

TO = "+15551230001"


def msg(to: str = TO, body: str = "Time to refill. Reply STOP to opt out.") -> OutboundMessage:
    return OutboundMessage(to=to, body=body, reference="outbox-1")


@pytest.fixture
def transport(twilio_settings: Settings) -> Iterator[AsyncTwilioTransport]:
    t = AsyncTwilioTransport(twilio_settings, read_timeout=1.0)  # the sandbox hangs 2 s
    yield t
    t.close()


def outcome(transport: TwilioTransport | AsyncTwilioTransport, message: OutboundMessage) -> tuple:
    try:
        result = transport.send(message)
    except ProviderError as exc:
        return ("error", exc.code, exc.http_status, exc.kind, exc.message.split(":")[0])
    return ("sent", result.status, len(result.provider_sid))


@pytest.mark.parametrize(
    "faults",
    [
        {},
        {"fail_numbers": {TO: 21610}},
        {"fail_numbers": {TO: 21211}},
        {"fail_numbers": {TO: 30007}},
        {"http_500_rate": 1.0},
        {"http_503_rate": 1.0},
        {"http_429_rate": 1.0},
        {"error_codes": {"30001": 1.0}},
        {"garbage_rate": 1.0},
        {"drop_after_accept_rate": 1.0},
        {"timeout_rate": 1.0},
    ],
    ids=lambda f: ",".join(f) or "none",
)
def test_each_answer_is_classified_as_the_blocking_transport_classifies_it(
    transport: AsyncTwilioTransport,
    twilio_settings: Settings,
    sandbox: SandboxHandle,
    faults: dict,
) -> None:
    blocking = TwilioTransport(twilio_settings, read_timeout=1.0)
    sandbox.set_faults(faults)

    expected = outcome(blocking, msg())
    got = outcome(transport, msg())

    assert got == expected
    blocking.close()


def test_invalid_numbers_and_empty_bodies_come_back_as_twilio_codes(
    transport: AsyncTwilioTransport,
) -> None:
    with pytest.raises(ProviderError) as invalid:
        transport.send(msg(to="+1555"))
    with pytest.raises(ProviderError) as empty:
        transport.send(msg(body="  "))
    assert (invalid.value.code, invalid.value.kind) == (21211, "invalid_number")
    assert "+1555" not in invalid.value.message and "[number]" in invalid.value.message
    assert (empty.value.code, empty.value.kind) == (21602, "permanent")


def test_a_hanging_provider_raises_within_the_read_timeout(
    transport: AsyncTwilioTransport, sandbox: SandboxHandle
) -> None:
    sandbox.set_faults(timeout_rate=1.0)

    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        transport.send(msg())

    assert time.monotonic() - started < 1.9
    assert (caught.value.http_status, caught.value.kind) == (None, "transient")
    assert caught.value.message.startswith("no answer:")


def test_dropped_after_accept_is_found_again_by_sent_since(
    transport: AsyncTwilioTransport, sandbox: SandboxHandle
) -> None:
    before = datetime.now(UTC)
    sandbox.set_faults(drop_after_accept_rate=1.0)

    with pytest.raises(ProviderError) as caught:
        transport.send(msg(body="Your appointment is tomorrow."))

    assert caught.value.message.startswith("no answer:")
    sandbox.set_faults()
    [found] = transport.sent_since(to=TO, since=before)
    assert (found.to, found.body) == (TO, "Your appointment is tomorrow.")
    assert sandbox.accepted_per_to() == {TO: 1}


def test_sent_since_follows_the_pages_and_keeps_only_that_number(
    twilio_settings: Settings, sandbox: SandboxHandle
) -> None:
    transport = AsyncTwilioTransport(twilio_settings, page_size=3)
    before = datetime.now(UTC)
    sids = {transport.send(msg(body=f"text {i}")).provider_sid for i in range(7)}
    transport.send(msg(to="+15551230002"))

    found = transport.sent_since(to=TO, since=before)

    assert found is not None and {r.provider_sid for r in found} == sids
    transport.close()


def test_a_provider_that_is_down_was_not_sent_to(
    transport: AsyncTwilioTransport, sandbox: SandboxHandle
) -> None:
    transport.send(msg())  # leaves a kept-alive connection in the pool
    sandbox.server.stop()

    with pytest.raises(ProviderError) as caught:
        transport.send(msg())

    assert (caught.value.http_status, caught.value.kind) == (None, "transient")
    assert caught.value.message.split(":")[0] in ("not sent", "no answer")


def test_wrong_credentials_are_refused_with_401(
    twilio_settings: Settings, sandbox: SandboxHandle
) -> None:
    transport = AsyncTwilioTransport(twilio_settings.with_(twilio_auth_token="not-the-token"))

    with pytest.raises(ProviderError) as caught:
        transport.send(msg())

    assert (caught.value.code, caught.value.http_status, caught.value.kind) == (
        20003,
        401,
        "permanent",
    )
    transport.close()


def test_coroutines_submitted_at_once_each_land_once(
    transport: AsyncTwilioTransport, sandbox: SandboxHandle
) -> None:
    numbers = [f"+1555100{i:04d}" for i in range(300)]
    slots = asyncio.Semaphore(16)

    async def send(to: str) -> str:
        async with slots:
            return (await transport.send_async(msg(to=to))).provider_sid

    futures = [transport.submit(send(n)) for n in numbers]
    sids = [f.result(timeout=30) for f in futures]

    assert len(set(sids)) == 300
    assert sandbox.accepted_per_to() == dict.fromkeys(numbers, 1)


def test_rewrite_keeps_path_and_query_and_leaves_other_hosts_alone() -> None:
    client = BaseUrlAsyncHttpClient(
        "http://127.0.0.1:9/prefix/", pool_size=1, connect_timeout=1, read_timeout=1
    )
    assert (
        client.rewrite("https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json?To=%2B1")
        == "http://127.0.0.1:9/prefix/2010-04-01/Accounts/AC1/Messages.json?To=%2B1"
    )
    assert client.rewrite("https://example.org/x") == "https://example.org/x"


def test_the_registry_builds_the_async_transport_and_close_stops_its_loop(
    twilio_settings: Settings,
) -> None:
    transport = make_transport(twilio_settings.with_(transport="sandbox"))
    assert is_async(transport) and transport.name == "sandbox"
    assert not is_async(TwilioTransport(twilio_settings))

    transport.close()  # type: ignore[attr-defined]

    assert transport.loop.is_closed()  # type: ignore[attr-defined]
    transport.close()  # type: ignore[attr-defined]  # twice is harmless
