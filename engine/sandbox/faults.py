"""Fault injection: which requests fail, and how, drawn from one seedable random stream."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Literal

from engine.sandbox.config import FaultConfig

FaultKind = Literal["timeout", "error", "garbage"]

# Error texts as Twilio words them (https://www.twilio.com/docs/api/errors).
ERROR_MESSAGES: dict[int, str] = {
    20003: "Authenticate",
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "An internal server error has occurred",
    20503: "Service unavailable",
    21211: "Invalid 'To' Phone Number",
    21266: "'To' and 'From' number cannot be the same",
    21408: "Permission to send an SMS has not been enabled for the region indicated by the 'To' "
    "number",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21610: "Attempt to send to unsubscribed recipient",
    21612: "The 'To' phone number is not currently reachable using the 'From' phone number via "
    "SMS.",
    21614: "'To' number is not a valid mobile number",
    21617: "The concatenated message body exceeds the 1600 character limit.",
    30001: "Queue overflow",
    30003: "Unreachable destination handset",
    30005: "Unknown destination handset",
    30006: "Landline or unreachable carrier",
    30007: "Message filtered",
    30008: "Unknown error",
}

# Delivery errors that mean Twilio never handed the message to a carrier (status `failed`);
# every other delivery error is a carrier's refusal (status `undelivered`).
FAILED_CODES = frozenset({30001, 30002, 30010, 30034})


def error_message(code: int) -> str:
    return ERROR_MESSAGES.get(code, f"Error {code}")


def http_status_for(code: int) -> int:
    """The HTTP status Twilio answers with for an error code."""
    special = {20003: 401, 20404: 404, 20429: 429, 20500: 500, 20503: 503}
    return special.get(code, 400)


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    code: int | None = None

    @property
    def http_status(self) -> int:
        return http_status_for(self.code) if self.code is not None else 200


class FaultInjector:
    """Thread-safe: one lock guards the config and the random stream, so a seeded run with
    requests made one at a time draws the same faults every time."""

    def __init__(self, config: FaultConfig) -> None:
        self._lock = threading.Lock()
        self._config = config
        self._rng = random.Random(config.seed)

    @property
    def config(self) -> FaultConfig:
        return self._config

    def configure(self, config: FaultConfig) -> None:
        """Replace every fault setting; a given seed restarts the random stream."""
        with self._lock:
            self._config = config
            if config.seed is not None:
                self._rng = random.Random(config.seed)

    def latency_seconds(self) -> float:
        low, high = self._config.latency_ms
        if high <= 0:
            return 0.0
        with self._lock:
            return (low if low == high else self._rng.uniform(low, high)) / 1000

    def applies_to(self, operation: str) -> bool:
        return operation == "create" or self._config.scope == "all"

    def draw(self) -> Fault | None:
        """At most one fault for this request, or None to answer normally."""
        c = self._config
        choices: list[tuple[float, Fault]] = [
            (c.timeout_rate, Fault("timeout")),
            (c.http_500_rate, Fault("error", 20500)),
            (c.http_503_rate, Fault("error", 20503)),
            (c.http_429_rate, Fault("error", 20429)),
            (c.garbage_rate, Fault("garbage")),
            *((p, Fault("error", code)) for code, p in c.error_codes.items()),
        ]
        if not any(p for p, _ in choices):
            return None
        with self._lock:
            u = self._rng.random()
        for p, fault in choices:
            if u < p:
                return fault
            u -= p
        return None

    def drop_after_accept(self) -> bool:
        rate = self._config.drop_after_accept_rate
        if rate <= 0:
            return False
        with self._lock:
            return self._rng.random() < rate

    def delivery_error(self, to: str) -> int | None:
        """The error a message to `to` will end with after acceptance, or None: delivered."""
        c = self._config
        if to in c.delivery_fail_numbers:
            return c.delivery_fail_numbers[to]
        if not c.delivery_errors:
            return None
        with self._lock:
            u = self._rng.random()
        for code, p in c.delivery_errors.items():
            if u < p:
                return code
            u -= p
        return None
