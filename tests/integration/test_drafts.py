"""Template edits made in the browser (engine.drafts) on SQLite and PostgreSQL: checked like
files, reviewed by someone else, activated and approved in one step."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from engine import drafts
from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import models as m
from engine.store.defqueries import active_definitions, approved_versions
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT

NOW = datetime.fromisoformat(AT)


@pytest.fixture
def rt(engage: Engage, settings: Settings) -> Runtime:
    engage("approve", "statin-refill", "--by", "carol")
    return Runtime(settings)


def _edit(rt: Runtime, content: str, author: str = "user:marketer-1") -> m.TemplateDraft:
    with rt.session_factory.begin() as session:
        return drafts.create_draft(
            session=session,
            defs=rt.definitions(session),
            template_id="statin-refill",
            locale="en",
            content=content,
            author=author,
            now=NOW,
        )


def _review(rt: Runtime, draft_id: int, reviewer: str, decision: str, comment: str | None = None):  # type: ignore[no-untyped-def]
    with rt.session_factory.begin() as session:
        return drafts.review_draft(
            session=session,
            defs=rt.definitions(session),
            draft_id=draft_id,
            reviewer=reviewer,
            decision=decision,  # type: ignore[arg-type]
            comment=comment,
            now=NOW + timedelta(hours=1),
        )


def _source(rt: Runtime) -> str:
    with rt.session_factory() as session:
        return drafts.template_source(session, rt.definitions(session), "statin-refill", "en")


def test_an_approved_edit_becomes_active_and_approved_at_once(rt: Runtime) -> None:
    original = _source(rt)
    edited = original.replace("Hi {{ given_name|gsm }}", "Hello {{ given_name|gsm }}")
    assert edited != original
    draft = _edit(rt, edited)
    assert draft.status == "pending" and draft.base_version != draft.version
    with pytest.raises(drafts.DraftError, match="own edit"):
        _review(rt, draft.id, "user:marketer-1", "approve")
    result = _review(rt, draft.id, "user:compliance-1", "approve", "fine")
    assert result.definitions_version is not None
    with rt.session_factory() as session:
        defs = active_definitions(session=session)
        assert defs is not None and defs.version == result.definitions_version
        template = defs.templates[("statin-refill", "en")]
        assert template.version == draft.version
        assert draft.version in approved_versions(session=session)
        actions = session.scalars(select(m.AuditEntry.action).order_by(m.AuditEntry.id)).all()
    assert actions[-2:] == ["template_edited", "template_approved"]
    assert _source(rt) == edited


def test_broken_or_empty_edits_are_refused_with_their_line(rt: Runtime) -> None:
    original = _source(rt)
    with pytest.raises(drafts.DraftError) as error:
        _edit(rt, original.replace("{{ given_name|gsm }}", "{{ given_name|gsm }"))
    assert any("templates/statin-refill.en.sms.j2:" in p for p in error.value.problems)
    with pytest.raises(drafts.DraftError) as error:
        _edit(rt, original.replace("{{ given_name|gsm }}", "{{ diagnosis }}"))
    assert error.value.problems
    with pytest.raises(drafts.DraftError, match="nothing changed"):
        _edit(rt, original)
    with pytest.raises(drafts.DraftError, match="empty"):
        _edit(rt, "  \n")
    with pytest.raises(drafts.DraftError) as error:  # the file name says statin-refill
        _edit(rt, original.replace("id: statin-refill", "id: other-template"))
    assert error.value.problems
    with rt.session_factory() as session:
        assert session.scalars(select(m.TemplateDraft)).all() == []


def test_rejection_needs_a_reason_and_a_newer_edit_supersedes(rt: Runtime) -> None:
    original = _source(rt)
    first = _edit(rt, original.replace("Hi ", "Hey "))
    second = _edit(rt, original.replace("Hi ", "Hello "), author="user:marketer-2")
    with rt.session_factory() as session:
        assert session.get_one(m.TemplateDraft, first.id).status == "superseded"
    with pytest.raises(drafts.DraftError, match="already superseded"):
        _review(rt, first.id, "user:compliance-1", "approve")
    with pytest.raises(drafts.DraftError, match="say why"):
        _review(rt, second.id, "user:compliance-1", "reject", "  ")
    result = _review(rt, second.id, "user:compliance-1", "reject", "too casual")
    assert result.draft.status == "rejected" and result.definitions_version is None
    assert _source(rt) == original


def test_an_edit_on_a_stale_base_is_not_activated(rt: Runtime, engage: Engage, definitions) -> None:  # type: ignore[no-untyped-def]
    draft = _edit(rt, _source(rt).replace("Hi ", "Hey "))
    path = definitions / "templates" / "statin-refill.en.sms.j2"
    path.write_text(path.read_text(encoding="utf-8").replace("Hi ", "Hiya "), encoding="utf-8")
    engage("sync")
    with pytest.raises(drafts.DraftError, match="changed since"):
        _review(rt, draft.id, "user:compliance-1", "approve")
    with rt.session_factory() as session:
        assert session.get_one(m.TemplateDraft, draft.id).status == "pending"
