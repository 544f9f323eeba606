"""The patients' phones: what each number has received, what it has read, and the texts it
sends back, which reach the app as Twilio delivers an incoming SMS: a form POSTed to the
messaging webhook, signed with the account's auth token (X-Twilio-Signature).

A phone shows a message once the carrier has it (status sent or delivered); failed and
undelivered ones never arrive. A TwiML <Message> in the webhook's answer is a reply
Twilio would send at once, so it arrives on the phone too.
"""

from __future__ import annotations

import logging
import threading
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import requests
from twilio.request_validator import RequestValidator

from engine.core.sms import measure
from engine.sandbox.config import SANDBOX_FROM_NUMBER, SandboxConfig
from engine.sandbox.store import (
    API_VERSION,
    MessageFilter,
    MessageStore,
    SandboxMessage,
    build_timeline,
    new_sid,
    utcnow,
)

log = logging.getLogger(__name__)

ON_PHONE = ("sent", "delivered")
MAX_TWIML_BYTES = 64 * 1024


@dataclass(frozen=True)
class PhoneText:
    """A text a phone sent to the program's number, and how the webhook took it."""

    sid: str
    number: str
    to: str
    body: str
    at: datetime
    webhook_status: int | None  # None: the webhook could not be reached
    error: str | None = None


class WebhookMissing(ValueError):
    """No messaging webhook URL: neither in the request nor in the sandbox's config."""


class Phones:
    """Every phone the sandbox has texted or been texted from."""

    def __init__(self, store: MessageStore, config: SandboxConfig) -> None:
        self._store = store
        self._config = config
        self._validator = RequestValidator(config.auth_token)
        self._lock = threading.Lock()
        self._sent: dict[str, list[PhoneText]] = {}
        self._read: dict[str, int] = {}
        self._http = requests.Session()
        self._http.trust_env = False  # the webhook is local; no proxy from the environment

    def close(self) -> None:
        self._http.close()

    def reset(self) -> None:
        with self._lock:
            self._sent.clear()
            self._read.clear()

    def received(self, number: str, now: datetime) -> list[SandboxMessage]:
        """Messages on the phone, oldest first."""
        messages = self._store.select(MessageFilter(to=number), now)
        messages.reverse()
        return [m for m in messages if m.step_at(now).status in ON_PHONE]

    def phones(self, now: datetime) -> list[dict[str, Any]]:
        """One summary per number, the most recently active first."""
        with self._lock:
            numbers = set(self._sent) | set(self._store.numbers())
        summaries = [self._summary(number, now) for number in numbers]
        summaries = [s for s in summaries if s["received"] or s["sent"]]
        summaries.sort(key=lambda s: (s["last_at"], s["number"]), reverse=True)
        return summaries

    def _summary(self, number: str, now: datetime) -> dict[str, Any]:
        received = self.received(number, now)
        with self._lock:
            sent = list(self._sent.get(number, ()))
            read = self._read.get(number, 0)
        times = [m.created for m in received] + [t.at for t in sent]
        return {
            "number": number,
            "received": len(received),
            "sent": len(sent),
            "unread": max(len(received) - read, 0),
            "last_at": max(times).isoformat() if times else "",
        }

    def thread(self, number: str, now: datetime) -> dict[str, Any]:
        """The conversation as the phone shows it, oldest first."""
        received = self.received(number, now)
        with self._lock:
            sent = list(self._sent.get(number, ()))
            read = self._read.get(number, 0)
        entries = [
            {
                "sid": m.sid,
                "direction": "outbound",
                "body": m.body,
                "at": m.created.isoformat(),
                "status": m.step_at(now).status,
            }
            for m in received
        ]
        entries += [
            {
                "sid": t.sid,
                "direction": "inbound",
                "body": t.body,
                "at": t.at.isoformat(),
                "status": "received" if t.webhook_status == 200 else "not-delivered",
                "webhook_status": t.webhook_status,
            }
            for t in sent
        ]
        entries.sort(key=lambda e: (e["at"], e["direction"] == "outbound"))
        return {"number": number, "messages": entries, "unread": max(len(received) - read, 0)}

    def mark_read(self, number: str, now: datetime) -> None:
        count = len(self.received(number, now))
        with self._lock:
            self._read[number] = max(self._read.get(number, 0), count)

    def send(self, number: str, body: str, *, url: str | None = None) -> PhoneText:
        """The phone texts `body` to the program: POST the signed form to the webhook."""
        webhook = url or self._config.inbound_url
        if not webhook:
            raise WebhookMissing("no messaging webhook URL: give one or set inbound_url")
        now = utcnow()
        program = self._program_number(number, now)
        params = inbound_params(self._config.account_sid, number, program, body)
        headers = {
            "X-Twilio-Signature": self._validator.compute_signature(webhook, params),
            "User-Agent": "TwilioProxy/1.1",
        }
        try:
            response = self._http.post(webhook, data=params, headers=headers, timeout=10)
        except requests.RequestException as exc:
            log.info("messaging webhook %s failed: %s", webhook, exc)
            text = PhoneText(params["MessageSid"], number, program, body, now, None, str(exc))
            return self._keep(text)
        text = PhoneText(params["MessageSid"], number, program, body, now, response.status_code)
        self._keep(text)
        if response.status_code == 200:
            for reply in twiml_messages(response.content):
                self._deliver_reply(number, program, reply)
        return text

    def _keep(self, text: PhoneText) -> PhoneText:
        with self._lock:
            self._sent.setdefault(text.number, []).append(text)
        return text

    def _program_number(self, number: str, now: datetime) -> str:
        """The number the phone answers: whoever texted it last, else the sandbox sender."""
        received = self.received(number, now)
        if received and received[-1].from_:
            return received[-1].from_
        return SANDBOX_FROM_NUMBER

    def _deliver_reply(self, number: str, program: str, body: str) -> None:
        now = utcnow()
        self._store.add(
            SandboxMessage(
                sid=new_sid(),
                account_sid=self._config.account_sid,
                to=number,
                from_=program,
                body=body,
                messaging_service_sid=None,
                status_callback=None,
                num_segments=measure(body)[1],
                created=now,
                timeline=build_timeline(
                    created=now,
                    initial="queued",
                    sent_delay=timedelta(0),
                    delivered_delay=timedelta(0),
                    error_code=None,
                    failed=False,
                ),
            )
        )


def inbound_params(account_sid: str, number: str, program: str, body: str) -> dict[str, str]:
    """The form Twilio posts to a messaging webhook for an incoming SMS."""
    sid = new_sid()
    return {
        "AccountSid": account_sid,
        "ApiVersion": API_VERSION,
        "Body": body,
        "From": number,
        "MessageSid": sid,
        "NumMedia": "0",
        "NumSegments": str(measure(body)[1]),
        "SmsMessageSid": sid,
        "SmsSid": sid,
        "SmsStatus": "received",
        "To": program,
    }


def twiml_messages(content: bytes) -> list[str]:
    """The bodies of <Message> verbs in a TwiML answer (none for empty or unreadable)."""
    if not content.strip() or len(content) > MAX_TWIML_BYTES:
        return []
    try:
        root = ElementTree.fromstring(content)
    except ElementTree.ParseError:
        return []
    bodies = []
    for verb in root.iter("Message"):
        body = verb.find("Body")
        text = (body.text if body is not None else verb.text) or ""
        if text.strip():
            bodies.append(text.strip())
    return bodies
