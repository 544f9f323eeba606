"""Status callbacks: each status change POSTed to the message's StatusCallback URL, in
order, signed like Twilio (X-Twilio-Signature), from background threads."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import requests
from twilio.request_validator import RequestValidator

from engine.sandbox.store import API_VERSION, MessageStore, SandboxMessage, StatusStep, utcnow

log = logging.getLogger(__name__)


def callback_params(message: SandboxMessage, step: StatusStep) -> dict[str, str]:
    """The form fields Twilio posts to a StatusCallback URL for one status change."""
    params = {
        "AccountSid": message.account_sid,
        "ApiVersion": API_VERSION,
        "From": message.from_ or "",
        "MessageSid": message.sid,
        "MessageStatus": step.status,
        "SmsSid": message.sid,
        "SmsStatus": step.status,
        "To": message.to,
    }
    if message.messaging_service_sid:
        params["MessagingServiceSid"] = message.messaging_service_sid
    if step.error_code is not None:
        params["ErrorCode"] = str(step.error_code)
    return params


@dataclass(frozen=True, order=True)
class _Job:
    due: datetime
    seq: int
    sid: str
    step_index: int
    attempt: int = 1


class CallbackSender:
    """Delivers every step of a message's timeline once it is due, one step at a time per
    message so a receiver sees them in order. A receiver that is down is retried
    `attempts` times with doubling delays, then the callback is logged and dropped."""

    def __init__(
        self,
        store: MessageStore,
        *,
        auth_token: str,
        attempts: int = 3,
        retry_delay: timedelta = timedelta(milliseconds=200),
        timeout_seconds: float = 5.0,
        workers: int = 4,
    ) -> None:
        self._store = store
        self._validator = RequestValidator(auth_token)
        self._attempts = attempts
        self._retry_delay = retry_delay
        self._timeout = timeout_seconds
        self._workers = workers
        self._queue: list[_Job] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._session: requests.Session | None = None
        self._counts_lock = threading.Lock()
        self.posted = 0  # answered by the receiver (any status below 500)
        self.dropped = 0  # given up after `attempts` tries

    def _start(self) -> None:
        """Start the threads on the first callback: a sandbox whose messages ask for none
        runs none. Called with `_cond` held."""
        self._session = requests.Session()
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="sandbox-callback")
        self._thread = threading.Thread(target=self._run, name="sandbox-callbacks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._session is not None:
            self._session.close()

    def schedule(self, message: SandboxMessage) -> None:
        """Queue the callbacks of a newly accepted message (it must have a StatusCallback)."""
        self._push(_Job(message.timeline[0].at, next(self._seq), message.sid, 0))

    def clear(self) -> None:
        with self._cond:
            self._queue.clear()

    def _push(self, job: _Job) -> None:
        with self._cond:
            if self._stopped:
                return
            if self._thread is None:
                self._start()
            heapq.heappush(self._queue, job)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._queue or self._queue[0].due > utcnow()):
                    wait = (self._queue[0].due - utcnow()).total_seconds() if self._queue else None
                    self._cond.wait(timeout=wait)
                if self._stopped:
                    return
                job = heapq.heappop(self._queue)
            assert self._pool is not None
            try:
                self._pool.submit(self._deliver, job)
            except RuntimeError:  # the pool was shut down by stop()
                return

    def _deliver(self, job: _Job) -> None:
        message = self._store.get(job.sid)
        if message is None or not message.status_callback:
            return  # the store was reset meanwhile
        step = message.timeline[job.step_index]
        if self._post(message.status_callback, callback_params(message, step)):
            with self._counts_lock:
                self.posted += 1
        elif job.attempt < self._attempts:
            delay = self._retry_delay * (2 ** (job.attempt - 1))
            self._push(
                _Job(utcnow() + delay, next(self._seq), job.sid, job.step_index, job.attempt + 1)
            )
            return
        else:
            with self._counts_lock:
                self.dropped += 1
            log.warning(
                "status callback %s for %s to %s dropped after %d attempts",
                step.status,
                message.sid,
                message.status_callback,
                job.attempt,
            )
        self._next_step(message, job.step_index + 1)

    def _next_step(self, message: SandboxMessage, index: int) -> None:
        if index < len(message.timeline):
            due = max(message.timeline[index].at, utcnow())
            self._push(_Job(due, next(self._seq), message.sid, index))

    def _post(self, url: str, params: dict[str, str]) -> bool:
        headers = {
            "X-Twilio-Signature": self._validator.compute_signature(url, params),
            "User-Agent": "TwilioProxy/1.1",
        }
        assert self._session is not None
        try:
            response = self._session.post(url, data=params, headers=headers, timeout=self._timeout)
        except requests.RequestException as exc:
            log.info("status callback to %s failed: %s", url, exc)
            return False
        if response.status_code >= 500:
            log.info("status callback to %s answered %s", url, response.status_code)
            return False
        return True
