import pytest

from engine.core.sms import (
    GSM_BASIC,
    GSM_EXTENSION,
    encoding_of,
    has_opt_out_text,
    measure,
    to_gsm,
)


def test_gsm_tables_have_the_03_38_sizes() -> None:
    assert len(GSM_BASIC) == 127  # 128 code points minus ESC
    assert len(GSM_EXTENSION) == 10
    assert not GSM_BASIC & GSM_EXTENSION


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Your refill is ready. Reply STOP to opt out.", "GSM-7"),
        ("Mañana él y Élise: ¿ok? ¡Olé! ü à è ù ì ò Ç ß Ø Å Æ Ñ Ü Ö Ä", "GSM-7"),
        ("Price: €5 {code} [1] ~ ^ | \\", "GSM-7"),
        ("Le ha tocado: está", "UCS-2"),  # á is not in GSM 03.38
        ("Medicación", "UCS-2"),  # ó
        ("Sí, aquí", "UCS-2"),  # í
        ("Menú", "UCS-2"),  # ú
        ("ça va", "UCS-2"),  # only capital Ç is in the table
        ("It’s ready", "UCS-2"),  # a typographic apostrophe
        ("`code`", "UCS-2"),  # backtick is not GSM
        ("See you 😀", "UCS-2"),
        ("", "GSM-7"),
    ],
)
def test_encoding_of(text: str, expected: str) -> None:
    assert encoding_of(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ("GSM-7", 1, 0)),
        ("a" * 160, ("GSM-7", 1, 160)),
        ("a" * 161, ("GSM-7", 2, 161)),
        ("a" * 153 * 2, ("GSM-7", 2, 306)),
        ("a" * (153 * 2 + 1), ("GSM-7", 3, 307)),
        ("€" * 80, ("GSM-7", 1, 160)),
        ("a" * 159 + "€", ("GSM-7", 2, 161)),
        ("€" * 81, ("GSM-7", 2, 162)),
        # 306 septets fit two parts, but the ESC pair at septets 153-154 moves to part two
        ("a" * 152 + "€" + "a" * 152, ("GSM-7", 3, 306)),
        ("a" * 151 + "€" + "a" * 153, ("GSM-7", 2, 306)),
        ("á" * 70, ("UCS-2", 1, 70)),
        ("á" * 71, ("UCS-2", 2, 71)),
        ("á" * 67 * 2, ("UCS-2", 2, 134)),
        ("á" * (67 * 2 + 1), ("UCS-2", 3, 135)),
        ("😀" * 35, ("UCS-2", 1, 70)),
        ("😀" * 36, ("UCS-2", 2, 72)),
        # 134 units fit two parts, but the surrogate pair at units 67-68 moves to part two
        ("á" * 66 + "😀" + "á" * 66, ("UCS-2", 3, 134)),
        ("á" * 65 + "😀" + "á" * 67, ("UCS-2", 2, 134)),
    ],
)
def test_measure(text: str, expected: tuple[str, int, int]) -> None:
    assert measure(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Reply STOP to opt out",
        "Msg&data rates may apply. Reply HELP for help, STOP to cancel.",
        "Text STOP to end",
        "STOP to unsubscribe",
        "reply stop to opt-out",
        'Reply "STOP" to opt out',
        "Reply HELP or STOP",
        "To opt out, txt END",
        "Responda PARAR para cancelar",
        "Responda PARAR",
        "Envíe BAJA para darse de baja",
        "BAJA para no recibir más mensajes",
    ],
)
def test_has_opt_out_text(text: str) -> None:
    assert has_opt_out_text(text)


@pytest.mark.parametrize(
    "text",
    [
        "Your prescription was STOPPED by your doctor",
        "Nonstop care for you",
        "Don't stop taking your medication",
        "Text us if you stop feeling well",
        "Tome la dosis baja por la mañana",
        "The end of your refill period is near",
        "",
    ],
)
def test_has_no_opt_out_text(text: str) -> None:
    assert not has_opt_out_text(text)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Zoë", "Zoe"),
        ("José", "José"),  # é is in the GSM-7 basic set: kept
        ("García", "Garcia"),  # í is not
        ("Łukasz", "Lukasz"),
        ("O\u2019Brien", "O'Brien"),
        ("Dvořák", "Dvorak"),
        ("Ñuñez", "Ñuñez"),
        ("Ana ☺", "Ana ?"),
    ],
)
def test_to_gsm_keeps_names_in_gsm7(name: str, expected: str) -> None:
    assert to_gsm(name) == expected
    assert encoding_of(to_gsm(name)) == "GSM-7"
