"""A marketer in a real browser (Debian's Chromium, on SQLite and PostgreSQL): opens a
campaign, edits its template text and watches the preview and lint follow as they type
(preview.js, no page load), saves the edit and finds it pending approval. The pages load
nothing from elsewhere and break no CSP rule."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from engine.settings import Settings
from tests.browser.conftest import Serve
from tests.integration.admin_fixtures import PASSWORD, create_staff
from tests.integration.booking_fixtures import NOW
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT, SAMPLE

REPORT_CSP = """
document.addEventListener("securitypolicyviolation", (e) => {
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI}`);
});
"""


@pytest.fixture
def origin(engage: Engage, settings: Settings, serve: Serve) -> str:
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    engage("approve", "statin-refill", "--by", "carol")
    engage("plan", "--at", AT)
    create_staff(settings, NOW)
    return serve(settings, now=NOW)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    context.add_init_script(REPORT_CSP)
    yield context.new_page()
    context.close()


def test_a_marketer_edits_a_template_with_a_live_preview(
    origin: str, page: Page, tmp_path: Path
) -> None:
    errors: list[str] = []
    requests: list[tuple[str, str]] = []
    page.on("console", lambda m: _error(errors, m))
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("request", lambda r: requests.append((r.method, r.url)))

    page.goto(f"{origin}/admin/login")
    page.fill("input[name=username]", "marketer-1")
    page.fill("input[name=password]", PASSWORD)
    with page.expect_navigation():
        page.click("button[type=submit]")
    page.click("nav.side >> text=Campaigns")
    with page.expect_navigation():
        page.click("text=Statin refill reminder")
    assert page.url == f"{origin}/admin/campaigns/statin-refill"
    expect(page.locator("#schedule-text")).to_contain_text("3 days before each prescription")
    text, lint = page.locator("#preview-text"), page.locator("#preview-lint")
    expect(text).to_contain_text("Hi Maria, your prescription refill is due soon.")
    expect(lint).to_have_text("No lint findings.")
    expect(page.locator("#preview-count")).to_contain_text("GSM-7")
    expect(page.locator("form.editor button[name=preview]")).to_be_hidden()  # live instead
    expect(page.locator("form.editor button[name=preview]")).to_have_count(1)
    page.screenshot(path=tmp_path / "campaign.png", full_page=True)

    loads = len([r for r in requests if r[1].endswith("/admin/campaigns/statin-refill")])
    source = page.input_value("#source")
    page.locator("#source").fill(source.replace("is due soon", "is due in 3 days — call us"))
    expect(text).to_contain_text("Hi Maria, your prescription refill is due in 3 days — call us")
    expect(lint).to_contain_text("is not in GSM-7, so the message goes as UCS-2")
    expect(page.locator("#preview-count")).to_contain_text("UCS-2")
    expect(page.locator("#preview-panel .badge.s-edited")).to_have_text("edited, not saved")
    assert page.url == f"{origin}/admin/campaigns/statin-refill"  # no page load
    assert len([r for r in requests if r[1].endswith("/admin/campaigns/statin-refill")]) == loads
    assert ("POST", f"{origin}/admin/campaigns/statin-refill/preview") in requests

    page.select_option("#patient", "S002")  # marketing consent only
    expect(text).to_contain_text("Hi Grace")
    expect(page.locator("#preview-rules")).to_contain_text("consent-required")

    with page.expect_navigation():
        page.get_by_role("button", name="Save as draft").click()
    assert page.url == f"{origin}/admin/templates/statin-refill/en/edit"
    expect(page.locator(".flash")).to_contain_text("pending until a compliance reviewer")
    row = page.locator("#drafts tbody tr").first
    expect(row).to_contain_text("user:marketer-1")
    expect(row.locator(".badge")).to_have_text("pending")
    expect(page.locator("#source")).to_have_value(re.compile("is due soon"))  # the active text
    page.screenshot(path=tmp_path / "editor.png", full_page=True)

    page.goto(f"{origin}/admin/campaigns/statin-refill/dashboard")
    expect(page.locator("svg.chart.funnel title").first).to_have_text(
        "Funnel of Statin refill reminder"
    )
    page.screenshot(path=tmp_path / "dashboard.png", full_page=True)

    assert errors == []
    assert [url for _, url in requests if not url.startswith(origin + "/")] == []


def _error(errors: list[str], message: ConsoleMessage) -> None:
    if message.type == "error":
        errors.append(message.text)
