"""Twilio's Messages REST API (2010-04-01), as far as the engine and the twilio SDK use it."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from datetime import UTC, date, datetime
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, request

from engine.sandbox.service import Sandbox, TwilioError
from engine.sandbox.store import MessageFilter, SandboxMessage, message_json, utcnow

bp = Blueprint("sandbox_twilio_api", __name__)
MESSAGES = "/2010-04-01/Accounts/<account_sid>/Messages"
FILTER_PARAMS = ("To", "From", "DateSent", "DateSent<", "DateSent>")
DATE_PARAMS = (("sent_on", "DateSent"), ("sent_after", "DateSent>"), ("sent_before", "DateSent<"))
DEFAULT_PAGE_SIZE = 50


def current_sandbox() -> Sandbox:
    return current_app.extensions["engage_sandbox"]  # type: ignore[no-any-return]


def json_response(payload: object, status: int = 200) -> Response:
    return current_app.response_class(json.dumps(payload), status, mimetype="application/json")


def error_response(error: TwilioError) -> Response:
    response = json_response(error.to_json(), error.status)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
    return response


def drop_connection() -> Response:
    """Close the client's connection without an answer (needs the werkzeug server, which
    hands the socket over in the environ)."""
    sock = request.environ.get("werkzeug.socket")
    if sock is None:
        return error_response(TwilioError.of(20500, "connection drop needs the werkzeug server"))
    with contextlib.suppress(OSError):  # already gone
        sock.shutdown(socket.SHUT_RDWR)
    return Response(b"", 500)


def guard(account_sid: str, operation: str) -> Response | None:
    """Authenticate, then apply latency and at most one injected fault; None: go on."""
    sandbox = current_sandbox()
    auth = request.authorization
    problem = sandbox.authenticate(
        account_sid, auth.username if auth else None, auth.password if auth else None
    )
    if problem is not None:
        return error_response(problem)
    if not sandbox.faults.applies_to(operation):
        return None
    delay = sandbox.faults.latency_seconds()
    if delay:
        time.sleep(delay)
    fault = sandbox.faults.draw()
    if fault is None:
        return None
    if fault.kind == "timeout":
        sandbox.hang()
        return drop_connection()
    if fault.kind == "garbage":
        return Response(
            "<html><body><h1>502 Bad Gateway</h1></body></html>", 200, mimetype="text/html"
        )
    assert fault.code is not None
    return error_response(TwilioError.of(fault.code))


@bp.post(f"{MESSAGES}.json")
def create_message(account_sid: str) -> Response:
    refused = guard(account_sid, "create")
    if refused is not None:
        return refused
    sandbox = current_sandbox()
    result = sandbox.accept(request.form)
    if isinstance(result, TwilioError):
        return error_response(result)
    if sandbox.faults.drop_after_accept():
        return drop_connection()
    return json_response(message_json(result, utcnow(), as_created=True), 201)


@bp.get(f"{MESSAGES}/<sid>.json")
def fetch_message(account_sid: str, sid: str) -> Response:
    refused = guard(account_sid, "fetch")
    if refused is not None:
        return refused
    message = current_sandbox().store.get(sid)
    if message is None or message.account_sid != account_sid:
        return error_response(
            TwilioError.of(20404, f"The requested resource {request.path} was not found")
        )
    return json_response(message_json(message, utcnow()))


def parse_date_param(name: str, value: str) -> datetime | date:
    """`YYYY-MM-DD` (a day) or an ISO 8601 time as the SDK sends it (`...T12:00:00Z`)."""
    try:
        if len(value) == 10:
            return date.fromisoformat(value)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"Invalid value for {name}: {value}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def read_filter(day_granular: bool) -> MessageFilter:
    args = request.args
    dates = {key: parse_date_param(name, args[name]) for key, name in DATE_PARAMS if args.get(name)}
    return MessageFilter(
        to=args.get("To") or None,
        from_=args.get("From") or None,
        day_granular=day_granular,
        **dates,
    )


def read_paging(max_size: int) -> tuple[int, int, str | None]:
    size = int(request.args.get("PageSize", DEFAULT_PAGE_SIZE))
    page = int(request.args.get("Page", 0))
    if not 1 <= size <= max_size or page < 0:
        raise ValueError(f"PageSize must be 1..{max_size} and Page at least 0")
    return page, size, request.args.get("PageToken") or None


def page_start(items: list[SandboxMessage], page: int, size: int, token: str | None) -> int:
    """Where a page begins: after the record named by PageToken (stable while new messages
    arrive at the head), else at Page * PageSize."""
    if token and token.startswith("PA"):
        for i, m in enumerate(items):
            if m.sid == token[2:]:
                return i + 1
    return page * size


def page_uri(page: int, size: int, token: str | None) -> str:
    params = [(k, request.args[k]) for k in FILTER_PARAMS if request.args.get(k)]
    params += [("PageSize", str(size)), ("Page", str(page))]
    if token:
        params.append(("PageToken", token))
    return f"{request.path}?{urlencode(params)}"


@bp.get(f"{MESSAGES}.json")
def list_messages(account_sid: str) -> Response:
    refused = guard(account_sid, "list")
    if refused is not None:
        return refused
    sandbox = current_sandbox()
    try:
        flt = read_filter(sandbox.config.date_sent_day_granular)
        page, size, token = read_paging(sandbox.config.max_page_size)
    except ValueError as exc:
        return error_response(TwilioError(20001, str(exc), 400))
    now = utcnow()
    items = sandbox.store.select(flt, now)
    start = page_start(items, page, size, token)
    chunk = items[start : start + size]
    more = start + size < len(items)
    return json_response(
        {
            "messages": [message_json(m, now) for m in chunk],
            "page": page,
            "page_size": size,
            "start": start,
            "end": start + max(len(chunk) - 1, 0),
            "uri": page_uri(page, size, token),
            "first_page_uri": page_uri(0, size, None),
            "previous_page_uri": page_uri(page - 1, size, None) if page > 0 else None,
            "next_page_uri": page_uri(page + 1, size, f"PA{chunk[-1].sid}") if more else None,
        }
    )
