"""One planned occurrence as an outbox row: status, send time, reasons, sealed body, link."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any

from engine import outbox_status as st
from engine.core.domain import (
    Campaign,
    ConsentState,
    Decision,
    History,
    Occurrence,
    Patient,
    RuleResult,
)
from engine.core.frozen import fast_init
from engine.core.memo import keep
from engine.crypto import PatientCipher, new_token
from engine.definitions import DefinitionSet
from engine.dryrun import Anchor, preview_link
from engine.evaluate import Evaluation, evaluate_occurrence
from engine.store.codec import SEALED_FIELDS
from engine.store.outbox_queries import body_field
from engine.variables import SEALED_SOURCES, VARIABLES

# TCPA: a revocation by any reasonable means must be honoured; erasure keeps the number here.
SUPPRESSED = RuleResult(
    rule="suppressed",
    policy="engage",
    effect="deny",
    message="the patient's number is on the suppression list (STOP or erasure)",
    cite="47 CFR 64.1200(a)(10)",
)


@fast_init
@dataclass(frozen=True)
class Pending:
    """An occurrence due within the horizon, for a patient row, not yet in the outbox."""

    patient_row: int
    patient: Patient
    campaign: Campaign
    anchor: Anchor
    occurrence: Occurrence


@fast_init
@dataclass(frozen=True)
class PlannedRow:
    """The outbox row's column values and, when it may be sent, its link's row (hash only)."""

    values: Mapping[str, Any]
    evaluation: Evaluation
    link: Mapping[str, Any] | None = None

    @property
    def key(self) -> str:
        return str(self.values["idempotency_key"])

    @property
    def status(self) -> str:
        return str(self.values["status"])


@dataclass(frozen=True)
class RowContext:
    """What every row of one tick shares."""

    defs: DefinitionSet
    now: datetime
    approved_versions: Collection[str]
    public_url: str


def sealed_fields(defs: DefinitionSet, campaigns: Iterable[Campaign]) -> frozenset[str]:
    """The sealed patient fields planning these campaigns reads (the others need not be
    decrypted): the birth date (ages), and a name or a medication when a variant of a
    campaign's template, or its audience, reads it. Every field for a template reading a
    variable not known here."""
    needed = {"birth_date"}
    for campaign in campaigns:
        for (template_id, _), compiled in defs.compiled_templates.items():
            if template_id != campaign.template:
                continue
            if not set(compiled.reads) <= VARIABLES:
                return SEALED_FIELDS
            needed.update(SEALED_SOURCES[n] for n in compiled.reads if n in SEALED_SOURCES)
        audience = defs.audiences.get(campaign.id)
        reads = audience.uses.reads.values() if audience is not None else ()
        if any(r.name == "prescription" and r.path[:1] in ((), ("medication",)) for r in reads):
            needed.add("medication")
    return frozenset(needed)


def reason_json(r: RuleResult) -> dict[str, Any]:
    return {
        "rule": r.rule,
        "policy": r.policy,
        "effect": r.effect,
        "message": r.message,
        "cite": r.cite,
    }


@lru_cache(maxsize=4096)
def reasons_json(reasons: tuple[RuleResult, ...]) -> list[dict[str, Any]]:
    """A row's reasons as stored; rows with the same reasons share one list (the rules
    memoize their results), which the outbox insert converts once per batch. Not to be
    mutated."""
    return [reason_json(r) for r in reasons]


def expired_reason(expires_at: datetime) -> RuleResult:
    return RuleResult(
        rule="expired",
        policy="engage",
        effect="deny",
        message=f"deferred past its expiry at {expires_at.isoformat()}",
    )


_REASONS: dict[int, tuple[Decision, tuple[RuleResult, ...]]] = {}


def _reasons(decision: Decision) -> tuple[RuleResult, ...]:
    """decision.reasons, kept for the decisions shared by many rows (engine.core.policy_memo)
    so that they are the same tuple, whose stored form reasons_json makes once."""
    known = _REASONS.get(id(decision))
    if known is not None and known[0] is decision:  # not another's, whose id was reused
        return known[1]
    return keep(_REASONS, id(decision), (decision, decision.reasons), limit=4096)[1]


def placement(
    decision: Decision, decided_for: datetime, expires_at: datetime
) -> tuple[str, datetime | None, tuple[RuleResult, ...]]:
    """(status, send_at, reasons) for a decision: allow queues at the decision time, defer
    waits for the deferring rule (re-decided at dispatch), deny blocks; a deferral that
    lands at or past the expiry is expired at once."""
    reasons = _reasons(decision)
    if decision.outcome == "allow":
        return st.QUEUED, decided_for, reasons
    if decision.outcome == "deny":
        return st.BLOCKED, None, reasons
    send_at = decision.send_at or decided_for
    if send_at >= expires_at:
        return st.EXPIRED, send_at, (*reasons, expired_reason(expires_at))
    return st.DEFERRED, send_at, reasons


def planned_row(
    ctx: RowContext,
    *,
    item: Pending,
    consents: Mapping[str, ConsentState],
    history: History,
    suppressed: bool,
    cipher: PatientCipher,
) -> PlannedRow:
    """Render and decide an occurrence for its due time (or now, if later), then build its
    row. A link is minted for every occurrence of a link campaign but kept only when the
    row may be sent; a blocked or expired body carries the placeholder link instead."""
    campaign, occurrence = item.campaign, item.occurrence
    decided_for = max(ctx.now, occurrence.due_at)
    token, token_digest = new_token() if campaign.link else (None, None)
    link = f"{ctx.public_url}/s/{token}" if token else None
    evaluation = evaluate_occurrence(
        ctx.defs,
        campaign=campaign,
        patient=item.patient,
        anchor=item.anchor,
        occurrence=occurrence,
        consents=consents,
        history=history,
        now=decided_for,
        approved_versions=ctx.approved_versions,
        link=link,
    )
    if suppressed:
        evaluation = replace(evaluation, decision=deny_suppressed(evaluation.decision))
    status, send_at, reasons = placement(evaluation.decision, decided_for, occurrence.expires_at)
    text = evaluation.rendered.text if evaluation.rendered else None
    keeps_link = link is not None and status in st.WAITING
    if link is not None and text is not None and not keeps_link:
        text = text.replace(link, preview_link(ctx.defs, ctx.public_url, campaign) or "")
    values = _row_values(ctx, item, evaluation, status, send_at, reasons)
    values["body_enc"] = cipher.encrypt_field(body_field(occurrence.idempotency_key), text)
    link_row = None
    if keeps_link and campaign.link is not None:
        link_row = {
            "token_hash": token_digest,
            "patient_id": item.patient_row,
            "kind": campaign.link.kind,
            "expires_at": occurrence.due_at + campaign.link.expires_after,
            "clicks": 0,
        }
    return PlannedRow(values, evaluation, link_row)


def deny_suppressed(decision: Decision) -> Decision:
    return replace(decision, outcome="deny", send_at=None, trace=(*decision.trace, SUPPRESSED))


def _row_values(
    ctx: RowContext,
    item: Pending,
    evaluation: Evaluation,
    status: str,
    send_at: datetime | None,
    reasons: tuple[RuleResult, ...],
) -> dict[str, Any]:
    occurrence, template, rendered = item.occurrence, evaluation.template, evaluation.rendered
    return {
        "idempotency_key": occurrence.idempotency_key,
        "campaign_id": item.campaign.id,
        "campaign_version": item.campaign.version,
        "template_id": template.id,
        "template_version": template.version,
        "locale": template.locale,
        "purpose": item.campaign.purpose,
        "patient_id": item.patient_row,
        "occurrence": occurrence.label,
        "anchor": occurrence.anchor,
        "outcome": evaluation.decision.outcome,
        "status": status,
        "due_at": occurrence.due_at,
        "send_at": send_at,
        "expires_at": occurrence.expires_at,
        "segments": rendered.segments if rendered else None,
        "encoding": rendered.encoding if rendered else None,
        "reasons": reasons_json(reasons),
        "policy_set": ctx.defs.policy_version,
        "decided_at": ctx.now,
        "attempts": 0,
    }
