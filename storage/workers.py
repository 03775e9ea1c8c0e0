"""Worker heartbeats: which processes claim jobs, on which host, from which queues, and when each was last seen.

The ``workers`` table lives in the queue's database (``queue.sqlite``, or the ``harmonode_queue`` schema on
PostgreSQL), one row per worker id (``storage.queue.worker_id``: ``host:pid:start``). A worker beats every few
seconds (``beat``); one not seen for ``stale_after_s`` is stale, and a job it holds may be taken over
(``storage.queue.JobQueue.claim_job``) before its lease runs out — across machines, where a pid cannot be
asked. A worker never seen (one from before heartbeats, or of another kind) is judged by its job's lease alone.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from storage.database import Database

TABLE = "workers"


class Workers:
    """The heartbeat table of one queue database (created when missing).

    Parameters
    ----------
    db
        The queue's database (``JobQueue.db``).
    lock
        The lock that guards the queue's shared connection (``JobQueue.lock``).
    """

    def __init__(self, db: Database, lock: threading.RLock | None = None) -> None:
        self.db = db
        self.lock = lock or threading.RLock()
        with self.lock:
            db[TABLE].create(
                {
                    "worker_id": str,
                    "host": str,
                    "pid": int,
                    "queues": str,  # JSON list of the job kinds (queues) it takes
                    "started_at": float,
                    "last_seen": float,
                    "current_job": int,  # the job it runs now, or NULL
                },
                pk="worker_id",
                if_not_exists=True,
            )

    def beat(
        self,
        worker_id: str,
        queues: list[str],
        host: str,
        pid: int,
        now: float | None = None,
        current_job: int | None = None,
    ) -> None:
        """Record that a worker is alive now (its first beat also records when it started).

        Parameters
        ----------
        worker_id
            Who beats (``storage.queue.worker_id()``).
        queues
            The job kinds it takes.
        host, pid
            Where it runs.
        now
            The time of the beat (``time.time()`` when omitted).
        current_job
            The id of the job it runs now, or None when idle.
        """
        now = time.time() if now is None else now
        with self.lock:
            self.db.conn.execute(
                f"INSERT INTO {TABLE} (worker_id, host, pid, queues, started_at, last_seen, current_job)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT(worker_id) DO UPDATE SET host=excluded.host,"
                " pid=excluded.pid, queues=excluded.queues, last_seen=excluded.last_seen,"
                " current_job=excluded.current_job",
                (worker_id, host, int(pid), json.dumps(sorted(str(q) for q in queues)), now, now, current_job),
            )

    def seen(self, now: float | None = None, stale_after_s: float = 30.0) -> list[dict[str, Any]]:
        """Every worker ever seen, by id, with ``queues`` decoded and ``alive`` (seen within ``stale_after_s``)."""
        now = time.time() if now is None else now
        with self.lock:
            rows = list(self.db.query(f"SELECT * FROM {TABLE} ORDER BY worker_id"))
        for row in rows:
            row["queues"] = json.loads(row["queues"] or "[]")
            row["alive"] = now - float(row["last_seen"] or 0.0) <= stale_after_s
        return rows

    def last_seen(self, worker_id: str) -> float | None:
        """When a worker last beat, or None for one never seen."""
        with self.lock:
            row = self.db.conn.execute(f"SELECT last_seen FROM {TABLE} WHERE worker_id=?", (worker_id,)).fetchone()
        return None if row is None else float(row[0] or 0.0)

    def is_stale(
        self, worker_id: str, stale_after_s: float, now: float | None = None, lease_until: float | None = None
    ) -> bool:
        """Whether a worker has not beaten within ``stale_after_s``.

        A worker never seen is stale only when ``lease_until`` (the lease of the job it holds) is given and
        has run out: without heartbeats, the lease is all there is to judge by.
        """
        now = time.time() if now is None else now
        seen = self.last_seen(worker_id)
        if seen is None:
            return lease_until is not None and lease_until < now
        return now - seen > stale_after_s

    def forget(self, worker_id: str) -> bool:
        """Remove a worker's row (a clean shutdown); return whether it was there."""
        with self.lock:
            return self.db.conn.execute(f"DELETE FROM {TABLE} WHERE worker_id=?", (worker_id,)).rowcount > 0
