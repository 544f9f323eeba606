"""`engage users create|list|disable` and `engage tokens create|list|revoke`: staff
accounts for the admin app and API tokens for other systems."""

from __future__ import annotations

from datetime import UTC, datetime

import click
from sqlalchemy import select

from engine import accounts, audit
from engine.runtime import Runtime, UsageProblem
from engine.store import models as m

ROLE_CHOICE = click.Choice(accounts.ROLES)


def _now() -> datetime:
    return datetime.now(UTC)


@click.group()
def users() -> None:
    """Staff accounts of the admin app."""


@users.command("create")
@click.argument("username")
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    envvar="ENGAGE_NEW_PASSWORD",
    help=f"At least {accounts.MIN_PASSWORD} characters (prompted; or ENGAGE_NEW_PASSWORD).",
)
@click.option("--by", default="cli", show_default=True, help="Who creates it (audited).")
@click.pass_obj
def create_user(rt: Runtime, username: str, role: str, password: str, by: str) -> None:
    """Create a staff account."""
    rt.require_schema()
    with rt.session_factory.begin() as session:
        try:
            user = accounts.create_user(
                session=session,
                username=username,
                password=password,
                role=role,
                now=_now(),
                by=by,
            )
        except accounts.AccountError as exc:
            raise UsageProblem(f"{exc.field}: {exc.message}") from exc
        audit.record(
            session=session,
            actor=f"cli:{by}",
            action="user_created",
            subject=f"user:{user.username}",
            details={"role": role},
            now=_now(),
        )
    click.echo(f"created user {username} ({accounts.ROLE_NAMES[role]})")


@users.command("list")
@click.pass_obj
def list_users(rt: Runtime) -> None:
    """List staff accounts."""
    rt.require_schema()
    with rt.session_factory() as session:
        for user in session.scalars(select(m.User).order_by(m.User.username)):
            state = "disabled" if user.disabled else "active"
            click.echo(f"{user.username}\t{user.role}\t{state}")


@users.command("disable")
@click.argument("username")
@click.option("--by", default="cli", show_default=True)
@click.pass_obj
def disable_user(rt: Runtime, username: str, by: str) -> None:
    """Disable an account (it can no longer sign in; its history stays)."""
    rt.require_schema()
    with rt.session_factory.begin() as session:
        user = session.scalar(select(m.User).where(m.User.username == username))
        if user is None:
            raise UsageProblem(f"no user {username!r}")
        user.disabled = True
        audit.record(
            session=session,
            actor=f"cli:{by}",
            action="user_disabled",
            subject=f"user:{username}",
            now=_now(),
        )
    click.echo(f"disabled user {username}")


@click.group()
def tokens() -> None:
    """API tokens (shown once, stored hashed)."""


@tokens.command("create")
@click.argument("name")
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option("--by", default="cli", show_default=True)
@click.pass_obj
def create_token(rt: Runtime, name: str, role: str, by: str) -> None:
    """Create a token and print its secret (the only time it is shown)."""
    rt.require_schema()
    with rt.session_factory.begin() as session:
        try:
            row, secret = accounts.create_token(
                session=session, name=name, role=role, now=_now(), by=by
            )
        except accounts.AccountError as exc:
            raise UsageProblem(f"{exc.field}: {exc.message}") from exc
        audit.record(
            session=session,
            actor=f"cli:{by}",
            action="token_created",
            subject=f"token:{row.name}",
            details={"role": role, "prefix": row.prefix},
            now=_now(),
        )
    click.echo(secret)


@tokens.command("revoke")
@click.argument("name")
@click.option("--by", default="cli", show_default=True)
@click.pass_obj
def revoke_token(rt: Runtime, name: str, by: str) -> None:
    """Revoke every live token with this name."""
    rt.require_schema()
    with rt.session_factory.begin() as session:
        rows = session.scalars(
            select(m.ApiToken).where(m.ApiToken.name == name, m.ApiToken.revoked_at.is_(None))
        ).all()
        if not rows:
            raise UsageProblem(f"no live token named {name!r}")
        for row in rows:
            row.revoked_at = _now()
        audit.record(
            session=session,
            actor=f"cli:{by}",
            action="token_revoked",
            subject=f"token:{name}",
            details={"count": len(rows)},
            now=_now(),
        )
    click.echo(f"revoked {len(rows)} token(s) named {name}")


def register(group: click.Group) -> None:
    group.add_command(users)
    group.add_command(tokens)
