"""The console's pages: studies and series, one series, deliveries, rules, model cards, quarantine.

Rules show their histograms before and after conversion, model cards their held-out FROC (PNG, drawn on
request with matplotlib, ``node.web.plots``).

Server-rendered (Jinja2, autoescaped), no JavaScript. Every page needs a login (``node.web.auth``); the
buttons that change something (resend dead deliveries, activate a rule) are shown to admins only and
refused (403) to the others whatever they post; a finding's accept / reject / modify buttons
(``node.web.assessments``) are shown to operators and admins. A series page shows each finding with its
key image (``/series/{uid}/findings/{n}/key-image.png``, the stored key-image SC as PNG) and, when
``[web] viewer_url`` is set, a link that opens the study in that viewer. Pages show the patient attributes
a radiology console needs to recognise a study (name, ID, accession); the node's logs never carry them.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from models.findings import LESION_KINDS
from node.web.api import activate_rule, resend
from node.web.auth import need
from node.web.pictures import picture_routes, weights_folder
from rules.registry import RuleRegistry
from storage import findings as found
from storage.deliveries import deliveries, delivery_status
from storage.users import Role

STUDIES_SHOWN = 200


def viewer_link(template: str, study_uid: str) -> str:
    """The viewer URL of a study from ``[web] viewer_url`` (``{study}`` replaced), or '' when none is set."""
    return template.replace("{study}", study_uid) if template and study_uid else ""


def findings_view(index: Any, series_uid: str, reported: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The series' findings as its SR reports them, each with its number and what a radiologist said of it."""
    stored = {f["finding_id"]: f for f in found.findings_of_series(index, series_uid)}
    rows = []
    for n, f in enumerate(reported, start=1):
        record = stored.get(str(f.get("tracking_uid", "")), {})
        rows.append(
            {
                **f,
                "number": int(record.get("number") or n),
                "finding_id": record.get("finding_id", ""),
                "state": record.get("state", ""),
                "assessed_by": record.get("assessed_by", ""),
            }
        )
    return rows


def _json(value: Any, default: Any) -> Any:
    if not value:
        return default
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return default


def studies_view(context: Any) -> list[dict[str, Any]]:
    """The latest studies, each with its series (state, condition key, rule and match, timings, findings)."""
    index = context.store.index
    studies = index.query(
        "SELECT study_instance_uid, patient_name, patient_id, accession_number, study_date, study_description,"
        " modalities, last_received_at FROM studies ORDER BY last_received_at DESC LIMIT ?",
        (STUDIES_SHOWN,),
    )
    uids = [s["study_instance_uid"] for s in studies]
    by_study: dict[str, list[dict[str, Any]]] = {u: [] for u in uids}
    if uids:
        marks = ",".join("?" for _ in uids)
        for row in index.query(
            f"SELECT * FROM series WHERE study_instance_uid IN ({marks}) ORDER BY series_number, first_received_at",
            tuple(uids),
        ):
            row["findings"] = _json(row.get("findings"), [])
            row["timings"] = _json(row.get("timings"), {})
            by_study[row["study_instance_uid"]].append(row)
    for s in studies:
        s["series"] = by_study[s["study_instance_uid"]]
    return studies


def models_view() -> list[dict[str, Any]]:
    """The model cards shipped with the weights (``models/weights/*.json``), read without importing torch."""
    folder = weights_folder()
    if folder is None:
        return []
    cards = []
    for path in sorted(folder.glob("*.json")):
        card = _json(path.read_text(encoding="utf-8"), {})
        if isinstance(card, dict):
            summary = {k: card[k] for k in ("metrics", "evaluation", "held_out", "threshold") if k in card}
            cards.append(
                {
                    "file": path.name,
                    "name": card.get("name", path.stem),
                    "version": card.get("version", ""),
                    "created": card.get("created", ""),
                    "sha256": card.get("sha256", ""),
                    "summary": json.dumps(summary, indent=1)[:6000],
                    "plot": isinstance(card.get("evaluation"), dict),
                }
            )
    return cards


def need_role(request: Request, role: Role) -> bool:
    """Whether the request's user has ``role`` (for showing a button; the route itself checks again)."""
    try:
        need(request, role)
    except HTTPException:
        return False
    return True


def routes(context: Any, pages: Any) -> list[BaseRoute]:
    """The console's pages and forms.

    Long because each page is a small closure over the context and the templates, and one function lists
    every page of the console in one place (the pictures are ``node.web.pictures``).
    """
    index = context.store.index

    async def home(request: Request) -> Response:
        return RedirectResponse("/studies", status_code=303)

    async def studies(request: Request) -> Response:
        rows = await run_in_threadpool(studies_view, context)
        return pages.render(request, "studies.html", studies=rows)

    async def series(request: Request) -> Response:
        uid = request.path_params["uid"]
        row = await run_in_threadpool(index.series, uid)
        if row is None:
            raise HTTPException(404, f"no series {uid}")
        row = dict(row)
        row["findings"] = _json(row.get("findings"), [])
        row["timings"] = _json(row.get("timings"), {})
        study = await run_in_threadpool(index.study, row["study_instance_uid"])
        sent = await run_in_threadpool(
            index.query,
            "SELECT destination, sop_class_uid, sop_instance_uid, state, attempts, last_error FROM deliveries"
            " WHERE series_instance_uid IN (SELECT series_instance_uid FROM series WHERE study_instance_uid=?"
            " AND origin='result')",
            (row["study_instance_uid"],),
        )
        findings = await run_in_threadpool(findings_view, index, uid, row["findings"])
        return pages.render(
            request,
            "series.html",
            series=row,
            study=study or {},
            deliveries=sent,
            findings=findings,
            viewer=viewer_link(context.settings.viewer_url, row["study_instance_uid"]),
            can_assess=context.feedback is not None and need_role(request, Role.OPERATOR),
            assessed=request.query_params.get("assessed"),
            kinds=LESION_KINDS,
        )

    async def delivery_page(request: Request) -> Response:
        summary = await run_in_threadpool(delivery_status, index)
        failing = await run_in_threadpool(deliveries, index, ("failed", "dead"))
        return pages.render(
            request,
            "deliveries.html",
            summary=summary,
            failing=failing[:500],
            destinations=context.destinations,
            requeued=request.query_params.get("requeued"),
        )

    async def resend_form(request: Request) -> Response:
        user = need(request, Role.ADMIN)
        form = await request.form()
        n = await run_in_threadpool(resend, context, str(form.get("destination", "")), user.name)
        return RedirectResponse(f"/deliveries?requeued={n}", status_code=303)

    async def rules_page(request: Request) -> Response:
        rules = await run_in_threadpool(lambda: RuleRegistry(index.db, index.lock).all())
        by_key: dict[str, list[Any]] = {}
        for rule in rules:
            by_key.setdefault(str(rule.key), []).append(rule)
        return pages.render(request, "rules.html", rules_by_key=by_key)

    async def activate_form(request: Request) -> Response:
        user = need(request, Role.ADMIN)
        form = await request.form()
        await run_in_threadpool(activate_rule, context, str(form.get("rule", "")), user.name)
        return RedirectResponse("/rules", status_code=303)

    async def models_page(request: Request) -> Response:
        return pages.render(request, "models.html", cards=await run_in_threadpool(models_view))

    async def quarantine_page(request: Request) -> Response:
        items = await run_in_threadpool(context.store.files.quarantined)
        return pages.render(request, "quarantine.html", items=list(reversed(items))[:500], total=len(items))

    return [
        Route("/", home, methods=["GET"]),
        Route("/studies", studies, methods=["GET"]),
        Route("/series/{uid}", series, methods=["GET"]),
        Route("/deliveries", delivery_page, methods=["GET"]),
        Route("/deliveries/resend", resend_form, methods=["POST"]),
        Route("/rules", rules_page, methods=["GET"]),
        Route("/rules/activate", activate_form, methods=["POST"]),
        Route("/models", models_page, methods=["GET"]),
        Route("/quarantine", quarantine_page, methods=["GET"]),
        *picture_routes(context),
    ]
