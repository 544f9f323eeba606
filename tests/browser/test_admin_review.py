"""The compliance and IT pages in a real browser (Debian's Chromium on a laptop screen, the
app over real HTTP, SQLite and PostgreSQL): a reviewer approves a marketer's edit and sees it
active; IT breaks a policy file, reloads, and reads the file and line while nothing changes.
The pages load nothing from elsewhere and break no CSP rule.

Chromium is required: without /usr/bin/chromium these tests fail (.ci/run installs it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page

from engine.settings import Settings
from engine.store import models as m
from engine.store.defqueries import active_version, approved_versions
from tests.browser.conftest import Serve
from tests.integration.admin_fixtures import PASSWORD
from tests.integration.conftest import Engage
from tests.integration.test_admin_compliance import NOW, Site, make_draft, prepare_site

LAPTOP = {"width": 1366, "height": 900}
REPORT_CSP = """
document.addEventListener("securitypolicyviolation", (e) => {
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI}`);
});
"""


@dataclass
class Desk:
    """A signed-in staff member's browser tab, recording console errors and every request."""

    page: Page
    origin: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def sign_in(self, username: str) -> None:
        self.page.goto(f"{self.origin}/admin/login")
        self.page.fill("#username", username)
        self.page.fill("#password", PASSWORD)
        with self.page.expect_navigation():
            self.page.click("button[type=submit]")
        assert self.page.url == f"{self.origin}/admin/"

    def menu(self, label: str) -> None:
        with self.page.expect_navigation():
            self.page.click(f"nav.side >> text={label}")

    def text(self, selector: str) -> str:
        return " ".join(self.page.inner_text(selector).split())

    def assert_clean(self, allowed_errors: tuple[str, ...] = ()) -> None:
        unexpected = [e for e in self.errors if not e.startswith(allowed_errors or ("\0",))]
        assert unexpected == []
        assert [u for u in self.requests if not u.startswith(self.origin + "/")] == []


def open_desk(browser: Browser, origin: str) -> Desk:
    context = browser.new_context(viewport=LAPTOP)
    context.add_init_script(REPORT_CSP)
    tab = Desk(context.new_page(), origin)
    tab.page.on("console", lambda msg: _console(tab, msg))
    tab.page.on("pageerror", lambda exc: tab.errors.append(f"pageerror: {exc}"))
    tab.page.on("request", lambda request: tab.requests.append(request.url))
    return tab


def _console(tab: Desk, message: ConsoleMessage) -> None:
    if message.type == "error":
        tab.errors.append(message.text)


@pytest.fixture
def site(engage: Engage, settings: Settings, definitions: Path) -> Site:
    return prepare_site(engage, settings, definitions)


def test_a_reviewer_approves_a_marketers_edit_and_sees_it_active(
    site: Site, serve: Serve, browser: Browser, tmp_path: Path
) -> None:
    draft_id = make_draft(site.runtime, "Hi ", "Hello ", "user:marketer-1")
    tab = open_desk(browser, serve(site.runtime.settings, now=NOW))
    try:
        tab.sign_in("compliance-1")
        tab.menu("Approvals")
        card = tab.page.locator(f"#draft-{draft_id}")
        assert "user:marketer-1" in card.inner_text()
        assert "Hello Maria" in card.locator("pre.sms").inner_text()
        assert card.locator(".diff .add").count() == 1 and card.locator(".diff .del").count() == 1
        tab.page.screenshot(path=tmp_path / "queue.png")

        with tab.page.expect_navigation():
            card.locator("text=Review").click()
        tab.page.fill("#comment", "Fine: no PHI, opt-out text kept.")
        with tab.page.expect_navigation():
            tab.page.click("#approve")
        assert tab.page.url == f"{tab.origin}/admin/approvals"
        assert "Approved statin-refill.en" in tab.text("p.flash")
        assert tab.page.locator(f"#draft-{draft_id}").count() == 0

        with site.runtime.session_factory() as session:
            draft = session.get_one(m.TemplateDraft, draft_id)
            assert draft.version in approved_versions(session=session)
        tab.page.goto(f"{tab.origin}/admin/approvals/templates/statin-refill")
        row = tab.page.locator("tr", has_text="statin-refill.en.sms.j2")
        assert draft.version in row.inner_text() and "approved" in row.inner_text()
        tab.assert_clean()
    finally:
        tab.page.context.close()


def test_it_reloads_a_broken_policy_file_and_reads_file_and_line(
    site: Site, serve: Serve, browser: Browser, definitions: Path, tmp_path: Path
) -> None:
    with site.runtime.session_factory() as session:
        before = active_version(session=session)
    tab = open_desk(browser, serve(site.runtime.settings, now=NOW))
    try:
        tab.sign_in("it-admin-1")
        tab.menu("Policies")
        assert tab.text("#active-version") == before
        path = definitions / "policies" / "tcpa.yaml"
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("effect: defer", "effect: later", 1), encoding="utf-8")

        with tab.page.expect_navigation():
            tab.page.click("text=Reload from folders")
        errors = tab.text("#reload-errors")
        assert "Nothing was reloaded" in errors
        assert "policies/tcpa.yaml:13: rules.0.effect" in errors
        assert tab.text("#active-version") == before
        tab.page.screenshot(path=tmp_path / "policies-error.png")
        with site.runtime.session_factory() as session:
            assert active_version(session=session) == before
        # The form answers 400 on purpose; Chromium notes it in the console.
        tab.assert_clean(
            allowed_errors=("Failed to load resource: the server responded with a status of 400",)
        )
    finally:
        tab.page.context.close()
