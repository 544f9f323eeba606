"""The marketers' pages on SQLite and PostgreSQL, with the sample patients planned and sent
through the sandbox provider: campaign list and page, live preview, dry-run, pause and
resume, template edits as drafts, and dashboards whose numbers are the database's."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from engine import audit
from engine.settings import Settings
from engine.store import models as m
from engine.web import create_app
from tests.integration.admin_fixtures import Admin, admin_app, create_staff, sign_in
from tests.integration.booking_fixtures import Booking, prepare
from tests.integration.conftest import Engage, SandboxHandle
from tests.integration.test_cli import AT
from tests.integration.test_webhooks import TOKEN, Twilio

NOW = datetime.fromisoformat(AT)  # 2026-12-07 16:00 UTC, 11:00 in New York
LATER = NOW + timedelta(hours=1)
STATIN_EN = Path(__file__).resolve().parents[2] / "templates" / "statin-refill.en.sms.j2"


@pytest.fixture
def db(engage: Engage, settings: Settings, tmp_path: Path, sandbox: SandboxHandle) -> Booking:
    """Sample patients and slots imported, three templates approved, planned and sent."""
    engage.env.update(
        {
            "ENGAGE_TRANSPORT": "sandbox",
            "TWILIO_API_BASE_URL": sandbox.url,
            "ENGAGE_STATUS_CALLBACK_URL": "",
            "ENGAGE_SEND_RATE": "0",
        }
    )
    booking = prepare(
        engage,
        settings,
        tmp_path,
        approve=("statin-refill", "appointment-reminder", "booking-confirmation"),
    )
    engage("dispatch", "--once", "--at", AT)
    create_staff(settings, NOW)
    return booking


@pytest.fixture
def app(db: Booking) -> Flask:
    return admin_app(db.settings, lambda: LATER)


@pytest.fixture
def marketer(app: Flask) -> Admin:
    return sign_in(app, "marketer-1")


def html(response: Any) -> str:
    """The page as read: whitespace collapsed, character references decoded."""
    return " ".join(unescape(response.get_data(as_text=True)).split())


def scalar(db: Booking, stmt: Any) -> Any:
    with db.runtime.session_factory() as session:
        return session.scalar(stmt)


def preview(admin: Admin, path: str, **fields: str) -> Any:
    return admin.client.post(path, json=fields, headers={"X-CSRFToken": admin.csrf()})


def test_each_page_renders_for_a_marketer(marketer: Admin, db: Booking) -> None:
    for path in (
        "/admin/campaigns",
        "/admin/campaigns/statin-refill",
        "/admin/campaigns/appointment-reminder?locale=es",
        "/admin/campaigns/awareness-monthly",
        "/admin/campaigns/statin-refill/dashboard",
        "/admin/dashboards",
        "/admin/templates",
        "/admin/templates/statin-refill/es/edit",
        "/admin/templates/booking-confirmation/en/edit",
        "/admin/campaigns/statin-refill/dry-run",
    ):
        response = marketer.get(path)
        assert response.status_code == 200, path
        assert "<script>" not in response.get_data(as_text=True)  # CSP: no inline script
    assert marketer.get("/admin/campaigns/nope").status_code == 404
    assert marketer.get("/admin/campaigns/nope/dashboard").status_code == 404
    assert marketer.get("/admin/templates/statin-refill/fr/edit").status_code == 404


def test_the_list_shows_live_counts_from_the_outbox(marketer: Admin, db: Booking) -> None:
    page = html(marketer.get("/admin/campaigns"))
    o = m.Outbox
    for name in ("Statin refill reminder", "Appointment reminder"):
        row = re.search(rf"<strong>{name}</strong>.*?</tr>", page)
        assert row is not None
        campaign = re.search(r'<code class="version">([\w-]+)</code>', row.group(0))
        assert campaign is not None
        shown = [int(n) for n in re.findall(r'<td class="n">(\d+)</td>', row.group(0))]
        expected = [
            scalar(
                db, select(func.count()).where(o.campaign_id == campaign.group(1), o.status == s)
            )
            for s in ("queued", "deferred", "sent", "delivered", "blocked", "failed")
        ]
        assert shown == expected and expected[2] > 0  # some were sent
    assert "awareness-monthly" in page and "badge s-active" in page


def test_the_campaign_page_explains_its_definition(marketer: Admin) -> None:
    page = html(marketer.get("/admin/campaigns/statin-refill"))
    assert (
        "3 days before each prescription refill is due, and on the day, at 10:00 in the "
        "patient's time zone." in page
    )
    assert "within 10 hours of its time is dropped" in page
    assert 'prescription.medication_class == "statin"' in page
    reminder = html(marketer.get("/admin/campaigns/appointment-reminder"))
    assert "2 days before each appointment, at 10:00" in reminder
    assert "<strong>primary-care</strong> visits, valid 1 week" in reminder
    monthly = html(marketer.get("/admin/campaigns/awareness-monthly"))
    assert "Every month from 1 Dec 2026, 12 times, at 11:00" in monthly
    # the preview is there on first load, for the synthetic patient
    assert "Hi Maria, your prescription refill is due soon." in page
    assert 'data-preview-url="/admin/campaigns/statin-refill/preview"' in page


def test_the_preview_shows_lint_and_the_blocking_rule(marketer: Admin) -> None:
    source = STATIN_EN.read_text(encoding="utf-8")
    url = "/admin/campaigns/statin-refill/preview"
    # S002 consented to marketing only: the consent rule blocks, citing the TCPA rule
    answer = preview(marketer, url, locale="en", patient="S002", source=source)
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["outcome"] == "deny" and body["approved"] is True and body["edited"] is False
    assert [r["rule"] for r in body["reasons"]] == ["consent-required"]
    assert body["reasons"][0]["cite"].startswith("47 CFR 64.1200(a)(1)")
    assert body["text"].startswith("Riverside Health: Hi Grace,")
    assert "consent-required" in body["html"] and "47 CFR 64.1200(a)(1)" in body["html"]
    # S001 has consent, but a curly apostrophe makes the text UCS-2 (lint warns on its line)
    # and two segments long, which the FCC healthcare exemption's rule blocks
    edited = source.replace("your prescription", "your doctor’s prescription")
    body = preview(marketer, url, locale="en", patient="S001", source=edited).get_json()
    assert body["edited"] is True and body["approved"] is False
    assert body["encoding"] == "UCS-2" and body["segments"] == 2
    assert any(
        i["severity"] == "warning" and "not in GSM-7" in i["message"] and i["line"] == 7
        for i in body["lint"]
    )
    assert body["outcome"] == "deny"
    assert [(r["rule"], r["policy"]) for r in body["reasons"]] == [("hc-concise", "fcc-healthcare")]
    assert "Hi Ada, your doctor’s prescription" in body["text"]
    assert "not approved" in body["html"]
    # an undeclared variable does not load: file:line, and no text
    broken = source.replace("{{ opt_out }}", "{{ opt_out }} {{ shoe_size }}")
    body = preview(marketer, url, locale="en", patient="sample", source=broken).get_json()
    assert body["text"] is None
    assert any(
        p.startswith("templates/statin-refill.en.sms.j2:7:") and "shoe_size" in p
        for p in body["problems"]
    )
    # bad requests
    assert preview(marketer, url, locale="fr", patient="S001", source=source).status_code == 400
    assert preview(marketer, url, locale="en", patient="S999", source=source).status_code == 400


def test_the_preview_works_without_script(marketer: Admin) -> None:
    source = STATIN_EN.read_text(encoding="utf-8").replace("refill is due soon", "refill is due")
    response = marketer.post(
        "/admin/campaigns/statin-refill/preview",
        {"locale": "en", "patient": "S001", "source": source, "preview": "Preview"},
    )
    page = html(response)
    assert response.status_code == 200
    assert "Riverside Health: Hi Ada, your prescription refill is due. Questions?" in page
    assert "edited, not saved" in page
    empty = marketer.post(
        "/admin/campaigns/statin-refill/preview", {"locale": "en", "patient": "S001", "source": ""}
    )
    assert empty.status_code == 400 and "This field is required." in html(empty)


def test_the_dry_run_matches_the_command(marketer: Admin, engage: Engage, db: Booking) -> None:
    report = json.loads(engage("dry-run", "statin-refill", "--at", AT, "--json").stdout)
    # 11:00 in New York is 16:00 UTC
    page = html(
        marketer.get(
            "/admin/campaigns/statin-refill/dry-run?at=2026-12-07T11:00&zone=America/New_York"
        )
    )
    assert "Decided at <strong>2026-12-07 16:00 UTC</strong>" in page
    tiles = re.findall(r'<li class="tile s-(\w+)"><span class="n">(\d+)</span>', page)
    summary = report["summary"]
    assert dict(tiles) == {k: str(summary[k]) for k in ("allow", "defer", "deny")}
    for rule, n in summary["by_rule"].items():
        assert f'<td><code>{rule}</code></td><td class="n">{n}</td>' in page
    assert "Patients are named only to roles that may see patient data." in page
    bad = marketer.get("/admin/campaigns/statin-refill/dry-run?at=tomorrow&zone=UTC")
    assert bad.status_code == 400 and 'class="error"' in bad.get_data(as_text=True)
    with db.runtime.session_factory() as session:
        entry = session.scalar(
            select(m.AuditEntry).where(m.AuditEntry.action == "campaign_dry_run")
        )
        assert entry is not None and entry.subject == "campaign:statin-refill"
        assert entry.details["allow"] == summary["allow"]


def test_pause_and_resume_are_recorded_and_audited(marketer: Admin, db: Booking) -> None:
    s = m.CampaignState
    response = marketer.post("/admin/campaigns/statin-refill/pause")
    assert response.status_code == 302
    assert scalar(db, select(s.paused).where(s.campaign_id == "statin-refill")) is True
    page = html(marketer.get("/admin/campaigns/statin-refill"))
    assert "Campaign statin-refill paused." in page and "Paused by user:marketer-1" in page
    assert 'id="resume"' in page
    assert "badge s-paused" in html(marketer.get("/admin/campaigns"))
    marketer.post("/admin/campaigns/statin-refill/resume")
    assert scalar(db, select(s.paused).where(s.campaign_id == "statin-refill")) is False
    with db.runtime.session_factory() as session:
        entries = session.execute(
            select(m.AuditEntry.actor, m.AuditEntry.action, m.AuditEntry.subject)
            .where(
                m.AuditEntry.action.like("campaign_%"), m.AuditEntry.action != "campaign_dry_run"
            )
            .order_by(m.AuditEntry.id)
        ).all()
        assert audit.verify(session=session).ok
    assert [tuple(e) for e in entries] == [
        ("user:marketer-1", "campaign_paused", "campaign:statin-refill"),
        ("user:marketer-1", "campaign_resumed", "campaign:statin-refill"),
    ]


def test_a_template_edit_becomes_a_pending_draft(marketer: Admin, db: Booking) -> None:
    source = STATIN_EN.read_text(encoding="utf-8")
    url = "/admin/templates/statin-refill/en/edit"
    broken = source.replace("{{ opt_out }}", "{{ opt_out }} {% if %}")
    response = marketer.post(
        url, {"locale": "en", "patient": "sample", "source": broken, "save": "1"}
    )
    page = html(response)
    assert response.status_code == 400
    error = re.search(r'<p class="error" id="source-error">(.*?)</p>', page)
    assert error and re.search(
        r"templates/statin-refill\.en\.sms\.j2:\d+: Expected an", error.group(1)
    )
    assert scalar(db, select(func.count()).select_from(m.TemplateDraft)) == 0
    edited = source.replace("refill is due soon", "refill is due in a few days")
    response = marketer.post(
        url, {"locale": "en", "patient": "sample", "source": edited, "save": "1"}
    )
    assert response.status_code == 302
    draft = scalar(db, select(m.TemplateDraft))
    assert (draft.status, draft.author, draft.template_id) == (
        "pending",
        "user:marketer-1",
        "statin-refill",
    )
    page = html(marketer.get(url))
    assert f"Saved draft #{draft.id} of statin-refill.en" in page
    assert "refill is due soon" in page  # the editor starts from the active text...
    again = html(marketer.get(f"{url}?draft={draft.id}"))
    assert "refill is due in a few days" in again  # ...or from an earlier edit
    assert re.search(rf"#{draft.id} · .*?badge s-pending\">pending<", page)
    # the campaign still sends the approved text
    body = preview(
        marketer, "/admin/templates/statin-refill/en/preview", patient="S001", source=source
    ).get_json()
    assert body["approved"] is True and "refill is due soon" in body["text"]


def test_viewers_may_look_but_not_change(app: Flask, db: Booking) -> None:
    viewer = sign_in(app, "viewer-1")
    page = html(viewer.get("/admin/campaigns/statin-refill"))
    assert 'id="pause"' not in page and "data-preview-url" not in page
    assert viewer.get("/admin/campaigns/statin-refill/dashboard").status_code == 200
    assert viewer.get("/admin/templates/statin-refill/en/edit").status_code == 403
    source = STATIN_EN.read_text(encoding="utf-8")
    edit = {"locale": "en", "patient": "sample", "source": source + " ", "save": "1"}
    assert viewer.post("/admin/templates/statin-refill/en/edit", edit).status_code == 403
    assert viewer.post("/admin/campaigns/statin-refill/pause").status_code == 403
    assert viewer.get("/admin/campaigns/statin-refill/dry-run").status_code == 403
    assert (
        preview(
            viewer,
            "/admin/campaigns/statin-refill/preview",
            locale="en",
            patient="S001",
            source=source,
        ).status_code
        == 403
    )
    assert scalar(db, select(func.count()).select_from(m.CampaignState)) == 0
    assert scalar(db, select(func.count()).select_from(m.TemplateDraft)) == 0
    refused = scalar(db, select(func.count()).where(m.AuditEntry.action == "forbidden"))
    assert refused == 5


def test_the_dashboard_numbers_are_the_databases(
    marketer: Admin, db: Booking, settings: Settings
) -> None:
    # S001 opens the link in their reminder and books, then texts STOP
    patient_app = create_app(db.settings.with_(twilio_auth_token=TOKEN), clock=lambda: LATER)
    client = patient_app.test_client()
    token = db.token("S001")
    page = client.get(f"/s/{token}").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', page)
    assert csrf
    booked = client.post(f"/s/{token}", data={"csrf_token": csrf.group(1), "slot": "PC-3"})
    assert booked.status_code == 303
    assert Twilio(client).text("STOP", sid="SM-stop-1").status_code == 200

    o, link = m.Outbox, m.SchedulingLink
    for campaign in ("appointment-reminder", "statin-refill"):
        mine = o.campaign_id == campaign
        expected = {
            "eligible": scalar(db, select(func.count()).where(mine)),
            "allowed": scalar(
                db, select(func.count()).where(mine, o.status.not_in(["blocked", "expired"]))
            ),
            "sent": scalar(db, select(func.count()).where(mine, o.sent_at.is_not(None))),
            "delivered": scalar(db, select(func.count()).where(mine, o.status == "delivered")),
            "clicked": scalar(
                db,
                select(func.count())
                .select_from(link)
                .join(o, o.id == link.outbox_id)
                .where(mine, link.opened_at.is_not(None)),
            ),
            "booked": scalar(
                db,
                select(func.count())
                .select_from(link)
                .join(o, o.id == link.outbox_id)
                .where(mine, link.booked_slot_id.is_not(None)),
            ),
        }
        page = html(marketer.get(f"/admin/campaigns/{campaign}/dashboard"))
        tiles = tiles_of(page)
        assert tiles == expected, campaign
        blocked = dict(
            re.findall(
                r'badge s-blocked">blocked</span></td><td><code>([\w-]+)</code></td>'
                r'<td class="n">(\d+)</td>',
                page,
            )
        )
        with db.runtime.session_factory() as session:
            rows = session.execute(select(o.reasons).where(mine, o.status == "blocked")).all()
        truth: dict[str, int] = {}
        for (reasons,) in rows:
            rule = next(r["rule"] for r in reasons if r["effect"] == "deny")
            truth[rule] = truth.get(rule, 0) + 1
        assert {k: int(v) for k, v in blocked.items()} == truth, campaign
        assert '<svg class="chart funnel"' in page and '<title id="funnel-title">' in page

    reminder = html(marketer.get("/admin/campaigns/appointment-reminder/dashboard"))
    assert tiles_of(reminder)["clicked"] == 1 and tiles_of(reminder)["booked"] == 1
    sent_to = scalar(
        db,
        select(func.count(func.distinct(o.patient_id))).where(
            o.campaign_id == "appointment-reminder", o.sent_at.is_not(None)
        ),
    )
    assert f"<strong>1</strong> of {sent_to} patients sent a message" in reminder
    day = f'<td>2026-12-07</td><td class="n">{tiles_of(reminder)["sent"]}</td>'
    assert day in reminder
    statin = html(marketer.get("/admin/campaigns/statin-refill/dashboard"))
    assert "texted STOP" in statin


def tiles_of(page: str) -> dict[str, int]:
    return {
        label: int(n.replace(",", ""))
        for n, label in re.findall(
            r'<li class="tile"><span class="n">([\d,]+)</span><span class="label">(\w+)</span>',
            page,
        )
    }
