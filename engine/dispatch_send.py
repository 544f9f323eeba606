"""The provider call: a per-sender rate limit, one send, and what came of it.

Sends run outside any database transaction, in a thread pool or as coroutines on an async
transport's event loop. Each row passes the send gate (engine.dispatch_gate) right before
its call; engine.dispatch_record writes the outcomes.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta

from engine import failpoints
from engine.dispatch_claim import Claimed
from engine.dispatch_gate import GateUnavailable, SendGate
from engine.transports.base import (
    AsyncTransport,
    OutboundMessage,
    ProviderError,
    SendResult,
    SentRecord,
    Transport,
)

BACKOFF_BASE = timedelta(seconds=2)
BACKOFF_CAP = timedelta(minutes=10)
# How far before a claim the provider is asked about: covers clock skew between hosts.
LOOKUP_MARGIN = timedelta(seconds=60)
STOP_POLL = 0.1  # seconds between looks at the stop flag while waiting for a rate slot
# Rows whose rate slot comes within this many seconds pass the send gate together: a row is
# marked started at most this long before its provider call (engine.dispatch_gate). Under a
# rate limit a group's slots spread out, and each gate statement costs the same however
# few rows it marks: at 100 messages/s, 50 ms gave two or three rows a statement.
GATE_HORIZON = 0.2
# The rows within GATE_HORIZON of the first waiting row's slot pass the gate this long
# before that slot (the gate's round trip), so a statement covers the whole horizon. (Passing
# each row as soon as its slot came within the horizon marked one row per statement after
# a group's first: at 50 messages/s, 1.3 ms of CPU per message in the gate's thread.)
GATE_LEAD = 0.05
_PHONE_LIKE = re.compile(r"\+?\d[\d\s().-]{4,}\d")


class RateLimiter:
    """At most `rate` acquisitions per second, evenly spaced (thread-safe).

    Each caller reserves the next free slot under the lock and waits for it outside the
    lock. `clock` and `wait` are injectable; `wait(seconds)` returning True (as
    threading.Event.wait does when set) means stop waiting: the caller is told False.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], object] | None = None,
    ) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._wait = wait or _sleep
        self._next = 0.0
        self._lock = threading.Lock()

    @property
    def rate(self) -> float | None:
        """Acquisitions per second at most; None: no limit."""
        return 1.0 / self.interval if self.interval else None

    def acquire(self) -> bool:
        """Block until this caller's slot; False when the wait was cut short."""
        delay = self.reserve()
        return delay <= 0 or not self._wait(delay)

    def reserve(self) -> float:
        """Take the next free slot; the seconds until it comes (for callers that wait on
        their own, such as a coroutine)."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        return slot - now


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def backoff_delay(attempts: int, *, rng: random.Random | None = None) -> timedelta:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempts)).

    Full jitter spreads retries of a throttled burst instead of synchronising them.
    """
    exponential = BACKOFF_BASE.total_seconds() * 2 ** min(attempts, 30)
    ceiling = min(BACKOFF_CAP.total_seconds(), exponential)
    return timedelta(seconds=(rng or random).uniform(0, ceiling))


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one claimed row at the provider boundary.

    Exactly one of: `result` (accepted), `error` (refused or failed), `found` (an earlier
    attempt was accepted after all: candidates the provider holds), `released` (not sent:
    the worker is stopping), `withheld` (not sent: the gate refused it, engine.dispatch_gate),
    `settled` (a lookup-only claim whose earlier attempt the provider does not hold).
    """

    claimed: Claimed
    result: SendResult | None = None
    error: ProviderError | None = None
    found: tuple[SentRecord, ...] = ()
    released: bool = False
    withheld: bool = False
    settled: bool = False  # a lookup-only claim: the earlier attempt did not go out


def send_claimed(
    claimed: Claimed,
    *,
    transport: Transport,
    limiter: RateLimiter,
    stop: threading.Event,
    gate: SendGate,
) -> SendOutcome:
    """Send one claimed row, unless the worker is stopping, an earlier try went out or the
    gate refuses it (an opt-out since the claim)."""
    if claimed.previous_claim_at is not None:
        failpoints.hit("send.before_lookup")
        try:
            records = transport.sent_since(to=claimed.to, since=_lookup_since(claimed))
        except ProviderError as exc:
            return _lookup_failed(claimed, exc)
        failpoints.hit("send.after_lookup")
        found = matching_records(records, to=claimed.to, body=claimed.body)
        if found:
            return SendOutcome(claimed, found=found)
    if claimed.lookup_only:
        return SendOutcome(claimed, settled=True)
    if stop.is_set() or not limiter.acquire() or stop.is_set():
        return SendOutcome(claimed, released=True)
    try:
        if not gate.admit(claimed):
            return SendOutcome(claimed, withheld=True)
    except GateUnavailable:
        return SendOutcome(claimed, released=True)
    failpoints.hit("send.before_call")
    try:
        result = transport.send(_message(claimed))
    except ProviderError as exc:
        failpoints.hit("send.after_error")
        return SendOutcome(claimed, error=exc)
    failpoints.hit("send.after_call")
    return SendOutcome(claimed, result=result)


class Lanes:
    """How an async sender works through its rows: at most `calls` provider calls at once
    (the concurrency), in groups of that many rows that pass the send gate together, one
    statement per group, with up to AHEAD groups past their turn in line (the next group
    passes the gate while the previous one's calls are in flight). Rows waiting for their
    rate slots sleep until then; one watcher looks at the stop flag for all of them."""

    AHEAD = 3

    def __init__(self, concurrency: int) -> None:
        self.size = max(1, concurrency)
        self.calls = asyncio.Semaphore(self.size)
        self.ahead = asyncio.Semaphore(self.AHEAD)
        self._sleepers: set[asyncio.Future[bool]] = set()
        self._watcher: asyncio.Task[None] | None = None

    async def sleep_until(self, deadline: float, stop: threading.Event) -> bool:
        """Sleep until `deadline` (time.monotonic); False, within STOP_POLL seconds, when
        the worker is stopping. One timer per sleeper, instead of a wake-up every
        STOP_POLL seconds for each (under a rate limit, most of the event loop's turns)."""
        delay = deadline - time.monotonic()
        if delay <= 0:
            return True
        if stop.is_set():
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        timer = loop.call_later(delay, _wake, waiter, True)
        self._sleepers.add(waiter)
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch(stop))
        try:
            return await waiter
        finally:
            timer.cancel()
            self._sleepers.discard(waiter)

    async def _watch(self, stop: threading.Event) -> None:
        while self._sleepers:
            if stop.is_set():
                for waiter in self._sleepers:
                    _wake(waiter, False)
                return
            await asyncio.sleep(STOP_POLL)


def _wake(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


async def send_batch_async(
    batch: Sequence[Claimed],
    futures: Sequence[Future[SendOutcome]],
    *,
    transport: AsyncTransport,
    limiter: RateLimiter,
    stop: threading.Event,
    lanes: Lanes,
    gate: SendGate,
) -> None:
    """send_claimed for a batch on the transport's event loop, each outcome set on its
    future (one hand-over to the loop per batch), a group of `lanes.size` rows at a time."""
    rows = list(zip(batch, futures, strict=True))
    groups = [rows[i : i + lanes.size] for i in range(0, len(rows), lanes.size)]
    sender = _GroupSender(transport, limiter, stop, lanes, gate)
    await asyncio.gather(*(sender.group(g) for g in groups))


@dataclass(frozen=True)
class _GroupSender:
    transport: AsyncTransport
    limiter: RateLimiter
    stop: threading.Event
    lanes: Lanes
    gate: SendGate

    async def group(self, rows: list[tuple[Claimed, Future[SendOutcome]]]) -> None:
        """Look up earlier attempts, take rate slots, pass the gate, send: as send_claimed
        does for one row. An exception is passed on to the rows not answered yet, as an
        executor would (they stay `sending`)."""
        try:
            async with self.lanes.ahead:
                await self._group(rows)
        except Exception as exc:
            for _, future in rows:
                if not future.done():
                    future.set_exception(exc)

    async def _group(self, rows: list[tuple[Claimed, Future[SendOutcome]]]) -> None:
        looked = await asyncio.gather(*(self._look_up(c) for c, _ in rows))
        todo = []
        for (claimed, future), outcome in zip(rows, looked, strict=True):
            if outcome is None:
                todo.append((claimed, future))
            else:
                future.set_result(outcome)
        if not todo:
            return
        slots = [time.monotonic() + self.limiter.reserve() for _ in todo]
        waiting = list(zip(todo, slots, strict=True))
        sends = []
        while waiting:  # rows whose rate slot comes within GATE_HORIZON pass the gate together
            if self.stop.is_set() or not await self.lanes.sleep_until(
                waiting[0][1] - GATE_LEAD, self.stop
            ):
                for (claimed, future), _ in waiting:
                    future.set_result(SendOutcome(claimed, released=True))
                break
            horizon = time.monotonic() + GATE_HORIZON
            due = [item for item in waiting if item[1] <= horizon]
            waiting = waiting[len(due) :]
            try:
                admitted = await self.gate.admit_group_async([c for (c, _), _ in due])
            except GateUnavailable:
                for (claimed, future), _ in due:
                    future.set_result(SendOutcome(claimed, released=True))
                continue
            failpoints.hit("send.group_admitted")
            sends += [
                asyncio.ensure_future(self._send(c, f, slot, c.outbox_id in admitted))
                for (c, f), slot in due
            ]
        await asyncio.gather(*sends)

    async def _look_up(self, claimed: Claimed) -> SendOutcome | None:
        """When an earlier attempt failed unclearly: its outcome if it went out after all
        (or if the provider cannot be asked now); None: send."""
        if claimed.previous_claim_at is None:
            return None
        failpoints.hit("send.before_lookup")
        try:
            async with self.lanes.calls:
                records = await self.transport.sent_since_async(
                    to=claimed.to, since=_lookup_since(claimed)
                )
        except ProviderError as exc:
            return _lookup_failed(claimed, exc)
        failpoints.hit("send.after_lookup")
        found = matching_records(records, to=claimed.to, body=claimed.body)
        if found:
            return SendOutcome(claimed, found=found)
        return SendOutcome(claimed, settled=True) if claimed.lookup_only else None

    async def _send(
        self, claimed: Claimed, future: Future[SendOutcome], slot: float, admitted: bool
    ) -> None:
        if not admitted:
            future.set_result(SendOutcome(claimed, withheld=True))
            return
        if not await self.lanes.sleep_until(slot, self.stop):
            future.set_result(SendOutcome(claimed, released=True))
            return
        try:
            async with self.lanes.calls:
                failpoints.hit("send.before_call")
                result = await self.transport.send_async(_message(claimed))
        except ProviderError as exc:
            failpoints.hit("send.after_error")
            future.set_result(SendOutcome(claimed, error=exc))
        else:
            failpoints.hit("send.after_call")
            future.set_result(SendOutcome(claimed, result=result))


def _lookup_since(claimed: Claimed) -> datetime:
    assert claimed.previous_claim_at is not None
    return claimed.previous_claim_at - LOOKUP_MARGIN


def _lookup_failed(claimed: Claimed, exc: ProviderError) -> SendOutcome:
    """Unknown whether the earlier attempt went out: retry later, never now."""
    return SendOutcome(claimed, error=ProviderError(f"lookup before retry failed: {exc.message}"))


def _message(claimed: Claimed) -> OutboundMessage:
    return OutboundMessage(to=claimed.to, body=claimed.body, reference=str(claimed.outbox_id))


def matching_records(
    records: Sequence[SentRecord] | None, *, to: str, body: str
) -> tuple[SentRecord, ...]:
    """The provider's messages that are this one (same number and text), oldest first.

    None (the provider cannot tell) matches nothing.
    """
    if not records:
        return ()
    same = (r for r in records if r.to == to and r.body == body)
    return tuple(sorted(same, key=lambda r: (r.created_at, r.provider_sid)))


def earliest(records: Sequence[SentRecord], *, taken: set[str]) -> SentRecord | None:
    """The first record whose sid no other outbox row holds (identical texts to a shared
    number are told apart that way)."""
    return next((r for r in records if r.provider_sid not in taken), None)


def describe(error: ProviderError) -> str:
    """last_error text: kind, HTTP status, code and the provider's words without numbers.

    Provider messages quote the destination number; no phone number is stored in clear.
    """
    return f"{error.kind}: HTTP {error.http_status or '-'} code {error.code or '-'}: " + scrub(
        error.message
    )


def scrub(text: str, limit: int = 300) -> str:
    """Mask anything that looks like a phone number and bound the length."""
    return _PHONE_LIKE.sub("[number]", text)[:limit]


def retry_at(now: datetime, attempts: int, rng: random.Random | None) -> datetime:
    return now + backoff_delay(attempts, rng=rng)
