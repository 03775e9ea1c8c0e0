"""Delivery of result objects to the configured destinations: C-STORE SCU from the durable queue.

One ``send`` job per (destination, object): key ``"<destination name>:<SOP Instance UID>"``, payload the
result record plus ``"destination"``. A job proposes only the SOP class and transfer syntax of its
object, reads the stored file and sends it. A peer that is down or answers a failure raises
``RetryLater``: the queue retries with exponential backoff and dead-letters the job after its maximum
attempts; ``retry_dead_deliveries`` (``harmonode resend``) brings dead ones back.

The per-destination state of every object lives in the index table ``deliveries``
(``pending`` → ``sent`` | ``failed`` (will be retried) → ``dead``), read by ``delivery_status``.
"""

from __future__ import annotations

import io
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pynetdicom import AE, evt

from node.config import Destination
from storage.index import Index, instance_meta_from_dataset
from storage.queue import DONE as JOB_DONE
from storage.queue import READY as JOB_READY
from storage.queue import RUNNING as JOB_RUNNING
from storage.queue import SEND, GiveUp, Job, JobQueue, RetryLater

if TYPE_CHECKING:
    from node.app import Node
    from storage.files import FileStore

log = logging.getLogger(__name__)

PENDING = "pending"
SENT = "sent"
FAILED = "failed"
DEAD = "dead"
DELIVERY_STATES = (PENDING, SENT, FAILED, DEAD)

RESULT_FIELDS = ("path", "sop_class_uid", "sop_instance_uid", "series_instance_uid", "transfer_syntax_uid")
# C-STORE statuses that mean "stored": success and the three warnings of PS3.4 B.2.3.
STORED_STATUSES = (0x0000, 0xB000, 0xB006, 0xB007)


class DeliveryError(RetryLater):
    """The destination refused the association or the object; the queue will try again later."""


# -- the deliveries table ----------------------------------------------------------------------------
def ensure_deliveries_table(index: Index) -> None:
    """Create the ``deliveries`` table in the node's index if it is not there."""
    with index.lock:
        index.db["deliveries"].create(
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
        index.db["deliveries"].create_index(["state"], if_not_exists=True)


def _set_delivery(index: Index, payload: dict[str, Any], state: str, attempts: int = 0, error: str = "") -> None:
    now = time.time()
    with index.transaction() as conn:
        conn.execute(
            "INSERT INTO deliveries (destination, sop_instance_uid, sop_class_uid, series_instance_uid, state,"
            " attempts, last_error, created_at, updated_at, sent_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(destination, sop_instance_uid) DO UPDATE SET state=excluded.state,"
            " attempts=excluded.attempts, last_error=excluded.last_error, updated_at=excluded.updated_at,"
            " sent_at=excluded.sent_at",
            (
                payload["destination"],
                payload["sop_instance_uid"],
                payload.get("sop_class_uid", ""),
                payload.get("series_instance_uid", ""),
                state,
                attempts,
                error[:2000],
                now,
                now,
                now if state == SENT else 0.0,
            ),
        )


def _delivery_state(index: Index, destination: str, sop_uid: str) -> str | None:
    rows = index.query(
        "SELECT state FROM deliveries WHERE destination=? AND sop_instance_uid=?", (destination, sop_uid)
    )
    return rows[0]["state"] if rows else None


def deliveries(index: Index, states: Sequence[str] = (), destination: str = "") -> list[dict[str, Any]]:
    """Delivery rows (one per destination and object), newest first, optionally filtered."""
    ensure_deliveries_table(index)
    sql, params = "SELECT * FROM deliveries WHERE 1=1", []
    if states:
        sql += f" AND state IN ({','.join('?' for _ in states)})"
        params.extend(states)
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
    ensure_deliveries_table(index)
    out: dict[str, dict[str, Any]] = {}
    for row in index.query("SELECT destination, state, COUNT(*) n FROM deliveries GROUP BY destination, state"):
        entry = out.setdefault(
            row["destination"], {"destination": row["destination"], **dict.fromkeys(DELIVERY_STATES, 0)}
        )
        entry[row["state"]] = row["n"]
    for name, entry in out.items():
        rows = index.query(
            "SELECT last_error FROM deliveries WHERE destination=? AND last_error != ''"
            " AND state IN (?, ?) ORDER BY updated_at DESC LIMIT 1",
            (name, FAILED, DEAD),
        )
        entry["last_error"] = rows[0]["last_error"] if rows else ""
    return [out[name] for name in sorted(out)]


# -- enqueueing --------------------------------------------------------------------------------------
def store_results(files: FileStore, index: Index, datasets: Iterable[Dataset]) -> list[dict[str, str]]:
    """Keep result objects in the node's own store and index (origin ``result``); return their records.

    Parameters
    ----------
    files, index
        The node's file store and index.
    datasets
        Result objects (``handlers.results.build_results``).

    Returns
    -------
    list[dict]
        One record per object, as ``enqueue_deliveries`` takes them (``path`` relative to the store).
    """
    records = []
    for ds in datasets:
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        stored = files.write_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buffer.getvalue())
        if not stored.duplicate:
            meta = instance_meta_from_dataset(ds, ts)
            index.record_instance(meta, stored.relpath, stored.size, stored.sha256, stored.version, origin="result")
        records.append(
            {
                "path": stored.relpath,
                "sop_class_uid": str(ds.SOPClassUID),
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "transfer_syntax_uid": ts,
            }
        )
    return records


def _existing_job_state(queue: JobQueue, key: str) -> str | None:
    with queue.lock:
        row = queue.db.conn.execute(
            "SELECT state FROM jobs WHERE kind=? AND key=? ORDER BY"
            " CASE state WHEN ? THEN 0 WHEN ? THEN 1 WHEN ? THEN 2 ELSE 3 END LIMIT 1",
            (SEND, key, JOB_DONE, JOB_RUNNING, JOB_READY),
        ).fetchone()
    return row[0] if row else None


def enqueue_deliveries(
    queue: JobQueue,
    destinations: Sequence[Destination],
    results: Sequence[dict[str, str]],
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
        Configured destinations; those with ``send_results=False`` are skipped.
    results
        Records with ``path``, ``sop_class_uid``, ``sop_instance_uid``, ``series_instance_uid`` and
        ``transfer_syntax_uid`` (``store_results`` returns them).
    index
        When given, each new delivery is recorded there as ``pending`` at once (else at its first attempt).

    Returns
    -------
    int
        How many jobs were queued.

    Raises
    ------
    ValueError
        A result record lacks one of the fields above.
    """
    if index is not None:
        ensure_deliveries_table(index)
    queued = 0
    for result in results:
        missing = [f for f in RESULT_FIELDS if not result.get(f)]
        if missing:
            raise ValueError(f"result record lacks {missing}")
        for dest in destinations:
            if not dest.send_results:
                continue
            key = f"{dest.name}:{result['sop_instance_uid']}"
            if _existing_job_state(queue, key) is not None:
                continue
            payload = {**{f: result[f] for f in RESULT_FIELDS}, "destination": dest.name}
            queue.enqueue(SEND, key, payload)
            if index is not None:
                _set_delivery(index, payload, PENDING)
            queued += 1
    if queued:
        log.info("queued %d delivery job(s) to %d destination(s)", queued, len(destinations))
    return queued


def retry_dead_deliveries(queue: JobQueue, index: Index, destination: str = "") -> int:
    """Bring dead deliveries back (``harmonode resend``): the jobs to ``ready``, the rows to ``pending``."""
    ensure_deliveries_table(index)
    n = queue.retry_dead(kind=SEND, key_prefix=f"{destination}:" if destination else "")
    sql, params = "UPDATE deliveries SET state=?, attempts=0, updated_at=? WHERE state=?", [PENDING, time.time(), DEAD]
    if destination:
        sql += " AND destination=?"
        params.append(destination)
    with index.transaction() as conn:
        conn.execute(sql, params)
    if n:
        log.info("%d dead delivery job(s) queued again", n)
    return n


# -- sending -----------------------------------------------------------------------------------------
def _nodelay(event: evt.Event) -> None:
    """Turn Nagle off on the association socket (a 40 ms stall per PDU otherwise)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _destination(node: Node, name: str) -> Destination:
    for dest in node.config.destinations:
        if dest.name == name:
            return dest
    raise GiveUp(f"destination {name!r} is not configured")


def c_store(
    path: Path, sop_class_uid: str, transfer_syntax_uid: str, dest: Destination, calling_ae: str, timeout: float = 30.0
) -> None:
    """Send one Part 10 file to ``dest`` over a new association proposing only its SOP class and syntax.

    Raises
    ------
    DeliveryError
        The association failed or was rejected, or the peer answered no or a failure status.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(sop_class_uid, [transfer_syntax_uid])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "peer unreachable or aborted"
        raise DeliveryError(f"association with {dest.ae_title}@{dest.host}:{dest.port} failed ({why})")
    try:
        status = assoc.send_c_store(path)  # the stored file as encoded, no decode/re-encode
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None) if status else None
    if code is None:
        raise DeliveryError(f"{dest.name}: no C-STORE response (association aborted or timed out)")
    if int(code) not in STORED_STATUSES:
        raise DeliveryError(f"{dest.name}: C-STORE failed with status 0x{int(code):04X}")


def send_job_payload(node: Node, job: Job) -> None:
    """Deliver one result object to one destination (the ``send`` job); safe to run twice.

    Parameters
    ----------
    node
        The node (config, file store, index).
    job
        A claimed ``send`` job whose payload is a result record plus ``destination``.

    Raises
    ------
    RetryLater
        The destination is down, refused the association or answered a failure status.
    GiveUp
        The destination is no longer configured or the stored file is gone.
    """
    payload = job.payload
    ensure_deliveries_table(node.index)
    dest = _destination(node, str(payload.get("destination", "")))
    sop_uid = str(payload["sop_instance_uid"])
    if _delivery_state(node.index, dest.name, sop_uid) == SENT:
        log.info("job %d: %s already delivered to %s", job.id, sop_uid, dest.name)
        return
    path = Path(payload["path"])
    if not path.is_absolute():
        path = node.files.abspath(str(payload["path"]))
    if not path.is_file():
        _set_delivery(node.index, payload, DEAD, job.attempts, f"stored file {payload['path']} is missing")
        raise GiveUp(f"stored file {payload['path']} is missing")
    try:
        c_store(path, payload["sop_class_uid"], payload["transfer_syntax_uid"], dest, node.config.node.ae_title)
    except DeliveryError as exc:
        state = DEAD if job.attempts >= job.max_attempts else FAILED
        _set_delivery(node.index, payload, state, job.attempts, str(exc))
        log.warning("delivery to %s failed (attempt %d/%d): %s", dest.name, job.attempts, job.max_attempts, exc)
        raise
    except Exception as exc:  # a malformed file, a bug: recorded, then retried by the queue
        state = DEAD if job.attempts >= job.max_attempts else FAILED
        _set_delivery(node.index, payload, state, job.attempts, f"{type(exc).__name__}: {exc}")
        raise
    _set_delivery(node.index, payload, SENT, job.attempts)
    log.info("delivered %s to %s (attempt %d)", sop_uid, dest.name, job.attempts)


__all__ = [
    "DELIVERY_STATES",
    "DeliveryError",
    "delivery_status",
    "deliveries",
    "enqueue_deliveries",
    "retry_dead_deliveries",
    "send_job_payload",
    "store_results",
]
