"""Dry-run: decide every occurrence the planner would handle at a time, writing nothing.

"As if nothing had been sent yet": the history is empty, so frequency caps see only what
the dry-run itself would send to the same patient earlier in the same run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any

from engine.core import schedule
from engine.core.audience_memo import AudienceMemo, audience_memo
from engine.core.cel_context import CompiledExpression
from engine.core.cel_variables import LazyAudienceVariables, local_today
from engine.core.domain import (
    Appointment,
    Campaign,
    ConsentState,
    History,
    Patient,
    Prescription,
    SentMessage,
)
from engine.core.frozen import fast_init
from engine.core.memo import keep
from engine.core.policy import RULE_ERRORS
from engine.crypto import PatientCipher
from engine.definitions import DefinitionSet
from engine.evaluate import Evaluation, evaluate_occurrence
from engine.variables import PREVIEW_LINK_TOKEN

Anchor = Prescription | Appointment | None
ConsentLookup = Callable[[list[int]], Mapping[int, Mapping[str, ConsentState]]]


@fast_init
@dataclass(frozen=True)
class Candidate:
    """A patient row as the store streams it."""

    row_id: int
    patient: Patient
    prescriptions: tuple[Prescription, ...] = ()
    appointments: tuple[Appointment, ...] = ()
    cipher: PatientCipher | None = None


@dataclass
class DryRunSummary:
    outcomes: Counter[str] = field(default_factory=Counter)
    deciding_rules: Counter[str] = field(default_factory=Counter)
    patients_seen: int = 0
    in_audience: int = 0
    unapproved_templates: set[str] = field(default_factory=set)
    audience_errors: int = 0

    def merge(self, other: DryRunSummary) -> None:
        """Add the counts of another part of the same run (another process's share)."""
        self.outcomes.update(other.outcomes)
        self.deciding_rules.update(other.deciding_rules)
        self.patients_seen += other.patients_seen
        self.in_audience += other.in_audience
        self.unapproved_templates |= other.unapproved_templates
        self.audience_errors += other.audience_errors

    def add(self, evaluation: Evaluation, count: int = 1) -> None:
        """Count `count` evaluations like this one."""
        decision = evaluation.decision
        self.outcomes[decision.outcome] += count
        if decision.outcome != "allow":
            self.deciding_rules[decision.deciding_rule or "?"] += count
        if not evaluation.approved:
            t = evaluation.template
            self.unapproved_templates.add(f"{t.file} ({t.version})")


def anchors_of(campaign: Campaign, candidate: Candidate) -> tuple[Anchor, ...]:
    if campaign.anchor == "prescription":
        return candidate.prescriptions
    if campaign.anchor == "appointment":
        return candidate.appointments
    return (None,)


def preview_link(defs: DefinitionSet, public_url: str, campaign: Campaign) -> str | None:
    """A stand-in of the real link's length: dry-runs and previews mint no tokens."""
    return f"{public_url}/s/{PREVIEW_LINK_TOKEN}" if campaign.link else None


def dry_run(
    defs: DefinitionSet,
    *,
    campaign: Campaign,
    candidates: Iterable[Candidate],
    consents_for: ConsentLookup,
    at: datetime,
    approved_versions: Collection[str],
    public_url: str,
    summary: DryRunSummary,
    batch_size: int = 1000,
) -> Iterator[Evaluation]:
    """Yield an evaluation per occurrence due at or before `at` and alive at `at`."""
    audience = defs.audiences.get(campaign.id)
    link = preview_link(defs, public_url, campaign)
    iterator = iter(candidates)
    while batch := list(islice(iterator, batch_size)):
        consents = consents_for([c.row_id for c in batch])
        for candidate in batch:
            summary.patients_seen += 1
            sent: list[SentMessage] = []
            seen_in_audience = False
            for anchor in anchors_of(campaign, candidate):
                if audience is not None and not in_audience(
                    audience, candidate, anchor, at, summary
                ):
                    continue
                seen_in_audience = True
                found = schedule.occurrences(
                    campaign, candidate.patient, anchor, not_after=at, alive_at=at
                )
                for occurrence in found:
                    evaluation = evaluate_occurrence(
                        defs,
                        campaign=campaign,
                        patient=candidate.patient,
                        anchor=anchor,
                        occurrence=occurrence,
                        consents=consents.get(candidate.row_id, {}),
                        history=History(tuple(sent)),
                        now=at,
                        approved_versions=approved_versions,
                        link=link,
                    )
                    if evaluation.decision.outcome == "allow":
                        sent.append(SentMessage(at, campaign.purpose))
                    summary.add(evaluation)
                    yield evaluation
            summary.in_audience += seen_in_audience


def in_audience(
    audience: CompiledExpression,
    candidate: Candidate,
    anchor: Anchor,
    at: datetime,
    summary: DryRunSummary,
) -> bool:
    """The campaign's audience `where`; an error evaluating it leaves the patient out.
    Results are remembered by the facts the audience reads (engine.core.audience_memo)."""
    patient = candidate.patient
    try:
        memo = _memo_of(audience)
        if memo is None:
            variables = LazyAudienceVariables(patient, anchor, at)
            return audience.evaluate_memoized(variables) is True
        local_today(at, patient.zones[0])  # a zone that does not exist fails, as it would
        key = memo.key(patient, anchor, at)
        known = memo.remembered(key)
        if known is None:
            known = audience.evaluate(LazyAudienceVariables(patient, anchor, at)) is True
            memo.remember(key, known)
        return known
    except RULE_ERRORS:
        summary.audience_errors += 1
        return False


_MEMOS: dict[int, tuple[CompiledExpression, AudienceMemo | None]] = {}


def _memo_of(audience: CompiledExpression) -> AudienceMemo | None:
    entry = _MEMOS.get(id(audience))
    if entry is None or entry[0] is not audience:  # not another's, whose id was reused
        entry = (audience, audience_memo(audience.uses))
        keep(_MEMOS, id(audience), entry, limit=256)
    return entry[1]


def decision_json(evaluation: Evaluation) -> dict[str, Any]:
    """One entry of `dry-run --json`'s `decisions`, as DESIGN.md specifies (plus extras)."""
    o, d, r = evaluation.occurrence, evaluation.decision, evaluation.rendered
    return {
        "patient": o.patient,
        "occurrence": f"{o.anchor}/{o.label}",
        "idempotency_key": o.idempotency_key,
        "due_at": o.due_at.isoformat(),
        "outcome": d.outcome,
        "send_at": d.send_at.isoformat() if d.send_at else None,
        "template": evaluation.template.id,
        "template_version": evaluation.template.version,
        "approved": evaluation.approved,
        "locale": evaluation.template.locale,
        "segments": r.segments if r else None,
        "encoding": r.encoding if r else None,
        "text": r.text if r else None,
        "reasons": [
            {
                "rule": x.rule,
                "policy": x.policy,
                "effect": x.effect,
                "message": x.message,
                "cite": x.cite,
            }
            for x in d.reasons
        ],
    }
