"""The deliveries table: the state of every result object at every destination, and the queue it feeds.

This module owns the ``deliveries`` table (created once, when the store opens: ``create_table``) and the
``send`` jobs that fill it. One ``send`` job per (destination, object): key ``"<destination name>:<SOP
Instance UID>"``, payload a ``SendPayload``. A row goes ``pending`` → ``sent`` | ``failed`` (the queue will
retry) → ``dead`` (dead-lettered; ``retry_dead_deliveries`` — ``harmonode resend`` — brings it back).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from storage.database import Database
from storage.files import FileStore
from storage.index import Index, Origin, instance_meta_from_dataset
from storage.queue import JobKind, JobQueue, JobState

log = logging.getLogger(__name__)


class DeliveryState(StrEnum):
    """Where one result object stands at one destination."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # will be retried
    DEAD = "dead"  # dead-lettered


DELIVERY_STATES = tuple(DeliveryState)
PENDING, SENT, FAILED, DEAD = DELIVERY_STATES


@dataclass(frozen=True)
class StoredResult:
    """A result object kept in the node's own store: what a delivery needs to send it as stored."""

    path: str  # relative to the file store
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str

    def __post_init__(self) -> None:
        missing = [name for name, value in asdict(self).items() if not value]
        if missing:
            raise ValueError(f"result record lacks {missing}")

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StoredResult:
        """The result named by a record with the five fields (extra keys are ignored)."""
        return cls(**{name: str(record.get(name) or "") for name in cls.__dataclass_fields__})

    def as_dict(self) -> dict[str, str]:
        """The record as JSON-ready fields."""
        return asdict(self)


@dataclass(frozen=True)
class SendPayload:
    """The payload of one ``send`` job: one stored result object for one destination."""

    destination: str
    result: StoredResult

    @property
    def key(self) -> str:
        """The job key: one job per destination and object."""
        return f"{self.destination}:{self.result.sop_instance_uid}"

    def to_json(self) -> dict[str, str]:
        """The payload as stored in the queue (flat, as earlier versions stored it)."""
        return {**self.result.as_dict(), "destination": self.destination}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> SendPayload:
        """Read a stored payload back.

        Raises
        ------
        ValueError
            The payload lacks the destination or a field of the result.
        """
        destination = str(payload.get("destination") or "")
        if not destination:
            raise ValueError("send payload names no destination")
        return cls(destination, StoredResult.from_dict(payload))


# -- the table ---------------------------------------------------------------------------------------
def create_table(db: Database) -> None:
    """Create the ``deliveries`` table and its index if they are not there (called once per open store)."""
    db["deliveries"].create(
        {
            "destination": str,
            "sop_instance_uid": str,
            "sop_class_uid": str,
            "series_instance_uid": str,
            "state": str,
            "attempts": int,
            "last_error": str,
            "created_at": float,
            "updated_at": float,
            "sent_at": float,
        },
        pk=("destination", "sop_instance_uid"),
        if_not_exists=True,
    )
    db["deliveries"].create_index(["state"], if_not_exists=True)


def set_delivery(index: Index, payload: SendPayload, state: DeliveryState, attempts: int = 0, error: str = "") -> None:
    """Record the state of one delivery (insert or update its row)."""
    now = time.time()
    result = payload.result
    with index.transaction() as conn:
        conn.execute(
            "INSERT INTO deliveries (destination, sop_instance_uid, sop_class_uid, series_instance_uid, state,"
            " attempts, last_error, created_at, updated_at, sent_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(destination, sop_instance_uid) DO UPDATE SET state=excluded.state,"
            " attempts=excluded.attempts, last_error=excluded.last_error, updated_at=excluded.updated_at,"
            " sent_at=excluded.sent_at",
            (
                payload.destination,
                result.sop_instance_uid,
                result.sop_class_uid,
                result.series_instance_uid,
                str(state),
                attempts,
                error[:2000],
                now,
                now,
                now if state == DeliveryState.SENT else 0.0,
            ),
        )


def delivery_state(index: Index, destination: str, sop_uid: str) -> DeliveryState | None:
    """The state of one object at one destination (None when it was never queued there)."""
    rows = index.query(
        "SELECT state FROM deliveries WHERE destination=? AND sop_instance_uid=?", (destination, sop_uid)
    )
    return DeliveryState(rows[0]["state"]) if rows else None


def deliveries(index: Index, states: Sequence[str] = (), destination: str = "") -> list[dict[str, Any]]:
    """Delivery rows (one per destination and object), newest first, optionally filtered."""
    sql, params = "SELECT * FROM deliveries WHERE 1=1", []
    if states:
        sql += f" AND state IN ({','.join('?' for _ in states)})"
        params.extend(str(s) for s in states)
    if destination:
        sql += " AND destination=?"
        params.append(destination)
    return index.query(sql + " ORDER BY updated_at DESC", tuple(params))


def delivery_status(index: Index) -> list[dict[str, Any]]:
    """Per destination: how many objects are pending, sent, failed (retrying) and dead, and the last error.

    Parameters
    ----------
    index
        The node's index.

    Returns
    -------
    list[dict]
        ``{"destination", "pending", "sent", "failed", "dead", "last_error"}`` per destination, by name.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in index.query("SELECT destination, state, COUNT(*) n FROM deliveries GROUP BY destination, state"):
        entry = out.setdefault(
            row["destination"], {"destination": row["destination"], **{str(s): 0 for s in DeliveryState}}
        )
        entry[row["state"]] = row["n"]
    for name, entry in out.items():
        rows = index.query(
            "SELECT last_error FROM deliveries WHERE destination=? AND last_error != ''"
            " AND state IN (?, ?) ORDER BY updated_at DESC LIMIT 1",
            (name, str(DeliveryState.FAILED), str(DeliveryState.DEAD)),
        )
        entry["last_error"] = rows[0]["last_error"] if rows else ""
    return [out[name] for name in sorted(out)]


# -- keeping results and queueing them ---------------------------------------------------------------
def store_results(files: FileStore, index: Index, datasets: Iterable[Dataset]) -> list[StoredResult]:
    """Keep result objects in the node's own store (its results tree) and index (origin ``result``).

    Parameters
    ----------
    files, index
        The node's file store and index.
    datasets
        Result objects (``handlers.results.build_results``).

    Returns
    -------
    list[StoredResult]
        One record per object, as ``enqueue_deliveries`` takes them (``path`` relative to the store).
    """
    records = []
    for ds in datasets:
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        stored = files.write_result(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buffer.getvalue())
        if not stored.duplicate:
            meta = instance_meta_from_dataset(ds, ts)
            index.record_instance(
                meta, stored.relpath, stored.size, stored.sha256, stored.version, origin=Origin.RESULT
            )
        records.append(
            StoredResult(stored.relpath, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), ts)
        )
    return records


def _existing_job_state(queue: JobQueue, key: str) -> str | None:
    with queue.lock:
        row = queue.db.conn.execute(
            "SELECT state FROM jobs WHERE kind=? AND key=? ORDER BY"
            " CASE state WHEN ? THEN 0 WHEN ? THEN 1 WHEN ? THEN 2 ELSE 3 END LIMIT 1",
            (str(JobKind.SEND), key, str(JobState.DONE), str(JobState.RUNNING), str(JobState.READY)),
        ).fetchone()
    return row[0] if row else None


def enqueue_deliveries(
    queue: JobQueue,
    destinations: Sequence[str],
    results: Sequence[StoredResult | dict[str, Any]],
    index: Index | None = None,
) -> int:
    """Queue one ``send`` job per destination and result object, each object at most once per destination.

    An object already queued, sent or dead-lettered for a destination is not queued again (a dead one
    comes back only through ``retry_dead_deliveries``).

    Parameters
    ----------
    queue
        The node's durable queue.
    destinations
        Names of the destinations to send to.
    results
        ``StoredResult`` records (``store_results`` returns them) or dicts with their five fields.
    index
        When given, each new delivery is recorded there as ``pending`` at once (else at its first attempt).

    Returns
    -------
    int
        How many jobs were queued.

    Raises
    ------
    ValueError
        A result record lacks one of the fields.
    """
    records = [r if isinstance(r, StoredResult) else StoredResult.from_dict(r) for r in results]
    queued = 0
    for record in records:
        for name in destinations:
            payload = SendPayload(name, record)
            if _existing_job_state(queue, payload.key) is not None:
                continue
            queue.enqueue(JobKind.SEND, payload.key, payload.to_json())
            if index is not None:
                set_delivery(index, payload, DeliveryState.PENDING)
            queued += 1
    if queued:
        log.info("queued %d delivery job(s) to %d destination(s)", queued, len(destinations))
    return queued


def retry_dead_deliveries(queue: JobQueue, index: Index, destination: str = "") -> int:
    """Bring dead deliveries back (``harmonode resend``): the jobs to ``ready``, the rows to ``pending``."""
    n = queue.retry_dead(kind=JobKind.SEND, key_prefix=f"{destination}:" if destination else "")
    sql = "UPDATE deliveries SET state=?, attempts=0, updated_at=? WHERE state=?"
    params: list[Any] = [str(DeliveryState.PENDING), time.time(), str(DeliveryState.DEAD)]
    if destination:
        sql += " AND destination=?"
        params.append(destination)
    with index.transaction() as conn:
        conn.execute(sql, params)
    if n:
        log.info("%d dead delivery job(s) queued again", n)
    return n
