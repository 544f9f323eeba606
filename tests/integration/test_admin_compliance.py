"""The compliance pages of the admin app on SQLite and PostgreSQL: the approval queue (diff,
lint, sample; nobody approves their own edit; a reject needs a reason), the decision explorer
(filters, rule traces with citations, pseudonyms for roles without patient access) and a
patient's consent history (evidence decrypted, every view audited)."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import select

from engine import audit, drafts
from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import admin_queries as q
from engine.store import models as m
from engine.store.consent_queries import add_suppression
from engine.store.defqueries import active_definitions, approved_versions
from tests.integration.admin_fixtures import admin_app, create_staff, sign_in
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT, SAMPLE

NOW = datetime.fromisoformat(AT)
EVIDENCE = "signed web form, confirmation 4471"


@dataclass
class Site:
    app: Flask
    runtime: Runtime
    engage: Engage


def prepare_site(engage: Engage, settings: Settings, definitions: Path) -> Site:
    """The sample patients imported and planned at AT, staff of every role, the app."""
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    engage("approve", "statin-refill", "--by", "carol")
    engage("plan", "--at", AT)
    create_staff(settings, NOW)
    settings = settings.with_(definitions_dir=definitions)
    return Site(admin_app(settings, lambda: NOW), Runtime(settings), engage)


def make_draft(rt: Runtime, old: str, new: str, author: str, locale: str = "en") -> int:
    with rt.session_factory.begin() as session:
        defs = rt.definitions(session)
        source = drafts.template_source(session, defs, "statin-refill", locale)
        assert old in source
        draft = drafts.create_draft(
            session=session,
            defs=defs,
            template_id="statin-refill",
            locale=locale,
            content=source.replace(old, new),
            author=author,
            now=NOW,
        )
        return draft.id


def audit_actions(rt: Runtime) -> list[tuple[str, str, str | None, dict]]:
    with rt.session_factory() as session:
        assert audit.verify(session=session).ok
        rows = session.scalars(select(m.AuditEntry).order_by(m.AuditEntry.id))
        return [(r.actor, r.action, r.subject, r.details) for r in rows]


@pytest.fixture
def site(engage: Engage, settings: Settings, definitions: Path) -> Site:
    return prepare_site(engage, settings, definitions)


def _text(response: object) -> str:
    return html.unescape(response.get_data(as_text=True))  # type: ignore[attr-defined]


def _draft_status(rt: Runtime, draft_id: int) -> str:
    with rt.session_factory() as session:
        return session.get_one(m.TemplateDraft, draft_id).status


def test_a_draft_waits_with_its_diff_and_only_another_reviewer_activates_it(site: Site) -> None:
    rt = site.runtime
    draft_id = make_draft(
        rt, "Hi {{ given_name|gsm }}", "Hello {{ given_name|gsm }}", "user:marketer-1"
    )
    own_id = make_draft(rt, "Hola", "Buenas", "user:compliance-2", locale="es")
    with rt.session_factory() as session:
        before = active_definitions(session=session)
    assert before is not None

    reviewer = sign_in(site.app, "compliance-1")
    queue = _text(reviewer.get("/admin/approvals"))
    assert f'href="/admin/approvals/drafts/{draft_id}"' in queue
    assert '<span class="del"><span class="mark" aria-hidden="true">−</span>' in queue
    assert "Hi {{ given_name|gsm }}, your prescription" in queue
    assert "Hello {{ given_name|gsm }}, your prescription" in queue
    assert "user:marketer-1" in queue and "GSM-7" in queue
    assert '<pre class="sms">Riverside Health: Hello Maria, your prescription' in queue

    # The author cannot act: a marketer lacks the permission; a reviewer's own edit is refused.
    author = sign_in(site.app, "marketer-1")
    assert (
        author.post(f"/admin/approvals/drafts/{draft_id}", {"approve": "Approve"}).status_code
        == 403
    )
    own = sign_in(site.app, "compliance-2")
    refused = own.post(f"/admin/approvals/drafts/{own_id}", {"approve": "Approve", "comment": "ok"})
    assert refused.status_code == 400
    assert "nobody reviews their own edit" in _text(refused)
    assert 'id="comment-error"' in _text(refused)
    assert _draft_status(rt, draft_id) == _draft_status(rt, own_id) == "pending"
    with rt.session_factory() as session:
        unchanged = active_definitions(session=session)
        assert unchanged is not None and unchanged.version == before.version

    approved = reviewer.post(f"/admin/approvals/drafts/{draft_id}", {"approve": "Approve"})
    assert approved.status_code == 302 and approved.headers["Location"] == "/admin/approvals"
    assert "Approved statin-refill.en" in _text(reviewer.get("/admin/approvals"))
    with rt.session_factory() as session:
        draft = session.get_one(m.TemplateDraft, draft_id)
        after = active_definitions(session=session)
        assert after is not None and after.version != before.version
        assert after.templates[("statin-refill", "en")].version == draft.version
        assert draft.version in approved_versions(session=session)
        assert draft.status == "approved" and draft.reviewed_by == "user:compliance-1"
    report = json.loads(site.engage("dry-run", "statin-refill", "--at", AT, "--json").stdout)
    english = [d for d in report["decisions"] if d["locale"] == "en" and d["outcome"] == "allow"]
    assert english and all(d["text"].split(": ", 1)[1].startswith("Hello ") for d in english)
    actions = [(actor, action) for actor, action, _, _ in audit_actions(rt)]
    assert ("user:compliance-1", "template_approved") in actions
    assert ("user:compliance-2", "template_approved") not in actions


def test_a_rejection_needs_a_reason_and_is_kept_in_the_history(site: Site) -> None:
    draft_id = make_draft(site.runtime, "Hi ", "Hey ", "user:marketer-1")
    reviewer = sign_in(site.app, "compliance-1")
    page = reviewer.get(f"/admin/approvals/drafts/{draft_id}")
    assert page.status_code == 200 and 'name="comment"' in _text(page)
    bare = reviewer.post(
        f"/admin/approvals/drafts/{draft_id}", {"reject": "Reject", "comment": " "}
    )
    assert bare.status_code == 400 and "say why it is rejected" in _text(bare)
    assert _draft_status(site.runtime, draft_id) == "pending"
    done = reviewer.post(
        f"/admin/approvals/drafts/{draft_id}", {"reject": "Reject", "comment": "too casual"}
    )
    assert done.status_code == 302
    assert _draft_status(site.runtime, draft_id) == "rejected"
    history = _text(reviewer.get("/admin/approvals/templates/statin-refill"))
    assert "too casual" in history and "user:compliance-1" in history and "carol" in history
    viewer = sign_in(site.app, "viewer-1")
    assert viewer.get("/admin/approvals/templates/statin-refill").status_code == 200
    assert viewer.get("/admin/approvals/templates/no-such-template").status_code == 404


def _sync_edit(site: Site, definitions: Path, old: str, new: str) -> str:
    """Edit the English refill template in the folder, sync, return the new version."""
    path = definitions / "templates" / "statin-refill.en.sms.j2"
    path.write_text(path.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    site.engage("sync")
    with site.runtime.session_factory() as session:
        return site.runtime.definitions(session).templates[("statin-refill", "en")].version


def test_folder_versions_without_review_wait_in_the_queue(site: Site, definitions: Path) -> None:
    howdy = _sync_edit(site, definitions, "Hi ", "Howdy ")
    reviewer = sign_in(site.app, "compliance-2")
    queue = _text(reviewer.get("/admin/approvals"))
    assert "appointment-reminder" in queue  # never reviewed: shown in full
    assert "No approved version to compare with" in queue
    assert "(the last approved)" in queue and "Howdy " in queue
    url = f"/admin/approvals/versions/statin-refill/en/{howdy}"
    assert reviewer.post(url, {"reject": "Reject"}).status_code == 400

    hiya = _sync_edit(site, definitions, "Howdy ", "Hiya ")  # the folder moved on meanwhile
    stale = reviewer.post(url, {"approve": "Approve"})
    assert stale.status_code == 400 and "no longer the active one" in _text(stale)
    assert "badge s-replaced" in _text(reviewer.get(url))
    assert reviewer.get("/admin/approvals/versions/statin-refill/en/0000").status_code == 404

    url = f"/admin/approvals/versions/statin-refill/en/{hiya}"
    assert reviewer.post(url, {"approve": "Approve"}).status_code == 302
    with site.runtime.session_factory() as session:
        assert hiya in approved_versions(session=session)
        assert howdy not in approved_versions(session=session)
    assert f"/versions/statin-refill/en/{hiya}" not in _text(reviewer.get("/admin/approvals"))
    again = reviewer.post(url, {"approve": "Approve"})
    assert again.status_code == 400 and "reviewed already" in _text(again)
    entries = audit_actions(site.runtime)
    assert entries[-1][:3] == (
        "user:compliance-2",
        "template_approved",
        "template:statin-refill.en",
    )
    assert entries[-1][3] == {"version": hiya, "source": "folders"}


def test_the_decision_explorer_filters_and_shows_traces_with_citations(site: Site) -> None:
    compliance = sign_in(site.app, "compliance-1")
    everything = _text(compliance.get("/admin/decisions"))
    assert "S003" in everything and "S001" in everything
    assert "47 CFR 64.1200(a)(1)" in everything  # the consent rule's citation in a trace
    blocked = _text(compliance.get("/admin/decisions?status=blocked&campaign=statin-refill"))
    assert "consent-required" in blocked and 'badge s-queued">queued' not in blocked
    gdpr = _text(compliance.get("/admin/decisions?rule=gdpr-explicit-consent"))
    assert "S003" in gdpr and "S001" not in gdpr and "GDPR Art. 9(2)(a)" in gdpr
    deferred = _text(compliance.get("/admin/decisions?outcome=defer"))
    assert "hc-daily-cap" in deferred and "S007" in deferred and "S003" not in deferred
    one = _text(compliance.get("/admin/decisions?patient=S005"))
    assert "S005" in one and "S001" not in one
    assert "No decision matches" in _text(compliance.get("/admin/decisions?rule=no-such-rule"))
    assert "Hi Ada" not in everything  # never a message text
    assert compliance.get("/admin/decisions?before=zero").status_code == 400

    viewer = _text(sign_in(site.app, "viewer-1").get("/admin/decisions?patient=S005"))
    assert "S00" not in viewer  # no external ids, and the patient filter is not theirs
    assert 'title="pseudonymous patient number">#' in viewer


def test_decisions_page_newest_first_by_keyset(site: Site) -> None:
    with site.runtime.session_factory() as session:
        everything = q.decisions(session=session, filters=q.DecisionFilters())
        assert everything.next_before is None
        ids = [d.row.id for d in everything.items]
        assert ids == sorted(ids, reverse=True) and len(ids) >= 5
        first = q.decisions(session=session, filters=q.DecisionFilters(), limit=3)
        second = q.decisions(
            session=session, filters=q.DecisionFilters(), limit=3, before=first.next_before
        )
        assert [d.row.id for d in (*first.items, *second.items)] == ids[:6]


def test_a_patients_consent_history_shows_evidence_and_is_audited(site: Site) -> None:
    site.engage(
        "consent", "grant", "--patient", "S001", "--purpose", "marketing",
        "--legal-basis", "written", "--method", "web_form", "--evidence", EVIDENCE,
        "--notice-version", "2026-03", "--by", "clerk-7", "--at", "2026-11-02T10:00:00Z",
    )  # fmt: skip
    for role in ("marketer-1", "viewer-1"):
        assert sign_in(site.app, role).get("/admin/patients/S001").status_code == 403
    compliance = sign_in(site.app, "compliance-1")
    found = compliance.get("/admin/patients?external_id=S001")
    assert found.status_code == 302 and found.headers["Location"] == "/admin/patients/S001"
    missing = compliance.get("/admin/patients?external_id=S999")
    assert missing.status_code == 404 and "no patient has the id" in _text(missing)
    page = _text(compliance.get("/admin/patients/S001"))
    assert EVIDENCE in page and "clerk-7" in page and "2026-03" in page
    ledger = page.split('id="ledger"')[1].split("</table>")[0]
    assert ledger.count("<tr>") == 1 + 3  # header and three events
    assert "intake_form" in ledger and ">cli<" in ledger
    assert "Lovelace" not in page and "555-0101" not in page
    assert "suppression list" not in page
    assert "statin-refill" in page  # recent decisions
    with site.runtime.session_factory.begin() as session:
        add_suppression(
            session=session, keyring=site.runtime.keyring, e164="+12125550105", reason="stop"
        )
    revoked = _text(compliance.get("/admin/patients/S005"))
    assert "revoked 2025-09-01" in revoked and "on the suppression list" in revoked
    assert compliance.get("/admin/patients/S999").status_code == 404
    viewed = [e for e in audit_actions(site.runtime) if e[1] == "patient_viewed"]
    assert [(e[0], e[2]) for e in viewed] == [
        ("user:compliance-1", "patient:S001"),
        ("user:compliance-1", "patient:S005"),
    ]
    assert EVIDENCE not in json.dumps([e[3] for e in viewed])
