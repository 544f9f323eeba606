"""What a patient's reply means (engine.core.inbound), English and Spanish."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from engine import outbox_status as outbox
from engine.core.domain import ConsentEvent
from engine.core.inbound import (
    HELP_KEYWORDS,
    OPT_IN_KEYWORDS,
    OPT_OUT_KEYWORDS,
    advance,
    classify,
    regrantable,
    reported_status,
)

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


# --- properties (hypothesis) -----------------------------------------------------------------

CLASSES = {"opt_out", "opt_in", "help", "other"}
KEYWORDS = sorted(
    [(k, "opt_out") for k in OPT_OUT_KEYWORDS]
    + [(k, "opt_in") for k in OPT_IN_KEYWORDS]
    + [(k, "help") for k in HELP_KEYWORDS]
)
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
CONTROL = st.text(st.characters(max_codepoint=0x9F), max_size=50)  # C0, C1, DEL, ASCII
LONG = st.builds(lambda s, n: s * n, st.sampled_from(["stop ", "no more texts ", "🙂", "\x00"]),
                 st.integers(1, 5000))  # fmt: skip
WHITESPACE = st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u2003\u3000"), max_size=4)
PUNCTUATION = st.text(st.characters(categories=("Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po")),
                      max_size=4)  # fmt: skip
# The forward order of delivery (CTIA / Twilio message lifecycle): a row never goes back.
RANK = {outbox.SENT: 1, outbox.DELIVERED: 2, outbox.UNDELIVERED: 3, outbox.FAILED: 3}
OUTBOX_STATUSES = [
    outbox.QUEUED, outbox.DEFERRED, outbox.BLOCKED, outbox.EXPIRED, outbox.CANCELLED,
    outbox.SENDING, outbox.SENT, outbox.FAILED, outbox.UNKNOWN, outbox.DELIVERED,
    outbox.UNDELIVERED,
]  # fmt: skip
TWILIO_STATUSES = [
    "accepted", "scheduled", "canceled", "queued", "sending", "sent", "failed", "delivered",
    "undelivered", "receiving", "received", "read", "partially_delivered",
]  # fmt: skip
REPORTS = st.sampled_from(TWILIO_STATUSES) | st.text(max_size=20)


def _mangle_case(text: str, flips: list[bool]) -> str:
    return "".join(c.upper() if up else c.lower() for c, up in zip(text, flips, strict=False))


@given(body=ANY_TEXT | CONTROL | LONG, opt_out_type=st.none() | ANY_TEXT)
def test_classify_never_raises_and_answers_one_of_four(body: str, opt_out_type: str | None) -> None:
    assert classify(body, opt_out_type) in CLASSES


@given(body=ANY_TEXT)
def test_classify_ignores_case_and_surrounding_whitespace(body: str) -> None:
    expected = classify(body)
    assert classify(body.lower()) == classify(body.upper()) == expected
    assert classify(f" \t{body}\n ") == expected


@given(
    keyword=st.sampled_from(KEYWORDS),
    flips=st.lists(st.booleans(), min_size=20, max_size=20),
    before=st.tuples(WHITESPACE, PUNCTUATION, WHITESPACE),
    after=st.tuples(WHITESPACE, PUNCTUATION, WHITESPACE),
)
def test_every_keyword_in_any_case_and_wrapping_is_understood(
    keyword: tuple[str, str],
    flips: list[bool],
    before: tuple[str, str, str],
    after: tuple[str, str, str],
) -> None:
    word, expected = keyword
    body = "".join(before) + _mangle_case(word, flips) + "".join(after)
    assert classify(body) == expected, body


# Invisible format characters (Cf) a phone keyboard or a copy-paste may slip into a word.
INVISIBLE = st.sampled_from(["\u200b", "\u200c", "\u200d", "\u2060", "\u00ad", "\ufeff", "\u200e"])
# Compatibility forms that NFKD folds to ASCII: fullwidth, mathematical bold, circled.
FORMS = st.sampled_from([0xFF21 - 0x41, 0x1D400 - 0x41, 0x24B6 - 0x41, 0])


def _styled(word: str, offset: int) -> str:
    return "".join(chr(ord(c) + offset) if "A" <= c <= "Z" else c for c in word.upper())


@given(
    keyword=st.sampled_from(sorted(OPT_OUT_KEYWORDS)),
    form=FORMS,
    invisible=st.lists(st.tuples(st.integers(0, 20), INVISIBLE), max_size=3),
)
@example(keyword="stop", form=0, invisible=[(1, "\u200b")])
@example(keyword="stop", form=0, invisible=[(2, "\u00ad")])
def test_opt_out_keywords_in_unicode_disguise_are_still_opt_outs(
    keyword: str, form: int, invisible: list[tuple[int, str]]
) -> None:
    """CTIA: a STOP is honoured however the phone spells it (ＳＴＯＰ, 𝐒𝐓𝐎𝐏, S\u200bTOP)."""
    body = _styled(keyword, form)
    for at, char in invisible:
        body = body[:at] + char + body[at:]
    assert classify(body) == "opt_out", ascii(body)


@given(
    kind=st.sampled_from([("stop", "opt_out"), ("start", "opt_in"), ("help", "help")]),
    flips=st.lists(st.booleans(), min_size=5, max_size=5),
    padding=WHITESPACE,
    body=ANY_TEXT,
)
def test_twilio_opt_out_type_wins_over_any_body(
    kind: tuple[str, str], flips: list[bool], padding: str, body: str
) -> None:
    opt_out_type, expected = kind
    assert classify(body, padding + _mangle_case(opt_out_type, flips) + padding) == expected


@given(current=st.sampled_from(OUTBOX_STATUSES) | st.text(max_size=12), report=REPORTS)
def test_advance_only_ever_moves_forward(current: str, report: str) -> None:
    new = advance(current, reported_status(report))
    if new is None:
        return
    assert current in (outbox.SENT, outbox.DELIVERED)  # only reported rows move
    assert RANK[new] > RANK[current]
    assert advance(new, reported_status(report)) is None  # the duplicate changes nothing


@given(reports=st.lists(REPORTS, max_size=12))
def test_late_and_duplicate_reports_never_move_a_row_back(reports: list[str]) -> None:
    current = outbox.SENT
    for report in reports:
        new = advance(current, reported_status(report))
        if new is not None:
            assert current not in (outbox.UNDELIVERED, outbox.FAILED)
            assert RANK[new] > RANK[current]
            current = new
    finals = [r for r in map(reported_status, reports) if r in (outbox.UNDELIVERED, outbox.FAILED)]
    if finals:
        assert current == finals[0]  # the first final report wins, whatever came after
    elif outbox.DELIVERED in map(reported_status, reports):
        assert current == outbox.DELIVERED
    else:
        assert current == outbox.SENT
