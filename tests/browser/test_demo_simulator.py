"""The phone simulator in Chromium, against the demo running as `engage demo` runs it (the
sandbox provider, the worker and the web app in threads, real HTTP between them): a
patient's reminders appear in their thread without a reload, and STOP typed there cancels
the patient's waiting reminders and brings back the confirmation.

Chromium is required: without /usr/bin/chromium these tests fail (.ci/run installs it).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from playwright.sync_api import Browser, Page

from engine.runtime import utcnow
from tests.integration.demo_fixtures import (
    RunningDemo,
    patients_waiting,
    plan,
    running_demo,
    stop_confirmation,
    waiting_rows,
)

REPORT_CSP = """
document.addEventListener("securitypolicyviolation", (e) => {
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI}`);
});
"""
ARRIVAL_MS = 20_000  # the worker plans at once and dispatches every second; polls every 3 s


def sign_in(page: Page, running: RunningDemo, username: str) -> None:
    page.goto(f"{running.url}/admin/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", running.password(username))
    with page.expect_navigation():
        page.click("button[type=submit]")


def test_texts_arrive_and_stop_cancels_the_waiting_reminders(
    browser: Browser, tmp_path: Path, definitions: Path
) -> None:
    with running_demo(tmp_path, definitions, worker=True) as running:
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.add_init_script(REPORT_CSP)
        sign_in(page, running, "demo-marketer")

        page.goto(f"{running.url}/admin/sandbox")
        # The list fills in by itself (simulator.js polls) as the worker's texts arrive.
        page.wait_for_selector("#threads li a", timeout=ARRIVAL_MS)
        plan(running.settings, utcnow(), horizon=timedelta(days=7))  # later reminders wait
        waiting = patients_waiting(running.settings)
        on_screen = page.locator("#threads .who").all_inner_texts()
        candidates = [p for p in on_screen if p.split()[0] in waiting]
        assert candidates, "no patient with a text and a later reminder"
        patient = candidates[0].split()[0]

        with page.expect_navigation():
            page.locator("#threads a", has_text=patient).click()
        assert page.locator("#thread-heading").inner_text() == patient
        assert page.locator("#thread .bubble.received").count() >= 1
        assert waiting_rows(running.settings, patient)

        with page.expect_navigation():
            page.click("form.quick button[value=STOP]")
        assert "webhook took it" in page.locator(".flash").inner_text()
        page.locator("#thread .bubble.sent", has_text="STOP").wait_for()
        stop_text = stop_confirmation(running.settings, patient)
        confirmation = page.locator("#thread .bubble.received", has_text=stop_text)
        confirmation.wait_for(timeout=ARRIVAL_MS)

        assert waiting_rows(running.settings, patient) == []
        assert errors == []
        page.close()
