"""What every admin view shares: transactions, the acting user, the page frame, errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from flask import Response, current_app, g, make_response, render_template, request
from flask_login import current_user
from sqlalchemy.orm import Session

from engine import audit
from engine.definitions import DefinitionSet
from engine.web import now_of, runtime_of
from engine.web.permissions import PERMISSIONS, allowed

# The admin sections, in menu order: (endpoint, label, permission to see it).
NAV: list[tuple[str, str, str]] = []


def nav_item(endpoint: str, label: str, permission: str = "view") -> None:
    """Register a section in the menu (each blueprint adds its own when imported)."""
    if permission not in PERMISSIONS:
        raise KeyError(permission)
    if all(e != endpoint for e, _, _ in NAV):
        NAV.append((endpoint, label, permission))


@contextmanager
def transaction() -> Iterator[Session]:
    """One read-then-write transaction (BEGIN IMMEDIATE on SQLite)."""
    with runtime_of(current_app).write_sessions.begin() as session:
        yield session


@contextmanager
def reading() -> Iterator[Session]:
    with runtime_of(current_app).session_factory() as session:
        yield session


def now() -> datetime:
    return now_of(current_app)


def definitions(session: Session) -> DefinitionSet:
    return runtime_of(current_app).definitions(session)


def actor() -> str:
    """Who acts, as the audit log names them: `user:<name>` or `token:<name>`."""
    name: str | None = g.get("actor")
    if name:
        return name
    if current_user.is_authenticated:
        return f"user:{current_user.username}"
    return "anonymous"


def role() -> str | None:
    if g.get("role"):
        return str(g.role)
    return str(current_user.role) if current_user.is_authenticated else None


def can(permission: str) -> bool:
    return allowed(role(), permission)


def record(action: str, subject: str | None = None, **details: Any) -> None:
    """Audit an action in its own transaction (for refusals and logins, which change
    nothing else); actions that change data audit inside their own transaction."""
    with transaction() as session:
        audit.record(
            session=session,
            actor=actor(),
            action=action,
            subject=subject,
            details=details,
            now=now(),
        )


def _current_section(menu: list[tuple[str, str]]) -> str | None:
    """The menu item to mark: the page's own, else the first of its blueprint's."""
    endpoint = request.endpoint or ""
    if any(e == endpoint for e, _ in menu):
        return endpoint
    area = endpoint.split(".")[0]
    return next((e for e, _ in menu if e.split(".")[0] == area), None)


def page(template: str, *, status: int = 200, **context: Any) -> Response:
    menu = [(e, label) for e, label, p in NAV if can(p)]
    html = render_template(template, menu=menu, can=can, active=_current_section(menu), **context)
    return make_response(html, status)
