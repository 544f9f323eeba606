"""The sandbox's behaviour without HTTP: authenticate, validate and accept a message."""

from __future__ import annotations

import hmac
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from engine.core.sms import measure
from engine.sandbox.callbacks import CallbackSender
from engine.sandbox.config import SANDBOX_FROM_NUMBER, SandboxConfig
from engine.sandbox.faults import FAILED_CODES, FaultInjector, error_message, http_status_for
from engine.sandbox.phones import Phones
from engine.sandbox.store import MessageStore, SandboxMessage, build_timeline, new_sid, utcnow

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
MAX_BODY = 1600


@dataclass(frozen=True)
class TwilioError:
    """An error answer in Twilio's format."""

    code: int
    message: str
    status: int

    @classmethod
    def of(cls, code: int, message: str | None = None) -> TwilioError:
        return cls(code, message or error_message(code), http_status_for(code))

    def to_json(self) -> dict[str, object]:
        return {
            "code": self.code,
            "message": self.message,
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
            "status": self.status,
        }


class Sandbox:
    """One sandbox: its message store, fault injector and status-callback sender."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.store = MessageStore()
        self.faults = FaultInjector(config.faults)
        self.callbacks = CallbackSender(
            self.store,
            auth_token=config.auth_token,
            attempts=config.callback_attempts,
            retry_delay=timedelta(milliseconds=config.callback_retry_ms),
            timeout_seconds=config.callback_timeout_seconds,
            workers=config.callback_workers,
        )
        self.phones = Phones(self.store, config)
        self._stopping = threading.Event()
        self._sent_delay = timedelta(milliseconds=config.sent_delay_ms)
        self._delivered_delay = timedelta(milliseconds=config.delivered_delay_ms)

    def stop(self) -> None:
        """End held requests and the callback threads."""
        self._stopping.set()
        self.callbacks.stop()
        self.phones.close()

    def hang(self) -> None:
        """Hold a request as a stuck provider would (cut short when the sandbox stops)."""
        self._stopping.wait(self.config.hang_seconds)

    def authenticate(
        self, account_sid: str, username: str | None, password: str | None
    ) -> TwilioError | None:
        """HTTP basic auth with the account's SID and auth token, as Twilio requires."""
        good = hmac.compare_digest(username or "", self.config.account_sid) and (
            hmac.compare_digest(password or "", self.config.auth_token)
        )
        if not good:
            return TwilioError.of(20003)
        if account_sid != self.config.account_sid:
            return TwilioError.of(
                20404, f"The requested resource for account {account_sid} was not found"
            )
        return None

    def accept(
        self, form: Mapping[str, str], now: datetime | None = None
    ) -> SandboxMessage | TwilioError:
        """Validate a create request like Twilio does and record the message it asks for."""
        to = form.get("To", "").strip()
        if to:
            self.store.count_create_request(to)
        problem = self._validate(to, form)
        if problem is not None:
            return problem
        now = now or utcnow()
        error_code = self.faults.delivery_error(to)
        service = form.get("MessagingServiceSid") or None
        message = SandboxMessage(
            sid=new_sid(),
            account_sid=self.config.account_sid,
            to=to,
            from_=form.get("From") or SANDBOX_FROM_NUMBER,
            body=form["Body"],
            messaging_service_sid=service,
            status_callback=form.get("StatusCallback") or None,
            num_segments=measure(form["Body"])[1],
            created=now,
            timeline=build_timeline(
                created=now,
                initial="accepted" if service else "queued",
                sent_delay=self._sent_delay,
                delivered_delay=self._delivered_delay,
                error_code=error_code,
                failed=error_code in FAILED_CODES,
            ),
        )
        self.store.add(message)
        if message.status_callback:
            self.callbacks.schedule(message)
        return message

    def _validate(self, to: str, form: Mapping[str, str]) -> TwilioError | None:
        if not to:
            return TwilioError.of(21604)
        if not E164.match(to):
            return TwilioError.of(21211, f"The 'To' number {to} is not a valid phone number.")
        sender = form.get("From") or ""
        if not sender and not form.get("MessagingServiceSid"):
            return TwilioError.of(21603)
        body = form.get("Body") or ""
        if not body.strip():
            return TwilioError.of(21602)
        if len(body) > MAX_BODY:
            return TwilioError.of(21617)
        if sender == to:
            return TwilioError.of(21266)
        code = self.faults.config.fail_numbers.get(to)
        if code is not None:
            return TwilioError.of(code)
        return None

    def reset(self) -> None:
        self.callbacks.clear()
        self.store.reset()
        self.phones.reset()
