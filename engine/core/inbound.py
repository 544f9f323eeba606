"""What a patient's text means, and how a delivery report moves an outbox row (pure).

Classification rule: a message is an opt-out when it is an opt-out keyword on its own
(punctuation, case, accents and a courtesy word such as "please" ignored), or contains
a clear opt-out phrase ("stop texting me", "no more texts", "no me envíen más mensajes").
Free text that merely contains "stop" ("I will stop by tomorrow", "can I stop taking my
statin?") is not an opt-out: it goes to staff as "other". CTIA Messaging Principles 5.1.1
require honouring the standard keywords and "reasonable" free-text opt-outs;
47 CFR 64.1200(a)(10) asks for "any reasonable means", hence the phrase list.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from typing import Literal

from engine.core.consent import fold
from engine.core.domain import ConsentEvent

Classification = Literal["opt_out", "opt_in", "help", "other"]

OPT_OUT_KEYWORDS = frozenset(
    {
        "stop",
        "stopall",
        "stop all",
        "unsubscribe",
        "cancel",
        "end",
        "quit",
        "revoke",
        "optout",
        "opt out",
    }
    | {"parar", "alto", "cancelar", "baja", "darme de baja"}
)
OPT_IN_KEYWORDS = frozenset({"start", "unstop", "yes"})
HELP_KEYWORDS = frozenset({"help", "info", "ayuda"})
COURTESY = frozenset({"please", "pls", "plz", "thanks", "thank you", "por favor", "gracias"})

_MESSAGES = r"(texts?|text messages?|messages?|msgs?|sms|reminders?)"
_OPT_OUT_PHRASES = (
    r"\bstop (texting|messaging|sending|contacting|txting|texts?|messages?)\b",
    r"\bstop (all|these|the|your) " + _MESSAGES,
    r"\b(remove|delete|take) (me|my number)\b.*\b(list|off|from)\b",
    r"\b(unsubscribe|opt) me( out)?\b",
    r"\bno more " + _MESSAGES,
    r"\b(dont|do not|never) (text|message|contact|sms) me\b",
    r"\b(dont|do not) send me (any )?(more )?" + _MESSAGES,
    r"\bno (mas|quiero) (mas )?(mensajes|textos)\b",
    r"\bno me (envien|manden|escriban|mande|envie)\b",
    r"\bdejen? de (enviar|mandar|escribir)",
    r"\b(darme|dar me|denme) de baja\b",
)
_NEGATED_STOP = re.compile(r"\b(dont|do not|never|please dont)\s+stop\b")
_PHRASES = tuple(re.compile(p) for p in _OPT_OUT_PHRASES)
_TWILIO_TYPES: dict[str, Classification] = {"stop": "opt_out", "start": "opt_in", "help": "help"}


def normalize(body: str) -> str:
    """Lower case, accents, format characters and apostrophes dropped, punctuation as spaces,
    one space each."""
    text = unicodedata.normalize("NFKD", body)
    # Accents and invisible format characters (zero-width space, soft hyphen, BOM) go.
    text = "".join(c for c in text if not _invisible(c)).lower()
    text = re.sub(r"['’`´]", "", text)
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(text.split())


def _invisible(c: str) -> bool:
    return bool(unicodedata.combining(c)) or unicodedata.category(c) == "Cf"


def _strip_courtesy(text: str) -> str:
    """'stop please' and 'please stop' are the keyword 'stop'."""
    for word in sorted(COURTESY, key=len, reverse=True):
        if text.startswith(word + " "):
            text = text[len(word) + 1 :]
        if text.endswith(" " + word):
            text = text[: -len(word) - 1]
    return text


def classify(body: str, opt_out_type: str | None = None) -> Classification:
    """opt_out, opt_in, help or other. Twilio's OptOutType (STOP/START/HELP) wins."""
    if opt_out_type and opt_out_type.strip().lower() in _TWILIO_TYPES:
        return _TWILIO_TYPES[opt_out_type.strip().lower()]
    text = normalize(body)
    keyword = _strip_courtesy(text)
    if keyword in OPT_OUT_KEYWORDS:
        return "opt_out"
    if keyword in OPT_IN_KEYWORDS:
        return "opt_in"
    if keyword in HELP_KEYWORDS:
        return "help"
    if not _NEGATED_STOP.search(text) and any(p.search(text) for p in _PHRASES):
        return "opt_out"
    return "other"


# --- opt-in ---------------------------------------------------------------------------------

KEYWORD_METHODS = frozenset({"sms_keyword", "carrier_opt_out"})


def regrantable(
    events: Sequence[ConsentEvent], purposes: Iterable[str], channel: str = "sms"
) -> dict[str, str | None]:
    """Purposes a START gives back, with the legal basis of their last grant.

    Only purposes that were active until a keyword opt-out (STOP, carrier 21610) revoked
    them: a purpose the patient revoked another way, or never granted, stays revoked.
    """
    found: dict[str, str | None] = {}
    for purpose in purposes:
        mine = [e for e in events if e.purpose == purpose and e.channel == channel]
        ordered = [e for _, e in sorted(enumerate(mine), key=lambda p: (p[1].occurred_at, p[0]))]
        trailing = 0
        while trailing < len(ordered) and _keyword_revocation(ordered[-1 - trailing]):
            trailing += 1
        if trailing == 0:
            continue
        before = fold(ordered[: len(ordered) - trailing]).get((purpose, channel))
        if before is not None and before.active:
            found[purpose] = before.legal_basis
    return found


def _keyword_revocation(event: ConsentEvent, methods: Collection[str] = KEYWORD_METHODS) -> bool:
    return event.status == "revoked" and event.method in methods


# --- delivery reports ---------------------------------------------------------------------

# Twilio MessageStatus -> outbox status; statuses before "sent" are not recorded.
_REPORTED = {"sent": "sent", "delivered": "delivered", "read": "delivered"}
_REPORTED |= {"undelivered": "undelivered", "failed": "failed"}
_RANK = {"sent": 1, "delivered": 2, "undelivered": 3, "failed": 3}
FINAL_REPORTS = frozenset({"undelivered", "failed"})


def reported_status(message_status: str) -> str | None:
    """The outbox status a Twilio MessageStatus means, None when it means nothing new."""
    return _REPORTED.get(message_status.strip().lower())


def advance(current: str, reported: str | None) -> str | None:
    """The row's new status, or None when the report would not move it forward.

    Status only moves forward (sent < delivered; undelivered and failed are final): a late
    or duplicate callback never moves a row back. Only sent and delivered rows move: a
    `sending` row belongs to the dispatcher until it records the provider's answer.
    """
    if reported is None or current not in _RANK or current in FINAL_REPORTS:
        return None
    if _RANK[reported] <= _RANK[current]:
        return None
    return reported
