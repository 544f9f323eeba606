"""Twilio webhooks: inbound SMS and delivery reports. Thin: check the signature, parse,
hand over to engine.inbound in one transaction, answer with empty TwiML.

No CSRF token here: the X-Twilio-Signature (HMAC-SHA1 of the URL and form with the
account's auth token) is what authenticates these requests.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from flask import Blueprint, Response, abort, current_app, request
from twilio.request_validator import RequestValidator

from engine.inbound import InboundSms, StatusReport, handle_inbound, handle_status
from engine.web import now_of, runtime_of

webhooks = Blueprint("twilio_webhooks", __name__, url_prefix="/twilio")

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def _twiml(reply: str | None = None) -> Response:
    if reply is None:
        return Response(EMPTY_TWIML, content_type="text/xml")
    body = f"<Response><Message>{escape(reply)}</Message></Response>"
    return Response(f'<?xml version="1.0" encoding="UTF-8"?>{body}', content_type="text/xml")


def _require_signature() -> None:
    """403 unless Twilio signed this exact URL and form with our auth token."""
    token = runtime_of(current_app).settings.twilio_auth_token
    signature = request.headers.get("X-Twilio-Signature", "")
    if not token or not signature:
        abort(403)
    if not RequestValidator(token).validate(request.url, request.form.to_dict(), signature):
        abort(403)


def _field(name: str) -> str:
    value = request.form.get(name, "").strip()
    if not value:
        abort(400)
    return value


@webhooks.post("/inbound")
def inbound() -> Response:
    _require_signature()
    message = InboundSms(
        message_sid=_field("MessageSid"),
        from_number=_field("From"),
        to_number=request.form.get("To", ""),
        body=request.form.get("Body", ""),
        opt_out_type=request.form.get("OptOutType") or None,
    )
    rt = runtime_of(current_app)
    with rt.session_factory.begin() as session:
        defs = rt.definitions(session)
        result = handle_inbound(
            session=session, keyring=rt.keyring, defs=defs, message=message, now=now_of(current_app)
        )
    return _twiml(result.inline_reply)


@webhooks.post("/status")
def delivery_status() -> Response:
    _require_signature()
    code = request.form.get("ErrorCode", "").strip()
    report = StatusReport(
        message_sid=_field("MessageSid"),
        message_status=_field("MessageStatus"),
        error_code=int(code) if code.isdigit() else None,
        ref=request.args.get("ref"),
    )
    rt = runtime_of(current_app)
    with rt.session_factory.begin() as session:
        defs = rt.definitions(session)
        handle_status(
            session=session, keyring=rt.keyring, defs=defs, report=report, now=now_of(current_app)
        )
    return _twiml()
