"""`engage serve`: the web app (Twilio webhooks, health check) under gunicorn.

Logs are JSON lines like the worker's. Access lines carry no query string and no client
address, and the token of a patient page (`/s/<token>`) is masked in every log line: the
token is the patient's credential to that page, and an IP address next to a health
service's URL is an identifier (HIPAA Safe Harbor, 45 CFR 164.514(b)(2)(i)(O)).
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any

import click
from flask import Flask
from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from engine.runtime import Runtime, UsageProblem
from engine.settings import Settings
from engine.store import db

_PAGE_TOKEN = re.compile(r"(/s/)[^\s/?#\"']+")
_QUERY = re.compile(r"(/[^\s?#\"']*)\?[^\s\"']*")


def loggable(text: str) -> str:
    """`text` without query strings and with patient-page tokens masked (`/s/-`)."""
    return _PAGE_TOKEN.sub(r"\1-", _QUERY.sub(r"\1", text))


class RedactFilter(logging.Filter):
    """Rewrites a record whose message holds a token or a query string (a handler filter:
    it sees records from every logger, Flask's "Exception on /s/..." included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = loggable(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class ServeLogger(glogging.Logger):
    """Gunicorn's logger, writing JSON lines; an access line is method, path, status,
    bytes and milliseconds, nothing else."""

    def setup(self, cfg: Any) -> None:
        from engine.worker import JsonLogFormatter

        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(JsonLogFormatter())
                handler.addFilter(RedactFilter())

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> None:
        if not self.cfg.accesslog:
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        fields = {
            "method": environ.get("REQUEST_METHOD"),
            "path": loggable(environ.get("PATH_INFO") or "/"),
            "status": int(status),
            "bytes": getattr(resp, "sent", None),
            "ms": round(request_time.total_seconds() * 1000, 1),
        }
        self.access_log.info("http.request", extra={"fields": fields})


class GunicornServer(BaseApplication):  # type: ignore[misc]
    """Gunicorn's custom-application API: options in, one Flask app per worker out."""

    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for name, value in self.options.items():
            self.cfg.set(name, value)
        if "control_socket_disable" in self.cfg.settings:  # gunicorn 25+
            # Its default path is shared by every gunicorn of the user.
            self.cfg.set("control_socket_disable", True)

    def load(self) -> Flask:
        """Called in each worker after the fork (no preload): database engines and their
        pools must never be shared between processes."""
        from engine.gc_tuning import freeze_startup_heap
        from engine.web import create_app

        app = create_app(self.settings)
        freeze_startup_heap()
        return app


def check_ready(rt: Runtime) -> None:
    """Refuse to start on a database without the current schema, without keys or without
    active definitions: every webhook would fail."""
    rt.require_schema()
    current, head = db.current_revision(rt.engine), db.head_revision()
    if current != head:
        raise UsageProblem(
            f"the database schema is at revision {current}, this engage needs {head}: "
            "run `engage init`"
        )
    rt.keyring  # noqa: B018 - raises UsageProblem when the keys cannot be loaded
    with rt.session_factory() as session:
        rt.definitions(session)
    rt.engine.dispose()  # the master's connections must not be inherited by workers


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _run_dev(settings: Settings, host: str, port: int) -> None:
    from werkzeug.serving import WSGIRequestHandler

    from engine.web import create_app

    class RedactingHandler(WSGIRequestHandler):
        def log(self, type: str, message: str, *args: Any) -> None:
            super().log(type, "%s", loggable(message % args if args else message))

    app = create_app(settings)
    app.run(
        host=host, port=port, threaded=True, use_reloader=False, request_handler=RedactingHandler
    )


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--workers", default=2, show_default=True, type=click.IntRange(1), help="Worker processes."
)
@click.option(
    "--threads",
    default=4,
    show_default=True,
    type=click.IntRange(1),
    help="Threads per worker (requests in flight per process).",
)
@click.option(
    "--timeout",
    default=30,
    show_default=True,
    type=click.IntRange(1),
    help="Seconds a request may take before its worker is restarted.",
)
@click.option(
    "--keep-alive",
    default=2,
    show_default=True,
    type=click.IntRange(0),
    help="Seconds an idle connection is held for another request; 0 closes it after each "
    "answer (less CPU when every client opens one per request).",
)
@click.option(
    "--dev", is_flag=True, help="Flask's development server instead (one process, no reloader)."
)
@click.pass_obj
def serve(
    rt: Runtime,
    host: str,
    port: int,
    workers: int,
    threads: int,
    timeout: int,
    keep_alive: int,
    dev: bool,
) -> None:
    """Serve the web app (Twilio webhooks at /twilio/inbound and /twilio/status, /healthz)
    with gunicorn until SIGTERM or Ctrl-C."""
    from engine.worker import configure_logging

    check_ready(rt)
    if not rt.settings.twilio_auth_token:
        click.echo(
            "warning: TWILIO_AUTH_TOKEN is not set: every webhook is refused (403)", err=True
        )
    configure_logging()
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactFilter())
    if dev:
        _run_dev(rt.settings, host, port)
        return
    options = {
        "bind": _bind(host, port),
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread" if threads > 1 else "sync",
        "timeout": timeout,
        # A connection held open after its answer costs the worker a second wake-up, when
        # the client leaves: up to a tenth of its CPU in `bench webhooks`.
        "keepalive": keep_alive,
        "graceful_timeout": min(timeout, 30),
        "accesslog": "-",
        "logger_class": ServeLogger,
        "proc_name": "engage-serve",
    }
    GunicornServer(rt.settings, options).run()


def register(group: click.Group) -> None:
    group.add_command(serve)
