"""Staff accounts and API tokens: argon2 password hashes, login throttling, hashed tokens.

Nothing here commits; callers run each use case in one transaction.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.store import models as m

ROLES = ("marketer", "compliance", "it_admin", "viewer")
ROLE_NAMES = {
    "marketer": "Marketer",
    "compliance": "Compliance reviewer",
    "it_admin": "IT administrator",
    "viewer": "Viewer",
}
USERNAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,63}")
MIN_PASSWORD = 12
# Five wrong passwords lock the account for a quarter of an hour (OWASP ASVS 2.2.1).
MAX_FAILURES = 5
LOCKOUT = timedelta(minutes=15)
TOKEN_PREFIX = "eng_"

_hasher = PasswordHasher()
# Verifying against this when the user does not exist keeps the response time the same.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A request that cannot be honoured, with the field it concerns."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class LoginResult:
    outcome: Literal["ok", "bad", "locked", "disabled"]
    user: m.User | None = None


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_new_user(username: str, password: str, role: str) -> None:
    if not USERNAME_RE.fullmatch(username):
        raise AccountError(
            "username", "use 2-64 lower-case letters, digits, '.', '_' or '-', starting alike"
        )
    if role not in ROLES:
        raise AccountError("role", f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise AccountError("password", f"use at least {MIN_PASSWORD} characters")


def create_user(
    *, session: Session, username: str, password: str, role: str, now: datetime, by: str
) -> m.User:
    check_new_user(username, password, role)
    if session.scalar(select(m.User.id).where(m.User.username == username)) is not None:
        raise AccountError("username", f"user {username!r} already exists")
    user = m.User(
        username=username,
        password_hash=hash_password(password),
        role=role,
        created_at=now,
        created_by=by,
        disabled=False,
        failed_logins=0,
    )
    session.add(user)
    session.flush()
    return user


def authenticate(*, session: Session, username: str, password: str, now: datetime) -> LoginResult:
    """Check a password; count failures and lock the account after too many."""
    user = session.scalar(select(m.User).where(m.User.username == username).with_for_update())
    if user is None:
        _verify(_DUMMY_HASH, password)
        return LoginResult("bad")
    if user.locked_until is not None and user.locked_until > now:
        _verify(_DUMMY_HASH, password)  # as slow as any other answer
        return LoginResult("locked", user)
    if not _verify(user.password_hash, password):
        user.failed_logins += 1
        if user.failed_logins >= MAX_FAILURES:
            user.locked_until, user.failed_logins = now + LOCKOUT, 0
            return LoginResult("locked", user)
        return LoginResult("bad", user)
    if user.disabled:
        return LoginResult("disabled", user)
    user.failed_logins, user.locked_until, user.last_login_at = 0, None, now
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return LoginResult("ok", user)


# What ends every web session of a user begun before it (engine.web.auth's loader).
SESSION_ENDING = ("logout", "user_disabled", "user_password_reset")


def sessions_ended(*, session: Session, username: str, since: int) -> bool:
    """Whether the user signed out, was disabled or had the password reset after the
    audit entry `since` (their sign-in)."""
    found = session.scalar(
        select(m.AuditEntry.id)
        .where(
            m.AuditEntry.action.in_(SESSION_ENDING),
            m.AuditEntry.subject == f"user:{username}",
            m.AuditEntry.id > since,
        )
        .limit(1)
    )
    return found is not None


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# --- API tokens -----------------------------------------------------------------------------


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(
    *, session: Session, name: str, role: str, now: datetime, by: str
) -> tuple[m.ApiToken, str]:
    """A new token; the secret is returned once and only its hash is stored."""
    if role not in ROLES:
        raise AccountError("role", f"unknown role {role!r}; one of {', '.join(ROLES)}")
    name = name.strip()
    if not 1 <= len(name) <= 128:
        raise AccountError("name", "give the token a name of 1-128 characters")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = m.ApiToken(
        token_hash=token_digest(secret),
        name=name,
        role=role,
        created_at=now,
        created_by=by,
        prefix=secret[: len(TOKEN_PREFIX) + 6],
    )
    session.add(row)
    session.flush()
    return row, secret


def token_for(*, session: Session, secret: str, now: datetime) -> m.ApiToken | None:
    """The live token with this secret (and its use recorded), or None."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
        return None
    row = session.scalar(select(m.ApiToken).where(m.ApiToken.token_hash == token_digest(secret)))
    if row is None or row.revoked_at is not None:
        return None
    row.last_used_at = now
    return row
