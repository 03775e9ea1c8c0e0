"""The JSON API for scripts: the node's status, deliveries, resend and rule activation.

Authenticate with ``Authorization: Bearer <token>`` (``harmonode users token NAME``) or HTTP Basic. Reading
needs any role; resending and activating a rule need ``admin`` (403 for the others, whatever the token).
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from node.web.auth import caller_of, need
from rules.registry import RuleRegistry, UnknownRule
from storage.deliveries import deliveries, retry_dead_deliveries
from storage.status import collect_status
from storage.users import Role


def resend(context: Any, destination: str, who: str) -> int:
    """Queue the dead deliveries (of one destination, or all) again; recorded in the audit trail."""
    names = {d.name for d in context.destinations}
    if destination and destination not in names and not deliveries(context.store.index, destination=destination):
        raise HTTPException(404, f"no destination {destination!r}")
    n = retry_dead_deliveries(context.store.queue, context.store.index, destination=destination)
    context.record("resend", user=who, destination=destination or "*", count=n)
    return n


def activate_rule(context: Any, ref: str, who: str) -> str:
    """Make rule ``ref`` active for its condition; return its label (``id@vN``)."""
    index = context.store.index
    try:
        rule = RuleRegistry(index.db, index.lock).activate(ref)
    except UnknownRule as exc:
        raise HTTPException(404, str(exc)) from exc
    context.record("rule-activated", user=who, rule=rule.label, key=str(rule.key))
    return rule.label


def routes(context: Any) -> list[BaseRoute]:
    """The ``/api/…`` routes."""

    async def whoami(request: Request) -> Response:
        caller = caller_of(request)
        return JSONResponse({"user": caller.user.name, "role": str(caller.user.role), "via": caller.via})

    async def status(request: Request) -> Response:
        report = await run_in_threadpool(collect_status, context.store, context.identity)
        return JSONResponse(report)

    async def delivery_rows(request: Request) -> Response:
        states = tuple(s for s in request.query_params.get("state", "").split(",") if s)
        rows = await run_in_threadpool(
            deliveries, context.store.index, states, request.query_params.get("destination", "")
        )
        return JSONResponse({"deliveries": rows})

    async def resend_dead(request: Request) -> Response:
        user = need(request, Role.ADMIN)
        destination = request.query_params.get("destination", "")
        n = await run_in_threadpool(resend, context, destination, user.name)
        return JSONResponse({"requeued": n})

    async def activate(request: Request) -> Response:
        user = need(request, Role.ADMIN)
        label = await run_in_threadpool(activate_rule, context, request.path_params["ref"], user.name)
        return JSONResponse({"active": label})

    return [
        Route("/api/whoami", whoami, methods=["GET"]),
        Route("/api/status", status, methods=["GET"]),
        Route("/api/deliveries", delivery_rows, methods=["GET"]),
        Route("/api/deliveries/resend", resend_dead, methods=["POST"]),
        Route("/api/rules/{ref:path}/activate", activate, methods=["POST"]),
    ]
