"""Whole decisions remembered by the facts their rules read.

Most decisions of a tick are made on the same facts: the same message (the rendered text of
a template without names has one length), the same time, no consent for the purpose or the
same legal basis, no history, one of a few zones and countries. A decision is a function
of the facts its rules read, so it is made once per distinct `DecisionKeys.key` and shared.

A key is built from the raw inputs the variables derive from, not from the variables (that
would cost what it saves): equal keys mean equal inputs to every rule of the set, so equal
decisions. A set whose expressions read something this module does not know how to key
is not memoized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.core.cel_uses import Uses
from engine.core.cel_variables import PATIENT_SOURCES
from engine.core.domain import ConsentState, Decision, DecisionContext, Patient
from engine.core.memo import keep, recall

MEMO_LIMIT = 8192
POLICY_ERROR = "policy-error: "

_CONSENT_FIELDS = frozenset({"active", "legal_basis", "method", "granted_at"})
_MESSAGE_PURPOSE = ("message", ("purpose",))
_KNOWN_NAMES = frozenset({"patient", "consent", "message", "local", "history", "now"})


@dataclass(frozen=True)
class DecisionKeys:
    """How to key the decisions of one policy set, and the decisions made so far."""

    patient_fields: tuple[Callable[[Patient, datetime], object], ...]
    purposes: tuple[str, ...] | None
    """The purposes whose consent expressions read besides the message's (None: any)."""
    granted_at: bool
    """Whether an expression reads consent timestamps (else they are left out of keys)."""
    history: bool
    """Whether a rule counts or an expression reads the history."""
    decisions: dict[tuple[Any, ...], Decision] = field(
        default_factory=dict, compare=False, repr=False
    )

    def key(self, ctx: DecisionContext) -> tuple[Any, ...]:
        """Everything the set's rules read of `ctx`, as a hashable tuple."""
        patient, consents, granted_at = ctx.patient, ctx.consents, self.granted_at
        own = _consent_key(consents.get(ctx.message.purpose), granted_at, revoked=True)
        if self.purposes is None:
            read = tuple((p, _consent_key(s, granted_at)) for p, s in consents.items())
        else:
            read = tuple([_consent_key(consents.get(p), granted_at) for p in self.purposes])
        return (
            ctx.now,
            ctx.now.tzinfo,  # equal instants in other zones print differently
            ctx.message,
            patient.zones,
            tuple([source(patient, ctx.now) for source in self.patient_fields]),
            own,
            read,
            _history_key(ctx) if self.history else None,
        )

    def remembered(self, key: tuple[Any, ...]) -> Decision | None:
        return recall(self.decisions, key)

    def remember(self, key: tuple[Any, ...], decision: Decision) -> None:
        """Keep `decision` unless a rule failed on it (errors are not remembered)."""
        if not any(r.message.startswith(POLICY_ERROR) for r in decision.trace):
            keep(self.decisions, key, decision, limit=MEMO_LIMIT)


def decision_keys(uses: Uses, kinds: set[str]) -> DecisionKeys | None:
    """The keys for a set whose expressions read `uses` and whose rules are of `kinds`;
    None when something read cannot be keyed (then decisions are not remembered)."""
    if not uses.names <= _KNOWN_NAMES:
        return None
    patient: set[str] = set()
    consent: set[str] = set()
    purposes: set[str] | None = set()
    for read in uses.reads.values():
        if read.name == "patient":
            patient.update(read.path[:1] or PATIENT_SOURCES)
        elif read.name == "consent":
            fields = read.path[:1] if read.index is not None else read.path[1:2]
            consent.update(fields or _CONSENT_FIELDS)
            if read.index is None and read.path and purposes is not None:
                purposes.add(read.path[0])
            elif read.index != _MESSAGE_PURPOSE:  # the whole map, or an entry of any key
                purposes = None
    if not patient <= set(PATIENT_SOURCES) or not consent <= _CONSENT_FIELDS:
        return None
    return DecisionKeys(
        patient_fields=tuple(PATIENT_SOURCES[f] for f in sorted(patient)),
        purposes=None if purposes is None else tuple(sorted(purposes)),
        granted_at="granted_at" in consent,
        history="history" in uses.names or "frequency_cap" in kinds,
    )


def _history_key(ctx: DecisionContext) -> tuple[object, ...]:
    sent = ctx.history.sent
    return tuple([(m.at, m.at.tzinfo, m.purpose) for m in sent]) if sent else ()


def _consent_key(state: ConsentState | None, granted_at: bool, *, revoked: bool = False) -> object:
    """What rules read of a consent state: the fields expressions see and, for the
    message's purpose (`revoked`), the consent rule's (its message names the day of a
    revocation)."""
    if state is None:
        return None
    day = state.revoked_at.date() if revoked and state.revoked_at is not None else None
    granted = (state.granted_at, getattr(state.granted_at, "tzinfo", None)) if granted_at else None
    return (state.active, state.channel, state.legal_basis, state.method, day, granted)
