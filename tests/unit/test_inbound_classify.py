"""What a patient's reply means (engine.core.inbound), English and Spanish."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from engine.core.domain import ConsentEvent
from engine.core.inbound import advance, classify, regrantable, reported_status

OPT_OUT = [
    "STOP", "stop", " Stop. ", "STOP!!!", "StopAll", "STOP ALL",
    "UNSUBSCRIBE", "cancel", "END", "quit", "Revoke", "OPTOUT", "opt-out", "opt out",
    "stop please", "Please STOP", "stop, thanks", "please stop texting me",
    "Stop texting me!", "stop sending me messages", "STOP ALL TEXTS", "remove me from this list",
    "Please remove me from your list", "take me off the list", "unsubscribe me",
    "no more texts", "No more messages please", "don't text me", "Do not text me again",
    "dont message me", "don’t send me any more texts",
    "PARAR", "parar", "Alto", "CANCELAR", "baja", "BAJA.", "darme de baja",
    "Quiero darme de baja", "no más mensajes", "No mas mensajes por favor",
    "no me envíen más mensajes", "No me manden mas textos", "dejen de enviarme mensajes",
    "parar por favor", "¡ALTO!",
]  # fmt: skip
OPT_IN = ["START", "start", "Start.", "UNSTOP", "yes", "YES!", "yes please"]
HELP = ["HELP", "help?", "Info", "INFO.", "AYUDA", "ayuda por favor", "help please"]
OTHER = [
    "I will stop by tomorrow", "can I stop taking my statin?", "When should I stop the pills",
    "Don't stop sending me reminders, they help", "stop sign on main street", "thanks",
    "see you at the appointment", "what is this about", "I need help with my refill",
    "Is the pharmacy open? I can stop in later", "end of the month works", "yes I'll come",
    "¿puedo dejar de tomar la pastilla?", "voy a parar en la farmacia mañana",
    "alto colesterol", "", "   ", "🙂", "STOPP", "start time?", "info about my appointment",
]  # fmt: skip


@pytest.mark.parametrize("body", OPT_OUT)
def test_opt_outs(body: str) -> None:
    assert classify(body) == "opt_out"


@pytest.mark.parametrize("body", OPT_IN)
def test_opt_ins(body: str) -> None:
    assert classify(body) == "opt_in"


@pytest.mark.parametrize("body", HELP)
def test_help(body: str) -> None:
    assert classify(body) == "help"


@pytest.mark.parametrize("body", OTHER)
def test_free_text_merely_containing_a_keyword_is_other(body: str) -> None:
    assert classify(body) == "other"


@pytest.mark.parametrize(
    ("body", "opt_out_type", "expected"),
    [
        ("arrete", "STOP", "opt_out"),
        ("STOP", "START", "opt_in"),
        ("whatever", "help", "help"),
        ("STOP", "", "opt_out"),
        ("STOP", None, "opt_out"),
        ("hello", "SOMETHING-NEW", "other"),
    ],
)
def test_twilio_opt_out_type_wins(body: str, opt_out_type: str | None, expected: str) -> None:
    assert classify(body, opt_out_type) == expected


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _event(
    purpose: str, status: str, day: int, method: str, basis: str | None = None
) -> ConsentEvent:
    return ConsentEvent(
        patient="P", purpose=purpose, status=status,  # type: ignore[arg-type]
        occurred_at=T0.replace(day=day), legal_basis=basis, method=method,
    )  # fmt: skip


def test_start_gives_back_only_what_the_keyword_took() -> None:
    events = [
        _event("adherence", "granted", 1, "intake_form", "express"),
        _event("appointment", "granted", 1, "web_form", "written"),
        _event("appointment", "revoked", 2, "phone"),
        _event("adherence", "revoked", 3, "sms_keyword"),
        _event("appointment", "revoked", 3, "sms_keyword"),
        _event("marketing", "revoked", 3, "sms_keyword"),
        _event("adherence", "revoked", 4, "carrier_opt_out"),
    ]
    assert regrantable(events, ["adherence", "appointment", "marketing"]) == {
        "adherence": "express"
    }


def test_nothing_to_give_back_while_consent_is_active() -> None:
    events = [_event("adherence", "granted", 1, "intake_form", "express")]
    assert regrantable(events, ["adherence"]) == {}


@pytest.mark.parametrize(
    ("current", "reported", "expected"),
    [
        ("sent", "delivered", "delivered"),
        ("sent", "undelivered", "undelivered"),
        ("sent", "failed", "failed"),
        ("sent", "sent", None),
        ("sent", "queued", None),
        ("delivered", "sent", None),
        ("delivered", "delivered", None),
        ("delivered", "undelivered", "undelivered"),
        ("undelivered", "delivered", None),
        ("failed", "delivered", None),
        ("sending", "delivered", None),
        ("cancelled", "delivered", None),
        ("queued", "sent", None),
    ],
)
def test_status_only_moves_forward(current: str, reported: str, expected: str | None) -> None:
    assert advance(current, reported_status(reported)) == expected
