"""The twilio transport on the SDK's asynchronous path (`create_async` over aiohttp).

The same SDK calls as engine.transports.twilio, at well under half the client CPU per
create (aiohttp's C parser instead of requests and urllib3), so one dispatcher process
can keep many more texts in flight. The event loop runs in a thread of its own: the
dispatcher hands it coroutines (`submit`), and `send` / `sent_since` are there as blocking
calls for everything else (reconciliation, tests, the demo).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import threading
import weakref
from collections.abc import Coroutine
from concurrent.futures import Future
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from requests.utils import get_environ_proxies
from twilio.base.exceptions import TwilioException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from engine.settings import Settings
from engine.transports.base import OutboundMessage, ProviderError, SendResult, SentRecord
from engine.transports.twilio import (
    CONNECT_TIMEOUT,
    POOL_SIZE,
    READ_TIMEOUT,
    RECONCILE_LIMIT,
    TWILIO_API,
    Sender,
    create_args,
    provider_error,
    records_since,
    rewrite_url,
    send_result,
)

T = TypeVar("T")
# Margin over the request timeouts for a blocking caller waiting on the loop thread.
WAIT_MARGIN = 5.0


class BaseUrlAsyncHttpClient(AsyncHttpClient):  # type: ignore[misc]
    """The SDK's async HTTP client, sending what it addresses to *.twilio.com to `base_url`
    (path and query kept), over one pooled aiohttp session made on the loop thread.

    Never retries: aiohttp retries a dropped keep-alive connection for idempotent methods
    only, never for the POST that creates a message (a retried create could text twice).
    """

    def __init__(
        self,
        base_url: str | None,
        *,
        pool_size: int,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        super().__init__(logging.getLogger("twilio.async_http_client"), True, None)
        self.base_url = base_url.rstrip("/") if base_url else None
        self.pool_size = pool_size
        self.client_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        proxies = get_environ_proxies(self.base_url or TWILIO_API)
        scheme = urlsplit(self.base_url or TWILIO_API).scheme
        self.proxy = proxies.get(scheme) or proxies.get("all")
        self.session: aiohttp.ClientSession | None = None
        self._auth: tuple[tuple[str, str], str] | None = None

    def rewrite(self, url: str) -> str:
        return rewrite_url(self.base_url, url)

    def open(self) -> None:
        """Make the session (on the loop thread: aiohttp binds it to the running loop)."""
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        context = ssl.create_default_context(cafile=bundle) if bundle else True
        connector = aiohttp.TCPConnector(limit=self.pool_size, ssl=context)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=self.client_timeout, trust_env=False
        )

    def with_auth(self, headers: dict[str, str] | None, auth: tuple[str, str] | None) -> dict:
        """The request's headers with its basic Authorization (encoded once per account)."""
        if auth is None:
            return dict(headers or {})
        if self._auth is None or self._auth[0] != auth:
            self._auth = (auth, aiohttp.encode_basic_auth(auth[0], auth[1]))
        return {**(headers or {}), "Authorization": self._auth[1]}

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        assert self.session is not None, "open() the client on the loop thread first"
        async with self.session.request(
            method.upper(),
            self.rewrite(url),
            params=params,
            data=data,
            headers=self.with_auth(headers, auth),
            allow_redirects=allow_redirects,
            proxy=self.proxy,
        ) as response:
            text = await response.text()
        return Response(response.status, text, response.headers)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def async_provider_error(exc: BaseException) -> ProviderError:
    """Map what the SDK and aiohttp raise to ProviderError, as provider_error does for
    requests: no answer -> http_status None, "not sent:" when no connection was made."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return ProviderError(f"not sent: could not connect ({type(exc).__name__})")
    if isinstance(exc, asyncio.TimeoutError):
        return ProviderError(f"no answer: none in time ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ProviderError(f"no answer: connection lost ({type(exc).__name__})")
    return provider_error(exc)  # type: ignore[arg-type]


EXPECTED = (
    TwilioException,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    OSError,
    json.JSONDecodeError,
)


class AsyncTwilioTransport:
    """Transport over the twilio SDK's async client, on an event loop in its own thread.

    `submit(coroutine)` runs a coroutine there and returns a concurrent Future; `send_async`
    and `sent_since_async` are for coroutines on that loop; `send` and `sent_since` block
    the calling thread. Close it to stop the loop thread.
    """

    name = "twilio"

    def __init__(
        self,
        settings: Settings,
        *,
        pool_size: int = POOL_SIZE,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        page_size: int = 50,
    ) -> None:
        self._sender = Sender.from_settings(settings)
        self._page_size = page_size
        self._wait = connect_timeout + read_timeout + WAIT_MARGIN
        self.http_client = BaseUrlAsyncHttpClient(
            settings.twilio_api_base_url,
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        sid = self._sender.account_sid
        self.client = Client(sid, self._sender.auth_token, http_client=self.http_client)
        self.messages = self.client.api.v2010.accounts(sid).messages
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="twilio-async", daemon=True
        )
        self._thread.start()
        self.loop.call_soon_threadsafe(self.http_client.open)
        # Closed at exit if nobody closed it (an open aiohttp session complains when
        # collected).
        self._finalizer = weakref.finalize(
            self, _stop, self.loop, self._thread, self.http_client, self._wait
        )

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Run `coroutine` on the transport's loop."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def send_async(self, message: OutboundMessage) -> SendResult:
        """One create request, never retried here (see TwilioTransport.send)."""
        try:
            created = await self.messages.create_async(**create_args(message, self._sender))
        except EXPECTED as exc:
            raise async_provider_error(exc) from exc
        return send_result(created)

    async def sent_since_async(self, *, to: str, since: datetime) -> list[SentRecord] | None:
        """As TwilioTransport.sent_since."""
        try:
            listed = await self.messages.list_async(
                to=to, page_size=self._page_size, limit=RECONCILE_LIMIT
            )
        except EXPECTED as exc:
            raise async_provider_error(exc) from exc
        return records_since(listed, to=to, since=since)

    def send(self, message: OutboundMessage) -> SendResult:
        return self.submit(self.send_async(message)).result(timeout=self._wait)

    def sent_since(self, *, to: str, since: datetime) -> list[SentRecord] | None:
        pages = RECONCILE_LIMIT // max(1, self._page_size) + 1
        future = self.submit(self.sent_since_async(to=to, since=since))
        return future.result(timeout=self._wait * pages)

    def close(self) -> None:
        """Close the connections and stop the loop thread (again: nothing)."""
        self._finalizer()


def _stop(
    loop: asyncio.AbstractEventLoop,
    thread: threading.Thread,
    http_client: BaseUrlAsyncHttpClient,
    wait: float,
) -> None:
    if loop.is_closed():
        return
    if thread.is_alive():
        asyncio.run_coroutine_threadsafe(http_client.close(), loop).result(timeout=wait)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=wait)
    loop.close()
