"""What every API module shares: its blueprint, JSON in and out, the error shape, cursors,
and the `documented` decorator the OpenAPI document is built from."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Blueprint, Response, jsonify, request
from flask.blueprints import BlueprintSetupState
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from engine.web.auth import api_error

API_PREFIX = "/api/v1"
JSON = "application/json"
M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])


class BadRequest(Exception):
    """A request the API answers with its error shape (400 unless told)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


def api_blueprint(name: str, import_name: str, url_prefix: str = API_PREFIX) -> Blueprint:
    """A blueprint of JSON endpoints authenticated by bearer token, hence exempt from CSRF
    (no cookie ever authenticates them), whose every error is JSON."""
    blueprint = Blueprint(name, import_name, url_prefix=url_prefix)

    def exempt_from_csrf(state: BlueprintSetupState) -> None:
        from engine.web import csrf

        csrf.exempt(blueprint)

    blueprint.record_once(exempt_from_csrf)
    blueprint.register_error_handler(BadRequest, _bad_request)
    blueprint.register_error_handler(HTTPException, _http_error)
    return blueprint


def _bad_request(exc: BadRequest) -> Response:
    return api_error(exc.status, exc.field, exc.message)


def _http_error(exc: HTTPException) -> Response:
    """405, 413, 500...: the same JSON shape as every other API error."""
    code = exc.code or 500
    response = api_error(code, "request", exc.description or exc.name)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def unrouted_api_request() -> Response | None:
    """A path under /api that matches no route (404) or not with this method (405): JSON,
    not the HTML page Flask would give. Runs before any view (an app-wide hook)."""
    exc = request.routing_exception
    if exc is None or not request.path.startswith("/api/"):
        return None
    if isinstance(exc, HTTPException):
        return _http_error(exc)
    return None


def first_error(exc: ValidationError) -> BadRequest:
    """The first problem pydantic found, naming the field at fault."""
    problem = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in problem["loc"]) or "body"
    if problem["type"] == "value_error":  # our own validators' words, without pydantic's prefix
        return BadRequest(where, str(problem["ctx"]["error"]))
    return BadRequest(where, problem["msg"])


def query(model: type[M]) -> M:
    """The query string, validated (unknown parameters and repeated ones are refused)."""
    for name in request.args:
        if len(request.args.getlist(name)) > 1:
            raise BadRequest(name, "give this parameter once")
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as exc:
        raise first_error(exc) from None


def body(model: type[M]) -> M:
    """The JSON body, validated; an empty body stands for `{}`."""
    raw = request.get_data(cache=False)
    if not raw.strip():
        raw = b"{}"
    elif request.mimetype != JSON:
        raise BadRequest("Content-Type", f"send the body as {JSON}", status=415)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise first_error(exc) from None


def answer(model: BaseModel, status: int = 200) -> Response:
    response = jsonify(model.model_dump(mode="json"))
    response.status_code = status
    return response


def encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(str(row_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id a page starts after; a cursor this API did not give is a 400."""
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if text.isascii() and text.isdigit():
            return int(text)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise BadRequest("cursor", "not a cursor this API gave")


def next_cursor(ids: Sequence[int], limit: int) -> str | None:
    """Given up to limit + 1 ids of a page, the cursor of the next page (None: last page)."""
    return encode_cursor(ids[limit - 1]) if len(ids) > limit else None


# --- documentation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    """What the OpenAPI document says of one endpoint (its path, method and permission come
    from the app's routes and the view's @api_requires)."""

    summary: str
    answer: type[BaseModel]
    status: int = 200
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    description: str = ""
    path_params: dict[str, str] = field(default_factory=dict)
    tag: str = ""


def documented(**doc: Any) -> Callable[[F], F]:
    """Attach the endpoint's documentation to its view (read by engine.web.api.openapi)."""

    def attach(view: F) -> F:
        view.api_doc = Doc(**doc)  # type: ignore[attr-defined]
        return view

    return attach
