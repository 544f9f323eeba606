"""The approval queue: template versions waiting for a compliance reviewer (pharma's MLR
review), each with its line diff, lint and a rendered sample, and every template's review
history.

Two kinds of version wait: edits made in the browser (engine.drafts, never approved by
their author) and versions synced from the folders that nobody has reviewed yet (they have
no author here, so any compliance reviewer may approve them).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from flask import Blueprint, Response, flash, redirect, url_for
from flask_wtf import FlaskForm
from sqlalchemy.orm import Session
from wtforms import SubmitField, TextAreaField
from wtforms.validators import Length, Optional

from engine import audit, drafts
from engine.core.lint import LintReport
from engine.definitions import DefinitionSet, load_sources
from engine.store import admin_queries as q
from engine.store import models as m
from engine.store.defqueries import record_review
from engine.web import ui
from engine.web.auth import requires
from engine.yamlsource import SourceErrors

blueprint = Blueprint("approvals", __name__, url_prefix="/admin/approvals")
ORDER = 30
MENU = [("approvals.queue", "Approvals", "view")]

Decision = Literal["approve", "reject"]


class ReviewForm(FlaskForm):  # type: ignore[misc]
    comment = TextAreaField("Comment", validators=[Optional(), Length(max=2000)])
    approve = SubmitField("Approve")
    reject = SubmitField("Reject")

    def decision(self) -> Decision | None:
        if self.approve.data:
            return "approve"
        return "reject" if self.reject.data else None


@dataclass(frozen=True)
class DiffLine:
    kind: Literal["add", "del", "same"]
    text: str


@dataclass
class ReviewItem:
    """One version to review, as the queue and the review page show it."""

    kind: Literal["draft", "folder"]
    template_id: str
    locale: str
    version: str
    file: str
    content: str
    author: str | None = None
    created_at: datetime | None = None
    compared_with: str | None = None  # the version the diff is against; None: full text
    diff: list[DiffLine] = field(default_factory=list)
    lint: LintReport | None = None
    problems: list[str] = field(default_factory=list)  # why the version no longer loads
    draft: m.TemplateDraft | None = None
    state: str = "pending"  # pending|approved|rejected|superseded|replaced (no longer active)

    @property
    def changes(self) -> tuple[int, int]:
        return (
            sum(1 for d in self.diff if d.kind == "add"),
            sum(1 for d in self.diff if d.kind == "del"),
        )


def line_diff(old: str, new: str) -> list[DiffLine]:
    """Every line of `new`, with the lines of `old` it drops, in order."""
    a, b = old.splitlines(), new.splitlines()
    lines: list[DiffLine] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            lines.extend(DiffLine("same", t) for t in b[j1:j2])
            continue
        lines.extend(DiffLine("del", t) for t in a[i1:i2])
        lines.extend(DiffLine("add", t) for t in b[j1:j2])
    return lines


# --- building the items ----------------------------------------------------------------------


def _draft_item(db: Session, defs: DefinitionSet, draft: m.TemplateDraft) -> ReviewItem:
    item = ReviewItem(
        "draft",
        draft.template_id,
        draft.locale,
        draft.version,
        draft.path,
        draft.content,
        author=draft.author,
        created_at=draft.created_at,
        draft=draft,
        state=draft.status,
    )
    active = defs.templates.get((draft.template_id, draft.locale))
    # A pending edit would replace the active text; a reviewed one is shown against its base.
    if draft.status == drafts.PENDING and active is not None:
        item.compared_with = active.version
        old: str | None = drafts.template_source(db, defs, draft.template_id, draft.locale)
    else:
        item.compared_with = draft.base_version
        old = q.stored_source(
            session=db, def_id=f"{draft.template_id}.{draft.locale}", version=draft.base_version
        )
    if old is not None:
        item.diff = line_diff(old, draft.content)
    else:
        item.compared_with = None
    try:
        candidate = load_sources(
            {**drafts.active_sources(db), draft.path: draft.content}, root="database"
        )
        item.lint = candidate.lint.get((draft.template_id, draft.locale))
    except SourceErrors as exc:
        item.problems = [str(e) for e in exc.errors]
    if draft.status == drafts.PENDING and (active is None or active.version != draft.base_version):
        item.problems.append(
            "the template changed since this edit was made: it can be rejected, not approved"
        )
    return item


def _folder_item(
    db: Session,
    defs: DefinitionSet,
    key: tuple[str, str, str],
    reviewed: dict[str, str],
) -> ReviewItem | None:
    """A version synced from the folders (active, or stored from an earlier set); None when
    no such version was ever stored."""
    template_id, locale, version = key
    template = defs.templates.get((template_id, locale))
    decision = reviewed.get(version)
    state = {"approve": "approved", "reject": "rejected"}.get(decision or "")
    if template is not None and template.version == version:
        content = drafts.template_source(db, defs, template_id, locale)
        item = ReviewItem("folder", template_id, locale, version, template.file, content)
        item.lint, item.state = defs.lint[(template_id, locale)], state or "pending"
    else:
        stored = q.stored_source(session=db, def_id=f"{template_id}.{locale}", version=version)
        if stored is None:
            return None
        path = f"templates/{template_id}.{locale}.sms.j2"
        item = ReviewItem("folder", template_id, locale, version, path, stored)
        item.state = state or "replaced"
    earlier = q.last_approved_source(
        session=db, template_id=template_id, locale=locale, before=version
    )
    if earlier is not None:
        item.compared_with = earlier[0]
        item.diff = line_diff(earlier[1], item.content)
    return item


@dataclass(frozen=True)
class Queue:
    edits: list[ReviewItem]
    folders: list[ReviewItem]
    rejected: list[tuple[str, str, str]]  # active variants whose version was rejected


def _queue(db: Session, defs: DefinitionSet) -> Queue:
    reviewed = q.reviewed_versions(session=db)
    variants = sorted(defs.templates.items())
    return Queue(
        edits=[_draft_item(db, defs, d) for d in q.pending_drafts(session=db)],
        folders=[
            item
            for (tid, loc), t in variants
            if t.version not in reviewed
            and (item := _folder_item(db, defs, (tid, loc, t.version), reviewed)) is not None
        ],
        rejected=[
            (tid, loc, t.version)
            for (tid, loc), t in variants
            if reviewed.get(t.version) == "reject"
        ],
    )


# --- views -----------------------------------------------------------------------------------


@blueprint.get("")
@requires("view")
def queue() -> Response:
    with ui.reading() as db:
        found = _queue(db, ui.definitions(db))
    return ui.page("admin/approvals/queue.html", queue=found)


@blueprint.get("/drafts/<int:draft_id>")
@requires("view")
def draft(draft_id: int) -> Response:
    return _draft_page(draft_id, ReviewForm())


@blueprint.post("/drafts/<int:draft_id>")
@requires("templates.review")
def review_draft(draft_id: int) -> Response:
    form = ReviewForm()
    decision = form.decision()
    if not form.validate_on_submit() or decision is None:
        return _draft_page(draft_id, form, status=400)
    try:
        with ui.transaction() as db:
            result = drafts.review_draft(
                session=db,
                defs=ui.definitions(db),
                draft_id=draft_id,
                reviewer=ui.actor(),
                decision=decision,
                comment=(form.comment.data or "").strip() or None,
                now=ui.now(),
            )
            name = f"{result.draft.template_id}.{result.draft.locale}"
    except drafts.DraftError as exc:
        form.comment.errors = [*form.comment.errors, exc.message, *exc.problems]
        return _draft_page(draft_id, form, status=400)
    if decision == "approve":
        flash(f"Approved {name}: definitions {result.definitions_version} are active.")
    else:
        flash(f"Rejected the edit of {name}; its author sees your comment.")
    return redirect(url_for("approvals.queue"))


def _draft_page(draft_id: int, form: ReviewForm, status: int = 200) -> Response:
    with ui.reading() as db:
        found = db.get(m.TemplateDraft, draft_id)
        if found is None:
            return _not_found("There is no such template edit.")
        item = _draft_item(db, ui.definitions(db), found)
    return ui.page("admin/approvals/review.html", item=item, form=form, status=status)


@blueprint.get("/versions/<template_id>/<locale>/<version>")
@requires("view")
def version(template_id: str, locale: str, version: str) -> Response:
    return _version_page(template_id, locale, version, ReviewForm())


@blueprint.post("/versions/<template_id>/<locale>/<version>")
@requires("templates.review")
def review_version(template_id: str, locale: str, version: str) -> Response:
    """Approve or reject a version synced from the folders (it has no author here)."""
    form = ReviewForm()
    decision = form.decision()
    if not form.validate_on_submit() or decision is None:
        return _version_page(template_id, locale, version, form, status=400)
    comment = (form.comment.data or "").strip() or None
    with ui.transaction() as db:
        problem = _version_problem(db, template_id, locale, version, decision, comment)
        if problem is None:
            _record_version_review(db, template_id, locale, version, decision, comment)
    if problem is not None:
        form.comment.errors = [*form.comment.errors, problem]
        return _version_page(template_id, locale, version, form, status=400)
    verb = "Approved" if decision == "approve" else "Rejected"
    flash(f"{verb} {template_id}.{locale} version {version}.")
    return redirect(url_for("approvals.queue"))


def _version_problem(
    db: Session,
    template_id: str,
    locale: str,
    version: str,
    decision: Decision,
    comment: str | None,
) -> str | None:
    template = ui.definitions(db).templates.get((template_id, locale))
    if template is None or template.version != version:
        return "this version is no longer the active one: review the current version"
    if version in q.reviewed_versions(session=db):
        return "this version has been reviewed already"
    if decision == "reject" and not comment:
        return "say why it is rejected, so the author can fix it"
    return None


def _record_version_review(
    db: Session,
    template_id: str,
    locale: str,
    version: str,
    decision: Decision,
    comment: str | None,
) -> None:
    record_review(
        session=db,
        template_id=template_id,
        locale=locale,
        version=version,
        decision=decision,
        by=ui.actor(),
        now=ui.now(),
        comment=comment,
    )
    audit.record(
        session=db,
        actor=ui.actor(),
        action="template_approved" if decision == "approve" else "template_rejected",
        subject=f"template:{template_id}.{locale}",
        details={"version": version, "source": "folders"},
        now=ui.now(),
    )


def _version_page(
    template_id: str, locale: str, version: str, form: ReviewForm, status: int = 200
) -> Response:
    with ui.reading() as db:
        defs = ui.definitions(db)
        reviewed = q.reviewed_versions(session=db)
        item = _folder_item(db, defs, (template_id, locale, version), reviewed)
    if item is None:
        return _not_found(f"There is no version {version} of {template_id}.{locale}.")
    return ui.page("admin/approvals/review.html", item=item, form=form, status=status)


@blueprint.get("/templates/<template_id>")
@requires("view")
def history(template_id: str) -> Response:
    """Every review, edit and stored version of a template's variants, newest first."""
    with ui.reading() as db:
        defs = ui.definitions(db)
        reviews = q.template_reviews(session=db, template_id=template_id)
        edits = q.template_drafts(session=db, template_id=template_id)
        versions = q.template_versions(session=db, template_id=template_id)
        variants = {
            loc: defs.templates[(template_id, loc)] for loc in defs.template_locales(template_id)
        }
        reviewed = q.reviewed_versions(session=db)
    if not (variants or reviews or edits or versions):
        return _not_found(f"There is no template {template_id}.")
    return ui.page(
        "admin/approvals/history.html",
        template_id=template_id,
        variants=variants,
        reviews=reviews,
        edits=edits,
        versions=versions,
        reviewed=reviewed,
    )


def _not_found(message: str) -> Response:
    return ui.page("admin/error.html", status=404, code=404, message=message)
