"""A prepared world for the web security tests: the sample patients imported with open
slots, every sample campaign approved and planned, staff of every role, an API token per
role (and a revoked one), a pending draft, and sample values for every route argument."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from flask import Flask

from engine import accounts
from engine.runtime import Runtime
from engine.settings import Settings
from engine.web.permissions import PERMISSIONS
from tests.integration.admin_fixtures import admin_app, create_staff, role_objects
from tests.integration.booking_fixtures import Booking, prepare
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT
from tests.integration.test_role_matrix import ARG, PUBLIC

NOW = datetime.fromisoformat(AT)
APPROVE = ("statin-refill", "appointment-reminder", "booking-confirmation")
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass
class World:
    booking: Booking
    settings: Settings
    values: dict[str, str]
    tokens: dict[str, str]
    revoked_token: str

    def app(self, **changes: object) -> Flask:
        return admin_app(self.settings.with_(**changes), lambda: NOW)

    def path(self, rule: str, **overrides: str) -> str:
        return fill(rule, {**self.values, **overrides})

    def bearer(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


# Values that route (every converter matches) but name nothing that exists.
NOWHERE = {
    "campaign_id": "no-such-campaign",
    "template_id": "no-such-template",
    "locale": "en",
    "version": "0",
    "external_id": "NOBODY",
    "draft_id": "999999",
    "user_id": "999999",
    "token_id": "999999",
    "change": "disable",
    "filename": "admin.css",
    "token": "A" * 22,
}


def fill(rule: str, values: dict[str, str]) -> str:
    """The rule's path with its arguments replaced by `values`."""
    return ARG.sub(lambda match: values[match.group(1)], rule)


def build_world(engage: Engage, settings: Settings, tmp_path: Path) -> World:
    booking = prepare(engage, settings, tmp_path, approve=APPROVE)
    create_staff(settings, NOW)
    rt = Runtime(booking.settings)
    with rt.session_factory.begin() as session:
        defs = rt.definitions(session)
        values, tokens = role_objects(session, defs, NOW)
        revoked, revoked_secret = accounts.create_token(
            session=session, name="revoked", role="it_admin", now=NOW, by="test"
        )
        revoked.revoked_at = NOW
        values["filename"] = "admin.css"
    rt.engine.dispose()
    values["token"] = booking.mint("S001")
    return World(booking, booking.settings, values, tokens, revoked_secret)


def guarded(app: Flask) -> list[tuple[str, str, str]]:
    """(rule, method, permission or "") of every route, HEAD and OPTIONS aside."""
    found = []
    for rule in app.url_map.iter_rules():
        permission = getattr(app.view_functions[rule.endpoint], "permission", "")
        assert permission in PERMISSIONS or rule.endpoint in PUBLIC, rule.rule
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found.append((rule.rule, method, permission))
    return found
