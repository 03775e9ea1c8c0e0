"""Series completion: a series is complete when no instance has arrived for a quiet period.

DICOM has no "end of series" message, so the node waits ``quiet_seconds`` after the last instance. The
watcher enqueues the ``analyze-series`` job first and marks the series complete second (conditionally on
its last arrival time), so a crash in between leaves a job, never a complete series without one. A late
instance puts the series back to ``receiving`` (``Index.record_instance``) and it completes again after
its own quiet period; the job checks the state and skips a series that reopened.

A series of SRs only (a viewer's assessment SR: IHE AI Result Assessment) becomes a ``feedback`` job
instead of an analysis: there is nothing to detect in it, and it may change the node's results.
"""

from __future__ import annotations

import logging
import threading
import time

from node.config import PipelineConfig
from storage.index import Index, Origin, SeriesState
from storage.queue import AnalyzeSeriesPayload, JobKind, JobQueue

log = logging.getLogger(__name__)

SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # the structured report storage SOP classes


class SeriesWatcher:
    """Turns quiet series into durable ``analyze-series`` jobs."""

    def __init__(self, index: Index, queue: JobQueue, config: PipelineConfig) -> None:
        self.index = index
        self.queue = queue
        self.config = config

    def tick(self, now: float | None = None) -> list[str]:
        """Complete every series quiet for long enough; return the UIDs completed in this tick."""
        now = time.time() if now is None else now
        rows = self.index.query(
            "SELECT series_instance_uid, last_received_at, instance_count FROM series"
            " WHERE state = ? AND origin = ? AND last_received_at <= ?",
            (SeriesState.RECEIVING, Origin.RECEIVED, now - self.config.quiet_seconds),
        )
        completed = []
        for row in rows:
            uid = row["series_instance_uid"]
            payload = AnalyzeSeriesPayload(uid)
            kind = JobKind.FEEDBACK if self._only_sr(uid) else JobKind.ANALYZE_SERIES
            self.queue.enqueue(kind, payload.key, payload.to_json())
            with self.index.lock:
                changed = self.index.db.conn.execute(
                    "UPDATE series SET state=?, completed_at=?, updated_at=?"
                    " WHERE series_instance_uid=? AND state=? AND last_received_at=?",
                    (SeriesState.COMPLETE, now, now, uid, SeriesState.RECEIVING, row["last_received_at"]),
                ).rowcount
            if changed:
                completed.append(uid)
                log.info("series %s complete (%d instances)", uid, row["instance_count"])
        return completed

    def _only_sr(self, series_uid: str) -> bool:
        """True when every instance of the series is a structured report (an assessment, perhaps)."""
        rows = self.index.query(
            "SELECT DISTINCT sop_class_uid FROM instances WHERE series_instance_uid=?", (series_uid,)
        )
        return bool(rows) and all(str(r["sop_class_uid"]).startswith(SR_CLASS_PREFIX) for r in rows)

    def run(self, stop: threading.Event) -> None:
        """Tick every ``poll_seconds`` until ``stop`` is set; a failing tick is logged, not fatal."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("series watcher tick failed; retrying")
            stop.wait(self.config.poll_seconds)
