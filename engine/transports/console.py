"""The console transport: prints what would be sent; nothing leaves the machine."""

from __future__ import annotations

import sys
import threading
import uuid
from datetime import datetime
from typing import TextIO

from engine.transports.base import OutboundMessage, SendResult, SentRecord


class ConsoleTransport:
    """Writes each message to `stream` (stderr by default) and accepts it."""

    name = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: OutboundMessage) -> SendResult:
        sid = "CONSOLE" + uuid.uuid4().hex
        stream = self._stream or sys.stderr
        with self._lock:  # one message's lines stay together when threads share the stream
            stream.write(f"--- SMS {sid} to {message.to} (ref {message.reference})\n")
            stream.write(f"{message.body}\n")
            stream.flush()
        return SendResult(provider_sid=sid, status="sent")

    def sent_since(self, *, to: str, since: datetime) -> list[SentRecord] | None:
        """Nothing is kept, so it cannot tell."""
        return None
