"""Signing in to the admin app on SQLite and PostgreSQL: argon2 passwords, lockout, CSRF,
a fresh session at sign-in, safe redirects, audit entries, and `engage users`."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from flask import Flask
from sqlalchemy import select

from engine import accounts, audit
from engine.settings import Settings
from engine.store import models as m
from engine.web import create_app
from tests.integration.admin_fixtures import CSRF, PASSWORD, admin_app, create_staff, sign_in
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT

NOW = datetime.fromisoformat(AT)


@pytest.fixture
def app(engage: Engage, settings: Settings) -> Flask:
    create_staff(settings, NOW)
    return admin_app(settings, lambda: NOW)


def _try(app: Flask, username: str, password: str) -> int:
    client = app.test_client()
    token = CSRF.search(client.get("/admin/login").get_data(as_text=True))
    assert token
    data = {"csrf_token": token.group(1), "username": username, "password": password}
    return client.post("/admin/login", data=data).status_code


def _audit(settings: Settings) -> list[tuple[str, str, str | None]]:
    from engine.runtime import Runtime

    with Runtime(settings).session_factory() as session:
        rows = session.scalars(select(m.AuditEntry).order_by(m.AuditEntry.id)).all()
        assert audit.verify(session=session).ok
        return [(r.actor, r.action, r.subject) for r in rows]


def test_signing_in_and_out(app: Flask, settings: Settings) -> None:
    anonymous = app.test_client()
    response = anonymous.get("/admin/")
    assert response.status_code == 302 and "/admin/login" in response.headers["Location"]
    admin = sign_in(app, "marketer-1")
    home = admin.get("/admin/")
    html = home.get_data(as_text=True)
    assert home.status_code == 200 and "marketer-1 · Marketer" in html
    assert home.headers["Cache-Control"] == "no-store"
    assert "script-src 'self'" in home.headers["Content-Security-Policy"]
    assert admin.post("/admin/logout").status_code == 302
    assert admin.get("/admin/").status_code == 302  # signed out
    assert ("user:marketer-1", "login", "user:marketer-1") in _audit(settings)
    assert ("user:marketer-1", "logout", "user:marketer-1") in _audit(settings)


def test_wrong_passwords_lock_the_account(app: Flask, settings: Settings) -> None:
    assert _try(app, "nobody", "whatever-it-is") == 401
    for _ in range(accounts.MAX_FAILURES - 1):
        assert _try(app, "viewer-1", "wrong password!") == 401
    assert _try(app, "viewer-1", "wrong password!") == 401  # the fifth locks
    assert _try(app, "viewer-1", PASSWORD) == 401  # locked, even with the right password
    later = admin_app(settings, lambda: NOW + accounts.LOCKOUT + timedelta(seconds=1))
    assert _try(later, "viewer-1", PASSWORD) == 302
    failed = [e for e in _audit(settings) if e[1] == "login_failed"]
    assert len(failed) == accounts.MAX_FAILURES + 2


def test_the_login_form_needs_its_csrf_token_and_redirects_only_here(app: Flask) -> None:
    client = app.test_client()
    data = {"username": "marketer-1", "password": PASSWORD}
    assert client.post("/admin/login", data=data).status_code == 400
    for target, expected in [
        ("/admin/", "/admin/"),
        ("https://evil.example/admin", "/admin/"),
        ("//evil.example/admin", "/admin/"),
        ("/s/whatever", "/admin/"),
    ]:
        client = app.test_client()
        token = CSRF.search(client.get("/admin/login").get_data(as_text=True))
        assert token
        response = client.post(
            f"/admin/login?next={target}", data={**data, "csrf_token": token.group(1)}
        )
        assert response.headers["Location"] == expected, target


def test_sign_in_starts_a_new_session(app: Flask) -> None:
    client = app.test_client()
    client.get("/admin/login")
    before = client.get_cookie("session")
    token = CSRF.search(client.get("/admin/login").get_data(as_text=True))
    assert token and before is not None
    data = {"csrf_token": token.group(1), "username": "it-admin-1", "password": PASSWORD}
    client.post("/admin/login", data=data)
    after = client.get_cookie("session")
    assert after is not None and after.value != before.value
    assert after.http_only and after.same_site == "Lax"


def test_sign_in_is_throttled_per_client(engage: Engage, settings: Settings) -> None:
    create_staff(settings, NOW)
    app = create_app(settings.with_(login_rate_per_minute=3), clock=lambda: NOW)
    codes = [_try(app, "marketer-1", "wrong password!") for _ in range(4)]
    assert codes[:3] == [401, 401, 401] and codes[3] == 429


def test_users_and_tokens_from_the_command_line(engage: Engage, settings: Settings) -> None:
    engage.env["ENGAGE_NEW_PASSWORD"] = PASSWORD
    result = engage("users", "create", "dana", "--role", "compliance", "--by", "root")
    assert "created user dana (Compliance reviewer)" in result.output
    assert engage("users", "create", "dana", "--role", "viewer", code=2)
    engage.env["ENGAGE_NEW_PASSWORD"] = "short"
    assert "at least 12" in engage("users", "create", "eve", "--role", "viewer", code=2).output
    secret = engage("tokens", "create", "ehr", "--role", "it_admin").output.strip()
    assert secret.startswith("eng_") and len(secret) > 40
    assert engage("tokens", "revoke", "ehr").output.startswith("revoked 1")
    app = create_app(settings, clock=lambda: NOW)
    assert _try(app, "dana", PASSWORD) == 302
    actions = [a for _, a, _ in _audit(settings) if a != "definitions_loaded"]
    assert actions[:3] == ["user_created", "token_created", "token_revoked"]
