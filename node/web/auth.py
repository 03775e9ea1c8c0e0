"""Who is asking: every request but the public few is refused until it names a user.

A request names its user with a session cookie (the console, after ``POST /login``), an API token
(``Authorization: Bearer hn_…``, from ``harmonode users token NAME``) or HTTP Basic (name and password,
counted against the lock-out like a login). ``AuthMiddleware`` wraps the whole application, so a route
mounted later (DICOMweb, the learning server) is behind the same login without doing anything.

A state-changing request that rides on the session cookie must carry the session's CSRF token: the
``csrf_token`` field of a form (every form the console renders has one) or an ``X-CSRF-Token`` header.
Requests with a token or Basic credentials carry no ambient authority and need none; the server never
sends a Basic challenge, so browsers never store such credentials for it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, quote

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.index import Index
from storage.users import LockedOut, LockoutPolicy, Role, User, authenticate, session_user, user_of_token

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_FORM_BYTES = 1024 * 1024  # a console form is tiny; a larger urlencoded body is refused


@dataclass(frozen=True)
class Caller:
    """The user of one request and how they proved it (``session``, ``token`` or ``basic``)."""

    user: User
    via: str


def csrf_token(session: dict) -> str:
    """The session's CSRF token, made on first use."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


def caller_of(request: Request) -> Caller:
    """The authenticated caller of a request (set by ``AuthMiddleware``)."""
    caller = request.scope.get("harmonode.caller")
    if caller is None:
        raise HTTPException(401, "login required")
    return caller


def need(request: Request, role: Role) -> User:
    """The request's user if their role includes ``role``; 403 otherwise."""
    user = caller_of(request).user
    if not user.role.allows(role):
        raise HTTPException(403, f"needs the {role} role; {user.name} is {user.role}")
    return user


def _wants_html(headers: Headers) -> bool:
    return "text/html" in headers.get("accept", "")


def _unauthorized(scope: Scope, headers: Headers, why: str) -> Response:
    if scope["method"] in SAFE_METHODS and _wants_html(headers):
        target = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
        return RedirectResponse("/login?next=" + quote(target, safe="/"), status_code=303)
    return JSONResponse({"error": why}, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="harmonode"'})


class AuthMiddleware:
    """Refuse every request without a user, except ``public`` paths; check CSRF on session writes."""

    def __init__(
        self,
        app: ASGIApp,
        index: Index,
        public: Callable[[str], bool],
        lockout: LockoutPolicy,
        on_login_failure: Callable[[str, str], None] | None = None,
    ) -> None:
        self.app = app
        self.index = index
        self.public = public
        self.lockout = lockout
        self.on_login_failure = on_login_failure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.public(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            caller = await self._caller(scope, headers)
        except LockedOut as exc:
            response = JSONResponse(
                {"error": str(exc)}, status_code=429, headers={"Retry-After": str(int(exc.retry_after_s) + 1)}
            )
            await response(scope, receive, send)
            return
        if caller is None:
            await _unauthorized(scope, headers, "login required")(scope, receive, send)
            return
        scope["harmonode.caller"] = caller
        if caller.via == "session" and scope["method"] not in SAFE_METHODS:
            receive, ok = await _csrf_checked(scope, receive, headers)
            if not ok:
                log.warning(
                    "%s %s by %s refused: missing or wrong CSRF token", scope["method"], scope["path"], caller.user.name
                )
                await JSONResponse({"error": "CSRF token missing or wrong"}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _caller(self, scope: Scope, headers: Headers) -> Caller | None:
        authorization = headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            user = user_of_token(self.index, credentials.strip())
            return Caller(user, "token") if user else None
        if scheme.lower() == "basic":
            try:
                name, _, password = base64.b64decode(credentials.strip()).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            # argon2 takes tens of milliseconds of CPU: off the event loop
            user = await run_in_threadpool(authenticate, self.index, name, password, self.lockout)
            if user is None and self.on_login_failure is not None:
                self.on_login_failure(name, "basic")
            return Caller(user, "basic") if user else None
        sid = (scope.get("session") or {}).get("sid")
        if not sid:
            return None
        user = session_user(self.index, str(sid))  # open on the server, with the role as it is now
        return Caller(user, "session") if user else None


async def _csrf_checked(scope: Scope, receive: Receive, headers: Headers) -> tuple[Receive, bool]:
    """Whether a session write carries its CSRF token; the body is read once and replayed to the app."""
    expected = str((scope.get("session") or {}).get("csrf") or "")
    if not expected:
        return receive, False
    given = headers.get("x-csrf-token", "")
    if given:
        return receive, hmac.compare_digest(given, expected)
    if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return receive, False
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > MAX_FORM_BYTES:
            return receive, False
    fields = parse_qs(body.decode("latin-1"))
    given = (fields.get("csrf_token") or [""])[0]

    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay, bool(given) and hmac.compare_digest(given, expected)


def check_login_csrf(session: dict, given: str) -> bool:
    """Whether the login form's CSRF token is the one the login page put in the (anonymous) session."""
    expected = str(session.get("csrf") or "")
    return bool(expected) and bool(given) and hmac.compare_digest(given, expected)
