"""The web edge: `create_app(settings)` builds the Flask app when asked, never at import."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from werkzeug.middleware.proxy_fix import ProxyFix

from engine.runtime import Runtime
from engine.settings import Settings

RUNTIME_KEY = "engage.runtime"
CLOCK_KEY = "engage.clock"


def utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(settings: Settings, *, clock: Callable[[], datetime] | None = None) -> Flask:
    """The app, wired to `settings`; the database and keys are opened on first use.

    `clock` replaces the wall clock (tests pass the time in).
    """
    app = Flask(__name__)
    app.extensions[RUNTIME_KEY] = Runtime(settings)
    app.extensions[CLOCK_KEY] = clock or utcnow
    if settings.trust_proxy:
        # Twilio signs the public URL; behind a proxy the request arrives on another.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1, x_prefix=1
        )

    from engine.web.webhooks import webhooks

    app.register_blueprint(webhooks)

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return jsonify(status="ok")

    return app


def runtime_of(app: Flask) -> Runtime:
    runtime: Runtime = app.extensions[RUNTIME_KEY]
    return runtime


def now_of(app: Flask) -> datetime:
    clock: Callable[[], datetime] = app.extensions[CLOCK_KEY]
    return clock()
