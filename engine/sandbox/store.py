"""The sandbox's memory: every accepted message, its status timeline, and request counts."""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime
from typing import Any

API_VERSION = "2010-04-01"


@dataclass(frozen=True)
class StatusStep:
    at: datetime
    status: str
    error_code: int | None = None


@dataclass(frozen=True)
class SandboxMessage:
    """One accepted message. Its status is read off `timeline` at the time of asking, so
    nothing has to run for a message to move from queued to delivered."""

    sid: str
    account_sid: str
    to: str
    from_: str | None
    body: str
    messaging_service_sid: str | None
    status_callback: str | None
    num_segments: int
    created: datetime
    timeline: tuple[StatusStep, ...]

    def step_at(self, now: datetime) -> StatusStep:
        current = self.timeline[0]
        for step in self.timeline:
            if step.at > now:
                break
            current = step
        return current

    def date_sent(self, now: datetime) -> datetime | None:
        for step in self.timeline:
            if step.at > now:
                return None
            if step.status == "sent":
                return step.at
        return None


@dataclass(frozen=True)
class MessageFilter:
    to: str | None = None
    from_: str | None = None
    sent_on: datetime | date | None = None
    sent_after: datetime | date | None = None  # inclusive, as Twilio's DateSent>=
    sent_before: datetime | date | None = None  # inclusive, as Twilio's DateSent<=
    day_granular: bool = False

    def matches(self, m: SandboxMessage, now: datetime) -> bool:
        if self.to is not None and m.to != self.to:
            return False
        if self.from_ is not None and m.from_ != self.from_:
            return False
        if self.sent_on is None and self.sent_after is None and self.sent_before is None:
            return True
        sent = m.date_sent(now)
        if sent is None:
            return False
        return (
            (self.sent_on is None or sent.date() == _day(self.sent_on))
            and (self.sent_after is None or self._cmp(sent, self.sent_after) >= 0)
            and (self.sent_before is None or self._cmp(sent, self.sent_before) <= 0)
        )

    def _cmp(self, sent: datetime, bound: datetime | date) -> int:
        if self.day_granular or not isinstance(bound, datetime):
            a, b = sent.date(), _day(bound)
            return (a > b) - (a < b)
        sent = sent.replace(microsecond=0)  # Twilio's dates have whole seconds
        return (sent > bound) - (sent < bound)


def _day(value: datetime | date) -> date:
    return value.date() if isinstance(value, datetime) else value


def rfc2822(value: datetime | None) -> str | None:
    """Twilio's date format: 'Thu, 24 Aug 2023 05:01:45 +0000'."""
    return None if value is None else format_datetime(value.replace(microsecond=0))


def message_json(m: SandboxMessage, now: datetime, *, as_created: bool = False) -> dict[str, Any]:
    """The message resource as Twilio's API returns it; `as_created` for the create answer,
    which shows the message as it stood on acceptance."""
    step = m.timeline[0] if as_created else m.step_at(now)
    uri = f"/{API_VERSION}/Accounts/{m.account_sid}/Messages/{m.sid}"
    return {
        "account_sid": m.account_sid,
        "api_version": API_VERSION,
        "body": m.body,
        "date_created": rfc2822(m.created),
        "date_sent": None if as_created else rfc2822(m.date_sent(now)),
        "date_updated": rfc2822(step.at),
        "direction": "outbound-api",
        "error_code": step.error_code,
        "error_message": None,
        "from": None if as_created and m.messaging_service_sid else m.from_,
        "messaging_service_sid": m.messaging_service_sid,
        "num_media": "0",
        "num_segments": str(m.num_segments),
        "price": None,
        "price_unit": "USD",
        "sid": m.sid,
        "status": step.status,
        "subresource_uris": {"media": f"{uri}/Media.json", "feedback": f"{uri}/Feedback.json"},
        "to": m.to,
        "uri": f"{uri}.json",
    }


class MessageStore:
    """Thread-safe, in memory. Lists come newest first, as Twilio lists them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: dict[str, SandboxMessage] = {}
        self._sids_by_to: dict[str, list[str]] = {}
        self._create_requests: Counter[str] = Counter()
        self._accepted: Counter[str] = Counter()

    def count_create_request(self, to: str) -> None:
        with self._lock:
            self._create_requests[to] += 1

    def add(self, message: SandboxMessage) -> None:
        with self._lock:
            self._messages[message.sid] = message
            self._sids_by_to.setdefault(message.to, []).append(message.sid)
            self._accepted[message.to] += 1

    def numbers(self) -> list[str]:
        """Every To number a message was accepted for."""
        with self._lock:
            return list(self._sids_by_to)

    def get(self, sid: str) -> SandboxMessage | None:
        return self._messages.get(sid)

    def select(self, flt: MessageFilter, now: datetime) -> list[SandboxMessage]:
        with self._lock:
            if flt.to is not None:
                candidates = [self._messages[s] for s in self._sids_by_to.get(flt.to, ())]
            else:
                candidates = list(self._messages.values())
        candidates.reverse()
        return [m for m in candidates if flt.matches(m, now)]

    def counts(self) -> dict[str, dict[str, int]]:
        """Create requests (accepted or not) and accepted messages per To number."""
        with self._lock:
            return {
                "create_requests_per_to": dict(self._create_requests),
                "accepted_per_to": dict(self._accepted),
            }

    def reset(self) -> None:
        with self._lock:
            self._messages.clear()
            self._sids_by_to.clear()
            self._create_requests.clear()
            self._accepted.clear()


def build_timeline(
    *,
    created: datetime,
    initial: str,
    sent_delay: timedelta,
    delivered_delay: timedelta,
    error_code: int | None,
    failed: bool,
) -> tuple[StatusStep, ...]:
    """queued -> sent -> delivered; or -> undelivered (carrier refused, after sent) or
    -> failed (never handed to a carrier)."""
    steps = [StatusStep(created, initial)]
    if initial != "queued":
        steps.append(StatusStep(created, "queued"))
    if error_code is not None and failed:
        steps.append(StatusStep(created + sent_delay, "failed", error_code))
        return tuple(steps)
    sent_at = created + sent_delay
    steps.append(StatusStep(sent_at, "sent"))
    final = "delivered" if error_code is None else "undelivered"
    steps.append(StatusStep(sent_at + delivered_delay, final, error_code))
    return tuple(steps)


def new_sid(prefix: str = "SM") -> str:
    return prefix + secrets.token_hex(16)


def utcnow() -> datetime:
    return datetime.now(UTC)
