"""The REST API on SQLite and PostgreSQL: bearer tokens and roles, every endpoint's answer
and its 400s naming the field, pagination, and no PHI where none is promised."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, update

from engine import audit
from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import models as m
from engine.store.outbox_queries import outbox_status
from engine.web import create_app
from tests.integration.admin_fixtures import create_staff, sign_in
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT, SAMPLE

NOW = datetime.fromisoformat(AT)
ROLES = ("it_admin", "compliance", "marketer", "viewer")


@dataclass
class Api:
    app: Flask
    tokens: dict[str, str]
    settings: Settings

    def call(self, method: str, path: str, role: str | None = "it_admin", **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if role is not None:
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        response = self.app.test_client().open(path, method=method, headers=headers, **kwargs)
        assert response.mimetype == "application/json", (path, response.status_code)
        return response

    def get(self, path: str, role: str | None = "it_admin", **kwargs: Any) -> Any:
        return self.call("GET", path, role, **kwargs)

    def post(self, path: str, role: str | None = "it_admin", **kwargs: Any) -> Any:
        return self.call("POST", path, role, **kwargs)

    def error(self, response: Any, status: int, field: str) -> str:
        assert response.status_code == status, response.get_data(as_text=True)
        error = response.get_json()["error"]
        assert (error["status"], error["field"]) == (status, field), error
        return str(error["message"])

    def audit(self) -> list[tuple[str, str, str | None, dict[str, Any]]]:
        with Runtime(self.settings).session_factory() as session:
            assert audit.verify(session=session).ok
            rows = session.scalars(select(m.AuditEntry).order_by(m.AuditEntry.id))
            return [(r.actor, r.action, r.subject, r.details) for r in rows]

    def scalar(self, statement: Any) -> Any:
        with Runtime(self.settings).session_factory() as session:
            return session.scalar(statement)


@pytest.fixture
def api(engage: Engage, settings: Settings) -> Api:
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    engage("approve", "statin-refill", "--by", "carol")
    engage("plan", "--at", AT)
    tokens = {
        role: engage("tokens", "create", role, "--role", role).output.strip() for role in ROLES
    }
    return Api(create_app(settings, clock=lambda: NOW), tokens, settings)


def _pages(api: Api, path: str, role: str = "it_admin") -> list[dict[str, Any]]:
    """Every item of a list endpoint, two at a time, following next_cursor."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        separator = "&" if "?" in path else "?"
        after = f"&cursor={cursor}" if cursor else ""
        page = api.get(f"{path}{separator}limit=2{after}", role).get_json()
        assert len(page["items"]) <= 2
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def _phi() -> list[str]:
    """Names and phone numbers of the sample patients."""
    with (SAMPLE / "patients.csv").open() as f:
        rows = list(csv.DictReader(f))
    digits = ["".join(ch for ch in r["phone"] if ch.isdigit())[-7:] for r in rows]
    return [r["given_name"] for r in rows] + [r["family_name"] for r in rows] + digits


# --- authentication and authorisation ------------------------------------------------------


def test_tokens_authenticate_and_roles_authorise(api: Api, engage: Engage) -> None:
    response = api.get("/api/v1/campaigns", role=None)
    api.error(response, 401, "authentication")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Basic abc", "Bearer ", "Bearer eng_not-a-token", api.tokens["viewer"]):
        api.error(
            api.get("/api/v1/campaigns", None, headers={"Authorization": header}),
            401,
            "authentication",
        )
    assert api.get("/api/v1/campaigns", "viewer").status_code == 200

    api.error(api.get("/api/v1/patients", "viewer"), 403, "authorization")
    api.error(api.post("/api/v1/consents", "marketer", json={}), 403, "authorization")
    api.error(api.post("/api/v1/campaigns/statin-refill/pause", "compliance"), 403, "authorization")
    forbidden = [(a, s, d) for a, action, s, d in api.audit() if action == "forbidden"]
    assert (
        "token:viewer",
        "/api/v1/patients",
        {"permission": "patients.view", "method": "GET"},
    ) in [(a, s, {k: d[k] for k in ("permission", "method")}) for a, s, d in forbidden]
    assert len(forbidden) == 3

    engage("tokens", "revoke", "viewer")
    api.error(api.get("/api/v1/campaigns", "viewer"), 401, "authentication")


def test_a_signed_in_session_is_not_an_api_token(api: Api) -> None:
    create_staff(api.settings, NOW)
    admin = sign_in(api.app, "it-admin-1")
    response = admin.client.get("/api/v1/campaigns")
    assert response.status_code == 401 and response.is_json
    response = admin.client.post("/api/v1/campaigns/statin-refill/pause")
    assert response.status_code == 401  # no CSRF token needed, and no cookie accepted either


def test_errors_are_json_with_the_one_shape(api: Api) -> None:
    api.error(api.get("/api/v1/nothing-here"), 404, "request")
    response = api.call("DELETE", "/api/v1/consents")
    api.error(response, 405, "request")
    assert "POST" in response.headers["Allow"]
    api.error(
        api.post("/api/v1/consents", data="x", content_type="text/plain"), 415, "Content-Type"
    )
    api.error(api.post("/api/v1/consents", data="{", content_type="application/json"), 400, "body")
    api.error(api.post("/api/v1/consents", json=[1]), 400, "body")
    api.error(
        api.post("/api/v1/consents", data="{}" + " " * 70_000, content_type="application/json"),
        413,
        "request",
    )
    api.error(api.get("/api/v1/patients?limit=1&limit=2"), 400, "limit")
    api.error(api.get("/api/v1/patients?colour=red"), 400, "colour")
    assert api.get("/api/openapi.json", role=None).status_code == 200


# --- patients ------------------------------------------------------------------------------


def test_patients_page_by_cursor_and_show_no_phi(api: Api) -> None:
    items = _pages(api, "/api/v1/patients")
    ids = [p["external_id"] for p in items]
    assert ids == [f"S{n:03}" for n in range(1, 11)]
    first = items[0]
    assert set(first) == {
        "external_id", "locale", "timezone", "country", "region", "suppressed", "erased", "consent"
    }  # fmt: skip
    assert first["consent"]["adherence"]["active"] is True
    assert first["consent"]["adherence"]["legal_basis"] == "express"
    assert set(first["consent"]) == {"adherence", "appointment", "marketing"}
    text = json.dumps(items)
    assert not [word for word in _phi() if word in text]

    only = api.get("/api/v1/patients?external_id=S002").get_json()
    assert [p["external_id"] for p in only["items"]] == ["S002"] and only["next_cursor"] is None
    assert api.get("/api/v1/patients?external_id=nobody").get_json()["items"] == []
    api.error(api.get("/api/v1/patients?limit=0"), 400, "limit")
    api.error(api.get("/api/v1/patients?limit=201"), 400, "limit")
    api.error(api.get("/api/v1/patients?cursor=LTE"), 400, "cursor")
    api.error(api.get("/api/v1/patients?cursor=!!"), 400, "cursor")
    listed = [e for e in api.audit() if e[1] == "patients_listed"]
    assert listed[0][0] == "token:it_admin" and listed[0][3] == {"count": 2}


def test_one_patient(api: Api) -> None:
    response = api.get("/api/v1/patients/S001", "compliance")
    patient = response.get_json()
    assert response.status_code == 200
    assert patient["external_id"] == "S001" and patient["timezone"] == "America/New_York"
    assert patient["erased"] is False and patient["suppressed"] is False
    assert {"candidate_timezones", "allow_phi_sms", "created_at"} <= set(patient)
    assert not [word for word in _phi() if word in response.get_data(as_text=True)]
    api.error(api.get("/api/v1/patients/S999"), 404, "external_id")
    assert ("token:compliance", "patient_viewed", "patient:S001", {}) in api.audit()


# --- consents ------------------------------------------------------------------------------

GRANT = {
    "patient": "S003",
    "purpose": "marketing",
    "status": "granted",
    "legal_basis": "written",
    "method": "web_form",
    "notice_version": "2026-01",
    "evidence": "signed form #4411",
    "occurred_at": "2026-12-07T15:00:00Z",
}


def test_recording_consent_as_the_cli_does(api: Api, engage: Engage) -> None:
    response = api.post("/api/v1/consents", "compliance", json=GRANT)
    assert response.status_code == 201, response.get_json()
    answer = response.get_json()
    assert answer["patient"] == "S003"
    assert answer["consent"]["marketing"]["active"] is True
    assert answer["consent"]["marketing"]["legal_basis"] == "written"
    assert answer["event"]["recorded_by"] == "token:compliance"
    assert "evidence" not in answer["event"]
    row = api.scalar(select(m.ConsentEvent).order_by(m.ConsentEvent.id.desc()).limit(1))
    assert (row.purpose, row.status, row.source) == ("marketing", "granted", "api")
    assert row.evidence_enc is not None and b"4411" not in row.evidence_enc
    event = answer["event"]["id"]
    assert (
        "token:compliance", "consent_recorded", "patient:S003",
        {"event": event, "purpose": "marketing", "status": "granted"},
    ) in api.audit()  # fmt: skip

    # A revocation through the API changes the next decision, as `engage consent revoke` does.
    before = json.loads(engage("dry-run", "statin-refill", "--at", AT, "--json").stdout)
    allowed = [d["patient"] for d in before["decisions"] if d["outcome"] == "allow"]
    assert allowed
    revoke = {"patient": allowed[0], "purpose": "adherence", "status": "revoked", "method": "phone"}
    assert (
        api.post("/api/v1/consents", json=revoke).get_json()["consent"]["adherence"]["active"]
        is False
    )
    after = json.loads(engage("dry-run", "statin-refill", "--at", AT, "--json").stdout)
    mine = [d for d in after["decisions"] if d["patient"] == allowed[0]]
    assert mine and all(d["outcome"] == "deny" for d in mine)


BAD_CONSENTS: list[tuple[dict[str, Any], int, str]] = [
    ({"purpose": "lottery"}, 400, "purpose"),
    ({"purpose": "Not An Id"}, 400, "purpose"),
    ({"legal_basis": "because"}, 400, "legal_basis"),
    ({"legal_basis": None}, 400, "legal_basis"),
    ({"status": "revoked"}, 400, "legal_basis"),
    ({"status": "maybe"}, 400, "status"),
    ({"method": ""}, 400, "method"),
    ({"method": None}, 400, "method"),
    ({"method": "web\u0000form"}, 400, "method"),
    ({"occurred_at": "2026-12-07T15:00:00"}, 400, "occurred_at"),
    ({"occurred_at": "2027-01-01T00:00:00Z"}, 400, "occurred_at"),
    ({"occurred_at": "0001-01-01T00:00:00+14:00"}, 400, "occurred_at"),
    ({"extra": 1}, 400, "extra"),
    ({"patient": "S999"}, 404, "patient"),
]


def test_a_bad_consent_names_its_field_and_records_nothing(api: Api) -> None:
    before = api.scalar(select(func.count()).select_from(m.ConsentEvent))
    for change, status, field in BAD_CONSENTS:
        api.error(api.post("/api/v1/consents", json={**GRANT, **change}), status, field)
    without_method = {k: v for k, v in GRANT.items() if k != "method"}
    assert "required" in api.error(api.post("/api/v1/consents", json=without_method), 400, "method")
    assert api.scalar(select(func.count()).select_from(m.ConsentEvent)) == before
    assert not [e for e in api.audit() if e[1] == "consent_recorded"]


def test_an_erased_patient_takes_no_consent(api: Api) -> None:
    with Runtime(api.settings).session_factory.begin() as session:  # crypto-shredding
        patient = session.scalar(select(m.Patient).where(m.Patient.external_id == "S003"))
        session.execute(
            update(m.PatientKey)
            .where(m.PatientKey.patient_id == patient.id)
            .values(wrapped_key=None)
        )
        patient.erased_at = NOW
    api.error(api.post("/api/v1/consents", json=GRANT), 409, "patient")
    assert api.get("/api/v1/patients/S003").get_json()["erased"] is True


# --- campaigns -----------------------------------------------------------------------------


def test_campaigns_with_their_counts(api: Api) -> None:
    items = api.get("/api/v1/campaigns", "viewer").get_json()["items"]
    assert [c["id"] for c in items] == [
        "appointment-reminder",
        "awareness-monthly",
        "statin-refill",
    ]
    detail = api.get("/api/v1/campaigns/statin-refill", "viewer").get_json()
    with Runtime(api.settings).session_factory() as session:
        expected = outbox_status(session=session, campaign_id="statin-refill")
    assert detail["counts"] == expected.by_status and sum(detail["counts"].values()) > 0
    by_rule = {(r["status"], r["rule"]): r["count"] for r in detail["by_rule"]}
    assert by_rule == expected.by_rule
    assert detail["paused"] is False and detail["purpose"] == "adherence"
    api.error(api.get("/api/v1/campaigns/no-such-campaign"), 404, "campaign_id")
    api.error(api.get("/api/v1/campaigns/NOT%20AN%20ID"), 404, "campaign_id")


def test_pausing_and_resuming_is_audited(api: Api) -> None:
    paused = api.post("/api/v1/campaigns/statin-refill/pause", "marketer")
    assert paused.status_code == 200
    assert paused.get_json()["paused"] is True and paused.get_json()["changed"] is True
    assert (
        api.post("/api/v1/campaigns/statin-refill/pause", "marketer").get_json()["changed"] is False
    )
    state = api.scalar(
        select(m.CampaignState).where(m.CampaignState.campaign_id == "statin-refill")
    )
    assert state.paused and state.updated_by == "token:marketer"
    assert api.get("/api/v1/campaigns/statin-refill").get_json()["paused"] is True
    resumed = api.post("/api/v1/campaigns/statin-refill/resume", "it_admin").get_json()
    assert resumed["paused"] is False and resumed["changed"] is True
    actions = [
        (a, action, s, d) for a, action, s, d in api.audit() if action.startswith("campaign_")
    ]
    assert actions == [
        ("token:marketer", "campaign_paused", "campaign:statin-refill", {"changed": True}),
        ("token:marketer", "campaign_paused", "campaign:statin-refill", {"changed": False}),
        ("token:it_admin", "campaign_resumed", "campaign:statin-refill", {"changed": True}),
    ]
    api.error(api.post("/api/v1/campaigns/nope/pause", "marketer"), 404, "campaign_id")
    api.error(api.post("/api/v1/campaigns/statin-refill/resume", "viewer"), 403, "authorization")


def test_the_dry_run_answers_what_the_cli_prints(api: Api, engage: Engage) -> None:
    cli = json.loads(engage("dry-run", "statin-refill", "--at", AT, "--json").stdout)
    response = api.post(
        "/api/v1/campaigns/statin-refill/dry-run", "compliance", json={"at": AT, "limit": 1000}
    )
    assert response.status_code == 200
    answer = response.get_json()
    assert answer.pop("truncated") is False
    assert answer == cli
    one = api.post(
        "/api/v1/campaigns/statin-refill/dry-run", json={"at": AT, "limit": 1}
    ).get_json()
    assert one["decisions"] == cli["decisions"][:1] and one["truncated"] is True
    assert one["summary"] == cli["summary"]
    now = api.post("/api/v1/campaigns/statin-refill/dry-run").get_json()  # no body: now, 100
    assert now["at"] == NOW.isoformat()
    api.error(
        api.post("/api/v1/campaigns/statin-refill/dry-run", json={"at": "2026-12-07T16:00:00"}),
        400,
        "at",
    )
    api.error(api.post("/api/v1/campaigns/statin-refill/dry-run", json={"limit": -1}), 400, "limit")
    api.error(
        api.post("/api/v1/campaigns/statin-refill/dry-run", json={"sample": 3}), 400, "sample"
    )
    api.error(api.post("/api/v1/campaigns/nope/dry-run", json={}), 404, "campaign_id")
    api.error(
        api.post("/api/v1/campaigns/statin-refill/dry-run", "viewer", json={}), 403, "authorization"
    )
    runs = [e for e in api.audit() if e[1] == "campaign_dry_run"]
    assert runs[0][:3] == ("token:compliance", "campaign_dry_run", "campaign:statin-refill")
    assert runs[0][3]["decisions"] == len(cli["decisions"])


# --- decisions and messages ----------------------------------------------------------------


def test_decisions_with_reasons_filters_and_patients_only_when_allowed(api: Api) -> None:
    rows = _pages(api, "/api/v1/decisions")
    assert len(rows) == api.scalar(select(func.count()).select_from(m.Outbox)) > 2
    assert [r["id"] for r in rows] == sorted({r["id"] for r in rows})
    assert all(r["patient"] and r["anchor"] is not None for r in rows)
    denied = [r for r in rows if r["outcome"] == "deny"]
    assert denied and all(r["reasons"] and r["deciding_rule"] for r in denied)

    with Runtime(api.settings).session_factory() as session:
        by_rule = outbox_status(session=session).by_rule
    for (status, rule), count in by_rule.items():
        found = _pages(api, f"/api/v1/decisions?rule={rule}")
        assert Counter(r["status"] for r in found)[status] == count
        assert all(r["deciding_rule"] == rule for r in found)
    outcome = api.get("/api/v1/decisions?outcome=deny&limit=200").get_json()["items"]
    assert outcome == denied

    mine = api.get("/api/v1/decisions?patient=S001&limit=200").get_json()["items"]
    assert mine == [r for r in rows if r["patient"] == "S001"] and mine
    api.error(api.get("/api/v1/decisions?patient=S999"), 404, "patient")
    api.error(api.get("/api/v1/decisions?outcome=maybe"), 400, "outcome")

    anonymous = api.get("/api/v1/decisions?limit=200", "marketer").get_json()["items"]
    assert len(anonymous) == len(rows)
    assert all(r["patient"] is None and r["anchor"] is None for r in anonymous)
    assert "S001" not in json.dumps(anonymous)
    api.error(api.get("/api/v1/decisions?patient=S001", "marketer"), 403, "patient")
    assert ("token:marketer", "forbidden", "/api/v1/decisions") in [e[:3] for e in api.audit()]


def test_messages_never_carry_text(api: Api) -> None:
    rows = _pages(api, "/api/v1/messages", "viewer")
    assert len(rows) == api.scalar(select(func.count()).select_from(m.Outbox))
    assert set(rows[0]) == {
        "id", "campaign", "status", "provider_status", "segments", "encoding", "send_at",
        "sent_at", "error_code", "attempts",
    }  # fmt: skip
    text = json.dumps(rows)
    assert "Riverside" not in text and not [w for w in _phi() if w in text]
    queued = api.get("/api/v1/messages?status=queued&campaign=statin-refill&limit=200").get_json()
    assert queued["items"] and all(
        (r["status"], r["campaign"]) == ("queued", "statin-refill") for r in queued["items"]
    )
    api.error(api.get("/api/v1/messages?status=lost"), 400, "status")
    api.error(api.get("/api/v1/messages?campaign=%00"), 400, "campaign")
