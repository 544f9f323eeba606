"""Decide and render one occurrence: the step shared by dry-run, preview and the planner."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from engine.core import policy, render, sms
from engine.core.domain import (
    Appointment,
    Campaign,
    ConsentState,
    Decision,
    DecisionContext,
    History,
    MessageFacts,
    Occurrence,
    Patient,
    Prescription,
    RenderedMessage,
    RuleResult,
    Template,
)
from engine.core.frozen import fast_init
from engine.definitions import DefinitionSet, locale_language
from engine.variables import template_variables


@fast_init
@dataclass(frozen=True)
class Evaluation:
    """An occurrence's decision, with the template variant and text it would send."""

    occurrence: Occurrence
    template: Template
    rendered: RenderedMessage | None
    decision: Decision
    approved: bool


def rendered_for(
    defs: DefinitionSet,
    *,
    template: Template,
    patient: Patient,
    anchor: Prescription | Appointment | None,
    link: str | None,
) -> RenderedMessage:
    """Render the template for this patient; raises render.TemplateError."""
    language = locale_language(template.locale)
    program = defs.program
    variables = template_variables(
        patient=patient,
        anchor=anchor,
        language=language,
        program_name=program.name,
        support_contact=program.support_contact,
        opt_out=program.text("opt_out", template.locale),
        link=link,
    )
    return render.render(defs.compiled_templates[(template.id, template.locale)], variables)


def evaluate_occurrence(
    defs: DefinitionSet,
    *,
    campaign: Campaign,
    patient: Patient,
    anchor: Prescription | Appointment | None,
    occurrence: Occurrence,
    consents: Mapping[str, ConsentState],
    history: History,
    now: datetime,
    approved_versions: Collection[str],
    link: str | None = None,
) -> Evaluation:
    """Render, then decide with every policy rule; unapproved or unrenderable means deny."""
    template = defs.template_for(campaign.template, patient.locale)
    try:
        rendered: RenderedMessage | None = rendered_for(
            defs, template=template, patient=patient, anchor=anchor, link=link
        )
    except render.TemplateError as exc:
        rendered = None
        failure = RuleResult("render-error", "engage", "deny", f"cannot render: {exc.message}")
        decision = Decision("deny", None, (failure,))
        return Evaluation(
            occurrence, template, None, decision, template.version in approved_versions
        )
    assert rendered is not None
    facts = MessageFacts(
        purpose=campaign.purpose,
        campaign=campaign.id,
        template=template.id,
        locale=template.locale,
        segments=rendered.segments,
        encoding=rendered.encoding,
        length=rendered.length,
        contains_phi=defs.template_contains_phi(template),
        has_opt_out_text=sms.has_opt_out_text(rendered.text),
    )
    context = DecisionContext(patient, consents, facts, history, now)
    decision = policy.decide(defs.policy_set, context)
    approved = template.version in approved_versions
    if not approved:
        decision = _deny_unapproved(decision, template)
    return Evaluation(occurrence, template, rendered, decision, approved)


def _deny_unapproved(decision: Decision, template: Template) -> Decision:
    """Only template versions a compliance reviewer approved may be sent."""
    reason = RuleResult(
        rule="template-approval",
        policy="engage",
        effect="deny",
        message=f"template {template.file} version {template.version} is not approved",
    )
    return replace(decision, outcome="deny", send_at=None, trace=(*decision.trace, reason))
