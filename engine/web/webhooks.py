"""Twilio webhooks: inbound SMS and delivery reports. Thin: check the signature, parse,
hand over to engine.inbound in one transaction, answer with empty TwiML.

No CSRF token here: the X-Twilio-Signature (HMAC-SHA1 of the URL and form with the
account's auth token) is what authenticates these requests. Anyone can post, so what
Twilio never sends is refused before it is read (over MAX_WEBHOOK_BYTES: 413; not a
form: 415) or before it changes anything (unsigned: 403; no usable MessageSid or From:
400). A signed report that means nothing here (unknown sid or status, odd ErrorCode) is
answered 200: Twilio logs a 4xx as an error and, with retries configured, sends it again.

Twilio may retry a text while the first attempt is still running. The write sessions
make the retry wait (SQLite: BEGIN IMMEDIATE queues for the lock; PostgreSQL: the insert
waits on the MessageSid's unique index, then does nothing), so it sees the first
attempt's row and is answered as a duplicate, not with a 500. Handling being idempotent, a
request whose database connection turns out dead (PostgreSQL restarted) is run again, once.

The active definitions are read from the database at most once a second per process
(DEFINITIONS_MAX_AGE): a newly synced set answers every webhook from one second after its
commit on, and no text or report is handled with a set replaced more than a second ago.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TypeVar
from xml.sax.saxutils import escape

from flask import Blueprint, Response, abort, current_app, request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from twilio.request_validator import RequestValidator

from engine.definitions import DefinitionSet
from engine.delivery_status import StatusReport, handle_status
from engine.dispatch_gate import wait_for_sends
from engine.inbound import InboundResult, InboundSms, handle_inbound
from engine.runtime import Runtime
from engine.web import now_of, runtime_of

log = logging.getLogger("engine.inbound")

webhooks = Blueprint("twilio_webhooks", __name__, url_prefix="/twilio")

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
# A text is at most 1,600 characters (about 19 KB form-encoded as emoji) plus ~30 fields.
MAX_WEBHOOK_BYTES = 64 * 1024
# Twilio's sids are 34 characters; 48 fits every column a sid is written into.
_SID = re.compile(r"[A-Za-z0-9_-]{1,48}")
_ERROR_CODE = re.compile(r"[0-9]{1,9}")  # ASCII digits only; fits the integer column
DEFINITIONS_MAX_AGE = 1.0  # seconds (engine.runtime.Runtime.definitions)
T = TypeVar("T")


def _twiml(reply: str | None = None) -> Response:
    if reply is None:
        return Response(EMPTY_TWIML, content_type="text/xml")
    body = f"<Response><Message>{escape(reply)}</Message></Response>"
    return Response(f'<?xml version="1.0" encoding="UTF-8"?>{body}', content_type="text/xml")


@webhooks.before_request
def _refuse_what_twilio_never_sends() -> None:
    """415 for anything but a form; 413 for a body larger than any Twilio form, unread."""
    if request.mimetype != "application/x-www-form-urlencoded":
        abort(415)
    # A Content-Length above the limit is refused before reading; a chunked body is read
    # up to the limit only, and refused when it reaches it.
    request.max_content_length = MAX_WEBHOOK_BYTES
    if len(request.get_data(cache=True)) >= MAX_WEBHOOK_BYTES:
        abort(413)


def _require_signature() -> None:
    """403 unless Twilio signed this exact URL and every form value with our auth token."""
    token = runtime_of(current_app).settings.webhook_auth_token
    signature = request.headers.get("X-Twilio-Signature", "")
    if not token or not signature:
        abort(403)
    try:
        # The MultiDict itself: Twilio signs every value of a repeated field.
        signed = RequestValidator(token).validate(request.url, request.form, signature)
    except ValueError:  # a Host header whose port is not a port: urlparse refuses it
        signed = False
    if not signed:
        abort(403)


def _sid() -> str:
    """The MessageSid, which keys idempotency; 400 unless it can be one."""
    sid = request.form.get("MessageSid", "").strip()
    if not _SID.fullmatch(sid):
        abort(400)
    return sid


def _field(name: str) -> str:
    value = request.form.get(name, "").strip()
    if not value:
        abort(400)
    return value


def _error_code() -> int | None:
    """Twilio's ErrorCode (five digits); None when absent or not a code."""
    code = request.form.get("ErrorCode", "").strip()
    return int(code) if _ERROR_CODE.fullmatch(code) else None


@webhooks.post("/inbound")
def inbound() -> Response:
    _require_signature()
    message = InboundSms(
        message_sid=_sid(),
        from_number=_field("From"),
        to_number=request.form.get("To", ""),
        body=request.form.get("Body", ""),
        opt_out_type=request.form.get("OptOutType") or None,
    )
    rt, now = runtime_of(current_app), now_of(current_app)

    def handle(session: Session) -> InboundResult:
        defs = _definitions(rt, session)
        return handle_inbound(
            session=session, keyring=rt.keyring, defs=defs, message=message, now=now
        )

    result = _in_transaction(rt, handle)
    if result.opted_out:  # answered once no text of theirs is still on its way
        left = wait_for_sends(session_factory=rt.write_sessions, patient_ids=result.opted_out)
        if left:
            log.warning("inbound.opt_out_sends_unsettled", extra={"fields": {"rows": left}})
    return _twiml(result.inline_reply)


@webhooks.post("/status")
def delivery_status() -> Response:
    _require_signature()
    report = StatusReport(
        message_sid=_sid(),
        message_status=request.form.get("MessageStatus", ""),
        error_code=_error_code(),
        ref=request.args.get("ref"),
    )
    rt, now = runtime_of(current_app), now_of(current_app)

    def handle(session: Session) -> str:
        defs = _definitions(rt, session)
        return handle_status(session=session, keyring=rt.keyring, defs=defs, report=report, now=now)

    _in_transaction(rt, handle)
    return _twiml()


def _definitions(rt: Runtime, session: Session) -> DefinitionSet:
    """The active set, its version read at most DEFINITIONS_MAX_AGE ago."""
    return rt.definitions(session, max_age=DEFINITIONS_MAX_AGE)


def _in_transaction(rt: Runtime, work: Callable[[Session], T]) -> T:
    """`work` in one write transaction; once more on a new connection when the first one
    was dead (a PostgreSQL restart the pool had not noticed). Safe: a retried text is a
    duplicate by MessageSid, and a report only moves a row forward."""
    try:
        with rt.write_sessions.begin() as session:
            return work(session)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        log.warning("webhook.retried_after_disconnect")
    with rt.write_sessions.begin() as session:
        return work(session)
