"""What every transport promises, and how provider errors are classified."""

from __future__ import annotations

from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

T = TypeVar("T")
ErrorKind = Literal["opted_out", "invalid_number", "filtered", "transient", "permanent"]

# Twilio error codes (https://www.twilio.com/docs/api/errors), by what the dispatcher does.
OPTED_OUT = frozenset({21610})  # the recipient replied STOP to this sender: revoke, suppress
INVALID_NUMBER = frozenset({21211, 21214, 21217, 21401, 21407, 21408, 21612, 21614, 30005, 30006})
FILTERED = frozenset({30007, 30034})  # carrier filtering, unregistered A2P traffic
TRANSIENT = frozenset({20429, 30001, 30008, 20500, 20503})  # queue overflow, unknown, 5xx


def classify(code: int | None, http_status: int | None) -> ErrorKind:
    """What a provider error means for the message: retry it, fail it, or revoke consent."""
    if code in OPTED_OUT:
        return "opted_out"
    if code in INVALID_NUMBER:
        return "invalid_number"
    if code in FILTERED:
        return "filtered"
    if code in TRANSIENT or http_status is None or http_status == 429 or http_status >= 500:
        return "transient"
    return "permanent"


@dataclass(frozen=True)
class OutboundMessage:
    """One text to send. `reference` (the outbox id) lets a provider be asked about it later."""

    to: str
    body: str
    reference: str


@dataclass(frozen=True)
class SendResult:
    provider_sid: str
    status: str  # the provider's status on acceptance: queued, accepted, sent...


@dataclass(frozen=True)
class SentRecord:
    """A message the provider holds, as far as reconciliation needs it."""

    provider_sid: str
    to: str
    body: str
    status: str
    created_at: datetime


class ProviderError(Exception):
    """The provider refused or failed a request; `kind` says what to do about it.

    `http_status` is None when no answer came at all (timeout, connection refused, garbage).
    """

    def __init__(self, message: str, *, code: int | None = None, http_status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status
        self.kind: ErrorKind = classify(code, http_status)


class Transport(Protocol):
    name: str

    def send(self, message: OutboundMessage) -> SendResult:
        """Hand one message to the provider; raise ProviderError when it is not accepted."""
        ...

    def sent_since(self, *, to: str, since: datetime) -> list[SentRecord] | None:
        """Messages to `to` the provider accepted since `since`, or None when it cannot tell.

        The dispatcher uses it to reconcile a row left `sending` by a crash.
        """
        ...


class AsyncTransport(Transport, Protocol):
    """A transport whose calls are coroutines on an event loop of its own; `submit` runs
    one there from any thread. The blocking `send` and `sent_since` still work."""

    async def send_async(self, message: OutboundMessage) -> SendResult: ...

    async def sent_since_async(self, *, to: str, since: datetime) -> list[SentRecord] | None: ...

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]: ...


def is_async(transport: Transport) -> bool:
    """Whether the dispatcher can hand this transport coroutines (AsyncTransport)."""
    return callable(getattr(transport, "submit", None)) and callable(
        getattr(transport, "send_async", None)
    )
