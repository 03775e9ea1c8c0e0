"""The console's pictures (PNG, drawn on request): a finding's key image, a rule's histograms, a card's FROC.

``/series/{uid}/findings/{n}/key-image.png`` renders the key-image Secondary Capture the node stored
(``node.web.keyimages``); ``/rules/{id}/v{n}/histograms.png`` a rule's group histogram before and after
conversion over the reference's (``rules.plots``); ``/models/{card}/evaluation.png`` a model card's held-out
FROC (``node.web.plots``). The last two need matplotlib (the ``plot`` extra): without it they answer 404 with
what to install, and the pages still list. Every route is behind the console's login (``node.web.auth``).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from node.web.keyimages import key_image_path, png_of
from node.web.plots import card_evaluation_png
from rules.plots import NoHistograms, rule_histograms_png
from rules.registry import RuleRegistry, UnknownRule

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CARD = re.compile(r"^[A-Za-z0-9_-]+$")
_CACHE = {"Cache-Control": "private, max-age=300"}
NO_MATPLOTLIB = "pictures need matplotlib: pip install 'harmonode[plot]'"


def weights_folder() -> Path | None:
    """The shipped weights' folder (``models/weights``), found without importing torch."""
    spec = importlib.util.find_spec("models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights"


def picture_routes(context: Any) -> list[BaseRoute]:
    """The console's picture routes (``context``: the web context with the node's store)."""
    index = context.store.index

    async def key_image(request: Request) -> Response:
        uid, number = request.path_params["uid"], request.path_params["number"]
        if not _UID.match(uid) or len(uid) > 64:
            raise HTTPException(400, "a series UID has digits and dots only")
        path = await run_in_threadpool(key_image_path, index, context.store.files, uid, number)
        if path is None:
            raise HTTPException(404, f"no key image of finding {number} in series {uid}")
        try:
            png = await run_in_threadpool(png_of, path)
        except ValueError as exc:
            raise HTTPException(404, str(exc)) from exc
        return Response(png, media_type="image/png", headers=_CACHE)

    async def rule_plot(request: Request) -> Response:
        ref = f"{request.path_params['rule']}@v{request.path_params['version']}"
        try:
            rule = await run_in_threadpool(lambda: RuleRegistry(index.db, index.lock).get(ref))
            png = await run_in_threadpool(rule_histograms_png, rule)
        except (UnknownRule, NoHistograms) as exc:
            raise HTTPException(404, str(exc)) from exc
        except ImportError as exc:
            raise HTTPException(404, NO_MATPLOTLIB) from exc
        return Response(png, media_type="image/png", headers=_CACHE)

    async def card_plot(request: Request) -> Response:
        name, folder = str(request.path_params["card"]), weights_folder()
        path = folder / f"{name}.json" if folder is not None and _CARD.match(name) else None
        if path is None or not path.is_file():
            raise HTTPException(404, f"no model card {name!r}")
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
            png = await run_in_threadpool(card_evaluation_png, card if isinstance(card, dict) else {})
        except (LookupError, ValueError) as exc:
            raise HTTPException(404, str(exc)) from exc
        except ImportError as exc:
            raise HTTPException(404, NO_MATPLOTLIB) from exc
        return Response(png, media_type="image/png", headers=_CACHE)

    return [
        Route("/series/{uid}/findings/{number:int}/key-image.png", key_image, methods=["GET"]),
        Route("/rules/{rule}/v{version:int}/histograms.png", rule_plot, methods=["GET"]),
        Route("/models/{card}/evaluation.png", card_plot, methods=["GET"]),
    ]
