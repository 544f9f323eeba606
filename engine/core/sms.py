"""GSM-7 / UCS-2 encoding, segment counting and opt-out detection for SMS bodies.

Segment sizes follow 3GPP TS 23.038 (GSM 03.38 alphabet) and TS 23.040 (concatenated SMS:
a 6-octet user data header leaves 153 septets or 67 UTF-16 code units per part).
"""

from __future__ import annotations

import functools
import re
import unicodedata

from engine.core.domain import Encoding

# GSM 03.38 default alphabet, in table order (0x00-0x7F without 0x1B ESC): 127 characters.
GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# GSM 03.38 extension table: each is sent as ESC + char, so it costs two septets.
GSM_EXTENSION = frozenset("\f^{}\\[~]|€")
GSM_ALL = GSM_BASIC | GSM_EXTENSION

GSM_SINGLE, GSM_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67


def encoding_of(text: str) -> Encoding:
    """GSM-7 when every character is in the GSM 03.38 basic or extension table, else UCS-2."""
    return "GSM-7" if GSM_ALL.issuperset(text) else "UCS-2"


def measure(text: str) -> tuple[Encoding, int, int]:
    """Return (encoding, segments, length in septets or UTF-16 code units).

    Empty text counts as one segment: carriers bill a message with an empty body as one.
    An ESC pair (GSM-7) or a surrogate pair (UCS-2) is never split across two parts, so a
    part may carry one unit less than its maximum.
    """
    if encoding_of(text) == "GSM-7":
        escapes = sum(text.count(c) for c in GSM_EXTENSION)
        if len(text) + escapes <= GSM_SINGLE:  # the common case, without a cost per character
            return "GSM-7", 1, len(text) + escapes
        costs = [2 if c in GSM_EXTENSION else 1 for c in text]
        return "GSM-7", _segments(costs, GSM_SINGLE, GSM_PART), sum(costs)
    costs = [2 if ord(c) > 0xFFFF else 1 for c in text]
    return "UCS-2", _segments(costs, UCS2_SINGLE, UCS2_PART), sum(costs)


def _segments(costs: list[int], single: int, part: int) -> int:
    total = sum(costs)
    if total <= single:
        return 1
    if total == len(costs):
        return -(-total // part)
    segments, used = 1, 0
    for cost in costs:
        if used + cost > part:
            segments, used = segments + 1, 0
        used += cost
    return segments


_VERBS = (
    r"reply|text|txt|send|respond|responda|responde|env[ií]e|env[ií]a|escriba|escribe"
    r"|conteste|contesta|mande|manda"
)
# Keywords carriers and Twilio treat as opt-out (CTIA Messaging Principles 5.1.1), plus
# Spanish ones. The short common words (end, cancel, quit) count only after a verb.
_STRONG = r"stop|stopall|unsubscribe|optout|opt-out|parar|baja|alto"
_ANY = _STRONG + r"|cancel|end|quit|revoke|cancelar|fin|salir"
_OTHER_KEYWORDS = r"help|info|ayuda|y|yes|s[ií]|no"
_ACTIONS = (
    r"opt[\s-]?out|end|stop|unsubscribe|cancel|quit|cancelar|darse de baja|dar de baja"
    r"|salir|no recibir|dejar de recibir|terminar|parar"
)
_OPEN_QUOTE = "[\"'“‘«]?"
_CLOSE_QUOTE = "[\"'”’»]?"
_OPT_OUT = re.compile(
    rf"\b(?:{_VERBS})\s+(?:with\s+|con\s+)?"
    rf"(?:{_OPEN_QUOTE}(?:{_OTHER_KEYWORDS}){_CLOSE_QUOTE}\s*(?:,|or|o|/)\s*)*"
    rf"{_OPEN_QUOTE}(?:{_ANY})\b"
    rf"|\b(?:{_STRONG}){_CLOSE_QUOTE}\s*(?:to|2|para|=|:|-)\s*(?:{_ACTIONS})\b",
    re.IGNORECASE,
)


@functools.lru_cache(maxsize=4096)
def has_opt_out_text(text: str) -> bool:
    """True when the text tells the patient how to opt out ("Reply STOP to opt out",
    "STOP to unsubscribe", "Responda PARAR"), as CTIA requires in the first message
    of a program. Case-insensitive and word-bounded: "stopped", "nonstop" or "don't stop
    taking it" do not count. Remembered by text: most messages of a tick share theirs.
    """
    return _OPT_OUT.search(text) is not None


def to_gsm(text: str) -> str:
    """Transliterate to the GSM-7 alphabet (Zoë -> Zoe, Łukasz -> Lukasz), so one accented
    name does not turn a message into UCS-2 and halve the characters per segment."""
    if GSM_ALL.issuperset(text):
        return text
    out = []
    for char in text:
        if char in GSM_ALL:
            out.append(char)
            continue
        base = "".join(
            c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c)
        )
        base = _FALLBACK.get(char, base)
        out.append(base if base and GSM_ALL.issuperset(base) else "?")
    return "".join(out)


_FALLBACK = {
    "ł": "l",
    "Ł": "L",
    "đ": "d",
    "Đ": "D",
    "ø": "ø",
    "œ": "oe",
    "Œ": "OE",
    "ß": "ss",
    "\u2019": "'",
    "\u2018": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2013": "-",
    "\u2014": "-",
    "\u2026": "...",
}
