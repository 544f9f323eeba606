"""The phones' side of the sandbox, for the phone simulator (not part of Twilio's API).

GET  /sandbox/phones.json                  one summary per number: received, sent, unread
GET  /sandbox/phones/<number>.json         the conversation, oldest first
POST /sandbox/phones/<number>/read         the phone has shown everything it received
POST /sandbox/phones/<number>/messages     the phone texts {"body", "url"?}: the signed
                                           webhook POST; answers the webhook's status
"""

from __future__ import annotations

import re

from flask import Blueprint, Response, request

from engine.sandbox.api import current_sandbox, json_response
from engine.sandbox.phones import WebhookMissing
from engine.sandbox.service import E164, MAX_BODY
from engine.sandbox.store import utcnow

bp = Blueprint("sandbox_phones", __name__)
PHONES = "/sandbox/phones"
_URL = re.compile(r"https?://[^\s]+")


def _bad(message: str, status: int = 400) -> Response:
    return json_response({"error": message}, status)


@bp.get(f"{PHONES}.json")
def phones() -> Response:
    return json_response({"phones": current_sandbox().phones.phones(utcnow())})


@bp.get(f"{PHONES}/<number>.json")
def thread(number: str) -> Response:
    if not E164.match(number):
        return _bad("not an E.164 number")
    return json_response(current_sandbox().phones.thread(number, utcnow()))


@bp.post(f"{PHONES}/<number>/read")
def read(number: str) -> Response:
    if not E164.match(number):
        return _bad("not an E.164 number")
    current_sandbox().phones.mark_read(number, utcnow())
    return Response(status=204)


@bp.post(f"{PHONES}/<number>/messages")
def send(number: str) -> Response:
    data = request.get_json(silent=True)
    if not E164.match(number):
        return _bad("not an E.164 number")
    if not isinstance(data, dict) or not isinstance(data.get("body"), str):
        return _bad('expected a JSON object {"body": "...", "url": "..."}')
    body, url = data["body"], data.get("url")
    if not body.strip() or len(body) > MAX_BODY:
        return _bad(f"body must be 1 to {MAX_BODY} characters")
    if url is not None and (not isinstance(url, str) or not _URL.fullmatch(url)):
        return _bad("url must be an http(s) URL")
    try:
        text = current_sandbox().phones.send(number, body, url=url)
    except WebhookMissing as exc:
        return _bad(str(exc))
    answer = {"sid": text.sid, "webhook_status": text.webhook_status, "error": text.error}
    return json_response(answer, 201 if text.webhook_status is not None else 502)
