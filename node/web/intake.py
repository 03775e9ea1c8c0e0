"""The C-STORE handler and the job handlers as the node binds them: refused for space first, counted after.

``guarded_store`` is bound to ``EVT_C_STORE`` in place of ``handlers.store.handle_store``: under disk
back-pressure it answers 0xA700 (out of resources) before a byte is written, otherwise it stores through
``handle_store`` and counts what that answered. ``observed_job`` wraps a job handler so that analysed series
feed the stage histograms and failed deliveries the per-destination counter, and so that an analysed series
and a delivered result each write their audit message. Both add a dictionary look-up and an increment to
the path they wrap (and, for a job, one audit line), nothing more.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt

from handlers.permissions import Permissions
from handlers.store import OUT_OF_RESOURCES, SUCCESS, StoreLimits, handle_store
from node.web.auditing import NodeAudit
from node.web.metrics import NodeMetrics
from node.web.space import DiskSpace
from storage.files import FileStore
from storage.index import Index
from storage.queue import Job, JobKind

log = logging.getLogger(__name__)

_WARNING_STATUSES = {0xB000, 0xB007, 0xB006}  # C-STORE warnings: the instance was stored
_REFUSAL_LOG_EVERY_S = 10.0


class _Throttle:
    """At most one log line per interval (a modality pushing into a full disk sends thousands)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.last = 0.0
        self.suppressed = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            return True
        self.suppressed += 1
        return False


_space_log = _Throttle(_REFUSAL_LOG_EVERY_S)


def _dataset_bytes(event: evt.Event) -> int:
    stream = getattr(event.request, "DataSet", None)
    if stream is None or not hasattr(stream, "getbuffer"):
        return 0
    with stream.getbuffer() as view:
        return view.nbytes


def guarded_store(
    event: evt.Event,
    files: FileStore,
    index: Index,
    limits: StoreLimits,
    permissions: Permissions | None,
    disk: DiskSpace,
    metrics: NodeMetrics,
    audit: NodeAudit | None = None,
) -> int | tuple[int, Any]:
    """EVT_C_STORE handler: 0xA700 under disk back-pressure, else ``handle_store``; the outcome is counted."""
    calling_ae = event.assoc.requestor.ae_title
    if not disk.accepting():
        metrics.refused(OUT_OF_RESOURCES)
        if _space_log.ready():
            log.warning(
                "C-STORE from %s refused with 0xA700: disk back-pressure, %.0f MB free (%d more refused quietly)",
                calling_ae,
                disk.free_bytes() / 2**20,
                _space_log.suppressed,
            )
            _space_log.suppressed = 0
        return OUT_OF_RESOURCES
    answer = handle_store(event, files, index, limits, permissions)
    status = answer[0] if isinstance(answer, tuple) else answer
    if status == SUCCESS or status in _WARNING_STATUSES:
        nbytes = _dataset_bytes(event)
        metrics.stored(calling_ae, nbytes)
        disk.consumed(nbytes)
        if audit is not None:
            audit.stored(event.assoc, str(event.request.AffectedSOPInstanceUID or ""))
    else:
        metrics.refused(int(status))
    return answer


def observed_job(
    kind: str, handler: Callable[[Job], None], index: Index, metrics: NodeMetrics, audit: NodeAudit | None = None
) -> Callable[[Job], None]:
    """``handler`` for jobs of ``kind``, feeding the series and delivery metrics (and the audit) with each outcome."""
    if kind == JobKind.ANALYZE_SERIES:

        def analyse(job: Job) -> None:
            try:
                handler(job)
            finally:
                _observe_series(job, index, metrics)
            if audit is not None:
                _audit_job(lambda: audit.analysed(str(job.payload.get("series_instance_uid") or job.key)))

        return analyse
    if kind == JobKind.SEND:

        def send(job: Job) -> None:
            destination = str(job.payload.get("destination", "?"))
            try:
                handler(job)
            except Exception:
                metrics.delivery_failures.labels(destination).inc()
                raise
            if audit is not None:
                uid = str(job.payload.get("sop_instance_uid", ""))
                _audit_job(lambda: audit.delivered(destination, uid))

        return send
    return handler


def _audit_job(write: Callable[[], None]) -> None:
    try:
        write()
    except Exception:  # the audit never fails a job that did its work
        log.exception("audit: a job's outcome could not be recorded")


def _observe_series(job: Job, index: Index, metrics: NodeMetrics) -> None:
    uid = str(job.payload.get("series_instance_uid") or job.key)
    try:
        row = index.series(uid)
        if row is None or row.get("state") not in ("done", "failed", "skipped"):
            return
        timings = json.loads(row.get("timings") or "{}") if row.get("state") != "skipped" else {}
        metrics.series_done(str(row["state"]), timings if isinstance(timings, dict) else {})
    except Exception:  # metrics never fail a job
        log.exception("metrics: series %s could not be observed", uid)
