"""The job handlers a process runs, by role: ``analyze-series`` (work) and ``send`` (dispatch)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from storage.index import SERIES_DONE, SERIES_FAILED, SERIES_PROCESSING, SERIES_RECEIVING
from storage.queue import ANALYZE_SERIES, SEND, Job

if TYPE_CHECKING:
    from node.app import Node

log = logging.getLogger(__name__)


def analyze_series_job(node: Node, job: Job) -> None:
    """Run the pipeline on one completed series (skipped if the series reopened meanwhile)."""
    from node.pipeline import run_series

    uid = job.payload.get("series_instance_uid", job.key)
    series = node.index.series(uid)
    if series is None:
        log.warning("job %d: series %s is not in the index; nothing to do", job.id, uid)
        return
    if not _is_image_series(node, uid):
        node.index.update_series(uid, state="skipped", error="not an image series: nothing to analyse")
        return
    if series["state"] == SERIES_RECEIVING:
        log.info("job %d: series %s reopened by a late instance; it will complete again", job.id, uid)
        return
    node.index.update_series(uid, state=SERIES_PROCESSING, error="")
    try:
        run_series(node, uid)
    except Exception as exc:
        node.index.update_series(uid, state=SERIES_FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    if node.index.series(uid)["state"] == SERIES_PROCESSING:
        node.index.update_series(uid, state=SERIES_DONE)


def _is_image_series(node: Node, series_uid: str) -> bool:
    from models.volume import IMAGE_SOP_CLASSES

    rows = node.index.query("SELECT DISTINCT sop_class_uid FROM instances WHERE series_instance_uid=?", (series_uid,))
    return any(r["sop_class_uid"] in IMAGE_SOP_CLASSES for r in rows)


def send_job(node: Node, job: Job) -> None:
    """Deliver one result object to one destination (``handlers.send``)."""
    from handlers.send import send_job_payload

    send_job_payload(node, job)


def register_job_handlers(node: Node, roles: tuple[str, ...]) -> None:
    """Bind the job kinds of ``roles`` to their handlers on ``node``."""
    if "work" in roles:
        node.job_handlers[ANALYZE_SERIES] = lambda job: analyze_series_job(node, job)
    if "dispatch" in roles:
        node.job_handlers[SEND] = lambda job: send_job(node, job)
