"""Staff sign-in (Flask-Login sessions, argon2, lockout, per-client throttle), sign-out,
and the permission checks every admin view and API endpoint goes through.

A session names its sign-in (the id of the `login` audit entry) and is bound to the
password hash: sign-out, disabling the account or a password reset ends every session of
the user on the server, so a copied cookie dies with them (docs/web-security.md).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from functools import wraps
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    jsonify,
    redirect,
    request,
    session,
    url_for,
)
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from engine import accounts, audit
from engine.store import models as m
from engine.web import ui
from engine.web.permissions import PERMISSIONS, allowed

auth = Blueprint("auth", __name__, url_prefix="/admin")
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Please sign in to continue."
login_manager.session_protection = "strong"

P = ParamSpec("P")
R = TypeVar("R")


class Staff(UserMixin):  # type: ignore[misc]
    def __init__(self, user: m.User, session_key: str) -> None:
        self.id = str(user.id)
        self.username = user.username
        self.role = user.role
        self.session_key = session_key

    def get_id(self) -> str:
        """What the session cookie holds: the user, the sign-in and their binding."""
        return self.session_key

    @property
    def role_name(self) -> str:
        return accounts.ROLE_NAMES.get(self.role, self.role)


def session_key(user: m.User, login_entry: int) -> str:
    """`<user id>.<login audit entry id>.<mac>`, the mac over both and the password hash."""
    return f"{user.id}.{login_entry}.{_session_mac(user, login_entry)}"


def _session_mac(user: m.User, login_entry: int) -> str:
    secret = current_app.config["SECRET_KEY"]
    key = secret if isinstance(secret, bytes) else str(secret).encode()
    message = f"session:{user.id}:{login_entry}:{user.password_hash}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


@login_manager.user_loader
def _load(key: str) -> Staff | None:
    """The signed-in user, unless their sessions were ended since this one began."""
    user_id, _, rest = key.partition(".")
    login_entry, _, mac = rest.partition(".")
    if not (user_id.isdigit() and login_entry.isdigit() and mac):
        return None
    with ui.reading() as db:
        user = db.get(m.User, int(user_id))
        if user is None or user.disabled:
            return None
        if not hmac.compare_digest(mac, _session_mac(user, int(login_entry))):
            return None  # the password changed (or the key is forged)
        if accounts.sessions_ended(session=db, username=user.username, since=int(login_entry)):
            return None
        return Staff(user, key)


class LoginForm(FlaskForm):  # type: ignore[misc]
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=256)])


# One answer for every failure, so that it never tells whether an account exists, is
# disabled or is locked (OWASP ASVS 2.2.1, 3.2.x: no user enumeration).
FAILED = (
    f"Wrong username or password. After {accounts.MAX_FAILURES} failed attempts an account "
    f"is locked for {int(accounts.LOCKOUT.total_seconds() // 60)} minutes."
)


@auth.route("/login", methods=["GET", "POST"])
def login() -> Response:
    form = LoginForm()
    if current_user.is_authenticated and request.method == "GET":
        return redirect(url_for("admin.home"))
    if not form.validate_on_submit():
        return ui.page("admin/login.html", form=form, status=400 if form.errors else 200)
    username = form.username.data.strip().lower()
    with ui.transaction() as db:
        result = accounts.authenticate(
            session=db, username=username, password=form.password.data, now=ui.now()
        )
        action = "login" if result.outcome == "ok" else "login_failed"
        details = {} if result.outcome == "ok" else {"reason": result.outcome}
        entry = audit.record(
            session=db,
            actor=f"user:{username}" if result.user else "anonymous",
            action=action,
            subject=f"user:{username}",
            details={**details, "ip": request.remote_addr or ""},
            now=ui.now(),
        )
        staff = None
        if result.outcome == "ok" and result.user:
            staff = Staff(result.user, session_key(result.user, entry.id))
    if staff is None:
        form.password.errors = [FAILED]
        return ui.page("admin/login.html", form=form, status=401)
    session.clear()  # a fresh session on sign-in: no fixation
    login_user(staff)
    return redirect(_safe_next(request.args.get("next")))


@auth.post("/logout")
def logout() -> Response:
    """Ends every session of the user (the `logout` entry is what the loader checks)."""
    if current_user.is_authenticated:
        ui.record("logout", f"user:{current_user.username}")
    logout_user()
    session.clear()
    return redirect(url_for("auth.login"))


def _safe_next(target: str | None) -> str:
    """Only a path on this site under /admin (no open redirect)."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and parts.path.startswith("/admin"):
            return target
    return url_for("admin.home")


# --- permission checks ---------------------------------------------------------------------


def requires(permission: str) -> Callable[[Callable[P, R]], Callable[P, R | Response]]:
    """An admin view: signed in, and the role may `permission`; a refusal is audited."""
    if permission not in PERMISSIONS:
        raise KeyError(permission)

    def decorate(view: Callable[P, R]) -> Callable[P, R | Response]:
        @wraps(view)
        def checked(*args: P.args, **kwargs: P.kwargs) -> R | Response:
            if not current_user.is_authenticated:
                return login_manager.unauthorized()  # type: ignore[no-any-return]
            if not allowed(current_user.role, permission):
                ui.record("forbidden", request.path, permission=permission, method=request.method)
                return ui.page("admin/error.html", status=403, code=403, permission=permission)
            return view(*args, **kwargs)

        checked.permission = permission  # type: ignore[attr-defined]
        return checked

    return decorate


def api_requires(permission: str) -> Callable[[Callable[P, R]], Callable[P, R | Response]]:
    """An API endpoint: `Authorization: Bearer <token>`, whose role may `permission`."""
    if permission not in PERMISSIONS:
        raise KeyError(permission)

    def decorate(view: Callable[P, R]) -> Callable[P, R | Response]:
        @wraps(view)
        def checked(*args: P.args, **kwargs: P.kwargs) -> R | Response:
            token = _bearer()
            if token is None:
                return api_error(401, "authentication", "a valid API token is required")
            g.actor, g.role = f"token:{token.name}", token.role
            if not allowed(token.role, permission):
                ui.record("forbidden", request.path, permission=permission, method=request.method)
                return api_error(403, "authorization", f"this token may not {permission}")
            return view(*args, **kwargs)

        checked.permission = permission  # type: ignore[attr-defined]
        return checked

    return decorate


def _bearer() -> m.ApiToken | None:
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return None
    with ui.transaction() as db:
        token = accounts.token_for(session=db, secret=secret.strip(), now=ui.now())
        if token is not None:
            db.expunge(token)
        return token


def api_error(status: int, field: str, message: str, **more: Any) -> Response:
    """The API's one error shape: {"error": {"status", "field", "message"}}."""
    response = jsonify(error={"status": status, "field": field, "message": message, **more})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="engage"'
    return response


def init_app(app: Any) -> None:
    login_manager.init_app(app)
    # "Remember me" is never offered; should it be, its cookie is as guarded as the session's.
    app.config.setdefault("REMEMBER_COOKIE_HTTPONLY", True)
    app.config.setdefault("REMEMBER_COOKIE_SAMESITE", "Lax")
    app.config.setdefault("REMEMBER_COOKIE_SECURE", app.config.get("SESSION_COOKIE_SECURE", False))
