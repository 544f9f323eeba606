"""Every role against every admin page and API endpoint, on SQLite and PostgreSQL: a route
answers 403 exactly when the permission matrix says the role may not, never a 5xx, and a
route without a permission is one of the few meant to be public."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import models as m
from engine.web.permissions import PERMISSIONS
from tests.integration.admin_fixtures import Admin, admin_app, create_staff, role_objects, sign_in
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT, SAMPLE

NOW = datetime.fromisoformat(AT)
PUBLIC = {
    "admin.root",
    "auth.login",
    "auth.logout",
    "api_openapi.openapi_json",
    "favicon",
    "healthz",
    "patient.show",
    "patient.book",
    "patient.booked",
    "static",
    "twilio_webhooks.inbound",
    "twilio_webhooks.delivery_status",
}
ARG = re.compile(r"<(?:[a-z]+(?:\([^)]*\))?:)?([a-z_]+)>")


@pytest.fixture
def world(engage: Engage, settings: Settings) -> dict[str, Any]:
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    engage("approve", "statin-refill", "--by", "carol")
    engage("plan", "--at", AT)
    create_staff(settings, NOW)
    rt = Runtime(settings)
    with rt.session_factory.begin() as session:
        defs = rt.definitions(session)
        values, secrets = role_objects(session, defs, NOW)
    rt.engine.dispose()
    return {"values": values, "tokens": secrets}


def _routes(app: Flask) -> list[tuple[str, str, str, str]]:
    """(endpoint, method, path with sample values, permission) for every guarded route."""
    found = []
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        permission = getattr(view, "permission", None)
        if permission is None:
            assert rule.endpoint in PUBLIC, f"{rule.rule} has no permission check"
            continue
        assert permission in PERMISSIONS
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            found.append((rule.endpoint, method, rule.rule, permission))
    return found


def _path(rule: str, values: dict[str, str]) -> str:
    return ARG.sub(lambda match: values[match.group(1)], rule)


def test_every_role_against_every_route(world: dict[str, Any], settings: Settings) -> None:
    app = admin_app(settings, lambda: NOW)
    routes = _routes(app)
    assert len(routes) > 40
    anonymous = app.test_client()
    clients: dict[str, Admin] = {}
    for role, username in [
        ("marketer", "marketer-1"),
        ("compliance", "compliance-1"),
        ("it_admin", "it-admin-1"),
        ("viewer", "viewer-1"),
    ]:
        clients[role] = sign_in(app, username)
    wrong: list[str] = []
    for _endpoint, method, rule, permission in routes:
        path = _path(rule, world["values"])
        api = rule.startswith(("/api/", "/metrics"))
        unauthenticated = anonymous.open(path, method=method)
        expected_anonymous = {401} if api else {302, 400}  # 400: a POST without CSRF token
        if unauthenticated.status_code not in expected_anonymous:
            wrong.append(f"anonymous {method} {path}: {unauthenticated.status_code}")
        for role, admin in clients.items():
            if api:
                headers = {"Authorization": f"Bearer {world['tokens'][role]}"}
                kwargs: dict[str, Any] = {"headers": headers}
                if method == "POST":
                    kwargs["json"] = {}
                response = admin.client.open(path, method=method, **kwargs)
            elif method == "POST":
                response = admin.post(path, {})
            else:
                response = admin.get(path)
            may = role in PERMISSIONS[permission]
            code = response.status_code
            if code >= 500 or (code == 403) == may:
                wrong.append(f"{role} {method} {path} ({permission}): {code}")
    assert wrong == []
    with Runtime(settings).session_factory() as session:
        refusals = session.scalars(
            select(m.AuditEntry).where(m.AuditEntry.action == "forbidden")
        ).all()
    assert refusals and all(r.details.get("permission") for r in refusals)
