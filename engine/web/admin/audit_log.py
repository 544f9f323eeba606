"""The audit log, newest first, filtered by action and actor, and a check of its hash chain
(engine.audit.verify) that shows how many entries hold and the first one that does not."""

from __future__ import annotations

from flask import Blueprint, Response, request
from flask_wtf import FlaskForm
from wtforms import IntegerField, SelectChoice, SelectField, StringField, SubmitField
from wtforms.validators import Length, NumberRange, Optional

from engine import audit
from engine.store import admin_queries as q
from engine.web import ui
from engine.web.auth import requires

blueprint = Blueprint("audit_log", __name__, url_prefix="/admin/audit")
ORDER = 65
MENU = [("audit_log.entries", "Audit log", "audit.view")]


class AuditFilter(FlaskForm):  # type: ignore[misc]
    class Meta:
        csrf = False  # a GET form that changes nothing

    action = SelectField("Action", validate_choice=False, default="")
    actor = StringField(
        "Actor",
        validators=[Optional(), Length(max=128)],
        render_kw={"placeholder": "e.g. user:it-admin-1"},
    )
    before = IntegerField(validators=[Optional(), NumberRange(min=1)])


class VerifyForm(FlaskForm):  # type: ignore[misc]
    verify = SubmitField("Verify chain")


@blueprint.get("")
@requires("audit.view")
def entries() -> Response:
    return _page(VerifyForm(formdata=None))


@blueprint.post("/verify")
@requires("audit.view")
def verify() -> Response:
    """Recompute every hash; the check itself is recorded after it ran."""
    form = VerifyForm()
    if not form.validate_on_submit():
        return _page(form, status=400)
    with ui.reading() as db:
        result = audit.verify(session=db)
    ui.record("audit_verified", "audit_log", entries=result.entries, ok=result.ok)
    return _page(form, result=result, status=200 if result.ok else 409)


def _page(
    verify_form: VerifyForm, *, result: audit.Verification | None = None, status: int = 200
) -> Response:
    form = AuditFilter(formdata=request.args if request.method == "GET" else None)
    with ui.reading() as db:
        form.action.choices = [
            SelectChoice("", "any"),
            *map(SelectChoice, q.audit_actions(session=db)),
        ]
        valid = form.validate() if request.method == "GET" else True
        found = (
            q.audit_entries(
                session=db,
                action=form.action.data or None,
                actor=(form.actor.data or "").strip() or None,
                before=form.before.data,
            )
            if valid
            else None
        )
    args = {k: v for k, v in request.args.items() if k != "before" and v}
    return ui.page(
        "admin/audit/entries.html",
        form=form,
        verify_form=verify_form,
        found=found,
        result=result,
        args=args,
        status=status if valid else 400,
    )
