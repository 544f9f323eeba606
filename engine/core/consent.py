"""Current consent, derived from the append-only ledger of consent events."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from engine.core.domain import ConsentEvent, ConsentState


def fold(events: Iterable[ConsentEvent]) -> dict[tuple[str, str], ConsentState]:
    """State per (purpose, channel): the latest event by occurrence time wins.

    Events recorded for the same instant keep their ledger order, so a revocation written
    after a grant at the same second still revokes.
    """
    ordered = sorted(enumerate(events), key=lambda pair: (pair[1].occurred_at, pair[0]))
    states: dict[tuple[str, str], ConsentState] = {}
    for _, event in ordered:
        key = (event.purpose, event.channel)
        previous = states.get(key)
        if event.status == "granted":
            states[key] = ConsentState(
                purpose=event.purpose,
                channel=event.channel,
                active=True,
                legal_basis=event.legal_basis,
                method=event.method,
                granted_at=event.occurred_at,
            )
        else:
            states[key] = ConsentState(
                purpose=event.purpose,
                channel=event.channel,
                active=False,
                legal_basis=previous.legal_basis if previous else None,
                method=event.method,
                granted_at=previous.granted_at if previous else None,
                revoked_at=event.occurred_at,
            )
    return states


def current_consents(
    events: Iterable[ConsentEvent], *, purposes: Iterable[str], channel: str = "sms"
) -> Mapping[str, ConsentState]:
    """Consent for every purpose on one channel; a purpose never granted is inactive."""
    states = fold(e for e in events if e.channel == channel)
    return {
        purpose: states.get((purpose, channel), ConsentState(purpose=purpose, channel=channel))
        for purpose in purposes
    }
