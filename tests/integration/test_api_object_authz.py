"""Every API endpoint against every kind of token, on SQLite and PostgreSQL: the role's
permissions decide what it may call and which objects and fields it sees (patients, who a
decision or dry-run concerns, the text naming them), and a missing, malformed, unknown or
revoked token gets 401. The cases come from the OpenAPI document and the permission
matrix: an endpoint without a case here fails the test."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from engine.accounts import ROLES
from engine.settings import Settings
from engine.web.permissions import PERMISSIONS, allowed
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT, SAMPLE
from tests.integration.web_fixtures import World, build_world, fill

EXTERNAL_ID = re.compile(r"\bS0\d\d\b")


@dataclass(frozen=True)
class Case:
    """A call of one endpoint: path arguments, query string, JSON body, and the extra
    permission this variant needs on top of the endpoint's own."""

    values: dict[str, str] = field(default_factory=dict)
    query: str = ""
    body: dict[str, Any] | None = None
    also_needs: str | None = None


CASES: dict[tuple[str, str], list[Case]] = {
    ("get", "/api/v1/campaigns"): [Case()],
    ("get", "/api/v1/campaigns/{campaign_id}"): [Case()],
    ("post", "/api/v1/campaigns/{campaign_id}/pause"): [Case()],
    ("post", "/api/v1/campaigns/{campaign_id}/resume"): [Case()],
    ("post", "/api/v1/campaigns/{campaign_id}/dry-run"): [Case(body={"at": AT, "limit": 50})],
    ("post", "/api/v1/consents"): [
        Case(
            body={
                "patient": "S002",
                "purpose": "adherence",
                "status": "revoked",
                "method": "phone",
                "evidence": "called the front desk",
            }
        )
    ],
    ("get", "/api/v1/decisions"): [
        Case(query="?limit=200"),
        Case(query="?patient=S001", also_needs="patients.view"),
    ],
    ("get", "/api/v1/messages"): [Case()],
    ("get", "/api/v1/patients"): [Case()],
    ("get", "/api/v1/patients/{external_id}"): [Case()],
    ("get", "/api/v1/patients/{external_id}/export"): [Case()],
    ("post", "/api/v1/patients/{external_id}/erase"): [
        Case(values={"external_id": "S010"}, body={"confirm": "S010"})
    ],
    ("get", "/metrics"): [Case()],
}
# The calls that change something come last, the erasure very last.
ORDER = ("get", "post /api/v1/campaigns", "post /api/v1/consents", "post /api/v1/patients")


@pytest.fixture
def world(engage: Engage, settings: Settings, tmp_path: Path) -> World:
    return build_world(engage, settings, tmp_path)


def _phi() -> list[str]:
    with (SAMPLE / "patients.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [row[k] for row in rows for k in ("given_name", "family_name", "phone", "birth_date")]


def _operations(app: Flask) -> dict[tuple[str, str], str]:
    """(method, path) -> permission, from the OpenAPI document, plus /metrics."""
    document = app.test_client().get("/api/openapi.json").get_json()
    found = {
        (method, path): operation["x-permission"]
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    metrics = app.view_functions["api_metrics.metrics"]
    return {**found, ("get", "/metrics"): metrics.permission}


def _rank(key: tuple[str, str]) -> tuple[int, str]:
    text = f"{key[0]} {key[1]}"
    return max(i for i, prefix in enumerate(ORDER) if text.startswith(prefix)), text


def test_every_endpoint_answers_each_token_as_its_role_allows_and_others_not_at_all(
    world: World,
) -> None:
    app = world.app()
    operations = _operations(app)
    assert set(CASES) == set(operations), "an API endpoint without a case (or a stale case)"
    assert all(permission in PERMISSIONS for permission in operations.values())
    client, phi, wrong = app.test_client(), _phi(), []
    shown_to: dict[str, set[str]] = {role: set() for role in ROLES}
    for key in sorted(CASES, key=_rank):
        method, template = key
        for case in CASES[key]:
            path = fill(re.sub(r"\{(\w+)\}", r"<\1>", template), {**world.values, **case.values})
            call = f"{method.upper()} {path}{case.query}"
            for role in ROLES:
                response = client.open(
                    path + case.query, method=method, headers=world.bearer(role), json=case.body
                )
                may = allowed(role, operations[key]) and (
                    case.also_needs is None or allowed(role, case.also_needs)
                )
                code, text = response.status_code, response.get_data(as_text=True)
                if may and not 200 <= code < 300:
                    wrong.append(f"{role} {call}: {code}, expected success")
                elif not may and code != 403:
                    wrong.append(f"{role} {call}: {code}, expected 403")
                if EXTERNAL_ID.search(text) or any(value in text for value in phi):
                    shown_to[role].add(call)
    assert wrong == []
    for role in ROLES:
        may_see = allowed(role, "patients.view")
        assert bool(shown_to[role]) == may_see, (role, sorted(shown_to[role]))
    _missing_malformed_unknown_and_revoked_tokens_get_401(world, app)


def _missing_malformed_unknown_and_revoked_tokens_get_401(world: World, app: Flask) -> None:
    client = app.test_client()
    headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {world.tokens['it_admin']}"},
        {"Authorization": world.tokens["it_admin"]},
        {"Authorization": "Bearer eng_" + "x" * 43},
        {"Authorization": "Bearer " + world.tokens["it_admin"][4:]},
        {"Authorization": f"Bearer {world.revoked_token}"},
    ]
    wrong = []
    for method, template in CASES:
        path = fill(re.sub(r"\{(\w+)\}", r"<\1>", template), world.values)
        for header in headers:
            response = client.open(path, method=method, headers=header, json={})
            error = (response.get_json() or {}).get("error", {})
            if (response.status_code, error.get("field")) != (401, "authentication") or (
                "Bearer" not in response.headers.get("WWW-Authenticate", "")
            ):
                wrong.append(f"{method} {path} with {header}: {response.status_code}")
    assert wrong == []
    ok = client.get("/api/v1/campaigns", headers=world.bearer("viewer"))
    assert ok.status_code == 200  # the same client with a live token
