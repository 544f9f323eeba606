"""The sandbox as a Flask app, and a threaded werkzeug server to run it in the background."""

from __future__ import annotations

import threading
from types import TracebackType

from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from engine.sandbox import api, control, phone_api
from engine.sandbox.config import SandboxConfig
from engine.sandbox.keepalive import KeepAliveRequestHandler, OpenConnections
from engine.sandbox.service import Sandbox


def create_sandbox_app(config: SandboxConfig | None = None) -> Flask:
    """A Twilio-compatible Messages API plus /sandbox control endpoints.

    Timeout and drop faults close the socket, which needs the werkzeug server
    (SandboxServer); under another WSGI server they answer 500 instead.
    """
    app = Flask("engine.sandbox")
    app.extensions["engage_sandbox"] = Sandbox(config or SandboxConfig())
    app.register_blueprint(api.bp)
    app.register_blueprint(control.bp)
    app.register_blueprint(phone_api.bp)
    return app


def sandbox_of(app: Flask) -> Sandbox:
    return app.extensions["engage_sandbox"]  # type: ignore[no-any-return]


class SandboxServer:
    """Runs the sandbox app on a threaded werkzeug server (one thread per connection,
    HTTP/1.1 keep-alive: see keepalive.py) in a background thread.

        server = SandboxServer(SandboxConfig(port=0))
        base_url = server.start()   # http://127.0.0.1:<free port>
        ...
        server.stop()
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.app = create_sandbox_app(self.config)
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._connections = OpenConnections()
        self._url: str | None = None

    @property
    def sandbox(self) -> Sandbox:
        return sandbox_of(self.app)

    @property
    def url(self) -> str:
        """The base URL (still known after stop, to test a provider that is down)."""
        if self._url is None:
            raise RuntimeError("the sandbox server was never started")
        return self._url

    def bind(self) -> str:
        """Open the listening socket (port 0: a free one) and return the base URL."""
        self._server = make_server(
            self.config.host,
            self.config.port,
            self.app,
            threaded=True,
            request_handler=KeepAliveRequestHandler,
        )
        self._server.open_connections = self._connections  # type: ignore[attr-defined]
        host, port = self._server.server_address[:2]
        self._url = f"http://{host}:{port}"
        return self._url

    def start(self) -> str:
        """Serve in a daemon thread; returns the base URL."""
        url = self.bind()
        assert self._server is not None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="sandbox-server",
            daemon=True,
        )
        self._thread.start()
        return url

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (the `engage sandbox` command)."""
        if self._server is None:
            self.bind()
        assert self._server is not None
        try:
            self._server.serve_forever()
        finally:
            self.sandbox.stop()
            self._close()

    def stop(self) -> None:
        """Stop accepting, end open connections and held requests, stop callbacks."""
        self.sandbox.stop()
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._close()

    def _close(self) -> None:
        if self._server is not None:
            self._server.server_close()
            self._server = None
        self._connections.close_all()

    def __enter__(self) -> SandboxServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
