"""Transport names (ENGAGE_TRANSPORT) to factories."""

from __future__ import annotations

from collections.abc import Callable

from engine.settings import Settings
from engine.transports.base import Transport

SANDBOX_URL = "http://127.0.0.1:8099"


def make_twilio(settings: Settings) -> Transport:
    """The twilio SDK's async client on an event loop of its own (engine.transports.
    twilio_async): the dispatcher hands it coroutines; blocking calls work too."""
    from engine.transports.twilio_async import AsyncTwilioTransport

    return AsyncTwilioTransport(settings)


def make_sandbox(settings: Settings) -> Transport:
    """The twilio transport pointed at the sandbox server, with its default credentials
    unless TWILIO_* settings say otherwise."""
    from engine.sandbox.config import (
        SANDBOX_ACCOUNT_SID,
        SANDBOX_AUTH_TOKEN,
        SANDBOX_FROM_NUMBER,
    )
    from engine.transports.twilio_async import AsyncTwilioTransport

    transport = AsyncTwilioTransport(
        settings.with_(
            twilio_api_base_url=settings.twilio_api_base_url or SANDBOX_URL,
            twilio_account_sid=settings.twilio_account_sid or SANDBOX_ACCOUNT_SID,
            twilio_auth_token=settings.twilio_auth_token or SANDBOX_AUTH_TOKEN,
            twilio_from_number=settings.twilio_from_number or SANDBOX_FROM_NUMBER,
        )
    )
    transport.name = "sandbox"
    return transport


def make_console(settings: Settings) -> Transport:
    from engine.transports.console import ConsoleTransport

    return ConsoleTransport()


TRANSPORTS: dict[str, Callable[[Settings], Transport]] = {
    "twilio": make_twilio,
    "sandbox": make_sandbox,
    "console": make_console,
}


def make_transport(settings: Settings) -> Transport:
    """The transport named by settings.transport; ValueError for an unknown name."""
    try:
        factory = TRANSPORTS[settings.transport]
    except KeyError:
        known = ", ".join(sorted(TRANSPORTS))
        raise ValueError(f"unknown transport {settings.transport!r}; known: {known}") from None
    return factory(settings)
