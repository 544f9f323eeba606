"""The running demo: the sandbox provider, the web app and the worker in threads of one
process, talking over real HTTP as in production (`engage demo` runs this after
engine.demo.setup)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server

from engine.demo import demo_settings
from engine.runtime import utcnow
from engine.sandbox.config import SandboxConfig
from engine.settings import Settings
from engine.store import db


class _Deferred:
    """A WSGI app to bind a server with before the real app exists (its URL is needed to
    build the app's settings)."""

    def __init__(self) -> None:
        self.app: Callable[..., Any] | None = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        assert self.app is not None, "the demo app is not ready yet"
        return self.app(environ, start_response)


class DemoServices:
    """The sandbox, the web app and the worker in threads of this process.

    services = DemoServices.bind(base_settings, var_dir, port=8000)
    setup(services.settings, now=...)
    services.start()
    ...
    services.stop()
    """

    def __init__(
        self, settings: Settings, sandbox: Any, web: BaseWSGIServer, app: _Deferred
    ) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.web = web
        self._app = app
        self.worker: Any = None
        self._threads: list[threading.Thread] = []

    @classmethod
    def bind(
        cls,
        base: Settings,
        var_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        sandbox_port: int = 0,
    ) -> DemoServices:
        """Open both listening sockets (port 0: a free one) and start the sandbox; an
        address in use raises OSError here, before any work."""
        from engine.sandbox.server import SandboxServer

        deferred = _Deferred()
        web = make_server(host, port, deferred, threaded=True)
        public_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        public_url = f"http://{public_host}:{web.server_port}"
        config = SandboxConfig(
            port=sandbox_port,
            inbound_url=f"{public_url}/twilio/inbound",
            delivered_delay_ms=800.0,
        )
        sandbox = SandboxServer(config)
        try:
            sandbox_url = sandbox.start()
        except OSError:
            web.server_close()
            raise
        settings = demo_settings(base, var_dir, public_url=public_url, sandbox_url=sandbox_url)
        return cls(settings, sandbox, web, deferred)

    @property
    def public_url(self) -> str:
        return self.settings.public_url

    def start(self, *, worker: bool = True, plan_interval: float = 15.0) -> None:
        """Serve the web app and, unless `worker=False`, run the worker's ticks."""
        from engine.web import create_app

        self._app.app = create_app(self.settings)
        self._spawn("demo-web", lambda: self.web.serve_forever(poll_interval=0.1))
        if worker:
            self.worker = build_worker(self.settings, plan_interval=plan_interval)
            self._spawn("demo-worker", self.worker.run)

    def _spawn(self, name: str, target: Callable[[], object]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def texts_on_phones(self) -> int:
        """Texts the patients' phones have received so far."""
        phones = self.sandbox.sandbox.phones
        return sum(p["received"] for p in phones.phones(utcnow()))

    def stop(self) -> None:
        """Worker first (it finishes and records its sends), then the web app, then the
        sandbox; each waits for its thread."""
        if self.worker is not None:
            self.worker.stop.set()
        if self._threads:
            self.web.shutdown()
        for thread in self._threads:
            thread.join(timeout=15)
        self.web.server_close()
        self.sandbox.stop()
        _dispose(self._app.app, self.worker)


def build_worker(settings: Settings, *, plan_interval: float = 15.0) -> Any:
    """A worker on the demo database with the sandbox transport (as `engage worker` builds
    it: claims on a BEGIN IMMEDIATE engine, planning on ordinary transactions)."""
    from engine.crypto import load_keys
    from engine.transports.registry import make_transport
    from engine.worker import Worker, WorkerConfig

    claims = db.make_session_factory(db.make_engine(settings.database_url, sqlite_immediate=True))
    plans = db.make_session_factory(db.make_engine(settings.database_url))
    config = WorkerConfig(
        worker_id="demo",
        dispatch_interval=1.0,
        plan_interval=plan_interval,
        reconcile_interval=60.0,
        rate_per_second=settings.send_rate_per_second,
        plan_horizon=timedelta(minutes=5),
    )
    return Worker(
        config=config,
        settings=settings,
        session_factory=claims,
        keyring=load_keys(settings),
        transport=make_transport(settings),
        plan_session_factory=plans,
    )


def close_worker(worker: Any) -> None:
    """Close the database connections of a stopped worker from build_worker."""
    for factory in (worker.session_factory, worker.plan_session_factory):
        factory.kw["bind"].dispose()


def _dispose(app: Any, worker: Any) -> None:
    if worker is not None:
        close_worker(worker)
    if app is not None:
        from engine.web import runtime_of

        runtime = vars(runtime_of(app))
        if "write_sessions" in runtime:
            runtime["write_sessions"].kw["bind"].dispose()
        if "engine" in runtime:
            runtime["engine"].dispose()
