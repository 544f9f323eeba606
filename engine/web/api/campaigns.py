"""`/api/v1/campaigns`: the active campaigns, their outbox counts, pause and resume
(campaigns.control, audited) and the dry-run (campaigns.dry_run), whose answer is the
object `engage dry-run --json` prints, built by the same functions."""

from __future__ import annotations

import re
from datetime import UTC

from flask import Response, current_app

from engine import audit
from engine.cli_decide import dry_run_stored, summary_json
from engine.core.domain import Campaign
from engine.definitions import DefinitionSet
from engine.defmodels import ID_PATTERN
from engine.dryrun import DryRunSummary, decision_json
from engine.store.outbox_queries import outbox_status, paused_campaigns, set_paused
from engine.web import runtime_of, ui
from engine.web.api import models as api
from engine.web.api.common import BadRequest, answer, api_blueprint, body, documented
from engine.web.auth import api_requires

blueprint = api_blueprint("api_campaigns", __name__)
ORDER = 82
CAMPAIGN_ID = {"campaign_id": ID_PATTERN}


def _campaign(defs: DefinitionSet, campaign_id: str) -> Campaign:
    campaign = defs.campaigns.get(campaign_id) if re.fullmatch(ID_PATTERN, campaign_id) else None
    if campaign is None:
        raise BadRequest("campaign_id", "no active campaign has this id", status=404)
    return campaign


def _summary(campaign: Campaign, paused: bool) -> dict[str, object]:
    return {
        "id": campaign.id,
        "name": campaign.name,
        "purpose": campaign.purpose,
        "template": campaign.template,
        "anchor": campaign.anchor,
        "version": campaign.version,
        "status": campaign.status,
        "paused": paused,
    }


@blueprint.get("/campaigns")
@documented(summary="The active campaigns", answer=api.CampaignList, tag="campaigns")
@api_requires("view")
def list_campaigns() -> Response:
    with ui.reading() as db:
        campaigns = ui.definitions(db).campaigns
        paused = paused_campaigns(session=db)
    items = [
        api.CampaignSummary(**_summary(c, c.id in paused))  # type: ignore[arg-type]
        for _, c in sorted(campaigns.items())
    ]
    return answer(api.CampaignList(items=items))


@blueprint.get("/campaigns/<campaign_id>")
@documented(
    summary="A campaign with its outbox counts by status, deciding rule and error",
    answer=api.CampaignDetail,
    errors=(404,),
    path_params=CAMPAIGN_ID,
    tag="campaigns",
)
@api_requires("view")
def get_campaign(campaign_id: str) -> Response:
    with ui.reading() as db:
        campaign = _campaign(ui.definitions(db), campaign_id)
        paused = campaign.id in paused_campaigns(session=db)
        counts = outbox_status(session=db, campaign_id=campaign.id)
    detail = api.CampaignDetail(
        **_summary(campaign, paused),  # type: ignore[arg-type]
        counts=dict(sorted(counts.by_status.items())),
        by_rule=[
            api.RuleCount(status=status, rule=rule, count=n)
            for (status, rule), n in sorted(counts.by_rule.items())
        ],
        failed_by_error=[
            api.ErrorCount(error_code=code, count=n)
            for code, n in sorted(counts.failed_by_error.items(), key=lambda kv: kv[0] or 0)
        ],
    )
    return answer(detail)


def _set_paused(campaign_id: str, paused: bool) -> Response:
    with ui.transaction() as db:
        campaign = _campaign(ui.definitions(db), campaign_id)
        changed = set_paused(
            session=db, campaign_id=campaign.id, paused=paused, by=ui.actor(), now=ui.now()
        )
        audit.record(
            session=db,
            actor=ui.actor(),
            action="campaign_paused" if paused else "campaign_resumed",
            subject=f"campaign:{campaign.id}",
            details={"changed": changed},
            now=ui.now(),
        )
    control = api.CampaignControl(**_summary(campaign, paused), changed=changed)  # type: ignore[arg-type]
    return answer(control)


@blueprint.post("/campaigns/<campaign_id>/pause")
@documented(
    summary="Pause a campaign: neither planned nor dispatched until resumed",
    answer=api.CampaignControl,
    errors=(404,),
    path_params=CAMPAIGN_ID,
    tag="campaigns",
)
@api_requires("campaigns.control")
def pause(campaign_id: str) -> Response:
    return _set_paused(campaign_id, True)


@blueprint.post("/campaigns/<campaign_id>/resume")
@documented(
    summary="Resume a paused campaign",
    answer=api.CampaignControl,
    errors=(404,),
    path_params=CAMPAIGN_ID,
    tag="campaigns",
)
@api_requires("campaigns.control")
def resume(campaign_id: str) -> Response:
    return _set_paused(campaign_id, False)


@blueprint.post("/campaigns/<campaign_id>/dry-run")
@documented(
    summary="Decide every occurrence the planner would handle at a time, writing nothing",
    description=(
        "The object `engage dry-run CAMPAIGN --at AT --json` prints: every due occurrence is "
        "decided and counted in `summary`; `decisions` lists the first `limit` of them, "
        "with patient external ids, anchor records and the rendered text (which names "
        "the patient) only for tokens with patients.view, else null."
    ),
    answer=api.DryRunReport,
    body=api.DryRunRequest,
    errors=(404,),
    path_params=CAMPAIGN_ID,
    tag="campaigns",
)
@api_requires("campaigns.dry_run")
def dry_run_campaign(campaign_id: str) -> Response:
    q = body(api.DryRunRequest)
    at = (q.at or ui.now()).astimezone(UTC)
    rt = runtime_of(current_app)
    sees_patients = ui.can("patients.view")
    with ui.reading() as db:
        defs = ui.definitions(db)
        campaign = _campaign(defs, campaign_id)
        summary = DryRunSummary()
        decisions, made = [], 0
        for evaluation in dry_run_stored(rt, db, defs, campaign=campaign, at=at, summary=summary):
            made += 1
            if made <= q.limit:
                decisions.append(_visible(decision_json(evaluation), sees_patients))
    report = api.DryRunReport.model_validate(
        {
            "campaign": campaign.id,
            "campaign_version": campaign.version,
            "policy_set": defs.policy_version,
            "definitions": defs.version,
            "at": at.isoformat(),
            "decisions": decisions,
            "summary": summary_json(summary),
            "truncated": made > q.limit,
        }
    )
    ui.record("campaign_dry_run", f"campaign:{campaign.id}", at=at.isoformat(), decisions=made)
    return answer(report)


def _visible(decision: dict[str, object], sees_patients: bool) -> dict[str, object]:
    """A decision as this token may see it: who it concerns and the text that names them
    only with patients.view, as on the admin page and in GET /api/v1/decisions."""
    if sees_patients:
        return decision
    label = str(decision["occurrence"]).rpartition("/")[2]
    return {**decision, "patient": None, "occurrence": label, "text": None}
