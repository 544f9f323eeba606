"""`GET /metrics`: Prometheus text format, for a bearer token with `view`.

The app is reachable from the internet (Twilio posts to it, patients open their links), so
/metrics is not left open as on an internal port: Prometheus sends a token
(`authorization: {credentials_file: ...}` in its scrape config).

- Outbox gauges (messages by campaign and status, decisions by outcome and by deciding rule,
  failures by error code, dispatch backlog, time of the latest decision) are read from the
  database at scrape time by a custom collector, so every gunicorn worker answers the same
  without shared state.
- Webhook latency (/twilio/*) is a histogram each process observes. Under several gunicorn
  workers set PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode) so a scrape
  adds up every worker's observations.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from flask import Flask, Response, current_app, g, request
from flask.blueprints import BlueprintSetupState
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from engine.store.api_queries import outbox_gauges
from engine.store.outbox_queries import outbox_status
from engine.web import now_of, runtime_of
from engine.web.api.common import api_blueprint
from engine.web.auth import api_requires

blueprint = api_blueprint("api_metrics", __name__, url_prefix="")
ORDER = 89
STATE_KEY = "engage.metrics"
WEBHOOKS = "twilio_webhooks"  # the blueprint of engine.web.webhooks
WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class WebMetrics:
    """One app's metrics: what this process observes, and the outbox read at scrape time."""

    observed: CollectorRegistry
    webhook_seconds: Histogram
    outbox: CollectorRegistry


class OutboxCollector:
    """Gauges computed from the outbox whenever Prometheus scrapes (the app's database is
    opened on first use, as everything create_app builds)."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        now = now_of(self.app)
        with runtime_of(self.app).session_factory() as db:
            gauges = outbox_gauges(session=db, now=now)
            status = outbox_status(session=db)
        messages = GaugeMetricFamily(
            "engage_outbox_messages",
            "Outbox rows by campaign and status.",
            labels=["campaign", "status"],
        )
        for (campaign, state), n in sorted(gauges.by_campaign_status.items()):
            messages.add_metric([campaign, state], n)
        outcomes = GaugeMetricFamily(
            "engage_decisions",
            "Outbox rows by their latest decision's outcome.",
            labels=["outcome"],
        )
        for outcome, n in sorted(gauges.by_outcome.items()):
            outcomes.add_metric([outcome], n)
        rules = GaugeMetricFamily(
            "engage_decisions_by_rule",
            "Blocked, deferred, expired and cancelled rows by the rule they are down to.",
            labels=["status", "rule"],
        )
        for (state, rule), n in sorted(status.by_rule.items()):
            rules.add_metric([state, rule], n)
        failed = GaugeMetricFamily(
            "engage_outbox_failed_messages", "Failed rows by provider error code.", labels=["code"]
        )
        for code, n in sorted(status.failed_by_error.items(), key=lambda kv: kv[0] or 0):
            failed.add_metric(["" if code is None else str(code)], n)
        yield from (messages, outcomes, rules, failed)
        yield GaugeMetricFamily(
            "engage_outbox_due_backlog_seconds",
            "How long the oldest due queued message has waited for the dispatcher.",
            value=gauges.due_backlog_seconds,
        )
        last = gauges.last_decided_at
        yield GaugeMetricFamily(
            "engage_outbox_last_decision_timestamp_seconds",
            "When the planner or dispatcher last decided a row (0: never).",
            value=last.timestamp() if last else 0.0,
        )


def _setup(state: BlueprintSetupState) -> None:
    app = state.app
    observed = CollectorRegistry()
    webhook_seconds = Histogram(
        "engage_webhook_duration_seconds",
        "Time to answer Twilio's webhooks, by endpoint and status code.",
        ["endpoint", "code"],
        registry=observed,
        buckets=WEBHOOK_BUCKETS,
    )
    outbox = CollectorRegistry()
    outbox.register(OutboxCollector(app))
    app.extensions[STATE_KEY] = WebMetrics(observed, webhook_seconds, outbox)


blueprint.record_once(_setup)


def metrics_of(app: Flask) -> WebMetrics:
    metrics: WebMetrics = app.extensions[STATE_KEY]
    return metrics


@blueprint.before_app_request
def _start_webhook_clock() -> None:
    if request.blueprint == WEBHOOKS:
        g.webhook_started = time.perf_counter()


@blueprint.after_app_request
def _observe_webhook(response: Response) -> Response:
    started = g.pop("webhook_started", None)
    if started is not None:
        endpoint = (request.endpoint or "unknown").rpartition(".")[2]
        metrics_of(current_app).webhook_seconds.labels(endpoint, str(response.status_code)).observe(
            time.perf_counter() - started
        )
    return response


@blueprint.get("/metrics")
@api_requires("view")
def metrics() -> Response:
    state = metrics_of(current_app)
    observed = state.observed
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        observed = CollectorRegistry()
        MultiProcessCollector(observed)
    text = generate_latest(observed) + generate_latest(state.outbox)
    return Response(text, mimetype=None, content_type=CONTENT_TYPE_LATEST)
