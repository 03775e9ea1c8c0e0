"""The console's accept / reject / modify buttons on a finding: issue 20's third way in.

``POST /findings/{finding_id}/assess`` with ``action`` (``accept``, ``reject`` or ``modify``; for ``modify``
any of ``kind``, ``diameter_mm`` and ``center_mm`` as ``x,y,z``) goes through the same path as an assessment
SR and ``harmonode feedback``: ``handlers.feedback.apply_assessment`` with the node's ``FeedbackDesk``, which
records the verdict, corrects the stored result (a new SR version queued to the destinations), makes the
export record and writes the audit message (the desk holds the node's trail). It needs the operator role
(403 for a viewer) and, like every console form, the session's CSRF token. The observer recorded is the
logged-in user. A bad value is a 400 naming it; a finding the node does not know a 404.
"""

from __future__ import annotations

import logging
import re

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from handlers.feedback import FeedbackDesk, apply_assessment
from models.findings import LESION_KINDS
from node.web.auth import need
from storage import findings as found
from storage.feedback import Assessment, FeedbackAction, FeedbackSource, FeedbackState
from storage.users import Role

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def assessment_of(finding_id: str, form: dict[str, str], observer: str) -> Assessment:
    """The verdict a console form asks for.

    Raises
    ------
    HTTPException
        400: an unknown action, a kind not in ``LESION_KINDS``, a diameter or centre that is not a number,
        or a modification that changes nothing.
    """
    try:
        action = FeedbackAction(form.get("action", ""))
    except ValueError as exc:
        raise HTTPException(400, f"action is one of accept, reject, modify; not {form.get('action')!r}") from exc
    kind, centre, diameter = "", None, 0.0
    if action == FeedbackAction.MODIFY:
        kind = form.get("kind", "").strip()
        if kind and kind not in LESION_KINDS:
            raise HTTPException(400, f"kind is one of {', '.join(LESION_KINDS)}; not {kind!r}")
        try:
            diameter = float(form.get("diameter_mm", "") or 0.0)
            text = form.get("center_mm", "").strip()
            centre = tuple(float(v) for v in text.split(",")) if text else None
        except ValueError as exc:
            raise HTTPException(400, "diameter_mm is a number and center_mm is x,y,z in mm") from exc
        if centre is not None and len(centre) != 3:
            raise HTTPException(400, "center_mm is three numbers x,y,z")
        if diameter < 0 or diameter != diameter:
            raise HTTPException(400, "diameter_mm is a positive number")
        if not (kind or centre or diameter):
            raise HTTPException(400, "a modification names a kind, a diameter or a centre")
    return Assessment(
        finding_id=finding_id,
        action=action,
        observer=observer,
        source=FeedbackSource.WEB,
        kind=kind,
        center_mm=centre,  # type: ignore[arg-type]
        diameter_mm=diameter,
    )


def routes(desk: FeedbackDesk | None) -> list[BaseRoute]:
    """The assessment route (none when the node gave the web server no feedback desk)."""
    if desk is None:
        return []

    async def assess(request: Request) -> Response:
        user = need(request, Role.OPERATOR)
        finding_id = request.path_params["finding_id"]
        if not _UID.match(finding_id) or len(finding_id) > 64:
            raise HTTPException(400, "a finding ID is a UID")
        form = {k: str(v) for k, v in (await request.form()).items()}
        assessment = assessment_of(finding_id, form, user.name)
        row = await run_in_threadpool(found.finding, desk.index, finding_id)
        if row is None:
            raise HTTPException(404, f"no finding {finding_id}")
        outcome = await run_in_threadpool(apply_assessment, desk, assessment)
        if outcome.state == FeedbackState.REFUSED:
            raise HTTPException(409, f"feedback refused: {outcome.reason}")
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(f"/series/{row['series_instance_uid']}?assessed={finding_id}", status_code=303)
        return JSONResponse(
            {"state": str(outcome.state), "corrected_sr": outcome.corrected_sr_uid, "export": outcome.export_record}
        )

    return [Route("/findings/{finding_id}/assess", assess, methods=["POST"])]
