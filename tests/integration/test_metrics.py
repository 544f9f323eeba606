"""/metrics on SQLite and PostgreSQL: a view token, outbox gauges equal to what the
database holds at scrape time, and webhook latency, also summed over processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from twilio.request_validator import RequestValidator

from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import models as m
from engine.store.outbox_queries import outbox_status
from engine.web import create_app
from tests.integration.conftest import REPO, Engage
from tests.integration.test_cli import AT, SAMPLE

NOW = datetime.fromisoformat(AT)
AUTH_TOKEN = "twilio-test-auth-token"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def planned(engage: Engage, settings: Settings) -> Settings:
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    engage("approve", "statin-refill", "--by", "carol")
    engage("plan", "--at", AT)
    return settings.with_(twilio_auth_token=AUTH_TOKEN)


@pytest.fixture
def token(engage: Engage) -> str:
    return str(engage("tokens", "create", "prometheus", "--role", "viewer").output.strip())


def scrape(app: Flask, token: str) -> Samples:
    response = app.test_client().get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    return samples(response.get_data(as_text=True))


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def named(found: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (n, labels), value in found.items() if n == name}


def test_metrics_need_a_token(planned: Settings) -> None:
    response = create_app(planned, clock=lambda: NOW).test_client().get("/metrics")
    assert response.status_code == 401 and response.is_json


def test_outbox_gauges_are_what_the_database_holds(planned: Settings, token: str) -> None:
    o = m.Outbox
    with Runtime(planned).session_factory() as session:
        by_status = session.execute(
            select(o.campaign_id, o.status, func.count()).group_by(o.campaign_id, o.status)
        ).all()
        by_outcome = dict(
            session.execute(select(o.outcome, func.count()).group_by(o.outcome)).all()
        )
        by_rule = outbox_status(session=session).by_rule
        oldest = session.scalar(select(func.min(o.send_at)).where(o.status == "queued"))
    assert by_status and by_rule and oldest is not None

    found = scrape(create_app(planned, clock=lambda: NOW), token)
    assert named(found, "engage_outbox_messages") == {
        (("campaign", c), ("status", s)): n for c, s, n in by_status
    }
    assert named(found, "engage_decisions") == {(("outcome", k),): n for k, n in by_outcome.items()}
    assert named(found, "engage_decisions_by_rule") == {
        (("rule", r), ("status", s)): n for (s, r), n in by_rule.items()
    }
    assert found[("engage_outbox_last_decision_timestamp_seconds", ())] == NOW.timestamp()

    # The dispatcher's backlog: how long the oldest due queued row has waited, by the app clock.
    ten_minutes_late = create_app(planned, clock=lambda: oldest + timedelta(minutes=10))
    assert scrape(ten_minutes_late, token)[("engage_outbox_due_backlog_seconds", ())] == 600
    early = create_app(planned, clock=lambda: oldest - timedelta(seconds=1))
    assert scrape(early, token)[("engage_outbox_due_backlog_seconds", ())] == 0


def test_webhook_latency_is_observed_for_twilio_only(planned: Settings, token: str) -> None:
    app = create_app(planned, clock=lambda: NOW)
    client = app.test_client()
    assert client.post("/twilio/status", data={"MessageSid": "SM1"}).status_code == 403
    form = {"MessageSid": "SM" + "0" * 32, "MessageStatus": "delivered"}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(
        "http://localhost/twilio/status", form
    )
    signed = client.post("/twilio/status", data=form, headers={"X-Twilio-Signature": signature})
    assert signed.status_code == 200
    assert client.get("/healthz").status_code == 200

    counts = named(scrape(app, token), "engage_webhook_duration_seconds_count")
    assert counts == {
        (("code", "403"), ("endpoint", "delivery_status")): 1,
        (("code", "200"), ("endpoint", "delivery_status")): 1,
    }


SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from engine.settings import Settings
    from engine.web import create_app

    var, url, action = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    settings = Settings(var_dir=var, database_url=url, master_key_file=var / "master.key",
                        index_key_file=var / "index.key")
    client = create_app(settings).test_client()
    if action == "post":
        assert client.post("/twilio/inbound", data={"Body": "hi"}).status_code == 403
    else:
        scraped = client.get("/metrics", headers={"Authorization": "Bearer " + action})
        print(scraped.get_data(as_text=True))
    """
)


def test_several_processes_add_up_with_prometheus_multiproc_dir(
    planned: Settings, token: str, tmp_path: Path
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", SCRIPT, str(planned.var_dir), planned.database_url]

    def run(action: str) -> str:
        done = subprocess.run([*args, action], env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("post")
    run("post")
    found = samples(run(token))
    counts = named(found, "engage_webhook_duration_seconds_count")
    assert counts == {(("code", "403"), ("endpoint", "inbound")): 2}
    assert named(found, "engage_outbox_messages")  # the database gauges are there too
