"""The phone simulator (sandbox transport only): every patient's phone as the sandbox
provider holds it, and replies typed as the patient.

Outbound texts are read from the sandbox server's message store over its HTTP API. A
reply never calls engine.inbound: the sandbox POSTs it, signed with the auth token exactly
as Twilio signs, to this app's own /twilio/inbound (settings.public_url), so it takes the
path a real patient's text takes. Numbers are shown masked; the audit log gets ids only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import phonenumbers
import requests
from flask import Blueprint, Response, current_app, flash, jsonify, redirect, request, url_for
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import StringField
from wtforms.validators import DataRequired, Length

from engine.sandbox.client import SandboxClient
from engine.store import models as m
from engine.store.codec import PatientErased
from engine.store.queries import load_patient_record
from engine.web import runtime_of, ui
from engine.web.auth import requires

blueprint = Blueprint("simulator", __name__, url_prefix="/admin/sandbox")
ORDER = 90
MENU = [("simulator.index", "Phone simulator", "sandbox.use")]

QUICK_REPLIES = ("STOP", "HELP", "START")
POLL_SECONDS = 3
MAX_TEXT = 1600  # Twilio's limit for one message body
_LINK = re.compile(r"https?://[^\s<>\"']+")
_TRAILING = ".,;:!?)]}'\""


class ReplyForm(FlaskForm):  # type: ignore[misc]
    body = StringField(
        "Text as the patient",
        validators=[
            DataRequired(message="Type a text to send."),
            Length(max=MAX_TEXT, message=f"A text is at most {MAX_TEXT} characters."),
        ],
    )


class OpenForm(FlaskForm):  # type: ignore[misc]
    class Meta:
        csrf = False  # a GET form that changes nothing

    patient = StringField("Patient id", validators=[DataRequired(), Length(max=64)])


@dataclass(frozen=True)
class Phone:
    """A patient's phone: who (external id), the number (E.164, never rendered) and zone."""

    external_id: str
    number: str
    zone: str | None


class SandboxUnavailable(Exception):
    pass


def _client() -> SandboxClient | None:
    """The sandbox's client, None unless this installation sends with the sandbox."""
    settings = runtime_of(current_app).settings
    if settings.transport != "sandbox":
        return None
    from engine.transports.registry import SANDBOX_URL

    return SandboxClient(settings.twilio_api_base_url or SANDBOX_URL, timeout=5.0)


def _unavailable(status: int = 404) -> Response:
    settings = runtime_of(current_app).settings
    return ui.page(
        "admin/simulator/unavailable.html",
        status=status,
        transport=settings.transport,
        sandbox_url=settings.twilio_api_base_url,
        reachable=status != 503,
    )


@blueprint.get("")
@requires("sandbox.use")
def index() -> Response:
    client = _client()
    if client is None:
        return _unavailable()
    form = OpenForm(formdata=request.args if request.args else None)
    if request.args and form.validate():
        return redirect(url_for("simulator.thread", external_id=form.patient.data.strip()))
    try:
        threads = _threads(client, current=None)
    except SandboxUnavailable:
        return _unavailable(503)
    return ui.page(
        "admin/simulator/index.html",
        threads=threads,
        phone=None,
        messages=[],
        open_form=form,
        form=ReplyForm(),
        quick=QUICK_REPLIES,
        poll_url=url_for("simulator.state"),
        poll_seconds=POLL_SECONDS,
    )


@blueprint.get("/<external_id>")
@requires("sandbox.use")
def thread(external_id: str) -> Response:
    response = _thread_page(external_id, ReplyForm())
    if response.status_code == 200:  # the page's polls are not audited again
        ui.record("sandbox_thread_viewed", f"patient:{external_id}")
    return response


def _thread_page(external_id: str, form: ReplyForm, status: int = 200) -> Response:
    client = _client()
    if client is None:
        return _unavailable()
    phone = _phone(external_id)
    if phone is None:
        return ui.page("admin/error.html", status=404, code=404, message="No such patient.")
    try:
        messages = _messages(client, phone)
        threads = _threads(client, current=external_id)
    except SandboxUnavailable:
        return _unavailable(503)
    return ui.page(
        "admin/simulator/index.html",
        status=status,
        threads=threads,
        phone=phone,
        masked=mask(phone.number),
        messages=messages,
        open_form=OpenForm(formdata=None),
        form=form,
        quick=QUICK_REPLIES,
        poll_url=url_for("simulator.state", patient=external_id),
        poll_seconds=POLL_SECONDS,
    )


@blueprint.post("/<external_id>/reply")
@requires("sandbox.use")
def reply(external_id: str) -> Response:
    form = ReplyForm()
    if not form.validate_on_submit():
        return _thread_page(external_id, form, status=400)
    client = _client()
    phone = _phone(external_id)
    if client is None or phone is None:
        return _thread_page(external_id, form, status=404)
    inbound_url = f"{runtime_of(current_app).settings.public_url}/twilio/inbound"
    try:
        result = client.text_from(phone.number, form.body.data, url=inbound_url)
    except (requests.RequestException, ValueError):
        return _unavailable(503)
    webhook_status = result.get("webhook_status")
    ui.record(
        "sandbox_text_sent",
        f"patient:{external_id}",
        sid=result.get("sid"),
        webhook_status=webhook_status,
    )
    if webhook_status == 200:
        flash(f"Texted from {external_id}'s phone; the app's webhook took it.")
    else:
        answer = f"answered {webhook_status}" if webhook_status else "could not be reached"
        flash(f"The text went out, but the app's webhook {inbound_url} {answer}.", "error")
    return redirect(url_for("simulator.thread", external_id=external_id), code=303)


@blueprint.get("/state.json")
@requires("sandbox.use")
def state() -> Response:
    """What the page's script polls: the phone list and, with ?patient=, that thread."""
    client = _client()
    if client is None:
        return _json_error(404, "the phone simulator needs the sandbox transport")
    external_id = request.args.get("patient") or None
    phone = _phone(external_id) if external_id else None
    if external_id and phone is None:
        return _json_error(404, "no such patient")
    try:
        messages = _messages(client, phone) if phone else None
        threads = _threads(client, current=external_id)
    except SandboxUnavailable:
        return _json_error(503, "the sandbox server does not answer")
    return jsonify(threads=threads, messages=messages)


def _json_error(status: int, message: str) -> Response:
    response = jsonify(error={"status": status, "message": message})
    response.status_code = status
    return response


# --- reading the sandbox ---------------------------------------------------------------------


def _phone(external_id: str) -> Phone | None:
    keyring = runtime_of(current_app).keyring
    with ui.reading() as db:
        try:
            record = load_patient_record(session=db, keyring=keyring, external_id=external_id)
        except PatientErased:
            return None
    if record is None or not record.phone:
        return None
    return Phone(record.patient.external_id, record.phone, record.patient.timezone)


def _threads(client: SandboxClient, *, current: str | None) -> list[dict[str, Any]]:
    """One entry per phone the sandbox knows that belongs to a patient (found by the
    number's blind index), most recent first."""
    try:
        phones = client.phones()
    except requests.RequestException as exc:
        raise SandboxUnavailable(str(exc)) from exc
    keyring = runtime_of(current_app).keyring
    by_index = {keyring.phone_index(p["number"]): p for p in phones}
    owners: dict[str, list[str]] = {}
    with ui.reading() as db:
        rows = db.execute(
            select(m.Patient.phone_index, m.Patient.external_id)
            .where(m.Patient.phone_index.in_(list(by_index)), m.Patient.erased_at.is_(None))
            .order_by(m.Patient.external_id)
        )
        for index, external_id in rows:
            owners.setdefault(index, []).append(external_id)
    threads = []
    for index, summary in by_index.items():
        ids = owners.get(index)
        if not ids:
            continue
        threads.append(
            {
                "patient": ids[0],
                "also": ids[1:],
                "masked": mask(summary["number"]),
                "received": summary["received"],
                "sent": summary["sent"],
                "unread": 0 if ids[0] == current else summary["unread"],
                "current": ids[0] == current,
                "href": url_for("simulator.thread", external_id=ids[0]),
                "last_at": summary["last_at"],
            }
        )
    threads.sort(key=lambda t: (t["last_at"], t["patient"]), reverse=True)
    return threads


def _messages(client: SandboxClient, phone: Phone) -> list[dict[str, Any]]:
    """The phone's conversation, marked read (it is on screen)."""
    try:
        conversation = client.thread(phone.number)
        client.mark_read(phone.number)
    except requests.RequestException as exc:
        raise SandboxUnavailable(str(exc)) from exc
    zone = ZoneInfo(phone.zone) if phone.zone else None
    return [
        {
            "sid": item["sid"],
            "direction": item["direction"],
            "status": item["status"],
            "when": _when(item["at"], zone),
            "parts": linkify(item["body"]),
        }
        for item in conversation["messages"]
    ]


def _when(iso: str, zone: ZoneInfo | None) -> str:
    at = datetime.fromisoformat(iso)
    local = at.astimezone(zone) if zone else at
    return local.strftime("%a %d %b, %H:%M ") + (local.tzname() or "UTC")


def linkify(body: str) -> list[dict[str, str | None]]:
    """The text in parts, links (http and https only) with their href, the rest plain."""
    parts: list[dict[str, str | None]] = []
    position = 0
    for match in _LINK.finditer(body):
        url = match.group(0).rstrip(_TRAILING)
        start, end = match.start(), match.start() + len(url)
        if start > position:
            parts.append({"text": body[position:start], "href": None})
        parts.append({"text": url, "href": url})
        position = end
    if position < len(body):
        parts.append({"text": body[position:], "href": None})
    return parts


def mask(number: str) -> str:
    """+1 212-555-0123 -> +1 •••-•••-••23: the country code and the last two digits."""
    try:
        shown = phonenumbers.format_number(
            phonenumbers.parse(number), phonenumbers.PhoneNumberFormat.INTERNATIONAL
        )
    except phonenumbers.NumberParseException:
        shown = number
    code, _, rest = shown.partition(" ")
    digits = sum(c.isdigit() for c in rest)
    masked, seen = [], 0
    for c in rest:
        if c.isdigit():
            seen += 1
            masked.append(c if seen > digits - 2 else "•")
        else:
            masked.append(c)
    return f"{code} {''.join(masked)}"
