"""The console's users, sessions, API tokens and failed logins (``users``, ``web_sessions``, ``api_tokens``,
``login_failures``).

Passwords are kept as argon2id hashes (argon2-cffi); API tokens are random (256 bits) and kept as their
SHA-256, so a copy of the index gives neither. A name with ``lockout_failures`` failed logins within
``lockout_window_s`` is locked until the oldest of them leaves the window, even for the right password.
A console session is a random id in the (signed) cookie and its SHA-256 here, so logging out, changing a
password or removing a user ends it on the server, not only in the browser.
The tables live in the index (``index.sqlite``), created by ``create_tables`` when a store is opened.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from storage.database import Database
from storage.index import Index

TOKEN_PREFIX = "hn_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_CHARS = 8

_hasher = PasswordHasher()  # argon2id, the library's defaults (RFC 9106 low-memory profile)


class Role(StrEnum):
    """What a user may do: viewers read, operators also act on the queue, admins also resend and change rules."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        """Whether this role includes ``needed`` (admin ⊃ operator ⊃ viewer)."""
        order = (Role.VIEWER, Role.OPERATOR, Role.ADMIN)
        return order.index(self) >= order.index(needed)


class UserError(ValueError):
    """A user name, role or password cannot be accepted."""


class LockedOut(Exception):
    """Too many failed logins for this name recently; carries the seconds until it may try again."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"locked out for {retry_after_s:.0f} s after repeated failed logins")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class User:
    """A console user as the web server sees it (never the hash)."""

    name: str
    role: Role


@dataclass(frozen=True)
class LockoutPolicy:
    """How many failed logins within how long lock a name."""

    failures: int = 5
    window_s: float = 15 * 60


def create_tables(db: Database) -> None:
    """Create the users, api_tokens and login_failures tables where missing (once per open store)."""
    db["users"].create(
        {"name": str, "role": str, "password_hash": str, "created_at": float, "updated_at": float},
        pk="name",
        if_not_exists=True,
    )
    db["api_tokens"].create(
        {"token_sha256": str, "name": str, "label": str, "created_at": float, "last_used_at": float},
        pk="token_sha256",
        if_not_exists=True,
    )
    db["api_tokens"].create_index(["name"], if_not_exists=True)
    db["web_sessions"].create(
        {"sid_sha256": str, "name": str, "created_at": float, "expires_at": float}, pk="sid_sha256", if_not_exists=True
    )
    db["web_sessions"].create_index(["name"], if_not_exists=True)
    db["login_failures"].create({"name": str, "at": float}, if_not_exists=True)
    db["login_failures"].create_index(["name", "at"], if_not_exists=True)


def check_name(name: str) -> str:
    """The name if it is a valid user name (letters, digits, ``._@-``, up to 64), else ``UserError``."""
    if not _NAME.match(name or ""):
        raise UserError(f"user name {name!r} is not valid: letters, digits and . _ @ - only, up to 64 characters")
    return name


def role_of(value: str) -> Role:
    """The role named ``value``, else ``UserError`` naming the roles."""
    try:
        return Role(value)
    except ValueError:
        raise UserError(f"role {value!r} is not one of {', '.join(r.value for r in Role)}") from None


def add_user(index: Index, name: str, role: str, password: str, replace: bool = False) -> User:
    """Add a user (or, with ``replace``, set an existing one's role and password).

    Raises
    ------
    UserError
        Invalid name or role, a password shorter than ``MIN_PASSWORD_CHARS``, or the user exists.
    """
    check_name(name)
    the_role = role_of(role)
    if len(password) < MIN_PASSWORD_CHARS:
        raise UserError(f"password too short: at least {MIN_PASSWORD_CHARS} characters")
    now = time.time()
    hashed = _hasher.hash(password)
    with index.transaction() as conn:
        exists = conn.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone()
        if exists and not replace:
            raise UserError(f"user {name!r} exists (use --replace to change its role and password)")
        conn.execute(
            "INSERT INTO users (name, role, password_hash, created_at, updated_at) VALUES (?,?,?,?,?)"
            " ON CONFLICT(name) DO UPDATE SET role=excluded.role, password_hash=excluded.password_hash,"
            " updated_at=excluded.updated_at",
            (name, str(the_role), hashed, now, now),
        )
        conn.execute("DELETE FROM login_failures WHERE name=?", (name,))
        conn.execute("DELETE FROM web_sessions WHERE name=?", (name,))  # a new password ends old sessions
    return User(name, the_role)


def remove_user(index: Index, name: str) -> bool:
    """Remove a user and its tokens; return whether it existed."""
    with index.transaction() as conn:
        conn.execute("DELETE FROM api_tokens WHERE name=?", (name,))
        conn.execute("DELETE FROM web_sessions WHERE name=?", (name,))
        return conn.execute("DELETE FROM users WHERE name=?", (name,)).rowcount > 0


def list_users(index: Index) -> list[dict[str, Any]]:
    """Every user with role, creation time and number of API tokens (never the hashes)."""
    return index.query(
        "SELECT u.name, u.role, u.created_at, (SELECT COUNT(*) FROM api_tokens t WHERE t.name = u.name) tokens"
        " FROM users u ORDER BY u.name"
    )


def get_user(index: Index, name: str) -> User | None:
    """The user called ``name``, or None."""
    rows = index.query("SELECT name, role FROM users WHERE name=?", (name,))
    return User(rows[0]["name"], Role(rows[0]["role"])) if rows else None


def _locked_for(conn: Any, name: str, policy: LockoutPolicy, now: float) -> float:
    rows = conn.execute(
        "SELECT at FROM login_failures WHERE name=? AND at>? ORDER BY at DESC LIMIT ?",
        (name, now - policy.window_s, policy.failures),
    ).fetchall()
    if len(rows) < policy.failures:
        return 0.0
    return rows[-1][0] + policy.window_s - now


def authenticate(index: Index, name: str, password: str, policy: LockoutPolicy | None = None) -> User | None:
    """The user if ``password`` is theirs; None (and the failure counted) otherwise.

    Unknown names are counted like known ones, and a hash is verified either way, so neither the answer nor
    its timing tells whether a name exists.

    Raises
    ------
    LockedOut
        The name has too many recent failures; the password was not checked.
    """
    policy = policy or LockoutPolicy()
    now = time.time()
    with index.lock:
        wait = _locked_for(index.db.conn, name, policy, now)
    if wait > 0:
        raise LockedOut(wait)
    rows = index.query("SELECT name, role, password_hash FROM users WHERE name=?", (name,))
    stored = rows[0]["password_hash"] if rows else _dummy_hash()
    try:
        ok = _hasher.verify(stored, password) and bool(rows)
    except (VerificationError, InvalidHashError):
        ok = False
    if not ok:
        with index.transaction() as conn:
            conn.execute("INSERT INTO login_failures (name, at) VALUES (?, ?)", (name[:64], now))
            conn.execute("DELETE FROM login_failures WHERE at < ?", (now - 24 * 3600,))
        return None
    if _hasher.check_needs_rehash(stored):
        with index.transaction() as conn:
            conn.execute("UPDATE users SET password_hash=? WHERE name=?", (_hasher.hash(password), name))
    with index.transaction() as conn:
        conn.execute("DELETE FROM login_failures WHERE name=?", (name,))
    return User(rows[0]["name"], Role(rows[0]["role"]))


def failed_logins(index: Index, name: str, window_s: float = 15 * 60) -> int:
    """How many failed logins ``name`` had within the last ``window_s`` seconds."""
    rows = index.query("SELECT COUNT(*) n FROM login_failures WHERE name=? AND at>?", (name, time.time() - window_s))
    return int(rows[0]["n"])


def open_session(index: Index, name: str, lifetime_s: float) -> str:
    """A new session id for ``name``, valid ``lifetime_s`` seconds (only its SHA-256 is kept)."""
    sid = secrets.token_urlsafe(32)
    now = time.time()
    with index.transaction() as conn:
        conn.execute("DELETE FROM web_sessions WHERE expires_at < ?", (now,))
        conn.execute(
            "INSERT INTO web_sessions (sid_sha256, name, created_at, expires_at) VALUES (?,?,?,?)",
            (_token_sha256(sid), name, now, now + lifetime_s),
        )
    return sid


def session_user(index: Index, sid: str) -> User | None:
    """The user of an open, unexpired session, or None."""
    rows = index.query(
        "SELECT u.name, u.role FROM web_sessions s JOIN users u ON u.name = s.name"
        " WHERE s.sid_sha256=? AND s.expires_at>?",
        (_token_sha256(sid), time.time()),
    )
    return User(rows[0]["name"], Role(rows[0]["role"])) if rows else None


def close_session(index: Index, sid: str) -> None:
    """End a session (logout)."""
    with index.transaction() as conn:
        conn.execute("DELETE FROM web_sessions WHERE sid_sha256=?", (_token_sha256(sid),))


def _token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(index: Index, name: str, label: str = "") -> str:
    """A new API token for ``name`` (shown once; only its SHA-256 is kept).

    Raises
    ------
    UserError
        No such user.
    """
    if get_user(index, name) is None:
        raise UserError(f"no user {name!r} (add it first: harmonode users add {name} --role viewer)")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with index.transaction() as conn:
        conn.execute(
            "INSERT INTO api_tokens (token_sha256, name, label, created_at, last_used_at) VALUES (?,?,?,?,0)",
            (_token_sha256(token), name, label[:200], time.time()),
        )
    return token


def user_of_token(index: Index, token: str) -> User | None:
    """The user an API token belongs to, or None for an unknown token."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    digest = _token_sha256(token)
    rows = index.query(
        "SELECT u.name, u.role FROM api_tokens t JOIN users u ON u.name = t.name WHERE t.token_sha256=?", (digest,)
    )
    if not rows:
        return None
    with index.transaction() as conn:
        conn.execute("UPDATE api_tokens SET last_used_at=? WHERE token_sha256=?", (time.time(), digest))
    return User(rows[0]["name"], Role(rows[0]["role"]))


def revoke_tokens(index: Index, name: str) -> int:
    """Remove every API token of ``name``; return how many."""
    with index.transaction() as conn:
        return conn.execute("DELETE FROM api_tokens WHERE name=?", (name,)).rowcount


@functools.cache
def _dummy_hash() -> str:
    """A hash verified for unknown names, so that they cost what a real one does."""
    return _hasher.hash(secrets.token_hex(16))
