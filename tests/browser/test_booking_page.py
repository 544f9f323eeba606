"""The patient page in a real browser: Debian's Chromium on a phone-sized screen, driving the
app over real HTTP on SQLite and PostgreSQL. A patient books by tapping, sees their time in
their own zone and language, loses a race for a slot gracefully, and the pages load nothing
from any other host, break no CSP rule and fit the phone without horizontal scrolling.

Chromium is required: without /usr/bin/chromium these tests fail (.ci/run installs it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Response
from sqlalchemy import select

from engine.crypto import token_hash
from engine.settings import Settings
from engine.store import models as m
from engine.store import queries
from tests.browser.conftest import Serve
from tests.integration.booking_fixtures import Booking, prepare
from tests.integration.conftest import Engage

MIN_TOUCH_PX = 44  # WCAG 2.5.5 target size; Apple's HIG asks the same
# CSP violations also reach the console, but say so in words a test can look for.
REPORT_CSP = """
document.addEventListener("securitypolicyviolation", (e) => {
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI}`);
});
"""
THURSDAY, FRIDAY = "Thursday, December 10, 2026", "Friday, December 11, 2026"
TAKEN = "Sorry, someone just booked that time. Please choose another one."
GONE = (
    "This link has expired or is no longer active. If you already booked, your visit is still on."
)


@pytest.fixture
def booking_db(engage: Engage, settings: Settings, tmp_path: Path) -> Booking:
    return prepare(engage, settings, tmp_path)


@dataclass
class Phone:
    """A page on a phone-sized screen that records what the patient would not see: console
    errors, uncaught exceptions, CSP violations, and every request it makes."""

    page: Page
    origin: str
    errors: list[tuple[str, str]] = field(default_factory=list)  # (message, its URL)
    requests: list[str] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)  # pages answered 4xx as the test expects

    def open(self, path: str, status: int = 200) -> Response:
        response = self.page.goto(self.origin + path)
        assert response is not None and response.status == status, path
        self._expect(response.url, status)
        return response

    def _expect(self, url: str, status: int) -> None:
        if status >= 400:
            self.refused.add(url)

    def submit(self, status: int = 200) -> None:
        """Tap the submit button and wait for the page it leads to."""
        with self.page.expect_navigation() as navigation:
            self.page.tap("button[type=submit]")
        response = navigation.value
        assert response is not None and response.status == status
        self._expect(response.url, status)

    def pick(self, time: str) -> None:
        row = self.page.locator("label.slot").filter(has_text=time)
        row.tap()
        assert row.locator("input[name=slot]").is_checked()

    def text(self, selector: str) -> str:
        return words(self.page.inner_text(selector))

    def texts(self, selector: str) -> list[str]:
        return [words(t) for t in self.page.locator(selector).all_inner_texts()]

    def offered(self) -> dict[str, list[str]]:
        """Day legend -> the times offered that day, as shown."""
        return {
            words(day.locator("legend").inner_text()): [
                words(t) for t in day.locator("label.slot .time").all_inner_texts()
            ]
            for day in self.page.locator("fieldset.day").all()
        }

    def assert_fits(self) -> None:
        scroll, width = self.page.evaluate(
            "() => [document.scrollingElement.scrollWidth, window.innerWidth]"
        )
        assert scroll <= width, f"scrolls sideways: {scroll} px content in {width} px"
        for target in self.page.locator("label.slot, button[type=submit]").all():
            box = target.bounding_box()
            assert box is not None and box["height"] >= MIN_TOUCH_PX, (
                target.inner_text(),
                box,
            )

    def assert_clean(self) -> None:
        """No error but Chromium's note on a 409/410 page the test asked for."""
        tolerated = self.refused
        assert [
            (text, url)
            for text, url in self.errors
            if not (text.startswith("Failed to load resource:") and url in tolerated)
        ] == []
        assert self.requests, "no request recorded"
        elsewhere = [url for url in self.requests if not url.startswith(self.origin + "/")]
        assert elsewhere == []


@pytest.fixture
def phone(browser: Browser) -> Iterator[Callable[..., Phone]]:
    """phone(origin, locale="en-US") -> a fresh browser context (its own cookies) on it."""
    with ExitStack() as stack:

        def open_phone(origin: str, locale: str = "en-US") -> Phone:
            context = browser.new_context(
                locale=locale,
                viewport={"width": 390, "height": 844},  # an iPhone 12 to 15
                device_scale_factor=3,
                is_mobile=True,
                has_touch=True,
            )
            stack.callback(context.close)
            context.add_init_script(REPORT_CSP)
            handset = Phone(context.new_page(), origin)
            handset.page.on("console", lambda msg: _console(handset, msg))
            handset.page.on(
                "pageerror", lambda exc: handset.errors.append((f"pageerror: {exc}", ""))
            )
            handset.page.on("request", lambda request: handset.requests.append(request.url))
            return handset

        yield open_phone


def _console(handset: Phone, message: ConsoleMessage) -> None:
    if message.type == "error":
        handset.errors.append((message.text, message.location.get("url", "")))


def words(text: str) -> str:
    """Text as read: babel puts a narrow no-break space in "9:00 AM"."""
    return " ".join(text.split())


def patient_id(db: Booking, external_id: str) -> int:
    with db.runtime.session_factory() as session:
        patient = queries.patient_by_external_id(session=session, external_id=external_id)
        assert patient is not None
        return patient.id


def booked_by(db: Booking, slot_id: str) -> int | None:
    with db.runtime.session_factory() as session:
        return session.scalar(select(m.Slot.booked_by).where(m.Slot.slot_id == slot_id))


def confirmations(db: Booking, external_id: str) -> list[str]:
    """Statuses of the booking confirmations planned for the patient."""
    with db.runtime.session_factory() as session:
        return list(
            session.scalars(
                select(m.Outbox.status).where(
                    m.Outbox.patient_id == patient_id(db, external_id),
                    m.Outbox.template_id == "booking-confirmation",
                )
            )
        )


def test_a_patient_books_a_time_by_tapping_on_their_phone(
    booking_db: Booking, serve: Serve, phone: Callable[..., Phone], tmp_path: Path
) -> None:
    token = booking_db.token("S001")
    ada = phone(serve(booking_db.settings))
    policy = ada.open(f"/s/{token}").headers["content-security-policy"]
    assert "default-src 'none'" in policy  # so "no CSP violation" below means something
    assert ada.page.get_attribute("html", "lang") == "en"
    assert ada.offered() == {THURSDAY: ["9:00 AM", "9:30 AM"], FRIDAY: ["10:00 AM"]}
    assert ada.text(".slots > .zone") == "All times are Eastern Time."
    assert ada.page.locator("#booking-error").count() == 0
    ada.assert_fits()
    ada.page.screenshot(path=tmp_path / "slots.png", full_page=True)

    ada.pick("9:30 AM")
    ada.submit()
    assert ada.page.url == f"{ada.origin}/s/booked"  # neither token nor booking in the URL
    assert ada.text("h1") == "You are booked"
    assert ada.texts("#booking p")[:3] == [
        THURSDAY,
        "9:30 AM (Eastern Time)",
        "with Dr. Chen",
    ]
    assert "We will also send you a text to confirm." in ada.text("main")
    ada.assert_fits()
    ada.page.screenshot(path=tmp_path / "booked.png", full_page=True)
    assert booked_by(booking_db, "PC-2") == patient_id(booking_db, "S001")
    assert booked_by(booking_db, "PC-1") is None
    assert confirmations(booking_db, "S001") == ["queued"]

    ada.open(f"/s/{token}", status=410)
    assert ada.text("#message-gone") == GONE
    assert ada.page.locator("form").count() == 0
    ada.assert_fits()
    ada.assert_clean()


def test_an_expired_link_shows_the_expiry_page(
    booking_db: Booking, serve: Serve, phone: Callable[..., Phone]
) -> None:
    token = booking_db.token("S001")
    with booking_db.runtime.session_factory() as session:
        expires = session.scalar(
            select(m.SchedulingLink.expires_at).where(
                m.SchedulingLink.token_hash == token_hash(token)
            )
        )
    assert expires is not None
    ada = phone(serve(booking_db.settings, now=expires + timedelta(seconds=1)))
    ada.open(f"/s/{token}", status=410)
    assert ada.text("h1") == "Link not available"
    assert ada.text("#message-gone") == GONE
    assert ada.page.locator("input[name=slot]").count() == 0
    ada.assert_fits()
    ada.assert_clean()


def test_a_slot_taken_meanwhile_is_refused_and_another_can_be_booked(
    booking_db: Booking, serve: Serve, phone: Callable[..., Phone]
) -> None:
    origin = serve(booking_db.settings)
    ada, grace = phone(origin), phone(origin)
    ada.open(f"/s/{booking_db.token('S001')}")
    grace_link = f"/s/{booking_db.mint('S002')}"
    grace.open(grace_link)
    assert (
        ada.offered() == grace.offered() == {THURSDAY: ["9:00 AM", "9:30 AM"], FRIDAY: ["10:00 AM"]}
    )

    ada.pick("9:00 AM")
    ada.submit()
    assert ada.texts("#booking p")[:2] == [THURSDAY, "9:00 AM (Eastern Time)"]

    grace.pick("9:00 AM")  # the page she still has open offers it
    grace.submit(status=409)
    assert grace.page.url == origin + grace_link
    alert = grace.page.locator("#booking-error")
    assert alert.get_attribute("role") == "alert" and words(alert.inner_text()) == TAKEN
    assert grace.offered() == {THURSDAY: ["9:30 AM"], FRIDAY: ["10:00 AM"]}
    values = grace.page.locator("input[name=slot]").evaluate_all("all => all.map(i => i.value)")
    assert values == ["PC-2", "PC-3"]
    grace.assert_fits()

    grace.pick("9:30 AM")
    grace.submit()
    assert grace.texts("#booking p")[:2] == [THURSDAY, "9:30 AM (Eastern Time)"]
    assert booked_by(booking_db, "PC-1") == patient_id(booking_db, "S001")
    assert booked_by(booking_db, "PC-2") == patient_id(booking_db, "S002")
    # No reminder led Grace here, so no campaign confirms by text: the page says so.
    assert "Please save these details." in grace.text("main")
    assert confirmations(booking_db, "S002") == []
    ada.assert_clean()
    grace.assert_clean()


def test_a_spanish_speaking_patient_gets_the_page_in_spanish(
    booking_db: Booking, serve: Serve, phone: Callable[..., Phone]
) -> None:
    token = booking_db.mint("S009")
    jose = phone(serve(booking_db.settings), locale="es-US")
    jose.open(f"/s/{token}")
    assert jose.page.get_attribute("html", "lang") == "es"
    assert jose.text("h1") == "Elija una hora para su cita"
    assert jose.offered() == {
        "jueves, 10 de diciembre de 2026": ["9:00", "9:30"],
        "viernes, 11 de diciembre de 2026": ["10:00"],
    }
    assert jose.text("button[type=submit]") == "Reservar esta hora"
    jose.assert_fits()

    jose.pick("9:30")
    jose.submit()
    assert jose.page.get_attribute("html", "lang") == "es"
    assert jose.text("h1") == "Su cita está reservada"
    assert jose.texts("#booking p")[:2] == [
        "jueves, 10 de diciembre de 2026",
        "9:30 (hora oriental)",
    ]
    jose.assert_fits()

    jose.open(f"/s/{token}", status=410)
    assert jose.text("h1") == "Enlace no disponible"
    jose.assert_clean()
