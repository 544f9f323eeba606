"""Twilio's webhooks after PostgreSQL restarted (a fast shutdown, then an immediate one, as
a crash) under the web app's connection pool, which sends no `SELECT 1` at checkout
(engine.store.db): no request fails because of the restart.

The cluster is the test's own (fault_fixtures.private_postgres), never the machine's shared
server.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from sqlalchemy import event
from twilio.request_validator import RequestValidator

from engine.settings import Settings
from engine.store import db
from engine.web import create_app, runtime_of
from tests.integration import fault_fixtures as ff
from tests.integration.conftest import Engage

private_postgres = ff.private_postgres

TOKEN = "restart-test-auth-token-0123456789"
RETRIED = "webhook.retried_after_disconnect"


@pytest.fixture
def db_url(private_postgres: ff.PrivateCluster) -> str:
    """The database on the private cluster (replaces conftest's, for every fixture)."""
    return private_postgres.create_database()


def test_webhooks_are_answered_after_postgresql_restarted(
    engage: Engage,
    settings: Settings,
    private_postgres: ff.PrivateCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(settings.with_(twilio_auth_token=TOKEN), clock=lambda: datetime.now(UTC))

    def report(n: int) -> int:
        form = {"MessageSid": f"SMrestart{n}", "MessageStatus": "delivered"}
        url = "http://localhost/twilio/status"
        signature = RequestValidator(TOKEN).compute_signature(url, form)
        with app.test_client() as client:
            response = client.post(
                "/twilio/status", data=form, headers={"X-Twilio-Signature": signature}
            )
        return response.status_code

    assert report(0) == 200  # the pool now holds a connection to the old server
    with caplog.at_level(logging.WARNING, logger="engine.inbound"):
        for n, mode in enumerate(("fast", "immediate"), start=1):
            private_postgres.stop(mode)
            private_postgres.start()
            assert report(n) == 200  # the dead connection was replaced before use
        assert RETRIED not in caplog.messages
        # Without that check the first statement fails on the dead connection, and the
        # request runs again on a new one.
        event.remove(runtime_of(app).engine, "checkout", db._drop_dead_connections)
        private_postgres.stop("fast")
        private_postgres.start()
        assert report(3) == 200
        assert RETRIED in caplog.messages
