"""What the patient pages say, in each language a patient may have (fallback: English)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Texts:
    language: str
    title: str
    heading: str
    intro: str
    times_in: str
    minutes: str
    with_provider: str
    book: str
    none_open: str
    call_us: str
    link_valid_until: str
    error_choose: str
    error_taken: str
    error_no_slot: str
    booked_title: str
    booked_heading: str
    booked_sms: str
    booked_no_sms: str
    gone_title: str
    gone_body: str
    expired_form_title: str
    expired_form_body: str
    too_many_title: str
    too_many_body: str
    help_line: str

    def error(self, which: str | None) -> str | None:
        return {
            "choose": self.error_choose,
            "taken": self.error_taken,
            "no-slot": self.error_no_slot,
        }.get(which or "")


EN = Texts(
    language="en",
    title="Book your visit",
    heading="Pick a time for your visit",
    intro="Choose one of the open times below. You can book once with this link.",
    times_in="All times are {zone}.",
    minutes="{n} min",
    with_provider="with {provider}",
    book="Book this time",
    none_open="There are no open times right now.",
    call_us="Please call us at {contact} and we will find a time with you.",
    link_valid_until="This link works until {date}.",
    error_choose="Please choose a time first.",
    error_taken="Sorry, someone just booked that time. Please choose another one.",
    error_no_slot="That time is no longer available. Please choose another one.",
    booked_title="You are booked",
    booked_heading="You are booked",
    booked_sms="We will also send you a text to confirm.",
    booked_no_sms="Please save these details.",
    gone_title="Link not available",
    gone_body="This link has expired or is no longer active. "
    "If you already booked, your visit is still on.",
    expired_form_title="Please try again",
    expired_form_body="This page was open for too long. Go back, reload it and choose your time.",
    too_many_title="Please wait a moment",
    too_many_body="There were too many requests from your device. Please try again in a minute.",
    help_line="Questions? Call {contact}.",
)

ES = Texts(
    language="es",
    title="Reserve su cita",
    heading="Elija una hora para su cita",
    intro="Elija una de las horas disponibles. Puede reservar una vez con este enlace.",
    times_in="Horario: {zone}.",
    minutes="{n} min",
    with_provider="con {provider}",
    book="Reservar esta hora",
    none_open="No hay horas disponibles en este momento.",
    call_us="Llámenos al {contact} y buscaremos una hora con usted.",
    link_valid_until="Este enlace funciona hasta el {date}.",
    error_choose="Primero elija una hora.",
    error_taken="Lo sentimos, alguien acaba de reservar esa hora. Elija otra, por favor.",
    error_no_slot="Esa hora ya no está disponible. Elija otra, por favor.",
    booked_title="Su cita está reservada",
    booked_heading="Su cita está reservada",
    booked_sms="También le enviaremos un mensaje de texto de confirmación.",
    booked_no_sms="Guarde estos datos, por favor.",
    gone_title="Enlace no disponible",
    gone_body="Este enlace ha vencido o ya no está activo. Si ya reservó, su cita sigue en pie.",
    expired_form_title="Inténtelo de nuevo",
    expired_form_body="Esta página estuvo abierta demasiado tiempo. Vuelva, recárguela y "
    "elija su hora.",
    too_many_title="Espere un momento",
    too_many_body="Hubo demasiadas solicitudes desde su dispositivo. Inténtelo en un minuto.",
    help_line="¿Preguntas? Llame al {contact}.",
)

CATALOG = {t.language: t for t in (EN, ES)}
LANGUAGES = list(CATALOG)


def texts_for(language: str) -> Texts:
    return CATALOG.get(language, EN)
