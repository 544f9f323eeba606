"""Templates as marketers see them: every variant with its review state, and an editor
with a live preview whose Save stores a draft that waits for compliance approval
(engine.drafts: checked like a file, never half saved, never approved by its author)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, flash, redirect, request, url_for
from sqlalchemy.orm import Session
from wtforms import SubmitField

from engine import drafts
from engine.definitions import DefinitionSet
from engine.store import admin_queries as q
from engine.store import models as m
from engine.store.defqueries import approved_versions
from engine.web import runtime_of, ui
from engine.web.admin.campaigns import (
    PreviewForm,
    patient_choices,
    preview_error,
    preview_json,
)
from engine.web.auth import requires
from engine.web.template_preview import SAMPLE, Preview, build_preview, campaign_for_template

blueprint = Blueprint("templates", __name__, url_prefix="/admin/templates")
ORDER = 15
MENU = [("templates.index", "Templates", "view")]


class EditForm(PreviewForm):
    save = SubmitField("Save as draft")


@blueprint.get("")
@requires("view")
def index() -> Response:
    with ui.reading() as db:
        defs = ui.definitions(db)
        reviewed = q.reviewed_versions(session=db)
        pending = {(d.template_id, d.locale) for d in q.pending_drafts(session=db)}
    used_by: dict[str, list[str]] = {}
    for campaign in defs.campaigns.values():
        used_by.setdefault(campaign.template, []).append(campaign.id)
        if campaign.link and campaign.link.confirmation:
            used_by.setdefault(campaign.link.confirmation, []).append(f"{campaign.id} (booking)")
    variants = sorted(defs.templates.items())
    return ui.page(
        "admin/templates/index.html",
        variants=variants,
        lint=defs.lint,
        reviewed=reviewed,
        pending=pending,
        used_by=used_by,
    )


@blueprint.get("/<template_id>/<locale>/edit")
@requires("templates.edit")
def edit(template_id: str, locale: str) -> Response:
    with ui.reading() as db:
        defs = ui.definitions(db)
        if (template_id, locale) not in defs.templates:
            return _not_found(template_id, locale)
        form = EditForm(formdata=None, locale=locale, patient=SAMPLE)
        form.source.data = drafts.template_source(db, defs, template_id, locale)
        draft = db.get(m.TemplateDraft, request.args.get("draft", 0, type=int))
        if draft is not None and (draft.template_id, draft.locale) == (template_id, locale):
            form.source.data = draft.content  # go on from an earlier edit
        form.patient.choices = patient_choices(db)
        result = _preview(db, defs, template_id, locale, form)
    return _page(template_id, locale, form, result)


@blueprint.post("/<template_id>/<locale>/edit")
@requires("templates.edit")
def save(template_id: str, locale: str) -> Response:
    """Preview (the button without script) or save the text as a pending draft."""
    form = EditForm()
    with ui.reading() as db:
        defs = ui.definitions(db)
        if (template_id, locale) not in defs.templates:
            return _not_found(template_id, locale)
        form.patient.choices = patient_choices(db)
        valid = form.validate()
        result = _preview(db, defs, template_id, locale, form) if valid else None
    if not valid or not form.save.data:
        return _page(template_id, locale, form, result, status=200 if valid else 400)
    try:
        with ui.transaction() as db:
            draft = drafts.create_draft(
                session=db,
                defs=ui.definitions(db),
                template_id=template_id,
                locale=locale,
                content=form.source.data,
                author=ui.actor(),
                now=ui.now(),
            )
            draft_id = draft.id
    except drafts.DraftError as exc:
        lead = f"{exc.message}:" if exc.problems else exc.message
        form.source.errors = [*form.source.errors, lead, *exc.problems]
        return _page(template_id, locale, form, result, status=400)
    flash(
        f"Saved draft #{draft_id} of {template_id}.{locale}: it is pending until a "
        "compliance reviewer approves it."
    )
    return redirect(url_for("templates.edit", template_id=template_id, locale=locale))


@blueprint.post("/<template_id>/<locale>/preview")
@requires("templates.preview")
def preview(template_id: str, locale: str) -> Response:
    """The editor's live preview (JSON with the panel's HTML, for preview.js)."""
    form = PreviewForm()
    with ui.reading() as db:
        defs = ui.definitions(db)
        if (template_id, locale) not in defs.templates:
            return _not_found(template_id, locale)
        form.patient.choices = patient_choices(db)
        if not form.validate():
            return preview_error(form)
        result = _preview(db, defs, template_id, locale, form)
    return preview_json(result)


def _preview(
    db: Session, defs: DefinitionSet, template_id: str, locale: str, form: PreviewForm
) -> Preview:
    return build_preview(
        runtime_of(current_app),
        db,
        defs,
        campaign=campaign_for_template(defs, template_id),
        locale=locale,
        source=form.source.data,
        patient=form.patient.data or SAMPLE,
        now=ui.now(),
    )


def _page(
    template_id: str,
    locale: str,
    form: EditForm,
    result: Preview | None,
    status: int = 200,
) -> Response:
    with ui.reading() as db:
        defs = ui.definitions(db)
        variant = defs.templates[(template_id, locale)]
        approved = variant.version in approved_versions(session=db)
        edits = q.template_drafts(session=db, template_id=template_id)
    campaign = campaign_for_template(defs, template_id)
    return ui.page(
        "admin/templates/edit.html",
        template_id=template_id,
        locale=locale,
        variant=variant,
        approved=approved,
        campaign=campaign if campaign.id in defs.campaigns else None,
        form=form,
        preview=result,
        edits=[d for d in edits if d.locale == locale],
        others=[loc for loc in defs.template_locales(template_id) if loc != locale],
        status=status,
    )


def _not_found(template_id: str, locale: str) -> Response:
    return ui.page(
        "admin/error.html",
        status=404,
        code=404,
        message=f"There is no template {template_id}.{locale} in the active definitions.",
    )
