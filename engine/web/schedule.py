"""The patient's self-scheduling page, `/s/<token>`: open slots in the patient's language and
time zone, a booking form, a confirmation page.

A token never appears anywhere but the path: not in logs (see engine/cli_serve.py), not in
the Referer sent onwards (Referrer-Policy: no-referrer), not in a redirect. Unknown,
expired and used tokens get one and the same page with 410; strings that could never be a
token get 404. Forms carry a CSRF token (flask-wtf); requests are rate-limited per client
(engine/web/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from zoneinfo import ZoneInfo

from babel.dates import format_date, format_time, get_timezone_name
from flask import (
    Blueprint,
    Response,
    current_app,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf.csrf import CSRFError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import TooManyRequests

from engine import booking
from engine.booking import LinkView, SlotView
from engine.definitions import Program
from engine.runtime import UsageProblem
from engine.store import models as m
from engine.web import now_of, runtime_of
from engine.web.texts import LANGUAGES, texts_for

patient_pages = Blueprint("patient", __name__, url_prefix="/s")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "X-Robots-Tag": "noindex, nofollow",
    "Cache-Control": "no-store",
}
BOOKED_KEY = "engage.booked"


@dataclass(frozen=True)
class SlotChoice:
    slot_id: str
    time: str
    duration_min: int
    provider: str
    location: str


@dataclass(frozen=True)
class Day:
    label: str
    slots: list[SlotChoice]


@patient_pages.after_request
def _headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


@patient_pages.get("/<token>")
def show(token: str) -> Response:
    if not booking.well_formed(token):
        return _gone(404)
    rt, now = runtime_of(current_app), now_of(current_app)
    with rt.write_sessions.begin() as db:
        link = booking.open_link(session=db, token=token, now=now)
        if link is None:
            return _gone(410)
        slots = booking.open_slots(session=db, link=link, now=now)
        program = rt.definitions(db).program
    return _slots_page(link, slots, program)


@patient_pages.post("/<token>")
def book(token: str) -> Response:
    if not booking.well_formed(token):
        return _gone(404)
    rt, now = runtime_of(current_app), now_of(current_app)
    slot_id = request.form.get("slot", "").strip()
    with rt.write_sessions.begin() as db:
        defs = rt.definitions(db)
        if not slot_id:
            link = booking.open_link(session=db, token=token, now=now)
            if link is None:
                return _gone(410)
            slots = booking.open_slots(session=db, link=link, now=now)
            return _slots_page(link, slots, defs.program, error="choose", status=400)
        result = booking.book(
            session=db,
            keyring=rt.keyring,
            defs=defs,
            token=token,
            slot_id=slot_id,
            now=now,
            public_url=rt.settings.public_url,
        )
        if result.outcome == "gone" or result.link is None:
            return _gone(410)
        if result.outcome != "booked":
            slots = booking.open_slots(session=db, link=result.link, now=now)
            return _slots_page(result.link, slots, defs.program, error=result.outcome, status=409)
    session[BOOKED_KEY] = {
        "slot": slot_id,
        "tz": result.link.timezone,
        "lang": result.link.language,
        "sms": result.confirmation in ("queued", "deferred"),
    }
    return redirect(url_for("patient.booked"), code=303)


@patient_pages.get("/booked")
def booked() -> Response:
    """The confirmation, from the session: the URL carries neither token nor booking."""
    state = session.get(BOOKED_KEY)
    if not isinstance(state, dict) or "slot" not in state:
        return _gone(404)
    rt = runtime_of(current_app)
    with rt.session_factory() as db:
        slot = db.scalar(select(m.Slot).where(m.Slot.slot_id == state["slot"]))
        program = rt.definitions(db).program
    if slot is None:
        return _gone(404)
    language, zone = state.get("lang", "en"), state.get("tz", "UTC")
    view = SlotView(slot.slot_id, slot.starts_at, slot.duration_min, slot.provider, slot.location)
    local = view.starts_at.astimezone(_zone(zone))
    return _page(
        "patient/booked.html",
        language,
        day=_day_label(local, language),
        time=_time_label(local, language),
        slot=view,
        zone=_zone_label(zone, language),
        sms=bool(state.get("sms")),
        program=program,
    )


@patient_pages.errorhandler(CSRFError)
def _csrf_failed(_error: CSRFError) -> Response:
    return _message_page("expired_form", 400)


@patient_pages.errorhandler(TooManyRequests)
def _too_many(_error: TooManyRequests) -> Response:
    response = _message_page("too_many", 429)
    response.headers["Retry-After"] = "60"
    return response


# --- rendering ------------------------------------------------------------------------------


def _slots_page(
    link: LinkView,
    slots: list[SlotView],
    program: Program,
    *,
    error: str | None = None,
    status: int = 200,
) -> Response:
    zone = _zone(link.timezone)
    days = [
        Day(
            _day_label(day, link.language),
            [
                SlotChoice(
                    s.slot_id,
                    _time_label(s.starts_at.astimezone(zone), link.language),
                    s.duration_min,
                    s.provider,
                    s.location,
                )
                for s in group
            ],
        )
        for day, group in groupby(slots, key=lambda s: s.starts_at.astimezone(zone).date())
    ]
    expires = link.expires_at.astimezone(zone)
    return _page(
        "patient/slots.html",
        link.language,
        status=status,
        days=days,
        zone=_zone_label(link.timezone, link.language),
        expires=_day_label(expires, link.language),
        error=error,
        program=program,
        action=request.path,
    )


def _gone(status: int) -> Response:
    """One page for every link that does not work, whatever the reason."""
    return _message_page("gone", status)


def _message_page(which: str, status: int) -> Response:
    language = request.accept_languages.best_match(LANGUAGES) or "en"
    program = None
    rt = runtime_of(current_app)
    try:
        with rt.session_factory() as db:
            program = rt.definitions(db).program
    except (UsageProblem, SQLAlchemyError):  # the page renders without definitions too
        program = None
    return _page("patient/message.html", language, status=status, which=which, program=program)


def _page(template: str, language: str, *, status: int = 200, **context: object) -> Response:
    t = texts_for(language)
    html = render_template(template, t=t, lang=t.language, **context)
    return make_response(html, status)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError):
        return ZoneInfo("UTC")


def _day_label(moment: datetime | object, language: str) -> str:
    return format_date(moment, format="full", locale=language)  # type: ignore[arg-type]


def _time_label(moment: datetime, language: str) -> str:
    return format_time(moment, format="short", locale=language)


def _zone_label(name: str, language: str) -> str:
    """ "Eastern Time", "hora oriental"; UTC stays "UTC"."""
    if name == "UTC":
        return "UTC"
    try:
        return get_timezone_name(_zone(name), width="long", zone_variant="generic", locale=language)
    except LookupError:
        return name
