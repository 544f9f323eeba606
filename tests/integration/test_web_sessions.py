"""Staff sessions on SQLite and PostgreSQL: a cookie from before sign-in grants nothing
after it, and sign-out, disabling or a password reset ends every session of the user on
the server (a copied cookie dies too). Sign-in failures all look alike, whether or not
the account exists, is disabled or is locked; the per-client throttle holds for all."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from engine import accounts
from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import models as m
from engine.web import create_app
from tests.integration.admin_fixtures import CSRF, PASSWORD, Admin, admin_app, create_staff, sign_in
from tests.integration.conftest import Engage
from tests.integration.web_fixtures import NOW


@pytest.fixture
def app(engage: Engage, settings: Settings) -> Flask:
    create_staff(settings, NOW)
    return admin_app(settings, lambda: NOW)


def _copy(admin: Admin, app: Flask) -> FlaskClient:
    """Another browser holding the same session cookie (a stolen one)."""
    thief = app.test_client()
    cookie = admin.client.get_cookie("session")
    assert cookie is not None
    thief.set_cookie("session", cookie.value)
    return thief


def _signed_in(client: FlaskClient) -> bool:
    return client.get("/admin/").status_code == 200


def test_a_cookie_from_before_sign_in_or_after_sign_out_grants_nothing(app: Flask) -> None:
    victim = app.test_client()
    page = victim.get("/admin/login").get_data(as_text=True)
    planted = victim.get_cookie("session")
    token = CSRF.search(page)
    assert planted is not None and token
    data = {"csrf_token": token.group(1), "username": "it-admin-1", "password": PASSWORD}
    assert victim.post("/admin/login", data=data).status_code == 302
    after = victim.get_cookie("session")
    assert after is not None and after.value != planted.value
    attacker = app.test_client()
    attacker.set_cookie("session", planted.value)
    assert not _signed_in(attacker) and _signed_in(victim)
    # Nor does the login page's CSRF token of the planted session work in the new one.
    assert victim.post("/admin/logout", data={"csrf_token": token.group(1)}).status_code == 400
    _sign_out_ends_every_session_of_the_user(app)


def _sign_out_ends_every_session_of_the_user(app: Flask) -> None:
    admin = sign_in(app, "compliance-1")
    other_user = sign_in(app, "compliance-2")
    thief = _copy(admin, app)
    other_browser = sign_in(app, "compliance-1")
    assert _signed_in(thief) and _signed_in(other_browser)
    assert admin.post("/admin/logout").status_code == 302
    assert not _signed_in(admin.client)
    assert not _signed_in(thief)  # the copied cookie still has the user id: refused
    assert not _signed_in(other_browser)
    assert _signed_in(other_user.client)
    assert _signed_in(sign_in(app, "compliance-1").client)  # a new sign-in works


def test_a_password_reset_or_disabling_ends_the_users_sessions(app: Flask) -> None:
    it = sign_in(app, "it-admin-1")
    marketer, viewer = sign_in(app, "marketer-1"), sign_in(app, "viewer-1")
    marketer_thief, viewer_thief = _copy(marketer, app), _copy(viewer, app)
    marketer_id = _user_id(it, "marketer-1")
    new_password = "another long password"
    reset = it.post(
        f"/admin/users/{marketer_id}/password",
        {"password": new_password, "confirm": new_password},
    )
    assert reset.status_code == 303
    assert not _signed_in(marketer.client) and not _signed_in(marketer_thief)
    assert _signed_in(sign_in(app, "marketer-1", new_password).client)
    assert it.post(f"/admin/users/{_user_id(it, 'viewer-1')}/disable").status_code == 303
    assert it.post(f"/admin/users/{_user_id(it, 'viewer-1')}/enable").status_code == 303
    assert not _signed_in(viewer.client) and not _signed_in(viewer_thief)  # even re-enabled
    assert _signed_in(it.client)


def _user_id(admin: Admin, username: str) -> int:

    settings = admin.client.application.extensions["engage.runtime"].settings
    with Runtime(settings).session_factory() as session:
        found = session.scalar(select(m.User.id).where(m.User.username == username))
    assert found is not None
    return int(found)


def _attempt(app: Flask, username: str, password: str) -> tuple[int, str]:
    client = app.test_client()
    token = CSRF.search(client.get("/admin/login").get_data(as_text=True))
    assert token
    data = {"csrf_token": token.group(1), "username": username, "password": password}
    response = client.post("/admin/login", data=data)
    html = response.get_data(as_text=True)
    return response.status_code, CSRF.sub("", html).replace(username, "<name>")


def test_failed_sign_ins_do_not_tell_whether_the_account_exists(
    app: Flask, settings: Settings
) -> None:
    it = sign_in(app, "it-admin-1")
    assert it.post(f"/admin/users/{_user_id(it, 'compliance-2')}/disable").status_code == 303
    unknown = _attempt(app, "nobody-here", "wrong password!")
    wrong = _attempt(app, "viewer-1", "wrong password!")
    disabled = _attempt(app, "compliance-2", PASSWORD)
    assert unknown[0] == 401 and "Wrong username or password" in unknown[1]
    assert wrong == unknown and disabled == unknown
    for _ in range(accounts.MAX_FAILURES - 1):
        assert _attempt(app, "viewer-1", "wrong password!") == unknown
    locked = _attempt(app, "viewer-1", PASSWORD)  # locked: the right password fails too
    assert locked == unknown
    later = admin_app(settings, lambda: NOW + accounts.LOCKOUT + timedelta(seconds=1))
    assert _attempt(later, "viewer-1", PASSWORD)[0] == 302
    throttled = create_app(settings.with_(login_rate_per_minute=2), clock=lambda: NOW)
    codes = [_attempt(throttled, name, "wrong password!")[0] for name in ("a-1", "b-2", "c-3")]
    assert codes == [401, 401, 429]  # per client, whichever accounts it tries
