"""The web edge: `create_app(settings)` builds the Flask app when asked, never at import."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Request, Response, jsonify, redirect, request, url_for
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from flask.typing import ResponseReturnValue
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFProtect
from werkzeug.middleware.proxy_fix import ProxyFix

from engine.crypto import KeyConfigError, load_secret_key
from engine.runtime import Runtime, UsageProblem
from engine.settings import Settings

RUNTIME_KEY = "engage.runtime"
CLOCK_KEY = "engage.clock"
# No form or webhook we serve comes near this; bigger bodies get 413 before parsing.
MAX_CONTENT_LENGTH = 64 * 1024

csrf = CSRFProtect()


def utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(settings: Settings, *, clock: Callable[[], datetime] | None = None) -> Flask:
    """The app, wired to `settings`; the database and keys are opened on first use.

    `clock` replaces the wall clock (tests pass the time in).
    """
    app = _App(__name__)
    app.session_interface = _SessionInterface()
    try:
        secret = load_secret_key(settings)
    except KeyConfigError as exc:
        raise UsageProblem(f"{exc} (run `engage init` to create it)") from exc
    app.config.update(
        SECRET_KEY=secret,
        MAX_CONTENT_LENGTH=MAX_CONTENT_LENGTH,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.public_url.startswith("https://"),
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session cookie
        RATELIMIT_ENABLED=settings.page_rate_per_minute > 0,
    )
    # No `SELECT 1` at each pool checkout: a dead connection is noticed by its socket.
    app.extensions[RUNTIME_KEY] = Runtime(settings, ping_on_checkout=False)
    app.extensions[CLOCK_KEY] = clock or utcnow
    csrf.init_app(app)
    # Per client address (the proxy's X-Forwarded-For when ENGAGE_TRUST_PROXY=1), limits
    # attached per blueprint below. In memory: each server process counts on its own.
    limiter = Limiter(get_remote_address, app=app, storage_uri="memory://")
    if settings.trust_proxy:
        # Behind one reverse proxy that terminates TLS: its X-Forwarded-For, -Proto, -Host,
        # -Port and -Prefix are believed (one hop), so the client address, the https
        # scheme (HSTS, below) and the public URL Twilio signs are the proxy's view.
        # Without ENGAGE_TRUST_PROXY=1 these headers are ignored: anyone can send them.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1, x_prefix=1
        )

    from engine.web import auth
    from engine.web.schedule import patient_pages
    from engine.web.webhooks import webhooks

    csrf.exempt(webhooks)  # authenticated by Twilio's signature instead
    # No limit applies to webhooks: spare each one the limiter's bookkeeping.
    limiter.request_filter(lambda: request.blueprint == webhooks.name)
    app.register_blueprint(webhooks)
    app.register_blueprint(patient_pages)
    limiter.limit(f"{max(settings.page_rate_per_minute, 1)}/minute")(patient_pages)
    auth.init_app(app)
    app.register_blueprint(auth.auth)
    for blueprint in _area_blueprints():
        app.register_blueprint(blueprint)
    # Password guessing: per client on top of the per-account lockout (engine.accounts).
    app.view_functions["auth.login"] = limiter.limit(
        f"{max(settings.login_rate_per_minute, 1)}/minute", methods=["POST"]
    )(app.view_functions["auth.login"])
    app.after_request(_security_headers)

    @app.get("/favicon.ico")
    def favicon() -> ResponseReturnValue:
        return redirect(url_for("static", filename="favicon.svg"), code=301)

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return jsonify(status="ok")

    return app


class _App(Flask):
    """Flask, remembering what `ensure_sync` made of each view and hook: it asked `inspect`
    again for every one of them on every request."""

    def __init__(self, import_name: str) -> None:
        super().__init__(import_name)
        self._synced: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        synced = self._synced.get(func)
        if synced is None:
            synced = self._synced[func] = super().ensure_sync(func)
        return synced


class _SessionInterface(SecureCookieSessionInterface):
    """Signed-cookie sessions, but none for webhooks: Twilio sends no cookie and is sent
    none, and opening and saving a session cost a webhook a twentieth of its time."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if request.path.startswith(WEBHOOK_PATH):
            return None  # Flask's null session: readable, empty, never saved
        return super().open_session(app, request)


WEBHOOK_PATH = "/twilio/"
ADMIN_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


# What no shared cache may keep: staff pages, API answers, metrics, webhook replies and
# patient pages (whose own blueprint sets it too, but not on a 404 outside its routes).
PRIVATE_PATHS = ("/admin", "/api", "/metrics", "/twilio", "/s/")


def _security_headers(response: Response) -> Response:
    """Every response (pages, JSON, errors, static files, redirects): no framing, no
    sniffing, no inline script (pages that set a stricter policy, like the patient page,
    keep theirs); HSTS only when the request came over TLS, directly or, with
    ENGAGE_TRUST_PROXY=1, as the proxy's X-Forwarded-Proto says (docs/web-security.md)."""
    wanted = list(ADMIN_HEADERS.items())
    if request.is_secure:
        wanted.append(("Strict-Transport-Security", "max-age=31536000"))
    if request.path.startswith(PRIVATE_PATHS):
        wanted.append(("Cache-Control", "no-store"))
    headers = response.headers
    present = {name.lower() for name, _ in headers}  # one pass, not one per header
    for name, value in wanted:
        if name.lower() not in present:
            headers.add(name, value)
    return response


def _area_blueprints() -> list[Blueprint]:
    """Every module of the admin and API packages that has a `blueprint`, by its `ORDER`
    (which is also the order of the admin menu)."""
    import importlib
    import pkgutil

    from engine.web.ui import nav_item

    modules = []
    for package_name in AREA_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package_name}.{info.name}")
            if hasattr(module, "blueprint"):
                modules.append(module)
    modules.sort(key=lambda module: (getattr(module, "ORDER", 100), module.__name__))
    for module in modules:
        for args in getattr(module, "MENU", ()):
            nav_item(*args)
    return [module.blueprint for module in modules]


AREA_PACKAGES = ("engine.web.admin", "engine.web.api")


def runtime_of(app: Flask) -> Runtime:
    runtime: Runtime = app.extensions[RUNTIME_KEY]
    return runtime


def now_of(app: Flask) -> datetime:
    clock: Callable[[], datetime] = app.extensions[CLOCK_KEY]
    return clock()
