"""Staff accounts and API tokens, managed by IT: create, disable or enable, reset a password;
create a token (its secret is shown once and only its hash is kept) and revoke it. Every
change is audited in its own transaction."""

from __future__ import annotations

from flask import Blueprint, Response, flash, redirect, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from sqlalchemy.orm import Session
from wtforms import PasswordField, SelectChoice, SelectField, StringField
from wtforms.validators import DataRequired, EqualTo, Length, Regexp

from engine import accounts, audit
from engine.store import models as m
from engine.web import ui
from engine.web.auth import requires

blueprint = Blueprint("people", __name__, url_prefix="/admin")
ORDER = 60
MENU = [
    ("people.users", "Users", "users.manage"),
    ("people.tokens", "API tokens", "tokens.manage"),
]

ROLE_CHOICES = [SelectChoice(role, accounts.ROLE_NAMES[role]) for role in accounts.ROLES]
PASSWORD_HINT = f"At least {accounts.MIN_PASSWORD} characters; tell the person to change it."
USERNAME_HINT = "2-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
# accounts.create_user checks these too; here they put every error next to its field at once.
NEW_PASSWORD = [
    DataRequired(),
    Length(
        min=accounts.MIN_PASSWORD,
        max=256,
        message=f"use at least {accounts.MIN_PASSWORD} characters",
    ),
]


def _normalized(value: str | None) -> str:
    return (value or "").strip().lower()


class NewUserForm(FlaskForm):  # type: ignore[misc]
    username = StringField(
        "Username",
        filters=[_normalized],
        validators=[
            DataRequired(),
            Regexp(f"^(?:{accounts.USERNAME_RE.pattern})$", message=f"use {USERNAME_HINT}"),
        ],
    )
    role = SelectField("Role", choices=ROLE_CHOICES, default="viewer")  # least privilege
    password = PasswordField("Initial password", validators=NEW_PASSWORD)


class PasswordForm(FlaskForm):  # type: ignore[misc]
    password = PasswordField("New password", validators=NEW_PASSWORD)
    confirm = PasswordField(
        "Repeat it", validators=[DataRequired(), EqualTo("password", "the two passwords differ")]
    )


class NewTokenForm(FlaskForm):  # type: ignore[misc]
    name = StringField("Name", validators=[DataRequired(), Length(max=128)])
    role = SelectField("Role", choices=ROLE_CHOICES, default="viewer")  # least privilege


def _audit(db: Session, action: str, subject: str, **details: object) -> None:
    audit.record(
        session=db,
        actor=ui.actor(),
        action=action,
        subject=subject,
        details=details,
        now=ui.now(),
    )


# --- users -----------------------------------------------------------------------------------


@blueprint.get("/users")
@requires("users.manage")
def users() -> Response:
    return _users_page(NewUserForm(formdata=None))


def _users_page(form: NewUserForm, status: int = 200) -> Response:
    with ui.reading() as db:
        rows = db.scalars(select(m.User).order_by(m.User.username)).all()
    return ui.page(
        "admin/people/users.html",
        users=rows,
        form=form,
        now=ui.now(),
        me=current_user.username,
        role_names=accounts.ROLE_NAMES,
        password_hint=PASSWORD_HINT,
        username_hint=USERNAME_HINT,
        status=status,
    )


@blueprint.post("/users")
@requires("users.manage")
def create_user() -> Response:
    form = NewUserForm()
    if not form.validate_on_submit():
        return _users_page(form, status=400)
    username = form.username.data
    try:
        with ui.transaction() as db:
            user = accounts.create_user(
                session=db,
                username=username,
                password=form.password.data,
                role=form.role.data,
                now=ui.now(),
                by=ui.actor(),
            )
            _audit(db, "user_created", f"user:{user.username}", role=user.role)
    except accounts.AccountError as exc:
        getattr(form, exc.field).errors = [exc.message]
        return _users_page(form, status=400)
    flash(f"Created {username} ({accounts.ROLE_NAMES[form.role.data]}).")
    return redirect(url_for("people.users"), code=303)


@blueprint.post("/users/<int:user_id>/<any(disable, enable):change>")
@requires("users.manage")
def set_disabled(user_id: int, change: str) -> Response:
    disable = change == "disable"
    if disable and str(user_id) == current_user.id:
        flash("You cannot disable your own account: ask another IT administrator.", "error")
        return _users_page(NewUserForm(formdata=None), status=400)
    with ui.transaction() as db:
        user = db.get(m.User, user_id, with_for_update=True)
        if user is None:
            return _missing("There is no such user.")
        changed = user.disabled != disable
        if changed:
            user.disabled = disable
            _audit(db, f"user_{change}d", f"user:{user.username}")
        name = user.username
    state = "disabled" if disable else "enabled"
    flash(f"{name} is {state}." if changed else f"{name} was already {state}.")
    return redirect(url_for("people.users"), code=303)


@blueprint.get("/users/<int:user_id>/password")
@requires("users.manage")
def password(user_id: int) -> Response:
    return _password_page(user_id, PasswordForm(formdata=None))


@blueprint.post("/users/<int:user_id>/password")
@requires("users.manage")
def reset_password(user_id: int) -> Response:
    form = PasswordForm()
    if not form.validate_on_submit():
        return _password_page(user_id, form, status=400)
    with ui.transaction() as db:
        user = db.get(m.User, user_id, with_for_update=True)
        if user is None:
            return _missing("There is no such user.")
        user.password_hash = accounts.hash_password(form.password.data)
        user.failed_logins, user.locked_until = 0, None
        _audit(db, "user_password_reset", f"user:{user.username}")
        name = user.username
    flash(f"New password set for {name}; the lockout, if any, is lifted.")
    return redirect(url_for("people.users"), code=303)


def _password_page(user_id: int, form: PasswordForm, status: int = 200) -> Response:
    with ui.reading() as db:
        user = db.get(m.User, user_id)
        if user is None:
            return _missing("There is no such user.")
        name = user.username
    return ui.page(
        "admin/people/password.html",
        form=form,
        username=name,
        user_id=user_id,
        password_hint=PASSWORD_HINT,
        status=status,
    )


# --- API tokens ------------------------------------------------------------------------------


@blueprint.get("/tokens")
@requires("tokens.manage")
def tokens() -> Response:
    return _tokens_page(NewTokenForm(formdata=None))


def _tokens_page(form: NewTokenForm, status: int = 200) -> Response:
    with ui.reading() as db:
        rows = db.scalars(select(m.ApiToken).order_by(m.ApiToken.created_at.desc())).all()
    return ui.page(
        "admin/people/tokens.html",
        tokens=rows,
        form=form,
        role_names=accounts.ROLE_NAMES,
        status=status,
    )


@blueprint.post("/tokens")
@requires("tokens.manage")
def create_token() -> Response:
    """The secret appears in this response only (never in a redirect, flash or log)."""
    form = NewTokenForm()
    if not form.validate_on_submit():
        return _tokens_page(form, status=400)
    try:
        with ui.transaction() as db:
            row, secret = accounts.create_token(
                session=db, name=form.name.data, role=form.role.data, now=ui.now(), by=ui.actor()
            )
            _audit(db, "token_created", f"token:{row.name}", role=row.role, prefix=row.prefix)
            name, role = row.name, row.role
    except accounts.AccountError as exc:
        getattr(form, exc.field).errors = [exc.message]
        return _tokens_page(form, status=400)
    return ui.page(
        "admin/people/token_created.html", name=name, role=accounts.ROLE_NAMES[role], secret=secret
    )


@blueprint.post("/tokens/<int:token_id>/revoke")
@requires("tokens.manage")
def revoke_token(token_id: int) -> Response:
    with ui.transaction() as db:
        row = db.get(m.ApiToken, token_id, with_for_update=True)
        if row is None:
            return _missing("There is no such token.")
        live = row.revoked_at is None
        if live:
            row.revoked_at = ui.now()
            _audit(db, "token_revoked", f"token:{row.name}", prefix=row.prefix)
        name = row.name
    flash(f"Token {name} is revoked." if live else f"Token {name} was already revoked.")
    return redirect(url_for("people.tokens"), code=303)


def _missing(message: str) -> Response:
    return ui.page("admin/error.html", status=404, code=404, message=message)
