"""Storage commitment transactions (push model): what a peer asked the node to commit, and what it was told.

This module owns ``commitments.sqlite`` in the data directory: one row per transaction a peer's N-ACTION
asked for (``record_request``), kept until its N-EVENT-REPORT was answered. A transaction goes ``pending``
→ ``reported`` | back to ``pending`` with a later ``next_attempt_at`` (the peer was unreachable) →
``failed`` after ``max_attempts``. The file is written with ``synchronous=FULL``: unlike the index, a
transaction cannot be rebuilt from the file store, and a request the node acknowledged must get its report
even after a crash or a power cut.

``judge`` answers from the index: an instance is committed when the index holds it with the SOP class the
peer names and its file is in the store. The store writes, fsyncs and links a file before indexing it and
acknowledges a C-STORE only after both (``handlers.store``), so an indexed instance is on disk.

In a cluster the table lives in the schema ``harmonode_commitments`` of the cluster's PostgreSQL database
(``Commitments("postgresql://…")``, ``storage.database``); the SQL is the same.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

from storage.database import open_database
from storage.index import Index


class CommitmentState(StrEnum):
    """Where one transaction stands."""

    PENDING = "pending"  # acknowledged; its report is still to be delivered
    REPORTED = "reported"  # the peer answered the N-EVENT-REPORT
    FAILED = "failed"  # the report could not be delivered within ``max_attempts``


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) of a Failed SOP Sequence item (PS3.3 C.14.1.1)."""

    PROCESSING_FAILURE = 0x0110  # indexed, but its file is not in the store
    NO_SUCH_OBJECT_INSTANCE = 0x0112  # never stored here
    CLASS_INSTANCE_CONFLICT = 0x0119  # stored, with another SOP class than the peer names


class EventType(IntEnum):
    """Event Type ID of the storage commitment N-EVENT-REPORT (PS3.4 J.3.3)."""

    ALL_COMMITTED = 1  # storage commitment request successful
    SOME_FAILED = 2  # storage commitment request complete, failures exist


@dataclass(frozen=True)
class SopReference:
    """One instance a peer asks about: its SOP class and SOP instance UIDs."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Outcome:
    """The answer to one transaction: what is committed, and what failed with which reason."""

    committed: tuple[SopReference, ...]
    failed: tuple[tuple[SopReference, FailureReason], ...]

    @property
    def event_type(self) -> EventType:
        """1 when every instance is committed, 2 when any failed."""
        return EventType.SOME_FAILED if self.failed else EventType.ALL_COMMITTED


@dataclass(frozen=True)
class Transaction:
    """One storage commitment request and where its report stands."""

    transaction_uid: str
    calling_ae: str  # who asked (the report goes to this AE)
    address: str  # where the request came from
    references: tuple[SopReference, ...]
    state: CommitmentState
    attempts: int
    created_at: float
    last_error: str = ""


_SQL_CREATE = (
    "CREATE TABLE IF NOT EXISTS commitments (transaction_uid TEXT PRIMARY KEY, calling_ae TEXT NOT NULL,"
    " address TEXT NOT NULL, refs TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
    " next_attempt_at REAL NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,"
    " reported_at REAL, event_type INTEGER, failed_count INTEGER, via TEXT, last_error TEXT NOT NULL DEFAULT '')"
)


class Commitments:
    """The durable table of storage commitment transactions (one connection, behind a lock).

    Parameters
    ----------
    path
        The SQLite file (``<data_dir>/commitments.sqlite``), created when missing, or a ``postgresql://`` URL.
    max_attempts
        Deliveries of a report tried before the transaction is ``failed``.
    backoff_base_s, backoff_max_s
        The wait after a failed attempt doubles from ``backoff_base_s`` up to ``backoff_max_s``.
    """

    def __init__(
        self, path: str | Path, max_attempts: int = 20, backoff_base_s: float = 5.0, backoff_max_s: float = 600.0
    ) -> None:
        self.path = str(path)
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.lock = threading.Lock()
        self._db = open_database(path, "commitments")
        self._conn = self._db.conn
        with self.lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")  # a row cannot be rebuilt from the file store
            self._conn.execute(_SQL_CREATE)
            self._conn.execute("CREATE INDEX IF NOT EXISTS commitments_due ON commitments (state, next_attempt_at)")

    def record_request(
        self, transaction_uid: str, calling_ae: str, address: str, references: Sequence[SopReference]
    ) -> None:
        """Keep a transaction before its N-ACTION is answered; a repeated request is reported again.

        The same Transaction UID asked again (a retried N-ACTION whose response was lost) replaces the
        earlier request and makes it pending again, so the peer gets a report for what it asked last.
        """
        now = time.time()
        refs = json.dumps([[r.sop_class_uid, r.sop_instance_uid] for r in references])
        with self.lock:
            self._conn.execute(
                "INSERT INTO commitments (transaction_uid, calling_ae, address, refs, state, attempts,"
                " next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,0,?,?,?)"
                " ON CONFLICT(transaction_uid) DO UPDATE SET calling_ae=excluded.calling_ae,"
                " address=excluded.address, refs=excluded.refs, state=excluded.state, attempts=0,"
                " next_attempt_at=excluded.next_attempt_at, updated_at=excluded.updated_at, last_error=''",
                (transaction_uid, calling_ae, address, refs, str(CommitmentState.PENDING), now, now, now),
            )

    def due(self, now: float | None = None, limit: int = 20) -> list[Transaction]:
        """Pending transactions whose report may be tried now, oldest first."""
        now = time.time() if now is None else now
        with self.lock:
            rows = self._conn.execute(
                "SELECT * FROM commitments WHERE state=? AND next_attempt_at<=? ORDER BY created_at LIMIT ?",
                (str(CommitmentState.PENDING), now, limit),
            ).fetchall()
            names = [c[0] for c in self._conn.execute("SELECT * FROM commitments LIMIT 0").description]
        return [_transaction(dict(zip(names, row, strict=True))) for row in rows]

    def get(self, transaction_uid: str) -> dict[str, Any] | None:
        """One transaction's row as a dict (``refs`` decoded), or None."""
        with self.lock:
            cur = self._conn.execute("SELECT * FROM commitments WHERE transaction_uid=?", (transaction_uid,))
            row = cur.fetchone()
            names = [c[0] for c in cur.description]
        if row is None:
            return None
        record = dict(zip(names, row, strict=True))
        record["refs"] = json.loads(record["refs"])
        return record

    def reported(self, transaction_uid: str, outcome: Outcome, via: str) -> None:
        """Record that the peer answered the report (``via``: ``same-association`` | ``new-association``)."""
        now = time.time()
        with self.lock:
            self._conn.execute(
                "UPDATE commitments SET state=?, attempts=attempts+1, reported_at=?, updated_at=?, event_type=?,"
                " failed_count=?, via=?, last_error='' WHERE transaction_uid=?",
                (str(CommitmentState.REPORTED), now, now, int(outcome.event_type), len(outcome.failed), via,
                 transaction_uid),
            )  # fmt: skip

    def attempt_failed(self, transaction_uid: str, error: str) -> CommitmentState:
        """Record a failed delivery of the report: pending again after a backoff, or ``failed`` for good."""
        now = time.time()
        with self.lock:
            row = self._conn.execute(
                "SELECT attempts FROM commitments WHERE transaction_uid=?", (transaction_uid,)
            ).fetchone()
            attempts = (row[0] if row else 0) + 1
            state = CommitmentState.FAILED if attempts >= self.max_attempts else CommitmentState.PENDING
            wait = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempts - 1))
            self._conn.execute(
                "UPDATE commitments SET state=?, attempts=?, next_attempt_at=?, updated_at=?, last_error=?"
                " WHERE transaction_uid=?",
                (str(state), attempts, now + wait, now, error[:2000], transaction_uid),
            )
        return state

    def counts(self) -> dict[str, int]:
        """How many transactions are in each state."""
        with self.lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM commitments GROUP BY state").fetchall()
        return {str(s): 0 for s in CommitmentState} | {state: n for state, n in rows}

    def close(self) -> None:
        """Close the connection."""
        with self.lock:
            self._conn.close()


def _transaction(row: dict[str, Any]) -> Transaction:
    return Transaction(
        transaction_uid=row["transaction_uid"],
        calling_ae=row["calling_ae"],
        address=row["address"],
        references=tuple(SopReference(c, i) for c, i in json.loads(row["refs"])),
        state=CommitmentState(row["state"]),
        attempts=int(row["attempts"]),
        created_at=float(row["created_at"]),
        last_error=row["last_error"] or "",
    )


_CHUNK = 500  # SQLite's host parameters per statement stay well under its limit


def judge(index: Index, references: Iterable[SopReference], stored: Callable[[str], bool]) -> Outcome:
    """Which of ``references`` the node has committed, answered from the index.

    Parameters
    ----------
    index
        The node's index.
    references
        The instances a peer asks about.
    stored
        Whether an indexed relative path is in the file store (``lambda p: files.abspath(p).is_file()``).

    Returns
    -------
    Outcome
        Committed: indexed with the SOP class named and its file present. Failed: never indexed (0x0112),
        indexed with another SOP class (0x0119), or indexed but its file gone (0x0110).
    """
    refs = list(references)
    held: dict[str, list[tuple[str, str]]] = {}
    uids = sorted({r.sop_instance_uid for r in refs})
    for start in range(0, len(uids), _CHUNK):
        chunk = uids[start : start + _CHUNK]
        marks = ",".join("?" for _ in chunk)
        for row in index.query(
            f"SELECT sop_instance_uid, sop_class_uid, path FROM instances WHERE sop_instance_uid IN ({marks})",
            tuple(chunk),
        ):
            held.setdefault(row["sop_instance_uid"], []).append((row["sop_class_uid"], row["path"]))
    committed: list[SopReference] = []
    failed: list[tuple[SopReference, FailureReason]] = []
    for ref in refs:
        copies = held.get(ref.sop_instance_uid, [])
        paths = [path for sop_class, path in copies if sop_class == ref.sop_class_uid]
        if not copies:
            failed.append((ref, FailureReason.NO_SUCH_OBJECT_INSTANCE))
        elif not paths:
            failed.append((ref, FailureReason.CLASS_INSTANCE_CONFLICT))
        elif not any(stored(path) for path in paths):
            failed.append((ref, FailureReason.PROCESSING_FAILURE))
        else:
            committed.append(ref)
    return Outcome(tuple(committed), tuple(failed))
