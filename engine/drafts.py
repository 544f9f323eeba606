"""Templates edited in the browser: a draft is checked like a file (parse, lint, every
campaign that uses it), waits for a compliance reviewer who is not its author, and on
approval becomes part of a new active definition set, approved in the same transaction, so
sending never pauses and never uses an unreviewed text.

Nothing here commits: callers run each use case in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine import audit
from engine.definitions import DefinitionSet, load_sources
from engine.store import models as m
from engine.store.defqueries import record_review, sync_definitions
from engine.yamlsource import SourceError, SourceErrors

PENDING, APPROVED, REJECTED, SUPERSEDED = "pending", "approved", "rejected", "superseded"
MAX_CONTENT = 8_000


class DraftError(ValueError):
    """Why a draft cannot be saved or reviewed; `problems` are file:line messages."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems or []


@dataclass(frozen=True)
class ReviewResult:
    draft: m.TemplateDraft
    decision: Literal["approve", "reject"]
    definitions_version: str | None = None  # the new active set, on approval


def active_sources(session: Session) -> dict[str, str]:
    rows = session.execute(
        select(m.Definition.path, m.Definition.content).where(m.Definition.active)
    ).all()
    return {path: content for path, content in rows}


def template_source(session: Session, defs: DefinitionSet, template_id: str, locale: str) -> str:
    """The active text of a template variant (front matter included)."""
    template = defs.templates.get((template_id, locale))
    if template is None:
        raise DraftError(f"no template {template_id}.{locale} in the active set")
    return active_sources(session)[template.file]


def create_draft(
    *,
    session: Session,
    defs: DefinitionSet,
    template_id: str,
    locale: str,
    content: str,
    author: str,
    now: datetime,
) -> m.TemplateDraft:
    """Check and store an edit as pending; an earlier pending edit of the variant by anyone
    is superseded (the queue shows one edit per variant)."""
    template = defs.templates.get((template_id, locale))
    if template is None:
        raise DraftError(f"no template {template_id}.{locale} in the active set")
    content = content.replace("\r\n", "\n")
    if not content.strip():
        raise DraftError("the template is empty")
    if len(content) > MAX_CONTENT:
        raise DraftError(f"the template is longer than {MAX_CONTENT} characters")
    candidate = _load_with(session, {template.file: content})
    edited = candidate.templates.get((template_id, locale))
    if edited is None:
        raise DraftError(f"the edit must keep `id: {template_id}` and `locale: {locale}`")
    if edited.version == template.version:
        raise DraftError("nothing changed: this is the active version")
    for earlier in session.scalars(
        select(m.TemplateDraft).where(
            m.TemplateDraft.template_id == template_id,
            m.TemplateDraft.locale == locale,
            m.TemplateDraft.status == PENDING,
        )
    ):
        earlier.status = SUPERSEDED
    draft = m.TemplateDraft(
        template_id=template_id,
        locale=locale,
        version=edited.version,
        path=template.file,
        content=content,
        base_version=template.version,
        author=author,
        created_at=now,
        status=PENDING,
    )
    session.add(draft)
    session.flush()
    audit.record(
        session=session,
        actor=author,
        action="template_edited",
        subject=f"template:{template_id}.{locale}",
        details={"draft": draft.id, "version": edited.version, "base": template.version},
        now=now,
    )
    return draft


def review_draft(
    *,
    session: Session,
    defs: DefinitionSet,
    draft_id: int,
    reviewer: str,
    decision: Literal["approve", "reject"],
    comment: str | None,
    now: datetime,
) -> ReviewResult:
    """Approve (activate) or reject a pending draft; never by its author."""
    draft = session.get(m.TemplateDraft, draft_id, with_for_update=True)
    if draft is None:
        raise DraftError(f"no draft {draft_id}")
    if draft.status != PENDING:
        raise DraftError(f"this edit is already {draft.status}")
    if draft.author == reviewer:
        raise DraftError("nobody reviews their own edit: ask another compliance reviewer")
    if decision == "reject" and not (comment or "").strip():
        raise DraftError("say why it is rejected, so the author can fix it")
    current = defs.templates.get((draft.template_id, draft.locale))
    if decision == "approve" and (current is None or current.version != draft.base_version):
        raise DraftError(
            "the template changed since this edit was made: ask for a new edit on top of "
            "the current version"
        )
    draft.status = APPROVED if decision == "approve" else REJECTED
    draft.reviewed_by, draft.reviewed_at, draft.comment = reviewer, now, comment
    record_review(
        session=session,
        template_id=draft.template_id,
        locale=draft.locale,
        version=draft.version,
        decision=decision,
        by=reviewer,
        now=now,
        comment=comment,
    )
    version = None
    if decision == "approve":
        new_defs = _load_with(session, {draft.path: draft.content})
        version = sync_definitions(session=session, defs=new_defs, now=now).version
    audit.record(
        session=session,
        actor=reviewer,
        action="template_approved" if decision == "approve" else "template_rejected",
        subject=f"template:{draft.template_id}.{draft.locale}",
        details={"draft": draft.id, "version": draft.version, "definitions": version},
        now=now,
    )
    return ReviewResult(draft, decision, version)


def _load_with(session: Session, changes: dict[str, str]) -> DefinitionSet:
    sources = {**active_sources(session), **changes}
    try:
        return load_sources(sources, root="database")
    except SourceErrors as exc:
        raise DraftError("the edit does not load", [_problem(e) for e in exc.errors]) from exc


def _problem(error: SourceError) -> str:
    return str(error)
