"""The twilio transport: the real twilio SDK, pointed at api.twilio.com or at any
Twilio-compatible server (TWILIO_API_BASE_URL, e.g. the sandbox)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client
from urllib3.exceptions import NewConnectionError

from engine.settings import Settings
from engine.transports.base import OutboundMessage, ProviderError, SendResult, SentRecord

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 10.0
POOL_SIZE = 64
RECONCILE_LIMIT = 1000  # messages to one number read when reconciling
TWILIO_API = "https://api.twilio.com"
_PHONE = re.compile(r"\+\d[\d\s().-]*\d|\d[\d\s().-]{5,}\d")  # +anything, or 7+ digits


class TransportConfigError(ValueError):
    """The transport cannot be built from these settings (missing credentials or sender)."""


class BaseUrlHttpClient(TwilioHttpClient):
    """TwilioHttpClient that sends what the SDK addresses to *.twilio.com to `base_url`
    instead, keeping path and query. Every SDK call goes through `request` with an absolute
    URL (Domain.absolute_url; paging's next_page_uri too), so one rewrite covers them all.

    Its requests Session keeps up to `pool_size` connections per host and never retries on
    its own: a retried POST could text a patient twice. Proxy and CA-bundle settings are read
    from the environment once, here, instead of on every request (requests' trust_env
    walks os.environ twice per request: a sixth of a send's CPU time).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        pool_size: int = POOL_SIZE,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        super().__init__(pool_connections=True)
        self.base_url = base_url.rstrip("/") if base_url else None
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        assert self.session is not None
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.session.trust_env = False
        self.proxy = get_environ_proxies(self.base_url or TWILIO_API)
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle:
            self.session.verify = bundle
        # Set after the base constructor, which accepts a number only; requests takes a
        # (connect, read) pair.
        self.timeout = (connect_timeout, read_timeout)  # type: ignore[assignment]

    def rewrite(self, url: str) -> str:
        return rewrite_url(self.base_url, url)

    def request(
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
        return super().request(
            method,
            self.rewrite(url),
            params=params,
            data=data,
            headers=headers,
            auth=auth,
            timeout=timeout,
            allow_redirects=allow_redirects,
        )

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def rewrite_url(base_url: str | None, url: str) -> str:
    """`url` sent to `base_url` instead when it addresses *.twilio.com (path and query
    kept); as is without a base URL or for any other host."""
    if base_url is None:
        return url
    parts = urlsplit(url)
    if not (parts.hostname or "").endswith("twilio.com"):
        return url
    return f"{base_url}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def send_result(created: Any) -> SendResult:
    """The result of an answered create; ProviderError when it names no message."""
    if not created.sid:
        raise ProviderError("answer without a message sid")
    return SendResult(provider_sid=created.sid, status=str(created.status or "queued"))


def redact(text: str) -> str:
    """Provider messages may quote the phone number; keep it out of logs and the outbox."""
    return _PHONE.sub("[number]", text)


def never_sent(exc: requests.RequestException) -> bool:
    """The request never reached the provider: no connection could be made."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(exc, requests.ConnectionError) and isinstance(reason, NewConnectionError)


def provider_error(exc: Exception) -> ProviderError:
    """Map what the SDK and requests raise to ProviderError; no answer -> http_status None.

    The message of a no-answer error starts with "not sent:" when no connection was made,
    else "no answer:" (the provider may hold the message: reconcile before resending).
    """
    if isinstance(exc, TwilioRestException):
        code = exc.code if isinstance(exc.code, int) and exc.code >= 10000 else None
        return ProviderError(redact(str(exc.msg)), code=code, http_status=exc.status)
    if isinstance(exc, TwilioServiceException):
        return ProviderError(redact(exc.title or ""), code=exc.code, http_status=exc.status)
    if isinstance(exc, requests.RequestException):
        if never_sent(exc):
            return ProviderError(f"not sent: could not connect ({type(exc).__name__})")
        if isinstance(exc, requests.Timeout):
            return ProviderError(f"no answer: none in time ({type(exc).__name__})")
        return ProviderError(f"no answer: connection lost ({type(exc).__name__})")
    if isinstance(exc, json.JSONDecodeError):
        return ProviderError("no answer: unreadable (not JSON)")
    response = exc.args[1] if len(exc.args) > 1 else None  # Page: TwilioException(msg, resp)
    status = getattr(response, "status_code", None)
    return ProviderError(redact(str(exc.args[0]) if exc.args else repr(exc)), http_status=status)


EXPECTED = (TwilioException, requests.RequestException, json.JSONDecodeError)


@dataclass(frozen=True)
class Sender:
    """The account and the sender every create names, checked once."""

    account_sid: str
    auth_token: str
    service_sid: str | None
    from_number: str | None
    callback: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Sender:
        sid, token = settings.twilio_account_sid, settings.twilio_auth_token
        if not sid or not token:
            raise TransportConfigError("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set")
        service, sender = settings.twilio_messaging_service_sid, settings.twilio_from_number
        if not service and not sender:
            raise TransportConfigError(
                "set TWILIO_MESSAGING_SERVICE_SID or TWILIO_FROM_NUMBER: the sender"
            )
        return cls(sid, token, service, sender, settings.status_callback_url or None)


def create_args(message: OutboundMessage, sender: Sender) -> dict[str, Any]:
    """The keyword arguments of `messages.create` for one text."""
    args: dict[str, Any] = {"to": message.to, "body": message.body}
    if sender.service_sid:
        args["messaging_service_sid"] = sender.service_sid
    else:
        args["from_"] = sender.from_number
    if sender.callback:
        sep = "&" if "?" in sender.callback else "?"
        args["status_callback"] = f"{sender.callback}{sep}ref={message.reference}"
    return args


def records_since(listed: list[Any], *, to: str, since: datetime) -> list[SentRecord] | None:
    """The listed messages to `to` created at or after `since` (to the second); None when
    all RECONCILE_LIMIT read fall in the window (older ones might too: cannot tell)."""
    floor = (since if since.tzinfo else since.replace(tzinfo=UTC)).astimezone(UTC)
    floor = floor.replace(microsecond=0)
    found = [
        m for m in listed if m.to == to and m.date_created is not None and m.date_created >= floor
    ]
    if len(listed) >= RECONCILE_LIMIT and len(found) == len(listed):
        return None
    return [
        SentRecord(
            provider_sid=m.sid or "",
            to=m.to or to,
            body=m.body or "",
            status=str(m.status or ""),
            created_at=m.date_created,
        )
        for m in found
    ]


class TwilioTransport:
    """Transport over the twilio SDK. Thread-safe: one Client and one pooled Session are
    shared by every thread (size the pool to the dispatcher's concurrency)."""

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
        sid, token = self._sender.account_sid, self._sender.auth_token
        self._page_size = page_size
        self.http_client = BaseUrlHttpClient(
            settings.twilio_api_base_url,
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self.client = Client(sid, token, http_client=self.http_client)
        self.messages = self.client.api.v2010.accounts(sid).messages

    def send(self, message: OutboundMessage) -> SendResult:
        """One create request, never retried here. ProviderError with http_status None
        means no readable answer came: the provider may or may not hold the message."""
        try:
            created = self.messages.create(**self._create_args(message))
        except EXPECTED as exc:
            raise provider_error(exc) from exc
        return send_result(created)

    def _create_args(self, message: OutboundMessage) -> dict[str, Any]:
        return create_args(message, self._sender)

    def sent_since(self, *, to: str, since: datetime) -> list[SentRecord] | None:
        """Messages to `to` created at or after `since` (to the second, as Twilio's dates
        are), or None when the provider cannot tell.

        No DateSent filter: a message still queued at the provider has no DateSent, and
        missing it would let reconciliation resend it. Instead the newest RECONCILE_LIMIT
        messages to the number are read and filtered on date_created here; if that many
        all fall in the window, older ones might too, and the answer is "cannot tell".
        Raises ProviderError when the provider cannot answer."""
        try:
            listed = list(
                self.messages.stream(to=to, page_size=self._page_size, limit=RECONCILE_LIMIT)
            )
        except EXPECTED as exc:
            raise provider_error(exc) from exc
        return records_since(listed, to=to, since=since)

    def close(self) -> None:
        self.http_client.close()
