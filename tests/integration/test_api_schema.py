"""The OpenAPI document is valid OpenAPI 3.1 and describes exactly the /api/v1 routes, and
schemathesis finds no server error, undocumented status or off-schema answer on any
operation, with valid and invalid input (SQLite and PostgreSQL); without a token, or with a
wrong one, every operation answers 401 or 403, whatever the input."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import datetime

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from engine.settings import Settings
from engine.web import create_app
from engine.web.api.models import ConsentRequest
from engine.web.api.openapi import REF, api_views
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT, SAMPLE

NOW = datetime.fromisoformat(AT)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Known ids, so generated requests also reach the answers behind a real resource.
KNOWN = {"campaign_id": "statin-refill", "external_id": "S001"}
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 25}
# A consent for a patient and a purpose that exist (random ones only ever get 404 and 400).
KNOWN_BODY = {"patient": "S001", "purpose": "marketing"}


@pytest.fixture
def app(engage: Engage, settings: Settings) -> Flask:
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    engage("approve", "statin-refill", "--by", "carol")
    engage("plan", "--at", AT)
    return create_app(settings, clock=lambda: NOW)


@pytest.fixture
def token(engage: Engage) -> str:
    return str(engage("tokens", "create", "schemathesis", "--role", "it_admin").output.strip())


def test_the_document_is_valid_openapi_31_and_covers_every_route(app: Flask) -> None:
    document = app.test_client().get("/api/openapi.json").get_json()
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    assert document["openapi"] == "3.1.0"
    routes = {(path, method) for path, method, _ in api_views(app)}
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == documented
    assert len(routes) == 12
    for path, item in document["paths"].items():
        for method, operation in item.items():
            view = app.view_functions[_endpoint(app, path, method)]
            assert operation["x-permission"] == view.permission, (path, method)
            codes = set(operation["responses"])
            assert {"401", "403"} <= codes and codes & {"200", "201"}, (path, method)
            where = {p["in"] for p in operation["parameters"]}
            assert ("400" in codes) == ("query" in where or "requestBody" in operation)
            assert ("path" in where) <= ("404" in codes)
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    assert document["security"] == [{"bearerAuth": []}]
    generated = ConsentRequest.model_json_schema(ref_template=REF)
    assert document["components"]["schemas"]["ConsentRequest"] == generated


def _endpoint(app: Flask, path: str, method: str) -> str:
    adapter = app.url_map.bind("localhost")
    concrete = path.replace("{campaign_id}", "statin-refill").replace("{external_id}", "S001")
    endpoint, _ = adapter.match(concrete, method=method.upper())
    return str(endpoint)


def test_schemathesis_finds_nothing(app: Flask, token: str) -> None:
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
    headers = {"Authorization": f"Bearer {token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 12
    for operation in operations:
        known = {k: v for k, v in KNOWN.items() if f"{{{k}}}" in operation.path}
        for mode, examples in EXAMPLES.items():
            strategies = [operation.as_strategy(generation_mode=mode)]
            if known and mode is GenerationMode.POSITIVE:
                strategies.append(
                    operation.as_strategy(generation_mode=mode, path_parameters=known)
                )
            if operation.path == "/api/v1/consents" and mode is GenerationMode.POSITIVE:
                strategies.append(operation.as_strategy(generation_mode=mode).map(_known_patient))
            for strategy in strategies:
                _run(strategy, examples, headers)


WRONG = [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic eDp5"}]
WRONG += [{"Authorization": "Bearer "}, {"Authorization": "bearer\u00a0x"}]


def test_every_operation_refuses_a_missing_or_wrong_token(app: Flask) -> None:
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 12
    for operation, headers in itertools.product(operations, WRONG):
        for mode in EXAMPLES:
            _run(operation.as_strategy(generation_mode=mode), 3, headers, _refused)


def _refused(case: schemathesis.Case, headers: dict[str, str]) -> None:
    response = case.call(headers=headers)
    assert response.status_code in (401, 403), (case.method, case.path, response.status_code)


def _known_patient(case: schemathesis.Case) -> schemathesis.Case:
    if isinstance(case.body, dict):
        case.body.update(KNOWN_BODY)
    return case


def _validate(case: schemathesis.Case, headers: dict[str, str]) -> None:
    case.call_and_validate(headers=headers, checks=CHECKS)


def _run(
    strategy: object,
    examples: int,
    headers: dict[str, str],
    check: Callable[[schemathesis.Case, dict[str, str]], None] = _validate,
) -> None:
    @given(case=strategy)
    @hypothesis_settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def exercise(case: schemathesis.Case) -> None:
        check(case, headers)

    exercise()
