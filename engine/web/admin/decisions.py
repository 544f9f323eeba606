"""The decision explorer: every outbox row with the rules that decided it, filtered by
campaign, status, outcome, rule and patient. Message bodies are PHI and never shown;
patients are named by their external id only to roles that may see patient data."""

from __future__ import annotations

from flask import Blueprint, Response, request
from flask_wtf import FlaskForm
from wtforms import IntegerField, SelectChoice, SelectField, StringField
from wtforms.validators import Length, NumberRange, Optional

from engine.definitions import DefinitionSet
from engine.outbox_status import (
    BLOCKED,
    CANCELLED,
    DEFERRED,
    DELIVERED,
    EXPIRED,
    FAILED,
    QUEUED,
    SENDING,
    SENT,
    UNDELIVERED,
    UNKNOWN,
)
from engine.store import admin_queries as q
from engine.store.outbox_queries import deciding_rule
from engine.web import ui
from engine.web.auth import requires

blueprint = Blueprint("decisions", __name__, url_prefix="/admin/decisions")
ORDER = 35
MENU = [("decisions.explore", "Decisions", "view")]

STATUSES = (QUEUED, DEFERRED, SENDING, SENT, DELIVERED, UNDELIVERED)
STATUSES += (BLOCKED, EXPIRED, CANCELLED, FAILED, UNKNOWN)
OUTCOMES = ("allow", "defer", "deny")
# Reasons the engine adds on its own, besides the rules of the policy packs.
ENGINE_RULES = ("template-approval", "render-error", "expired", "suppressed", "opted-out")
ENGINE_RULES += ("no-body", "no-phone", "program-reply")
ANY = SelectChoice("", "any")


class DecisionFilter(FlaskForm):  # type: ignore[misc]
    class Meta:
        csrf = False  # a GET form that changes nothing

    campaign = SelectField("Campaign", validate_choice=False, default="")
    status = SelectField("Status", choices=[ANY, *map(SelectChoice, STATUSES)], default="")
    outcome = SelectField("Outcome", choices=[ANY, *map(SelectChoice, OUTCOMES)], default="")
    rule = StringField("Rule", validators=[Optional(), Length(max=128)])
    patient = StringField("Patient id", validators=[Optional(), Length(max=64)])
    before = IntegerField(validators=[Optional(), NumberRange(min=1)])


def _rule_ids(defs: DefinitionSet) -> list[str]:
    return sorted({r.id for p in defs.policies for r in p.rules} | set(ENGINE_RULES))


@blueprint.get("")
@requires("view")
def explore() -> Response:
    form = DecisionFilter(formdata=request.args)
    see_patients = ui.can("patients.view")
    with ui.reading() as db:
        defs = ui.definitions(db)
        campaigns = sorted(set(defs.campaigns) | set(q.outbox_campaigns(session=db)))
        form.campaign.choices = [ANY, *map(SelectChoice, campaigns)]
        if not form.validate():
            return _page(form, None, defs, status=400)
        filters = q.DecisionFilters(
            campaign=form.campaign.data or None,
            status=form.status.data or None,
            outcome=form.outcome.data or None,
            rule=(form.rule.data or "").strip() or None,
            patient=((form.patient.data or "").strip() or None) if see_patients else None,
        )
        found = q.decisions(session=db, filters=filters, before=form.before.data)
    return _page(form, found, defs)


def _page(
    form: DecisionFilter,
    found: q.Page[q.DecisionRow] | None,
    defs: DefinitionSet,
    status: int = 200,
) -> Response:
    args = {k: v for k, v in request.args.items() if k != "before" and v}
    return ui.page(
        "admin/decisions/explore.html",
        form=form,
        found=found,
        rules=_rule_ids(defs),
        see_patients=ui.can("patients.view"),
        deciding_rule=deciding_rule,
        args=args,
        status=status,
    )
