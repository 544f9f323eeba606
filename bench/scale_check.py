"""The benchmark's correctness check: the planner's rows equal the straightforward path's.

For a random sample of patients, every occurrence the tick had to plan is decided again
the plain way, one patient at a time: definitions compiled afresh (no memo carried over),
the patient read on their own, consent folded from their ledger (engine.core.consent, not
the planner's batch fold), the campaigns' audiences and schedules, evaluate_occurrence for
each occurrence in due order with the earlier allowed ones counted as sent. The stored row
must have the same status, outcome, reasons (by rule), send time and text (the link's
random token aside).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from engine.core import schedule
from engine.core.domain import ConsentState, History, SentMessage
from engine.definitions import DefinitionSet, load_sources
from engine.dryrun import Candidate, DryRunSummary, anchors_of, in_audience, preview_link
from engine.evaluate import evaluate_occurrence
from engine.outbox_status import QUEUED
from engine.planner import DEFAULT_HORIZON
from engine.planner_rows import deny_suppressed, placement
from engine.store import consent_queries, outbox_queries, queries
from engine.store import models as m
from engine.store.defqueries import approved_versions
from engine.variables import PREVIEW_LINK_TOKEN


@dataclass
class SampleResult:
    patients: int = 0
    rows: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        verdict = "all equal" if not self.mismatches else f"{len(self.mismatches)} differ"
        return f"{self.patients} patients, {self.rows} rows: {verdict}"


def check_sample(p: Any, *, size: int, at: datetime, public_url: str) -> SampleResult:
    """Compare the stored rows of `size` random patients with the straightforward path."""
    defs = load_sources({f.path: f.content for f in p.defs.files}, root=p.defs.root)
    link = re.compile(re.escape(public_url) + r"/s/[A-Za-z0-9_-]+")
    result = SampleResult()
    with p.sessions() as session:
        approved = approved_versions(session=session)
        ids = session.scalars(select(m.Patient.id).where(m.Patient.erased_at.is_(None))).all()
        sample = sorted(random.Random(5).sample(list(ids), min(size, len(ids))))
        stored: dict[str, m.Outbox] = {
            row.idempotency_key: row
            for row in session.scalars(select(m.Outbox).where(m.Outbox.patient_id.in_(sample)))
        }
        suppressed = consent_queries.suppressed_patients(session=session, patient_ids=sample)
        where = m.Patient.id.in_(sample)
        for data in queries.iter_patients(session=session, keyring=p.keyring, where=where):
            consents = consent_queries.current_consents_for(
                session=session, keyring=p.keyring,
                patient_external_id=data.patient.external_id, purposes=list(defs.purposes),
            )  # fmt: skip
            candidate = Candidate(data.id, data.patient, data.prescriptions, data.appointments)
            expected = _expected(defs, candidate, consents, approved, at, public_url,
                                 data.id in suppressed)  # fmt: skip
            result.patients += 1
            for key, want in expected.items():
                row = stored.pop(key, None)
                result.rows += 1
                if row is None:
                    result.mismatches.append(f"{key}: not planned")
                    continue
                assert data.cipher is not None
                text = data.cipher.decrypt_field(outbox_queries.body_field(key), row.body_enc)
                got = (row.status, row.outcome, [r["rule"] for r in row.reasons], row.send_at,
                       link.sub(f"{public_url}/s/{PREVIEW_LINK_TOKEN}", text or ""))  # fmt: skip
                if got != want:
                    result.mismatches.append(f"{key}: stored {got}, expected {want}")
    result.mismatches.extend(f"{key}: planned but not expected" for key in stored)
    return result


def _expected(
    defs: DefinitionSet,
    candidate: Candidate,
    consents: dict[str, ConsentState] | Any,
    approved: set[str],
    at: datetime,
    public_url: str,
    suppressed: bool,
) -> dict[str, tuple[Any, ...]]:
    items = []
    for campaign_id in sorted(defs.campaigns):
        campaign = defs.campaigns[campaign_id]
        if campaign.status != "active":
            continue
        audience = defs.audiences.get(campaign.id)
        for anchor in anchors_of(campaign, candidate):
            if audience is not None and not in_audience(
                audience, candidate, anchor, at, DryRunSummary()
            ):
                continue
            for occurrence in schedule.occurrences(
                campaign, candidate.patient, anchor,
                not_after=at + DEFAULT_HORIZON, alive_at=at,
            ):  # fmt: skip
                items.append((campaign, anchor, occurrence))
    items.sort(key=lambda item: item[2].due_at)
    sent: list[SentMessage] = []
    out: dict[str, tuple[Any, ...]] = {}
    for campaign, anchor, occurrence in items:
        decided_for = max(at, occurrence.due_at)
        evaluation = evaluate_occurrence(
            defs, campaign=campaign, patient=candidate.patient, anchor=anchor,
            occurrence=occurrence, consents=consents, history=History(tuple(sent)),
            now=decided_for, approved_versions=approved,
            link=preview_link(defs, public_url, campaign),
        )  # fmt: skip
        decision = deny_suppressed(evaluation.decision) if suppressed else evaluation.decision
        status, send_at, reasons = placement(decision, decided_for, occurrence.expires_at)
        if status == QUEUED:
            sent.append(SentMessage(send_at or decided_for, campaign.purpose))
        text = evaluation.rendered.text if evaluation.rendered else ""
        out[occurrence.idempotency_key] = (
            status, decision.outcome, [r.rule for r in reasons], send_at, text,
        )  # fmt: skip
    return out
