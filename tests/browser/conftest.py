"""Browser tests: Debian's Chromium driven by Playwright, against the app served over real
HTTP, on the integration suite's databases (SQLite and PostgreSQL) and fixtures."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright
from werkzeug.serving import make_server

from engine.settings import Settings
from engine.web import create_app, runtime_of
from tests.integration.booking_fixtures import NOW
from tests.integration.conftest import (  # noqa: F401 - fixtures shared with integration
    db_backend,
    db_url,
    definitions,
    engage,
    engine,
    keyring,
    postgres_admin,
    sandbox,
    sandbox_factory,
    session_factory,
    settings,
)

CHROMIUM = Path("/usr/bin/chromium")
Serve = Callable[..., str]


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's Chromium "
            "(apt-get install chromium; .ci/run installs it)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@pytest.fixture
def serve() -> Iterator[Serve]:
    """serve(settings, now=NOW) -> the origin of the app running on a free 127.0.0.1 port
    in a background thread; every server is shut down after the test."""
    with ExitStack() as stack:

        def start(settings: Settings, now: datetime = NOW) -> str:
            app = create_app(settings, clock=lambda: now)
            server = make_server("127.0.0.1", 0, app, threaded=True)
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()

            def stop() -> None:
                server.shutdown()
                thread.join(timeout=5)
                server.server_close()
                runtime = runtime_of(app)
                if "engine" in vars(runtime):  # opened by a request
                    runtime.engine.dispose()

            stack.callback(stop)
            return f"http://127.0.0.1:{server.server_port}"

        yield start
