"""The one Starlette application of the node: its collaborators, its routes, its login.

``build_app(context, mounts)`` is the factory: the console, the API and the operations endpoints are
added here, and another part of the node passes its own routes in ``mounts`` (``Mount("/dicom-web",
app=...)``) to live behind the same sessions, tokens and CSRF check. Only ``PUBLIC_PATHS`` answer without
a user: the login page, ``/healthz``, ``/readyz`` and ``/metrics`` (which has its own optional token).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute

from node.config import Destination, WebConfig
from node.web.auth import AuthMiddleware, caller_of, csrf_token
from node.web.metrics import NodeMetrics
from node.web.space import DiskSpace
from storage.store import Store
from storage.users import LockoutPolicy

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/login", "/healthz", "/readyz", "/metrics"})
SESSION_COOKIE = "harmonode_session"
TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class WebContext:
    """What the web server is given by the node: its storage, settings and live parts (never the Node)."""

    store: Store
    settings: WebConfig
    identity: dict[str, Any]  # ae_title, host, port of the DICOM side
    metrics: NodeMetrics
    disk: DiskSpace
    destinations: tuple[Destination, ...] = ()
    roles_alive: Callable[[], dict[str, bool]] = field(default=lambda: {})
    audit: Any = None  # node.web.auditing.NodeAudit when the trail is on
    feedback: Any = None  # handlers.feedback.FeedbackDesk: the findings' accept / reject / modify buttons

    def record(self, event: str, **details: Any) -> None:
        """Write one audit message when the trail is on (login, resend, rule change)."""
        if self.audit is not None:
            try:
                self.audit.record(event, **details)
            except Exception:
                log.exception("audit: %s could not be recorded", event)


def is_public(path: str) -> bool:
    """Whether ``path`` answers without a user."""
    return path in PUBLIC_PATHS or path.startswith("/static/")


def session_secret(settings: WebConfig, data_dir: Path) -> str:
    """The key that signs session cookies: read from ``secret_file``, made there (0600) on first start."""
    path = Path(settings.secret_file) if settings.secret_file else data_dir / "web" / "secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise ValueError(f"session secret in {path} is shorter than 32 characters")
    return secret


class Pages:
    """Renders the console's templates (Jinja2, autoescaped) with the user and CSRF token of the request."""

    def __init__(self, directory: Path = TEMPLATES) -> None:
        self.env = Environment(loader=FileSystemLoader(directory), autoescape=select_autoescape(["html"]))

    def render(self, request: Request, name: str, status_code: int = 200, **values: Any) -> HTMLResponse:
        """The template ``name`` as an HTML response."""
        caller = request.scope.get("harmonode.caller")
        html = self.env.get_template(name).render(
            user=caller.user if caller else None,
            csrf_token=csrf_token(request.session),
            path=request.url.path,
            **values,
        )
        return HTMLResponse(html, status_code=status_code)


def _error_handler(pages: Pages) -> Callable[[Request, Exception], Any]:
    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if "text/html" in request.headers.get("accept", "") and request.scope.get("harmonode.caller"):
            return pages.render(
                request, "error.html", status_code=exc.status_code, status=exc.status_code, detail=exc.detail
            )
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    return handle


def build_app(context: WebContext, mounts: Sequence[BaseRoute] = ()) -> Starlette:
    """The node's web application.

    Parameters
    ----------
    context
        The node's storage, web settings, metrics, disk watch and live roles.
    mounts
        More routes (``Mount``/``Route``) to serve behind the same login, e.g. DICOMweb at ``/dicom-web``.

    Returns
    -------
    Starlette
        The ASGI application (``node.web.server.WebServer`` runs it under uvicorn).
    """
    from node.web import api, assessments, console, health, login

    settings = context.settings
    pages = Pages()
    routes: list[BaseRoute] = [
        *login.routes(context, pages),
        *health.routes(context),
        *console.routes(context, pages),
        *api.routes(context),
        *assessments.routes(context.feedback),
        *mounts,
    ]

    def failed_login(name: str, how: str) -> None:
        log.warning("login failed for a user name over %s", how)
        context.record("login", user=name, outcome="failure", via=how)

    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=session_secret(settings, context.store.root),
            session_cookie=SESSION_COOKIE,
            max_age=int(settings.session_hours * 3600),
            same_site="strict",
            https_only=settings.secure_cookies,
        ),
        Middleware(
            AuthMiddleware,
            index=context.store.index,
            public=is_public,
            lockout=LockoutPolicy(settings.lockout_failures, settings.lockout_minutes * 60),
            on_login_failure=failed_login,
        ),
    ]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _error_handler(pages)})
    app.state.context = context
    return app


__all__ = ["WebContext", "build_app", "caller_of", "is_public", "PUBLIC_PATHS"]
