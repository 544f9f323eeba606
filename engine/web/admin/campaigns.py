"""The marketers' campaign pages: every campaign with its live counts; one campaign's
definition in words, its template variants with a live preview, a dry-run at a chosen
time, and pause/resume (audited)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_wtf import FlaskForm
from sqlalchemy.orm import Session
from wtforms import DateTimeLocalField, HiddenField, SelectField, SubmitField, TextAreaField
from wtforms.validators import DataRequired, Length

from engine import audit, drafts
from engine.cli_decide import dry_run_stored
from engine.core.describe import describe_duration, describe_schedule
from engine.core.domain import Campaign
from engine.definitions import DefinitionSet
from engine.dryrun import DryRunSummary
from engine.evaluate import Evaluation
from engine.store import dashboard_queries as dq
from engine.store.defqueries import approved_versions
from engine.store.outbox_queries import set_paused
from engine.web import runtime_of, ui
from engine.web.auth import requires
from engine.web.template_preview import SAMPLE, Preview, build_preview

blueprint = Blueprint("campaigns", __name__, url_prefix="/admin/campaigns")
ORDER = 10
MENU = [("campaigns.index", "Campaigns", "view")]

LIVE = ("queued", "deferred", "sent", "delivered", "blocked", "failed")
SHOWN_DECISIONS = 25


class PreviewForm(FlaskForm):  # type: ignore[misc]
    """A template text to preview (also posted as JSON by preview.js)."""

    locale = HiddenField()
    patient = SelectField("Patient", validate_choice=True)
    source = TextAreaField(
        "Template text", validators=[DataRequired(), Length(max=drafts.MAX_CONTENT)]
    )
    preview = SubmitField("Preview")


class DryRunForm(FlaskForm):  # type: ignore[misc]
    class Meta:
        csrf = False  # a GET form that changes nothing

    at = DateTimeLocalField(
        "Decide at", validators=[DataRequired()], format=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"]
    )
    zone = SelectField("Time zone of that time", default="UTC")


class ControlForm(FlaskForm):  # type: ignore[misc]
    submit = SubmitField()


def patient_choices(db: Session) -> list[tuple[str, str]]:
    first = dq.first_patients(session=db)
    return [(SAMPLE, "Synthetic sample"), *((pid, f"{pid} ({loc})") for pid, loc in first)]


def campaign_status(campaign: Campaign, paused: dq.PauseState | None) -> str:
    if campaign.status == "paused":
        return "paused"
    return "paused" if paused and paused.paused else "active"


# --- the list ---------------------------------------------------------------------------------


@blueprint.get("")
@requires("view")
def index() -> Response:
    with ui.reading() as db:
        defs = ui.definitions(db)
        counts = dq.counts_by_campaign(session=db)
        states = dq.pause_states(session=db)
    rows = [
        {
            "campaign": c,
            "status": campaign_status(c, states.get(c.id)),
            "counts": {s: counts.get(c.id, {}).get(s, 0) for s in LIVE},
        }
        for c in sorted(defs.campaigns.values(), key=lambda c: c.name.lower())
    ]
    return ui.page("admin/campaigns/list.html", rows=rows, live=LIVE, defs=defs)


# --- one campaign -----------------------------------------------------------------------------


@blueprint.get("/<campaign_id>")
@requires("view")
def campaign(campaign_id: str) -> Response:
    return _campaign_page(campaign_id, request.args.get("locale"))


def _campaign_page(
    campaign_id: str,
    locale: str | None,
    form: PreviewForm | None = None,
    preview: Preview | None = None,
    status: int = 200,
) -> Response:
    with ui.reading() as db:
        defs = ui.definitions(db)
        found = defs.campaigns.get(campaign_id)
        if found is None:
            return _not_found(campaign_id)
        locales = defs.template_locales(found.template)
        locale = locale if locale in locales else _default_locale(defs, locales)
        if form is None:
            form = PreviewForm(formdata=None, locale=locale, patient=SAMPLE)
            form.source.data = drafts.template_source(db, defs, found.template, locale)
            if ui.can("templates.preview"):
                preview = _preview_of(db, defs, found, locale, None, SAMPLE)
        form.patient.choices = patient_choices(db)
        context = _campaign_context(db, defs, found)
        dry = DryRunForm(formdata=None, at=ui.now().replace(second=0, microsecond=0, tzinfo=None))
        dry.zone.choices = _zones(db)
    return ui.page(
        "admin/campaigns/campaign.html",
        locale=locale,
        form=form,
        preview=preview,
        dry=dry,
        control=ControlForm(formdata=None),
        status=status,
        **context,
    )


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _default_locale(defs: DefinitionSet, locales: list[str]) -> str:
    default = defs.program.default_locale
    return default if default in locales else locales[0]


def _campaign_context(db: Session, defs: DefinitionSet, campaign: Campaign) -> dict[str, Any]:
    approved = approved_versions(session=db)
    variants = [
        (loc, defs.templates[(campaign.template, loc)], defs.lint[(campaign.template, loc)])
        for loc in defs.template_locales(campaign.template)
    ]
    state = dq.pause_states(session=db).get(campaign.id)
    counts = dq.counts_by_campaign(session=db).get(campaign.id, {})
    return {
        "campaign": campaign,
        "purpose": defs.purposes.get(campaign.purpose, ""),
        "variants": variants,
        "approved": approved,
        "state": state,
        "campaign_status": campaign_status(campaign, state),
        "counts": {s: counts.get(s, 0) for s in LIVE},
        "total": sum(counts.values()),
        "schedule_text": sentence(describe_schedule(campaign.schedule)),
        "expiry_text": describe_duration(campaign.expires_after),
        "link_text": describe_duration(campaign.link.expires_after) if campaign.link else None,
    }


@blueprint.post("/<campaign_id>/preview")
@requires("templates.preview")
def preview(campaign_id: str) -> Response:
    """The live preview: JSON for preview.js (with the panel's HTML), else the page."""
    form = PreviewForm()
    with ui.reading() as db:
        defs = ui.definitions(db)
        found = defs.campaigns.get(campaign_id)
        if found is None:
            return _not_found(campaign_id)
        form.patient.choices = patient_choices(db)
        valid = form.validate()
        if form.locale.data not in defs.template_locales(found.template):
            form.locale.errors = [*form.locale.errors, "not one of the campaign's variants"]
            valid = False
        if not valid:
            return _invalid(form, campaign_id)
        result = _preview_of(db, defs, found, form.locale.data, form.source.data, form.patient.data)
    if request.is_json:
        return preview_json(result)
    return _campaign_page(campaign_id, result.locale, form, result)


def _preview_of(
    db: Session,
    defs: DefinitionSet,
    campaign: Campaign,
    locale: str,
    source: str | None,
    patient: str,
) -> Preview:
    rt = runtime_of(current_app)
    return build_preview(
        rt, db, defs, campaign=campaign, locale=locale, source=source, patient=patient, now=ui.now()
    )


def preview_json(result: Preview) -> Response:
    html = render_template("admin/campaigns/_preview.html", preview=result)
    return jsonify(**result.to_json(), html=html)


def preview_error(form: FlaskForm) -> Response:
    """A preview request that cannot be previewed: 400, the problems by field."""
    problems = [f"{f.name}: {' '.join(f.errors)}" for f in form if f.errors]
    response = jsonify(error={"status": 400, "message": "; ".join(problems)})
    response.status_code = 400
    return response


def _invalid(form: PreviewForm, campaign_id: str) -> Response:
    if request.is_json:
        return preview_error(form)
    return _campaign_page(campaign_id, form.locale.data, form, status=400)


# --- dry-run ----------------------------------------------------------------------------------


def _zones(db: Session) -> list[tuple[str, str]]:
    return [("UTC", "UTC"), *((z, z) for z in dq.patient_zones(session=db) if z != "UTC")]


@blueprint.get("/<campaign_id>/dry-run")
@requires("campaigns.dry_run")
def dry_run_page(campaign_id: str) -> Response:
    """Decide every occurrence due at a time, writing nothing (engage dry-run)."""
    form = DryRunForm(formdata=request.args if request.args else None)
    rt = runtime_of(current_app)
    with ui.reading() as db:
        defs = ui.definitions(db)
        found = defs.campaigns.get(campaign_id)
        if found is None:
            return _not_found(campaign_id)
        form.zone.choices = _zones(db)
        if not request.args:
            form.at.data = ui.now().replace(second=0, microsecond=0, tzinfo=None)
            return _dry_page(found, form)
        if not form.validate():
            return _dry_page(found, form, status=400)
        at = form.at.data.replace(tzinfo=ZoneInfo(form.zone.data)).astimezone(UTC)
        summary = DryRunSummary()
        shown: list[Evaluation] = []
        for evaluation in dry_run_stored(rt, db, defs, campaign=found, at=at, summary=summary):
            if len(shown) < SHOWN_DECISIONS:
                shown.append(evaluation)
    ui.record(
        "campaign_dry_run",
        f"campaign:{campaign_id}",
        at=at.isoformat(),
        **{k: summary.outcomes[k] for k in ("allow", "defer", "deny")},
    )
    return _dry_page(found, form, at=at, summary=summary, shown=shown)


def _dry_page(
    campaign: Campaign,
    form: DryRunForm,
    *,
    at: datetime | None = None,
    summary: DryRunSummary | None = None,
    shown: list[Evaluation] | None = None,
    status: int = 200,
) -> Response:
    return ui.page(
        "admin/campaigns/dry_run.html",
        campaign=campaign,
        form=form,
        at=at,
        summary=summary,
        shown=shown or [],
        limit=SHOWN_DECISIONS,
        see_patients=ui.can("patients.view"),
        status=status,
    )


# --- pause and resume -------------------------------------------------------------------------


@blueprint.post("/<campaign_id>/pause")
@requires("campaigns.control")
def pause(campaign_id: str) -> Response:
    return _control(campaign_id, paused=True)


@blueprint.post("/<campaign_id>/resume")
@requires("campaigns.control")
def resume(campaign_id: str) -> Response:
    return _control(campaign_id, paused=False)


def _control(campaign_id: str, *, paused: bool) -> Response:
    form = ControlForm()
    if not form.validate_on_submit():
        flash("The form expired: please try again.", "error")
        return redirect(url_for("campaigns.campaign", campaign_id=campaign_id))
    action = "campaign_paused" if paused else "campaign_resumed"
    with ui.transaction() as db:
        if campaign_id not in ui.definitions(db).campaigns:
            return _not_found(campaign_id)
        changed = set_paused(
            session=db, campaign_id=campaign_id, paused=paused, by=ui.actor(), now=ui.now()
        )
        audit.record(
            session=db,
            actor=ui.actor(),
            action=action,
            subject=f"campaign:{campaign_id}",
            details={"changed": changed},
            now=ui.now(),
        )
    verb = "paused" if paused else "resumed"
    flash(
        f"Campaign {campaign_id} {verb}."
        if changed
        else f"Campaign {campaign_id} was already {verb}."
    )
    return redirect(url_for("campaigns.campaign", campaign_id=campaign_id))


def _not_found(campaign_id: str) -> Response:
    return ui.page(
        "admin/error.html",
        status=404,
        code=404,
        message=f"There is no campaign {campaign_id!r} in the active definitions.",
    )
