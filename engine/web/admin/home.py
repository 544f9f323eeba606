"""The admin landing page: what needs attention, by role."""

from __future__ import annotations

from flask import Blueprint, Response, redirect, url_for
from sqlalchemy import func, select

from engine.store import models as m
from engine.store.outbox_queries import outbox_status
from engine.web import ui
from engine.web.auth import requires

blueprint = Blueprint("admin", __name__, url_prefix="/admin")
ORDER = 0
MENU = [("admin.home", "Overview")]


@blueprint.get("")
def root() -> Response:
    return redirect(url_for("admin.home"))


@blueprint.get("/")
@requires("view")
def home() -> Response:
    with ui.reading() as db:
        defs = ui.definitions(db)
        status = outbox_status(session=db)
        drafts = db.scalar(
            select(func.count())
            .select_from(m.TemplateDraft)
            .where(m.TemplateDraft.status == "pending")
        )
        patients = db.scalar(select(func.count()).select_from(m.Patient))
    return ui.page(
        "admin/home.html",
        defs=defs,
        counts=status,
        pending_drafts=drafts or 0,
        patients=patients or 0,
    )
