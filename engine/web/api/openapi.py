"""`GET /api/openapi.json`: the OpenAPI 3.1 document of /api/v1, generated from the app's
routes, each view's `documented(...)` and `@api_requires(...)`, and the pydantic models
the views validate and answer with, so the document cannot drift from the code."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask, Response, current_app, jsonify
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from engine.web.api import models as api
from engine.web.api.common import API_PREFIX, JSON, Doc, api_blueprint, unrouted_api_request

blueprint = api_blueprint("api_openapi", __name__, url_prefix="/api")
blueprint.before_app_request(unrouted_api_request)
ORDER = 88
CACHE_KEY = "engage.openapi"
REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")

ERRORS = {
    400: "A parameter or the body is invalid; `field` names it.",
    401: "No valid API token (missing, unknown or revoked).",
    403: "The token's role lacks the permission (audited as `forbidden`).",
    404: "No such resource; `field` names the parameter.",
    409: "The resource's state forbids it.",
    413: "The body is too large.",
    415: "The body is not application/json.",
}
INFO = {
    "title": "engage API",
    "version": "1",
    "description": (
        "Token-authenticated JSON API of engage (see docs/api.md). Every error is "
        '`{"error": {"status", "field", "message"}}`. A token carries a role; each '
        "operation names the permission it needs in `x-permission`."
    ),
}


@blueprint.get("/openapi.json")
def openapi_json() -> Response:
    if CACHE_KEY not in current_app.extensions:
        current_app.extensions[CACHE_KEY] = openapi_document(current_app)
    return jsonify(current_app.extensions[CACHE_KEY])


def api_views(app: Flask) -> list[tuple[str, str, Any]]:
    """(OpenAPI path, method, view) of every route under /api/v1."""
    found = []
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(API_PREFIX + "/"):
            path = _PARAM.sub(r"{\1}", rule.rule)
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                found.append((path, method.lower(), app.view_functions[rule.endpoint]))
    return found


def openapi_document(app: Flask) -> dict[str, Any]:
    views = [(path, method, view) for path, method, view in api_views(app)]
    docs: list[Doc] = [view.api_doc for _, _, view in views if hasattr(view, "api_doc")]
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(api.ErrorAnswer, "serialization")]
    wanted += [(d.answer, "serialization") for d in docs]
    wanted += [(d.body, "validation") for d in docs if d.body is not None]
    refs, top = models_json_schema(list(dict.fromkeys(wanted)), ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for path, method, view in views:
        doc: Doc | None = getattr(view, "api_doc", None)
        if doc is not None:
            permission = getattr(view, "permission", None)
            paths.setdefault(path, {})[method] = _operation(view.__name__, doc, permission, refs)
    return {
        "openapi": "3.1.0",
        "info": INFO,
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `engage tokens create NAME --role ROLE`.",
                }
            },
        },
    }


def _operation(
    name: str, doc: Doc, permission: str | None, refs: dict[Any, dict[str, Any]]
) -> dict[str, Any]:
    def content(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return {JSON: {"schema": refs[(model, mode)]}}

    statuses = {401, 403, *doc.errors}
    if doc.query is not None or doc.body is not None:
        statuses.add(400)
    if doc.body is not None:
        statuses |= {413, 415}
    responses: dict[str, Any] = {
        str(doc.status): {
            "description": doc.summary,
            "content": content(doc.answer, "serialization"),
        }
    }
    for status in sorted(statuses):
        error = content(api.ErrorAnswer, "serialization")
        responses[str(status)] = {"description": ERRORS[status], "content": error}
    operation: dict[str, Any] = {
        "operationId": name,
        "summary": doc.summary,
        "description": (doc.description + f"\n\nPermission: `{permission}`.").strip(),
        "tags": [doc.tag] if doc.tag else [],
        "x-permission": permission,
        "parameters": _path_parameters(doc) + _query_parameters(doc),
        "responses": responses,
    }
    if doc.body is not None:
        # An empty body stands for {} (every field of a dry-run has a default).
        required = any(f.is_required() for f in doc.body.model_fields.values())
        operation["requestBody"] = {
            "required": required,
            "content": content(doc.body, "validation"),
        }
    return operation


def _path_parameters(doc: Doc) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": p}}
        for name, p in doc.path_params.items()
    ]


def _query_parameters(doc: Doc) -> list[dict[str, Any]]:
    """One parameter per field of the query model (a query string has no null: an optional
    parameter is simply left out)."""
    if doc.query is None:
        return []
    schema = doc.query.model_json_schema(ref_template=REF)
    required = set(schema.get("required", ()))
    parameters = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        if "anyOf" in prop:
            options = [o for o in prop.pop("anyOf") if o != {"type": "null"}]
            prop = {**(options[0] if len(options) == 1 else {"anyOf": options}), **prop}
            if prop.get("default", "") is None:
                del prop["default"]
        parameter = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters
