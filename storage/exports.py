"""Export records (seed 004, claims 3 and 13) and the durable queue that carries them to the learning side.

An export record holds the finding's feature vector (compressed: float16 then zlib, base64 in the JSON), the
recognition result (class, probability, diameter), the changed result when a radiologist changed it, the
reliability, the model version and the imaging condition key — and nothing else: no patient or study
identifier, no UID, no date, no coordinate, no pixel (``build_record`` is the only place one is made, and it
is given nothing else). The ``exports`` table keeps each record (``record_id`` is a random token, linked to
nothing outside this node) with the finding it came from, which stays here.

Delivery rides the node's durable job queue (``storage.queue``): one ``export`` job per record and target
(``folder``: ``[learning] export_dir``; ``server``: ``[learning] learning_server``), retried with backoff,
dead-lettered after its attempts, safe to run twice (a file is named by its record, a POST carries the
record id as its ``Idempotency-Key``). ``write_record_file`` is the folder's atomic write.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.database import Database
from storage.queue import JobKind

if TYPE_CHECKING:  # the index's schema creates this module's table: no import at run time
    from storage.index import Index
    from storage.queue import JobQueue

RECORD_FORMAT = "harmonode-export/1"
#: The only keys a record has (the privacy contract: tests check every record against it).
RECORD_KEYS = frozenset(
    {
        "format",
        "trigger",
        "features",
        "feature_codec",
        "feature_length",
        "result",
        "changed",
        "reliability",
        "model_version",
        "condition_key",
    }
)


class ExportTarget(StrEnum):
    """Where export records go."""

    FOLDER = "folder"
    SERVER = "server"


class ExportTrigger(StrEnum):
    """Why a record was made."""

    LOW_RELIABILITY = "low-reliability"  # claim 7: the recognition's reliability is under the threshold
    FEEDBACK = "feedback"  # claim 10: a radiologist assessed (accepted, rejected, changed) the result


@dataclass(frozen=True)
class ExportSettings:
    """The ``[learning]`` keys the export side reads (``node.config`` builds it)."""

    export_dir: str = ""
    learning_server: str = ""
    token: str = ""
    reliability_threshold: float = 0.3
    timeout_s: float = 10.0

    @property
    def targets(self) -> tuple[ExportTarget, ...]:
        """The configured targets (none: records are kept in the index only)."""
        out = []
        if self.export_dir:
            out.append(ExportTarget.FOLDER)
        if self.learning_server:
            out.append(ExportTarget.SERVER)
        return tuple(out)


def create_table(db: Database) -> None:
    """Create the ``exports`` table where missing (an older index gains it as it opens)."""
    db["exports"].create(
        {
            "record_id": str,
            "origin": str,  # what made it, once: "<finding>:detected" or "<finding>:feedback:<row>" (local only)
            "finding_id": str,  # local only: never in the record
            "trigger": str,
            "body": str,  # the record, JSON
            "created_at": float,
        },
        pk="record_id",
        if_not_exists=True,
    )
    db["exports"].create_index(["origin"], unique=True, if_not_exists=True)


def build_record(
    trigger: ExportTrigger,
    features: bytes,
    feature_length: int,
    feature_codec: str,
    result: Mapping[str, Any],
    changed: Mapping[str, Any] | None,
    reliability: float,
    model_version: str,
    condition_key: str,
) -> dict[str, Any]:
    """The export record of one finding: the listed fields and nothing else.

    Parameters
    ----------
    trigger
        Why it is exported.
    features, feature_length, feature_codec
        The compressed feature vector, its length and how it was compressed.
    result
        The recognition result: ``kind``, ``probability``, ``diameter_mm`` (other keys are dropped).
    changed
        The radiologist's result: ``assessment`` (accepted, rejected, modified), ``kind``, ``diameter_mm``;
        None when nobody changed it (other keys are dropped: a changed centre is a coordinate).
    reliability, model_version, condition_key
        As the finding has them.

    Returns
    -------
    dict
        JSON-ready, with exactly the keys of ``RECORD_KEYS``.
    """
    kept_result = {k: result[k] for k in ("kind", "probability", "diameter_mm") if k in result}
    kept_changed = None
    if changed is not None:
        kept_changed = {k: changed[k] for k in ("assessment", "kind", "diameter_mm") if k in changed}
    return {
        "format": RECORD_FORMAT,
        "trigger": str(trigger),
        "features": base64.b64encode(features).decode("ascii"),
        "feature_codec": feature_codec,
        "feature_length": int(feature_length),
        "result": kept_result,
        "changed": kept_changed,
        "reliability": round(float(reliability), 4),
        "model_version": model_version,
        "condition_key": condition_key,
    }


def record_features(record: Mapping[str, Any]) -> bytes:
    """The compressed feature bytes of a record."""
    return base64.b64decode(str(record["features"]))


def add_export(
    index: Index,
    queue: JobQueue,
    settings: ExportSettings,
    record: Mapping[str, Any],
    finding_id: str,
    origin: str,
) -> str | None:
    """Keep an export record and queue one ``export`` job per configured target; once per ``origin``.

    Returns
    -------
    str or None
        The new record's id; None when this origin made its record before (a rerun, a job run twice).
    """
    if set(record) != RECORD_KEYS:
        raise ValueError(f"an export record has exactly the keys {sorted(RECORD_KEYS)}, not {sorted(record)}")
    record_id = secrets.token_hex(16)
    with index.transaction() as conn:
        changed = conn.execute(
            "INSERT INTO exports (record_id, origin, finding_id, trigger, body, created_at) VALUES (?,?,?,?,?,?)"
            " ON CONFLICT(origin) DO NOTHING",
            (record_id, origin, finding_id, str(record["trigger"]), json.dumps(record, sort_keys=True), time.time()),
        ).rowcount
    if not changed:
        return None
    for target in settings.targets:
        payload = {"record_id": record_id, "target": str(target)}
        queue.enqueue(JobKind.EXPORT, f"{target}:{record_id}", payload)
    return record_id


def export_body(index: Index, record_id: str) -> bytes | None:
    """The stored record as the bytes a target receives (None when there is no such record)."""
    rows = index.query("SELECT body FROM exports WHERE record_id=?", (record_id,))
    return rows[0]["body"].encode("utf-8") if rows else None


def exports_status(index: Index, queue: JobQueue) -> dict[str, Any]:
    """Records kept per trigger, and export jobs per target and state, for ``status --json``."""
    kept = {r["trigger"]: r["n"] for r in index.query("SELECT trigger, COUNT(*) n FROM exports GROUP BY trigger")}
    position = "strpos" if queue.db.dialect == "postgresql" else "instr"  # the same function, named twice
    with queue.lock:
        rows = queue.db.conn.execute(
            f"SELECT substr(key, 1, {position}(key, ':') - 1), state, COUNT(*) FROM jobs WHERE kind=? GROUP BY 1, 2",
            (str(JobKind.EXPORT),),
        ).fetchall()
    targets: dict[str, dict[str, int]] = {}
    for target, state, n in rows:
        targets.setdefault(target, {})[state] = n
    return {"records": kept, "targets": targets}


def write_record_file(folder: str | Path, record_id: str, body: bytes, fsync: bool = True) -> Path:
    """Write one record to ``folder/<record_id>.json`` atomically (temp file, fsync, rename, fsync the folder).

    Writing the same record again replaces it with the same bytes (a job run twice leaves one file).

    Raises
    ------
    ValueError
        A record id that is not a hex token (it becomes a file name).
    OSError
        The folder cannot be written.
    """
    if not record_id or any(c not in "0123456789abcdef" for c in record_id):
        raise ValueError(f"not a record id: {record_id!r}")
    target_dir = Path(folder)
    target_dir.mkdir(parents=True, exist_ok=True)
    final = target_dir / f"{record_id}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{record_id}.", suffix=".tmp", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        dir_fd = os.open(target_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return final
