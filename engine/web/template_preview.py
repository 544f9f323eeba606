"""A template variant previewed as edited, for one patient or a synthetic sample: the text
the patient would get, its encoding and segments, lint, and what every policy rule would
decide if it went now. Shared by the campaign page and the template editor.

The edited text is loaded with the whole active set (as saving a draft checks it), so a
preview fails with exactly the file:line problems a save would report. Nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from engine import drafts
from engine.cli_decide import campaign_for, candidates, consent_lookup
from engine.core import schedule, sms
from engine.core.domain import (
    Appointment,
    Campaign,
    ConsentState,
    Decision,
    History,
    Occurrence,
    Patient,
    Prescription,
    RenderedMessage,
    RuleResult,
)
from engine.core.lint import LintReport
from engine.definitions import DefinitionSet, load_sources
from engine.dryrun import DryRunSummary, anchors_of, in_audience, preview_link
from engine.evaluate import evaluate_occurrence
from engine.runtime import Runtime
from engine.store import models as m
from engine.store.defqueries import approved_versions
from engine.yamlsource import SourceErrors

SAMPLE = "sample"  # the synthetic patient's value in the patient select
SAMPLE_ZONE = "America/New_York"
Anchor = Prescription | Appointment | None


@dataclass(frozen=True)
class Meter:
    """How much of its segments a message fills."""

    encoding: str
    length: int
    segments: int

    @property
    def capacity(self) -> int:
        single, part = (
            (sms.GSM_SINGLE, sms.GSM_PART)
            if self.encoding == "GSM-7"
            else (sms.UCS2_SINGLE, sms.UCS2_PART)
        )
        return single if self.segments <= 1 else part * self.segments

    @property
    def unit(self) -> str:
        return "characters" if self.encoding == "GSM-7" else "UTF-16 units"


@dataclass
class Preview:
    template_id: str
    locale: str
    patient: str
    at: datetime
    version: str | None = None
    edited: bool = False
    problems: list[str] = field(default_factory=list)  # file:line, why it does not load
    lint: LintReport | None = None
    rendered: RenderedMessage | None = None
    decision: Decision | None = None
    approved: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def meter(self) -> Meter | None:
        r = self.rendered
        return Meter(r.encoding, r.length, r.segments) if r else None

    @property
    def stopping(self) -> list[RuleResult]:
        """The rules that would block or defer the message, with their reasons."""
        trace = self.decision.trace if self.decision else ()
        return [r for r in trace if r.effect in ("deny", "defer")]

    def to_json(self) -> dict[str, Any]:
        d, r = self.decision, self.rendered
        return {
            "template": self.template_id,
            "locale": self.locale,
            "patient": self.patient,
            "at": self.at.isoformat(),
            "version": self.version,
            "edited": self.edited,
            "approved": self.approved,
            "problems": self.problems,
            "lint": [
                {"severity": i.severity, "line": i.line, "message": i.message}
                for i in (self.lint.issues if self.lint else ())
            ],
            "text": r.text if r else None,
            "encoding": r.encoding if r else None,
            "segments": r.segments if r else None,
            "length": r.length if r else None,
            "outcome": d.outcome if d else None,
            "send_at": d.send_at.isoformat() if d and d.send_at else None,
            "reasons": [
                {
                    "rule": x.rule,
                    "policy": x.policy,
                    "effect": x.effect,
                    "message": x.message,
                    "cite": x.cite,
                }
                for x in self.stopping
            ],
            "notes": self.notes,
        }


def campaign_for_template(defs: DefinitionSet, template_id: str) -> Campaign:
    """A campaign that sends the template (as its message, else as its booking
    confirmation), else a stand-in without an anchor, as `engage preview` picks one."""
    found = campaign_for(defs, template_id)
    if found.template == template_id and found.id in defs.campaigns:
        return found
    for campaign in defs.campaigns.values():
        if campaign.link and campaign.link.confirmation == template_id:
            return replace(campaign, template=template_id)
    return found


def build_preview(
    rt: Runtime,
    session: Session,
    defs: DefinitionSet,
    *,
    campaign: Campaign,
    locale: str,
    source: str | None,
    patient: str,
    now: datetime,
) -> Preview:
    """Render and decide the variant (as edited in `source`, if given) for `patient` (an
    external id, or SAMPLE) as if it were sent at `now` with nothing sent before."""
    result = Preview(campaign.template, locale, patient, now)
    variant = defs.templates[(campaign.template, locale)]
    candidate = _with_source(session, defs, variant.file, source, result)
    if candidate is None:
        return result
    edited = candidate.templates.get((campaign.template, locale))
    if edited is None:
        result.problems.append(
            f"the edit must keep `id: {campaign.template}` and `locale: {locale}`"
        )
        return result
    result.version, result.lint = edited.version, candidate.lint[(edited.id, locale)]
    result.approved = edited.version in approved_versions(session=session)
    campaign = replace(candidate.campaigns.get(campaign.id, campaign), template=campaign.template)
    subject = _subject(rt, session, candidate, campaign, patient, locale, now, result.notes)
    if subject is None:
        result.problems.append(f"there is no patient {patient!r}")
        return result
    person, anchor, consents = subject
    if candidate.template_for(campaign.template, person.locale) != edited:
        result.notes.append(
            f"The patient's locale is {person.locale}: shown with the {locale} variant."
        )
        person = replace(person, locale=locale)
    key = schedule.idempotency_key(campaign.id, person.external_id, "preview", "preview")
    evaluation = evaluate_occurrence(
        candidate,
        campaign=campaign,
        patient=person,
        anchor=anchor,
        occurrence=Occurrence(campaign.id, person.external_id, "preview", "preview", now, now, key),
        consents=consents,
        history=History(),
        now=now,
        approved_versions={edited.version},  # approval is shown apart from the rules
        link=preview_link(candidate, rt.settings.public_url, campaign),
    )
    result.rendered, result.decision = evaluation.rendered, evaluation.decision
    return result


def _with_source(
    session: Session, defs: DefinitionSet, path: str, source: str | None, result: Preview
) -> DefinitionSet | None:
    """The active set with the file replaced by `source`; None (and the problems noted)
    when it does not load."""
    active = drafts.active_sources(session)
    text = None if source is None else source.replace("\r\n", "\n")
    if text is None or text == active.get(path):
        return defs
    result.edited = True
    if len(text) > drafts.MAX_CONTENT:
        result.problems.append(f"the template is longer than {drafts.MAX_CONTENT} characters")
        return None
    try:
        return load_sources({**active, path: text}, root="database")
    except SourceErrors as exc:
        result.problems.extend(str(e) for e in exc.errors)
        return None


def _subject(
    rt: Runtime,
    session: Session,
    defs: DefinitionSet,
    campaign: Campaign,
    patient: str,
    locale: str,
    now: datetime,
    notes: list[str],
) -> tuple[Patient, Anchor, dict[str, ConsentState]] | None:
    """The patient, the record the message is about, and their consent."""
    if patient == SAMPLE:
        notes.append(
            "A synthetic patient: values from the examples in policies/data.yaml, active "
            f"consent to every purpose, {SAMPLE_ZONE} time."
        )
        return sample_patient(defs, campaign, locale, now)
    found = list(candidates(rt, session, m.Patient.external_id == patient))
    if not found:
        return None
    candidate = found[0]
    anchors = anchors_of(campaign, candidate)
    audience = defs.audiences.get(campaign.id)
    inside = [
        a
        for a in anchors
        if audience is None or in_audience(audience, candidate, a, now, DryRunSummary())
    ]
    if campaign.anchor != "none" and not anchors:
        notes.append(f"{patient} has no {campaign.anchor}: its variables are missing.")
    elif not inside:
        notes.append(f"{patient} is not in this campaign's audience; shown anyway.")
    anchor = inside[0] if inside else anchors[0] if anchors else None
    consents = consent_lookup(session, defs)([candidate.row_id]).get(candidate.row_id, {})
    return candidate.patient, anchor, dict(consents)


def sample_patient(
    defs: DefinitionSet, campaign: Campaign, locale: str, now: datetime
) -> tuple[Patient, Anchor, dict[str, ConsentState]]:
    """A made-up patient built from the variables' examples, consenting to every purpose."""

    def example(name: str, default: str) -> str:
        variable = defs.variables.get(name)
        return variable.example if variable and variable.example else default

    person = Patient(
        external_id=SAMPLE,
        timezone=SAMPLE_ZONE,
        locale=locale,
        region="NY",
        birth_date=date(1970, 1, 1),
        given_name=example("given_name", "Maria"),
        family_name=example("family_name", "Lopez"),
    )
    anchor: Anchor = None
    if campaign.anchor == "prescription":
        anchor = Prescription(
            rx_id="sample-rx",
            medication=example("medication", "atorvastatin"),
            medication_class=example("medication_class", "statin"),
            refill_due=(now + timedelta(days=3)).date(),
        )
    elif campaign.anchor == "appointment":
        anchor = Appointment(
            appointment_id="sample-visit",
            starts_at=now + timedelta(days=2),
            kind=example("appointment_kind", "primary-care"),
            provider=example("provider", "Dr. Chen"),
            location=example("location", "Main St Clinic"),
        )
    granted = now - timedelta(days=365)
    consents = {
        purpose: ConsentState(purpose, active=True, legal_basis="written", granted_at=granted)
        for purpose in defs.purposes
    }
    return person, anchor, consents
