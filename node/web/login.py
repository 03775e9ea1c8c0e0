"""``/login`` and ``/logout``: the console's session, begun with a name and password, ended by a button.

The login form posts ``username``, ``password`` and ``csrf_token`` to ``/login``; a wrong password is
counted (``storage.users``), and a name with too many recent failures gets 429 until its window passes.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from node.web.auth import check_login_csrf, csrf_token
from storage.users import LockedOut, LockoutPolicy, authenticate, close_session, open_session

log = logging.getLogger(__name__)


def _next_path(value: str) -> str:
    """Where to go after login: a path on this server only (never ``//host`` or a URL)."""
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def routes(context: Any, pages: Any) -> list[BaseRoute]:
    """The login and logout routes."""
    settings = context.settings
    policy = LockoutPolicy(settings.lockout_failures, settings.lockout_minutes * 60)

    async def login_page(request: Request) -> Response:
        return pages.render(request, "login.html", next=_next_path(request.query_params.get("next", "/")))

    async def login(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        target = _next_path(str(form.get("next", "/")))
        if not check_login_csrf(request.session, str(form.get("csrf_token", ""))):
            return pages.render(
                request, "login.html", status_code=403, next=target, message="The form expired: please log in again."
            )
        try:
            user = await run_in_threadpool(authenticate, context.store.index, name, password, policy)
        except LockedOut as exc:
            context.record("login", user=name, outcome="locked", via="form")
            return pages.render(
                request,
                "login.html",
                status_code=429,
                next=target,
                message=f"Too many failed logins: try again in {exc.retry_after_s / 60:.0f} min.",
            )
        if user is None:
            log.warning("login failed for a user name from %s", request.client.host if request.client else "?")
            context.record(
                "login", user=name, outcome="failure", via="form", address=request.client.host if request.client else ""
            )
            return pages.render(
                request, "login.html", status_code=401, next=target, message="Wrong user name or password."
            )
        address = request.client.host if request.client else ""
        request.session.clear()
        request.session["sid"] = await run_in_threadpool(
            open_session, context.store.index, user.name, settings.session_hours * 3600
        )
        csrf_token(request.session)  # a fresh token for the new session
        context.record("login", user=user.name, outcome="success", via="form", address=address)
        log.info("login: %s (%s)", user.name, user.role)
        return RedirectResponse(target, status_code=303)

    async def logout(request: Request) -> Response:
        sid = request.session.get("sid")
        if sid:
            await run_in_threadpool(close_session, context.store.index, str(sid))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    return [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
