"""Staff accounts of every role and signed-in test clients of the admin app."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from engine import accounts, drafts
from engine.definitions import DefinitionSet
from engine.runtime import Runtime
from engine.settings import Settings
from engine.web import create_app

PASSWORD = "correct horse battery staple"
USERS = {role: f"{role.replace('_', '-')}-1" for role in accounts.ROLES}  # marketer-1, ...
CSRF = re.compile(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"')


def create_staff(settings: Settings, now: datetime) -> dict[str, str]:
    """One user per role (plus a second marketer and compliance reviewer); role -> name."""
    runtime = Runtime(settings)
    with runtime.session_factory.begin() as session:
        for name, role in [
            *((u, r) for r, u in USERS.items()),
            ("marketer-2", "marketer"),
            ("compliance-2", "compliance"),
        ]:
            accounts.create_user(
                session=session, username=name, password=PASSWORD, role=role, now=now, by="test"
            )
    runtime.engine.dispose()
    return dict(USERS)


@dataclass
class Admin:
    """A test client signed in as one user, with the CSRF token its forms carry."""

    client: FlaskClient
    username: str

    def csrf(self, path: str = "/admin/") -> str:
        html = self.client.get(path).get_data(as_text=True)
        found = CSRF.search(html)
        assert found, f"no CSRF token on {path}"
        return found.group(1)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, **kwargs)

    def post(self, path: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        form = {"csrf_token": self.csrf(), **(data or {})}
        return self.client.post(path, data=form, **kwargs)


def sign_in(app: Flask, username: str, password: str = PASSWORD) -> Admin:
    client = app.test_client()
    page = client.get("/admin/login").get_data(as_text=True)
    token = CSRF.search(page)
    assert token
    response = client.post(
        "/admin/login",
        data={"csrf_token": token.group(1), "username": username, "password": password},
    )
    assert response.status_code == 302, response.get_data(as_text=True)
    return Admin(client, username)


def admin_app(settings: Settings, clock: Callable[[], datetime]) -> Flask:
    return create_app(settings.with_(login_rate_per_minute=1000), clock=clock)


def role_objects(
    session: Session, defs: DefinitionSet, now: datetime
) -> tuple[dict[str, str], dict[str, str]]:
    """Something for every route argument to name (a draft, a user, a token), and one API
    token per role: (route argument values, token secret by role)."""
    source = drafts.template_source(session, defs, "statin-refill", "en")
    draft = drafts.create_draft(
        session=session,
        defs=defs,
        template_id="statin-refill",
        locale="en",
        content=source.replace("Hi ", "Hello "),
        author="user:marketer-2",
        now=now,
    )
    target = accounts.create_user(
        session=session,
        username="target-user",
        password="a long enough password",
        role="viewer",
        now=now,
        by="test",
    )
    token_row, _ = accounts.create_token(
        session=session, name="target", role="viewer", now=now, by="test"
    )
    secrets = {
        role: accounts.create_token(
            session=session, name=f"{role}-token", role=role, now=now, by="test"
        )[1]
        for role in accounts.ROLES
    }
    values = {
        "campaign_id": "statin-refill",
        "template_id": "statin-refill",
        "locale": "en",
        "version": defs.templates[("statin-refill", "en")].version,
        "external_id": "S001",
        "draft_id": str(draft.id),
        "user_id": str(target.id),
        "token_id": str(token_row.id),
        "change": "disable",
    }
    return values, secrets
