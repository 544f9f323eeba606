"""Security headers on every kind of response, no inline script in any page or template,
HSTS only over TLS, cookie flags, and CSRF on every state-changing form route, on SQLite
and PostgreSQL. The routes come from the app's url_map: a new route is checked unasked."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from twilio.request_validator import RequestValidator
from werkzeug.test import TestResponse

from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import models as m
from engine.web import create_app
from tests.integration.admin_fixtures import CSRF, PASSWORD, admin_app, create_staff, sign_in
from tests.integration.conftest import Engage
from tests.integration.web_fixtures import (
    NOW,
    NOWHERE,
    STATE_CHANGING,
    World,
    build_world,
    fill,
    guarded,
)

TEMPLATES = Path(__file__).resolve().parents[2] / "engine" / "web" / "templates"
REFERRER_POLICIES = {
    "no-referrer",
    "same-origin",
    "strict-origin",
    "strict-origin-when-cross-origin",
}
UNSAFE_SOURCES = {"'unsafe-inline'", "'unsafe-eval'", "'unsafe-hashes'", "*", "data:", "http:"}


@pytest.fixture
def world(engage: Engage, settings: Settings, tmp_path: Path) -> World:
    return build_world(engage, settings, tmp_path)


def header_problems(response: TestResponse, *, tls: bool = False) -> list[str]:
    """What is wrong with a response's security headers (empty: nothing)."""
    problems = []
    policy = response.headers.get("Content-Security-Policy", "")
    directives = {}
    for part in policy.split(";"):
        name, _, sources = part.strip().partition(" ")
        if name:
            directives[name] = set(sources.split())
    scripts = directives.get("script-src", directives.get("default-src"))
    if scripts is None or scripts & UNSAFE_SOURCES:
        problems.append(f"script sources {scripts}")
    if directives.get("frame-ancestors") != {"'none'"}:
        problems.append(f"frame-ancestors {directives.get('frame-ancestors')}")
    if response.headers.get("X-Content-Type-Options") != "nosniff":
        problems.append("no nosniff")
    if response.headers.get("X-Frame-Options") != "DENY":
        problems.append("no X-Frame-Options")
    if response.headers.get("Referrer-Policy") not in REFERRER_POLICIES:
        problems.append(f"Referrer-Policy {response.headers.get('Referrer-Policy')}")
    if ("Strict-Transport-Security" in response.headers) != tls:
        problems.append(f"HSTS {response.headers.get('Strict-Transport-Security')} (tls={tls})")
    for cookie in response.headers.getlist("Set-Cookie"):
        flags = cookie.lower()
        if "max-age=0" in flags and cookie.split(";")[0].endswith("="):
            continue  # a deletion carries nothing (Flask-Login clears remember_token)
        if "httponly" not in flags or "samesite=lax" not in flags:
            problems.append(f"cookie {cookie.split('=')[0]} without HttpOnly/SameSite")
    return problems


class InlineScript(HTMLParser):
    """Collects what a strict CSP would block or what smuggles script into a page: a
    <script> without src or with a body, on* handler attributes, javascript: URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name.lower(): value or "" for name, value in attrs}
        if tag == "script":
            self._in_script = True
            if not names.get("src"):
                self.found.append("<script> without src")
        self.found += [f"{tag} {name}=" for name in names if name.startswith("on")]
        self.found += [
            f"{tag} {name}=javascript:"
            for name, value in names.items()
            if value.strip().lower().startswith("javascript:")
        ]

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.found.append(f"inline script {data.strip()[:40]!r}")


def inline_script(html: str) -> list[str]:
    parser = InlineScript()
    parser.feed(html)
    return parser.found


def test_no_template_has_inline_script_or_handlers() -> None:
    templates = sorted(TEMPLATES.rglob("*.html"))
    assert len(templates) > 20
    found = {str(t.relative_to(TEMPLATES)): inline_script(t.read_text()) for t in templates}
    assert {name: problems for name, problems in found.items() if problems} == {}
    assert inline_script('<a href="javascript:x()" onclick="y()"><script>z()</script>') == [
        "a onclick=",
        "a href=javascript:",
        "<script> without src",
        "inline script 'z()'",
    ]


def _walk(world: World, app: Flask) -> list[tuple[str, TestResponse]]:
    """Every route, anonymously and as an IT administrator (signed in, or by token for
    the API), GETs before POSTs and signing out last; (what, response) pairs."""
    anonymous = app.test_client()
    admin = sign_in(app, "it-admin-1")
    order = {"GET": 0, "POST": 1}
    routes = sorted(guarded(app), key=lambda r: (r[0] == "/admin/logout", order.get(r[1], 2), r[0]))
    seen = []
    for rule, method, _permission in routes:
        path = world.path(rule)
        api = rule.startswith(("/api/", "/metrics"))
        seen.append((f"anonymous {method} {path}", anonymous.open(path, method=method)))
        if api:
            response = admin.client.open(
                path, method=method, headers=world.bearer("it_admin"), json={}
            )
        elif method == "POST":
            response = admin.post(path, {})
        else:
            response = admin.client.open(path, method=method)
        seen.append((f"it_admin {method} {path}", response))
    return seen


def _signed(client: FlaskClient, path: str, form: dict[str, str], token: str) -> TestResponse:
    signature = RequestValidator(token).compute_signature(f"http://localhost{path}", form)
    return client.post(path, data=form, headers={"X-Twilio-Signature": signature})


def _error_kinds(world: World, app: Flask) -> list[tuple[str, TestResponse]]:
    client = app.test_client()
    big = "x" * (80 * 1024)
    token = app.extensions["engage.runtime"].settings.webhook_auth_token
    inbound = {"MessageSid": "SM" + "1" * 32, "From": "+12125550199", "Body": "HELP"}
    kinds = [
        ("404 page", client.get("/nope")),
        ("404 admin", client.get("/admin/nope")),
        ("404 api", client.get("/api/v1/nope", headers=world.bearer("viewer"))),
        ("404 patient link", client.get("/s/x")),
        ("410 patient link", client.get("/s/" + "A" * 22)),
        ("405 admin", client.get("/admin/logout")),
        ("405 api", client.delete("/api/v1/campaigns", headers=world.bearer("viewer"))),
        ("405 webhook", client.get("/twilio/inbound")),
        ("413 admin", client.post("/admin/login", data={"username": big})),
        ("413 api", client.post("/api/v1/consents", data=big, content_type="application/json")),
        ("413 webhook", client.post("/twilio/inbound", data={"Body": big})),
        ("415 webhook", client.post("/twilio/inbound", json={})),
        ("400 login without csrf", client.post("/admin/login", data={"username": "a"})),
        ("400 api", client.get("/api/v1/patients?cursor=zz", headers=world.bearer("it_admin"))),
        ("401 api", client.get("/api/v1/campaigns")),
        ("403 api", client.post("/api/v1/campaigns/x/pause", headers=world.bearer("viewer"))),
        ("403 webhook unsigned", client.post("/twilio/inbound", data=inbound)),
        ("200 webhook signed", _signed(client, "/twilio/inbound", inbound, token)),
        ("200 booking page", client.get(f"/s/{world.values['token']}")),
    ]
    limited = create_app(world.settings.with_(login_rate_per_minute=1), clock=lambda: NOW)
    limited_client = limited.test_client()
    found = CSRF.search(limited_client.get("/admin/login").get_data(as_text=True))
    assert found
    for _ in range(2):
        data = {"csrf_token": found.group(1), "username": "a", "password": "b"}
        throttled = limited_client.post("/admin/login", data=data)
    kinds.append(("429 login", throttled))
    return kinds


def _failing_app(world: World) -> Flask:
    app = world.app()

    def boom() -> str:
        raise RuntimeError("a bug")

    for path in ("/admin/boom", "/api/v1/boom", "/s/boom/x"):
        app.add_url_rule(path, f"boom{path.replace('/', '_')}", boom, methods=["GET"])
    return app


def test_every_response_carries_the_security_headers(world: World) -> None:
    app = world.app(transport="sandbox")
    responses = _walk(world, app) + _error_kinds(world, app)
    failing = _failing_app(world).test_client()
    responses += [
        (f"500 {p}", failing.get(p)) for p in ("/admin/boom", "/api/v1/boom", "/s/boom/x")
    ]
    codes = {response.status_code for _, response in responses}
    assert {200, 301, 302, 303, 400, 401, 403, 404, 405, 410, 413, 415, 429, 500} <= codes
    assert [(what, p) for what, r in responses for p in header_problems(r)] == []
    pages = [(what, r) for what, r in responses if r.mimetype == "text/html"]
    assert len(pages) > 40
    found = [(what, p) for what, r in pages for p in inline_script(r.get_data(as_text=True))]
    assert found == []
    for what, response in responses:
        if response.request.path.startswith(("/admin", "/api", "/s/", "/metrics", "/twilio")):
            assert "no-store" in response.headers.get("Cache-Control", ""), what


@pytest.fixture
def staffed(engage: Engage, settings: Settings) -> Settings:
    """No patients: for what is decided before any view looks anything up."""
    create_staff(settings, NOW)
    return settings


def test_hsts_and_secure_cookies_only_over_tls_and_the_proxy_only_when_trusted(
    staffed: Settings,
) -> None:
    direct = admin_app(staffed, lambda: NOW).test_client()
    behind = admin_app(staffed.with_(trust_proxy=True), lambda: NOW).test_client()
    proto = {"X-Forwarded-Proto": "https"}
    assert header_problems(direct.get("/healthz")) == []
    assert header_problems(direct.get("/healthz", base_url="https://localhost"), tls=True) == []
    assert header_problems(direct.get("/healthz", headers=proto)) == []  # not believed
    assert header_problems(behind.get("/healthz", headers=proto), tls=True) == []
    assert header_problems(behind.get("/healthz")) == []
    hsts = behind.get("/admin/login", headers=proto).headers["Strict-Transport-Security"]
    assert int(hsts.removeprefix("max-age=").split(";")[0]) >= 31536000
    on_https = admin_app(staffed.with_(public_url="https://rh.example"), lambda: NOW)
    on_http = admin_app(staffed.with_(public_url="http://localhost"), lambda: NOW)
    assert {"secure", "httponly", "samesite=lax"} <= _session_cookie_flags(on_https)
    assert {"httponly", "samesite=lax"} == _session_cookie_flags(on_http) - {"path=/"}


def _session_cookie_flags(app: Flask) -> set[str]:
    client = app.test_client()
    token = CSRF.search(client.get("/admin/login").get_data(as_text=True))
    assert token
    data = {"csrf_token": token.group(1), "username": "viewer-1", "password": PASSWORD}
    response = client.post("/admin/login", data=data)
    assert response.status_code == 302
    (cookie,) = [c for c in response.headers.getlist("Set-Cookie") if c.startswith("session=")]
    return {part.strip().lower() for part in cookie.split(";")[1:]}


def _audit_entries(settings: Settings) -> int:
    with Runtime(settings).session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(m.AuditEntry)) or 0)


def test_forms_need_this_sessions_csrf_token_and_the_api_a_bearer_token(
    staffed: Settings,
) -> None:
    app = admin_app(staffed, lambda: NOW)
    forms = [
        (rule, method)
        for rule, method, _ in guarded(app)
        if method in STATE_CHANGING and not rule.startswith(("/api/", "/metrics", "/twilio/"))
    ]
    assert len(forms) > 15 and ("/admin/login", "POST") in forms
    victim, attacker = sign_in(app, "it-admin-1"), sign_in(app, "it-admin-1")
    foreign = attacker.csrf()
    assert foreign != victim.csrf()
    before = _audit_entries(staffed)
    refused: dict[str, list[int]] = {}
    for rule, method in forms:
        path = fill(rule, NOWHERE)
        answers = []
        for token in (None, "not-a-token", foreign, foreign[:-4] + "abcd"):
            data: dict[str, Any] = {} if token is None else {"csrf_token": token}
            answers.append(victim.client.open(path, method=method, data=data).status_code)
        refused[f"{method} {path}"] = answers
    assert {k: v for k, v in refused.items() if v != [400] * 4} == {}
    assert _audit_entries(staffed) == before  # nothing happened, nothing refused
    assert victim.get("/admin/").status_code == 200  # still signed in: logout was refused
    # The API: a bearer token or nothing, even with a session and its CSRF token.
    csrf = victim.csrf()
    calls = [
        (rule, method)
        for rule, method, _ in guarded(app)
        if rule.startswith(("/api/v1/", "/metrics"))
    ]
    assert any(method in STATE_CHANGING for _, method in calls)
    api_answers = {
        f"{method} {rule}": victim.client.open(
            fill(rule, NOWHERE), method=method, json={}, headers={"X-CSRFToken": csrf}
        ).status_code
        for rule, method in calls
    }
    assert {call: code for call, code in api_answers.items() if code != 401} == {}
