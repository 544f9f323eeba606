"""The life of an outbox row.

    planned:   queued (allowed; waits for send_at), deferred (re-decided at send_at)
    closed at planning or dispatch: blocked (denied, with reasons), expired, cancelled
    dispatch:  sending (committed before the provider call), sent (accepted, provider sid
               recorded), failed (final error), unknown (a crash left it sending and the
               provider could not tell: surfaced, never resent)
    callbacks: delivered, undelivered (status only moves forward)
A transient failure puts a row back to queued with a later send_at and attempts + 1.
"""

from __future__ import annotations

QUEUED = "queued"
DEFERRED = "deferred"
BLOCKED = "blocked"
EXPIRED = "expired"
CANCELLED = "cancelled"
SENDING = "sending"
SENT = "sent"
FAILED = "failed"
UNKNOWN = "unknown"
DELIVERED = "delivered"
UNDELIVERED = "undelivered"

WAITING = frozenset({QUEUED, DEFERRED})
FINAL = frozenset({BLOCKED, EXPIRED, CANCELLED, SENT, FAILED, UNKNOWN, DELIVERED, UNDELIVERED})
# Rows that count as messages to the patient for frequency caps (sent or committed to be).
COUNTS_AS_SENT = frozenset({SENDING, SENT, DELIVERED, UNDELIVERED, UNKNOWN})
