"""The durable job queue: a SQLite table (or PostgreSQL, shared by a cluster), claimed with a lease, retried
with backoff, dead-lettered.

States: ``ready`` → ``running`` (claimed, lease until ``lease_until``) → ``done`` | back to ``ready`` with
``next_attempt_at`` in the future (a failure, exponential backoff) | ``dead`` after ``max_attempts``.
A worker that dies leaves its job ``running`` with an expired lease; ``claim`` takes such a job again.
Every job must therefore be safe to run twice. ``claim_job`` claims one named job (a message from a broker
names it) and takes it over from a worker whose process is gone or whose heartbeat is stale
(``storage.workers``); ``published_at`` records when a job was last handed to a broker, so a reconciler can
hand again what a broker lost (``to_publish``, ``published_waiting``, ``swap_published``).

On PostgreSQL (``storage.database``) the queue is the schema ``harmonode_queue``; ``claim`` skips rows another
process is claiming at the same moment (``FOR UPDATE SKIP LOCKED``), so many processes claim at once and each
job goes to one of them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from storage.database import like, open_database
from storage.workers import Workers


class JobState(StrEnum):
    """Where a job stands."""

    READY = "ready"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"


READY, RUNNING, DONE, DEAD = JobState.READY, JobState.RUNNING, JobState.DONE, JobState.DEAD


class RetryLater(Exception):
    """A job could not run now for a reason that may pass (a peer is down); retry with backoff."""


class GiveUp(Exception):
    """A job can never succeed (bad input); dead-letter it at once."""


class JobKind(StrEnum):
    """The kinds of job the node runs (``node.jobs`` binds each to its handler)."""

    ANALYZE_SERIES = "analyze-series"
    SEND = "send"
    FEEDBACK = "feedback"  # read an arrived assessment SR (IHE AIRA) and apply it
    EXPORT = "export"  # deliver one export record (seed 004) to the learning folder or server
    SERIES_RESULTS = "series-results"  # a cluster's CPU half of an analysis: the results of its findings


ANALYZE_SERIES, SEND = JobKind.ANALYZE_SERIES, JobKind.SEND


@dataclass(frozen=True)
class AnalyzeSeriesPayload:
    """The payload of an ``analyze-series`` job: the series to analyse (also the job's key)."""

    series_instance_uid: str

    def __post_init__(self) -> None:
        if not self.series_instance_uid:
            raise ValueError("an analyze-series job needs a Series Instance UID")

    @property
    def key(self) -> str:
        """The job key: one job per series."""
        return self.series_instance_uid

    def to_json(self) -> dict[str, str]:
        """The payload as stored in the queue."""
        return {"series_instance_uid": self.series_instance_uid}

    @classmethod
    def from_json(cls, payload: dict[str, Any], key: str = "") -> AnalyzeSeriesPayload:
        """Read a stored payload back (the job key stands in for a payload without the UID)."""
        return cls(str(payload.get("series_instance_uid") or key))


@dataclass(frozen=True)
class QueueSettings:
    """A retry policy: leases, retries, dead letters (``[queue]`` for analysis, ``[delivery]`` for sends)."""

    lease_seconds: float = 300.0
    max_attempts: int = 5
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt: doubling from the base, capped."""
        return min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, attempts - 1)))

    @property
    def retry_window_s(self) -> float:
        """How long a job keeps being retried before it is dead-lettered (the sum of its delays)."""
        return sum(self.delay(n) for n in range(1, self.max_attempts))


#: Delivery retries for hours: a PACS down for a night's maintenance gets its results in the morning.
DELIVERY_POLICY = QueueSettings(lease_seconds=300.0, max_attempts=40, backoff_base_s=5.0, backoff_max_s=1800.0)


def worker_id() -> str:
    """Who claims a job: ``host:pid:start`` (the start time tells a live process from a reused pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc``), or '' where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _worker_alive(worker: str) -> bool:
    """Whether the process named by a claim still runs (unknown forms count as alive: wait the lease)."""
    parts = worker.split(":")
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    pid, started = int(parts[1]), parts[2]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not started or _process_start(pid) == started


@dataclass(frozen=True)
class Job:
    """A claimed job."""

    id: int
    kind: str
    key: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int


class JobQueue:
    """A durable queue of jobs in its own SQLite file (WAL, synchronous=FULL: a job is never lost) or schema.

    ``path`` is the SQLite file or a ``postgresql://`` URL. ``stale_after_s``: a running job whose worker has
    not beaten for that long may be taken over by ``claim_job``.
    """

    stale_after_s: float = 30.0

    def __init__(
        self,
        path: str | Path,
        settings: QueueSettings | None = None,
        policies: Mapping[str, QueueSettings] | None = None,
    ) -> None:
        settings = settings or QueueSettings()
        self.settings = settings
        self.policies = dict(policies or {})  # a job kind's own retry policy (delivery: hours, not seconds)
        self.path = str(path)
        self.db = open_database(path, "queue")
        conn = self.db.conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        self.lock = threading.RLock()
        self.lease_seconds = settings.lease_seconds
        self.max_attempts = settings.max_attempts
        self.backoff_base_s = settings.backoff_base_s
        self.backoff_max_s = settings.backoff_max_s
        self.worker_id = worker_id()
        self.db["jobs"].create(
            {
                "id": int,
                "kind": str,
                "key": str,  # what the job is about (series UID, "series UID → destination", ...)
                "payload": str,
                "state": str,
                "attempts": int,
                "max_attempts": int,
                "next_attempt_at": float,
                "lease_until": float,
                "worker": str,
                "last_error": str,
                "created_at": float,
                "updated_at": float,
                "published_at": float,  # when last handed to a broker (0: never)
            },
            pk="id",
            defaults={"published_at": 0},
            if_not_exists=True,
        )
        if "published_at" not in self.db["jobs"].columns_dict:  # a queue from before brokers
            self.db["jobs"].add_column("published_at", float, not_null_default=0)
        self.db["jobs"].create_index(["state", "kind", "next_attempt_at"], if_not_exists=True)
        self.db["jobs"].create_index(["kind", "key"], if_not_exists=True)
        self.workers = Workers(self.db, self.lock)

    def enqueue(
        self,
        kind: str,
        key: str,
        payload: dict[str, Any] | None = None,
        max_attempts: int | None = None,
        dedupe: bool = True,
    ) -> int:
        """Add a job; with ``dedupe`` an unfinished job of the same kind and key is reused (its id returned).

        A job of the same kind and key that is running gets a fresh ``ready`` twin, so work that arrived
        while it ran (a late instance) is not lost.
        """
        now = time.time()
        body = json.dumps(payload or {}, sort_keys=True)
        with self.lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                if dedupe:
                    row = conn.execute(
                        "SELECT id FROM jobs WHERE kind=? AND key=? AND state=? LIMIT 1", (kind, key, READY)
                    ).fetchone()
                    if row:
                        conn.execute("UPDATE jobs SET payload=?, updated_at=? WHERE id=?", (body, now, row[0]))
                        conn.execute("COMMIT")
                        return int(row[0])
                cur = conn.execute(
                    "INSERT INTO jobs (kind, key, payload, state, attempts, max_attempts, next_attempt_at,"
                    " lease_until, worker, last_error, created_at, updated_at)"
                    " VALUES (?,?,?,?,0,?,?,0,'','',?,?)",
                    (kind, key, body, READY, max_attempts or self.policy(kind).max_attempts, now, now, now),
                )
                conn.execute("COMMIT")
                return int(cur.lastrowid or 0)
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def claim(self, kinds: tuple[str, ...] | list[str], now: float | None = None) -> Job | None:
        """Atomically claim the oldest due job of one of ``kinds`` (or one whose lease expired)."""
        now = time.time() if now is None else now
        marks = ",".join("?" for _ in kinds)
        # SQLite runs one writer at a time; PostgreSQL's claimers skip the row another one is taking
        skip = " FOR UPDATE SKIP LOCKED" if self.db.dialect == "postgresql" else ""
        with self.lock:
            row = self.db.conn.execute(
                f"UPDATE jobs SET state=?, attempts=attempts+1, lease_until=?, worker=?, updated_at=?"
                f" WHERE id = (SELECT id FROM jobs WHERE kind IN ({marks}) AND"
                f"  ((state=? AND next_attempt_at<=?) OR (state=? AND lease_until<?))"
                f"  ORDER BY next_attempt_at, id LIMIT 1{skip})"
                f" RETURNING id, kind, key, payload, attempts, max_attempts",
                (RUNNING, now + self.lease_seconds, self.worker_id, now, *kinds, READY, now, RUNNING, now),
            ).fetchone()
        if row is None:
            return None
        return Job(row[0], row[1], row[2], json.loads(row[3] or "{}"), row[4], row[5])

    def claim_job(self, job_id: int, now: float | None = None) -> Job | None:
        """Claim exactly this job, if it may be run now; None when it may not.

        It may when it is ``ready`` and due, or ``running`` with an expired lease, or ``running`` by a
        process of this host that no longer runs, or by a worker whose heartbeat is older than
        ``stale_after_s``. It may not when it is done, dead, not yet due, unknown, or held by a live worker.
        The claim is a compare-and-set on the row as read: of several processes claiming one job at once,
        one gets it.
        """
        now = time.time() if now is None else now
        with self.lock:
            row = self.db.conn.execute(
                "SELECT state, next_attempt_at, lease_until, worker, attempts FROM jobs WHERE id=?", (int(job_id),)
            ).fetchone()
            if row is None or not self._may_take(row[0], row[1], row[2], row[3] or "", now):
                return None
            taken = self.db.conn.execute(
                "UPDATE jobs SET state=?, attempts=attempts+1, lease_until=?, worker=?, updated_at=?"
                " WHERE id=? AND state=? AND attempts=? AND worker=?"
                " RETURNING id, kind, key, payload, attempts, max_attempts",
                (RUNNING, now + self.lease_seconds, self.worker_id, now, int(job_id), row[0], row[4], row[3]),
            ).fetchone()
        if taken is None:
            return None
        return Job(taken[0], taken[1], taken[2], json.loads(taken[3] or "{}"), taken[4], taken[5])

    def _may_take(self, state: str, next_attempt_at: float, lease_until: float, worker: str, now: float) -> bool:
        """Whether a job in this state may be claimed now (``claim_job``)."""
        if state == READY:
            return float(next_attempt_at or 0.0) <= now
        if state != RUNNING:
            return False
        if float(lease_until or 0.0) < now:
            return True
        if worker.split(":", 1)[0] == socket.gethostname() and not _worker_alive(worker):
            return True
        return worker != self.worker_id and self.workers.is_stale(worker, self.stale_after_s, now, lease_until)

    # -- the broker's side (node.cluster's relay): each attempt of a job gets one message --------------
    def to_publish(self, kinds: tuple[str, ...] | list[str], now: float) -> list[tuple[int, str, float]]:
        """(id, kind, published_at) of ready, due jobs without a message for their current attempt."""
        where = "(published_at < next_attempt_at OR published_at = 0) ORDER BY next_attempt_at, id"  # 0: never
        return self._ready_due(kinds, where, (), now)

    def published_waiting(
        self, kinds: tuple[str, ...] | list[str], older_than_s: float, now: float
    ) -> list[tuple[int, str, float]]:
        """(id, kind, published_at) of ready jobs whose message went out over ``older_than_s`` ago, unclaimed."""
        where = "published_at >= next_attempt_at AND published_at > 0 AND published_at <= ? ORDER BY id"
        return self._ready_due(kinds, where, (now - older_than_s,), now)

    def _ready_due(
        self, kinds: tuple[str, ...] | list[str], where: str, params: tuple[Any, ...], now: float
    ) -> list[tuple[int, str, float]]:
        marks = ",".join("?" for _ in kinds)
        with self.lock:
            rows = self.db.conn.execute(
                f"SELECT id, kind, published_at FROM jobs WHERE kind IN ({marks}) AND state=? AND next_attempt_at<=?"
                f" AND {where}",
                (*kinds, READY, now, *params),
            ).fetchall()
        return [(int(r[0]), str(r[1]), float(r[2])) for r in rows]

    def swap_published(self, job_id: int, expected: float, value: float) -> bool:
        """Set ``published_at`` to ``value`` if it still is ``expected`` (of two relays, one publishes)."""
        with self.lock:
            return bool(
                self.db.conn.execute(
                    "UPDATE jobs SET published_at=? WHERE id=? AND published_at=?", (value, int(job_id), expected)
                ).rowcount
            )

    def release_stale(self, now: float | None = None) -> int:
        """Put back to ``ready`` the running jobs of silent workers (``stale_after_s``) or ended leases."""
        now = time.time() if now is None else now
        with self.lock:
            rows = self.db.conn.execute("SELECT id, worker, lease_until FROM jobs WHERE state=?", (RUNNING,)).fetchall()
            stale = [
                int(job_id)
                for job_id, worker, lease in rows
                if float(lease or 0) < now or self.workers.is_stale(worker or "", self.stale_after_s, now, lease)
            ]
            for job_id in stale:
                self.db.conn.execute(
                    "UPDATE jobs SET state=?, lease_until=0, next_attempt_at=?, updated_at=? WHERE id=? AND state=?",
                    (READY, now, now, job_id, RUNNING),
                )
        return len(stale)

    def extend_lease(self, job_id: int, now: float | None = None) -> None:
        """Renew this process's lease on a job it runs (a worker's heartbeat does, so long work keeps it)."""
        now = time.time() if now is None else now
        with self.lock:
            self.db.conn.execute(
                "UPDATE jobs SET lease_until=? WHERE id=? AND state=? AND worker=?",
                (now + self.lease_seconds, int(job_id), RUNNING, self.worker_id),
            )

    def complete(self, job: Job) -> bool:
        """Mark a claimed job done; False when another worker has claimed it since (its run goes on)."""
        with self.lock:
            return bool(
                self.db.conn.execute(
                    "UPDATE jobs SET state=?, last_error='', updated_at=? WHERE id=? AND NOT (state=? AND worker!=?)",
                    (DONE, time.time(), job.id, RUNNING, self.worker_id),
                ).rowcount
            )

    def policy(self, kind: str) -> QueueSettings:
        """The retry policy of a job kind (its own when configured, else the queue's)."""
        return self.policies.get(str(kind), self.settings)

    def fail(self, job: Job, error: str, retry: bool = True, now: float | None = None) -> str:
        """Record a failure: back to ``ready`` after its kind's backoff, or ``dead`` when attempts are spent.

        Returns the new state, or ``taken over`` when this process no longer holds the job (its lease was
        released or another worker claimed it): the row is then left as it is.
        """
        now = time.time() if now is None else now
        dead = not retry or job.attempts >= job.max_attempts
        delay = self.policy(job.kind).delay(job.attempts)
        state = DEAD if dead else READY
        with self.lock:
            held = self.db.conn.execute(
                "UPDATE jobs SET state=?, last_error=?, next_attempt_at=?, lease_until=0, updated_at=?"
                " WHERE id=? AND state=? AND worker=?",
                (state, error[:2000], now + (0 if dead else delay), now, job.id, RUNNING, self.worker_id),
            ).rowcount
        return str(state) if held else "taken over"

    def release_orphans(self) -> int:
        """Put back to ``ready`` the jobs that a dead process of this host had claimed; return how many.

        A process that dies (SIGKILL, power cut) leaves its claimed jobs ``running`` until their lease runs
        out (minutes). A claim names its process (host, pid and the process's start time), so at startup the
        claims of processes of this host that no longer run are released at once. Claims of other hosts, or
        of processes still running, wait out their lease as before.
        """
        host = socket.gethostname()
        with self.lock:
            rows = self.db.conn.execute(
                f"SELECT id, worker FROM jobs WHERE state=? AND {like(self.db, 'worker')}", (RUNNING, f"{host}:%")
            ).fetchall()
            orphans = [job_id for job_id, worker in rows if not _worker_alive(worker)]
            now = time.time()
            for job_id in orphans:
                self.db.conn.execute(
                    "UPDATE jobs SET state=?, lease_until=0, next_attempt_at=?, updated_at=? WHERE id=? AND state=?",
                    (READY, now, now, job_id, RUNNING),
                )
        return len(orphans)

    def retry_dead(self, kind: str | None = None, key_prefix: str = "") -> int:
        """Put dead jobs back to ``ready`` with fresh attempts (``harmonode resend``); return how many."""
        sql = "UPDATE jobs SET state=?, attempts=0, next_attempt_at=?, updated_at=? WHERE state=?"
        params: list[Any] = [READY, time.time(), time.time(), DEAD]
        if kind:
            sql += " AND kind=?"
            params.append(kind)
        if key_prefix:
            sql += f" AND {like(self.db, 'key')}"
            params.append(key_prefix + "%")
        with self.lock:
            return self.db.conn.execute(sql, params).rowcount

    def jobs(self, states: tuple[str, ...] | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Jobs, newest first, optionally only in some states."""
        sql = "SELECT id, kind, key, state, attempts, max_attempts, next_attempt_at, last_error, worker,"
        sql += " created_at, updated_at FROM jobs"
        params: list[Any] = []
        if states:
            sql += f" WHERE state IN ({','.join('?' for _ in states)})"
            params.extend(states)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        with self.lock:
            return list(self.db.query(sql, params))

    def pending_count(self, kinds: tuple[str, ...] | None = None) -> int:
        """Jobs not yet done or dead."""
        sql = "SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)"
        params: list[Any] = [READY, RUNNING]
        if kinds:
            sql += f" AND kind IN ({','.join('?' for _ in kinds)})"
            params.extend(kinds)
        with self.lock:
            return int(self.db.conn.execute(sql, params).fetchone()[0])

    def depths(self) -> dict[str, dict[str, int]]:
        """Jobs waiting and running, per kind: the queue depths ``harmonode status`` shows."""
        with self.lock:
            rows = self.db.conn.execute(
                "SELECT kind, state, COUNT(*) FROM jobs WHERE state IN (?, ?) GROUP BY kind, state", (READY, RUNNING)
            ).fetchall()
        out: dict[str, dict[str, int]] = {}
        for kind, state, n in rows:
            out.setdefault(str(kind), {str(READY): 0, str(RUNNING): 0})[str(state)] = int(n)
        return out

    def close(self) -> None:
        """Close the connection."""
        with self.lock:
            self.db.conn.close()
