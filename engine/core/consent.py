"""Current consent, derived from the append-only ledger of consent events."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from engine.core.domain import ConsentEvent, ConsentState

ConsentRow = tuple[str, str, str, datetime, str | None, str | None]
"""(purpose, channel, status, occurred_at, legal_basis, method) of one ledger event."""


def fold(events: Iterable[ConsentEvent]) -> dict[tuple[str, str], ConsentState]:
    """State per (purpose, channel): the latest event by occurrence time wins.

    Events recorded for the same instant keep their ledger order, so a revocation written
    after a grant at the same second still revokes.
    """
    ordered = sorted(enumerate(events), key=lambda pair: (pair[1].occurred_at, pair[0]))
    return fold_ordered(
        (e.purpose, e.channel, e.status, e.occurred_at, e.legal_basis, e.method) for _, e in ordered
    )


def fold_ordered(rows: Iterable[ConsentRow]) -> dict[tuple[str, str], ConsentState]:
    """`fold` of events already in order (by occurrence time, then ledger order), given as
    plain rows: what a database sorting the ledger hands over. Only the final state of each
    (purpose, channel) is built."""
    latest: dict[tuple[str, str], tuple[bool, str | None, str | None, datetime | None, Any]] = {}
    for purpose, channel, status, occurred_at, legal_basis, method in rows:
        key = (purpose, channel)
        if status == "granted":
            latest[key] = (True, legal_basis, method, occurred_at, None)
        else:  # a revocation keeps the basis and time of the grant it ends
            previous = latest.get(key)
            basis, granted = (previous[1], previous[3]) if previous else (None, None)
            latest[key] = (False, basis, method, granted, occurred_at)
    return {
        (purpose, channel): ConsentState(
            purpose=purpose,
            channel=channel,
            active=active,
            legal_basis=basis,
            method=method,
            granted_at=granted,
            revoked_at=revoked,
        )
        for (purpose, channel), (active, basis, method, granted, revoked) in latest.items()
    }


def current_consents(
    events: Iterable[ConsentEvent], *, purposes: Iterable[str], channel: str = "sms"
) -> Mapping[str, ConsentState]:
    """Consent for every purpose on one channel; a purpose never granted is inactive."""
    states = fold(e for e in events if e.channel == channel)
    return {
        purpose: states.get((purpose, channel), ConsentState(purpose=purpose, channel=channel))
        for purpose in purposes
    }
