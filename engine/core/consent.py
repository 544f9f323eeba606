"""Current consent, derived from the append-only ledger of consent events."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from datetime import datetime
from typing import TypeVar

from engine.core.domain import ConsentEvent, ConsentState

K = TypeVar("K", bound=Hashable)

Latest = tuple[bool, str | None, str | None, datetime | None, datetime | None]
"""(active, legal_basis, method, granted_at, revoked_at): a ConsentState's varying fields."""


def fold(events: Iterable[ConsentEvent]) -> dict[tuple[str, str], ConsentState]:
    """State per (purpose, channel): the latest event by occurrence time wins.

    Events recorded for the same instant keep their ledger order, so a revocation written
    after a grant at the same second still revokes.
    """
    ordered = sorted(enumerate(events), key=lambda pair: (pair[1].occurred_at, pair[0]))
    latest = fold_latest(
        ((e.purpose, e.channel), e.status, e.occurred_at, e.legal_basis, e.method)
        for _, e in ordered
    )
    return {
        (purpose, channel): ConsentState(purpose, channel, *fields)
        for (purpose, channel), fields in latest.items()
    }


def fold_latest(
    rows: Iterable[tuple[K, str, datetime, str | None, str | None]],
) -> dict[K, Latest]:
    """The fold itself, for rows of (key, status, occurred_at, legal_basis, method) in
    order, any key (a (purpose, channel), or a (patient, purpose) for a batch of ledgers
    read at once): a grant makes the key active with its basis and time; a revocation
    ends it and keeps the basis and time of the grant it ends."""
    latest: dict[K, Latest] = {}
    for key, status, occurred_at, legal_basis, method in rows:
        if status == "granted":
            latest[key] = (True, legal_basis, method, occurred_at, None)
        else:
            previous = latest.get(key)
            basis, granted = (previous[1], previous[3]) if previous else (None, None)
            latest[key] = (False, basis, method, granted, occurred_at)
    return latest


def current_consents(
    events: Iterable[ConsentEvent], *, purposes: Iterable[str], channel: str = "sms"
) -> Mapping[str, ConsentState]:
    """Consent for every purpose on one channel; a purpose never granted is inactive."""
    states = fold(e for e in events if e.channel == channel)
    return {
        purpose: states.get((purpose, channel), ConsentState(purpose=purpose, channel=channel))
        for purpose in purposes
    }
