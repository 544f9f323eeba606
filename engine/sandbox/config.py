"""What a sandbox run looks like: credentials, timings and the faults it injects."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

SANDBOX_ACCOUNT_SID = "AC" + "0" * 32
SANDBOX_AUTH_TOKEN = "sandbox-token"
SANDBOX_FROM_NUMBER = "+15005550006"  # Twilio's magic "valid" From number for test credentials
DEFAULT_PORT = 8099

# Twilio test-credential magic To numbers (https://www.twilio.com/docs/iam/test-credentials).
MAGIC_TO_NUMBERS: dict[str, int] = {
    "+15005550001": 21211,  # invalid number
    "+15005550002": 21612,  # cannot route to this number
    "+15005550003": 21408,  # no international permission
    "+15005550004": 21610,  # recipient replied STOP
    "+15005550009": 21614,  # not a mobile number
}

SCOPES = ("create", "all")


class FaultConfigError(ValueError):
    """A fault description that cannot be applied (unknown key, bad rate)."""


def _rate(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise FaultConfigError(f"{name} must be a probability between 0 and 1, got {value!r}")
    return float(value)


def _codes(name: str, value: object) -> dict[int, float]:
    if not isinstance(value, Mapping):
        raise FaultConfigError(f"{name} must map error codes to probabilities")
    try:
        return {int(code): _rate(f"{name}[{code}]", p) for code, p in value.items()}
    except (TypeError, ValueError) as exc:
        raise FaultConfigError(f"{name}: {exc}") from exc


def _numbers(name: str, value: object) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise FaultConfigError(f"{name} must map E.164 numbers to error codes")
    try:
        return {str(number): int(code) for number, code in value.items()}
    except (TypeError, ValueError) as exc:
        raise FaultConfigError(f"{name}: {exc}") from exc


def _latency(value: object) -> tuple[float, float]:
    """`latency_ms` is a number (fixed) or [min, max] (uniform)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return (float(value), float(value))
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] <= value[1]
    ):
        return (float(value[0]), float(value[1]))
    raise FaultConfigError(f"latency_ms must be a number or [min, max], got {value!r}")


@dataclass(frozen=True)
class FaultConfig:
    """What goes wrong, and how often. One draw per request picks at most one of: timeout,
    http 500, http 503, http 429, garbage, each error code (in that order); a To number in
    `fail_numbers` always fails with its code; `drop_after_accept_rate` is drawn after a
    message is accepted; `delivery_*` decide the final status its callbacks report."""

    error_codes: dict[int, float] = field(default_factory=dict)  # {21610: 0.1}
    http_500_rate: float = 0.0
    http_503_rate: float = 0.0
    http_429_rate: float = 0.0
    timeout_rate: float = 0.0  # hang `hang_seconds`, then close without an answer
    garbage_rate: float = 0.0  # 200 with a non-JSON body; the message is NOT recorded
    drop_after_accept_rate: float = 0.0  # recorded, then the connection closes unanswered
    latency_ms: tuple[float, float] = (0.0, 0.0)
    fail_numbers: dict[str, int] = field(default_factory=lambda: dict(MAGIC_TO_NUMBERS))
    delivery_errors: dict[int, float] = field(default_factory=dict)  # {30003: 0.05}
    delivery_fail_numbers: dict[str, int] = field(default_factory=dict)
    scope: str = "create"  # "create": faults hit creates only; "all": fetch and list too
    seed: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultConfig:
        """Parse the JSON of `POST /sandbox/faults`; keys left out take their defaults."""
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise FaultConfigError(f"unknown fault setting(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("error_codes", "delivery_errors"):
                kwargs[key] = _codes(key, value)
            elif key in ("fail_numbers", "delivery_fail_numbers"):
                kwargs[key] = _numbers(key, value)
            elif key == "latency_ms":
                kwargs[key] = _latency(value)
            elif key == "scope":
                if value not in SCOPES:
                    raise FaultConfigError(f"scope must be one of {SCOPES}, got {value!r}")
                kwargs[key] = value
            elif key == "seed":
                if value is not None and not isinstance(value, int):
                    raise FaultConfigError(f"seed must be an integer, got {value!r}")
                kwargs[key] = value
            else:
                kwargs[key] = _rate(key, value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as `GET /sandbox/faults` shows it and `from_dict` reads it."""
        data = asdict(self)
        for key in ("error_codes", "delivery_errors"):
            data[key] = {str(code): p for code, p in data[key].items()}
        data["latency_ms"] = list(self.latency_ms)
        return data


@dataclass(frozen=True)
class SandboxConfig:
    """How a sandbox server runs. Delays are in milliseconds after the create request."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port
    account_sid: str = SANDBOX_ACCOUNT_SID
    auth_token: str = SANDBOX_AUTH_TOKEN
    faults: FaultConfig = field(default_factory=FaultConfig)
    sent_delay_ms: float = 0.0  # queued -> sent (DateSent is set then)
    delivered_delay_ms: float = 20.0  # sent -> delivered / undelivered / failed
    hang_seconds: float = 15.0  # how long a `timeout` fault holds the request
    callback_attempts: int = 3  # tries per status callback before it is logged and dropped
    callback_retry_ms: float = 200.0  # first retry delay; doubles each try
    callback_timeout_seconds: float = 5.0
    callback_workers: int = 4
    date_sent_day_granular: bool = False  # compare DateSent filters by day, like older APIs
    # The messaging webhook a phone's texts are POSTed to (Twilio's SmsUrl of the number);
    # a request to /sandbox/phones/<number>/messages may name another.
    inbound_url: str | None = None
    max_page_size: int = 1000
