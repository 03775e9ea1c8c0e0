"""``/healthz`` (the process answers) and ``/readyz`` (it can do its work), and ``/metrics``.

``/healthz`` and ``/readyz`` answer without a session: they name no patient and no study, only whether
each part works, so load balancers and orchestrators can ask. ``/readyz`` answers 200 when every check
passes and 503 otherwise, with each check's result:

- ``store_writable``: a file can be written, fsynced and removed under the data directory;
- ``index_open``, ``queue_open``: the SQLite files answer a query;
- ``disk_space``: free space is above the back-pressure watermark (C-STORE is accepted);
- ``roles``: each role this process runs (listen, work, dispatch) has its thread(s) alive;
- ``destinations``: each result destination answers C-ECHO (cached ``[web] echo_cache_s`` seconds).

``/metrics`` answers without a session too; when ``[web] metrics_token`` is set it needs that bearer token.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from handlers.peer import Peer, associate

log = logging.getLogger(__name__)


def echo(peer: Peer, calling_ae: str, timeout: float = 3.0) -> str:
    """'' when ``peer`` answers C-ECHO with success, else why not."""
    try:
        assoc = associate(peer, calling_ae, [build_context(Verification)], timeout=timeout)
    except Exception as exc:  # a resolver or socket error
        return f"{type(exc).__name__}: {exc}"
    if not assoc.is_established:
        return "association refused or no answer"
    try:
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        return "" if code == 0x0000 else f"C-ECHO status {code!r}"
    finally:
        assoc.release()


class EchoCache:
    """The C-ECHO outcome of each destination, at most ``max_age_s`` old."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, str]] = {}

    def outcome(self, peer: Peer, calling_ae: str) -> str:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(peer.name)
        if seen is not None and now - seen[0] < self.max_age_s:
            return seen[1]
        why = echo(peer, calling_ae)
        with self._lock:
            self._seen[peer.name] = (time.monotonic(), why)
        return why


def _store_writable(context: Any) -> str:
    tmp = context.store.files.tmp
    path = tmp / f"readyz-{secrets.token_hex(4)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
    except OSError as exc:
        return f"{exc.strerror or exc}"
    return ""


def readiness(context: Any, echoes: EchoCache) -> dict[str, Any]:
    """Each readiness check: ``{"ok": bool, "detail": str}``, plus ``ready`` (all ok)."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, why: str) -> None:
        checks[name] = {"ok": not why, "detail": why}

    check("store_writable", _store_writable(context))
    for name, probe in (("index_open", context.store.index), ("queue_open", context.store.queue)):
        try:
            with probe.lock:
                probe.db.conn.execute("SELECT 1").fetchone()
            check(name, "")
        except Exception as exc:
            check(name, f"{type(exc).__name__}: {exc}")
    free = context.disk.free_bytes()
    check("disk_space", "" if context.disk.accepting() else f"{free / 2**20:.0f} MB free: C-STORE refused (0xA700)")
    roles = context.roles_alive()
    dead = sorted(role for role, alive in roles.items() if not alive)
    check("roles", f"not running: {', '.join(dead)}" if dead else "")
    checks["roles"]["running"] = sorted(role for role, alive in roles.items() if alive)
    calling = str(context.identity.get("ae_title", "HARMONODE"))
    for dest in context.destinations:
        if dest.send_results:
            check(f"destination:{dest.name}", echoes.outcome(dest, calling))
    return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}


def routes(context: Any) -> list[BaseRoute]:
    """``/healthz``, ``/readyz`` and ``/metrics``."""
    echoes = EchoCache(context.settings.echo_cache_s)
    token = context.settings.metrics_token

    async def healthz(request: Request) -> Response:
        return JSONResponse({"alive": True})

    async def readyz(request: Request) -> Response:
        report = await run_in_threadpool(readiness, context, echoes)
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    async def metrics(request: Request) -> Response:
        if token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given, token):
                return PlainTextResponse(
                    "metrics token required\n", status_code=401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'}
                )
        body = await run_in_threadpool(context.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
