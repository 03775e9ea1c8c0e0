"""The index: patients, studies, series and instances in SQLite (sqlite-utils, WAL), or PostgreSQL in a cluster.

The file store is the source of truth; the index is rebuilt from it at startup for any stored file it
lacks (``storage.recovery``). That is why commits use ``synchronous=NORMAL``: a commit lost to a power cut
is re-indexed from the fsynced file, never lost.

One connection is shared by the node's threads behind a lock; SQLite serializes writers anyway and the
statements here are short. On PostgreSQL (a ``postgresql://`` URL, ``storage.database``) the index is the
schema ``harmonode_index`` shared by every process of a cluster; ``transaction`` takes the schema's advisory
lock, so writers of all processes serialize as SQLite's do.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

from storage.database import Dialect, open_database
from storage.meta import (
    CONDITION_KEYWORDS,
    InstanceMeta,
    instance_meta_from_dataset,
    meta_as_dict,
)
from storage.schema import SCHEMA_VERSION, migrate


class SeriesState(StrEnum):
    """Where a series stands: receiving → complete (quiet period over) → processing → done | failed | skipped.

    A late instance puts a received series back to ``receiving``.
    """

    RECEIVING = "receiving"
    COMPLETE = "complete"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # not an image series: nothing to analyse


SERIES_RECEIVING = SeriesState.RECEIVING
SERIES_COMPLETE = SeriesState.COMPLETE
SERIES_PROCESSING = SeriesState.PROCESSING
SERIES_DONE = SeriesState.DONE
SERIES_FAILED = SeriesState.FAILED


class Origin(StrEnum):
    """Where an instance (and its series) came from."""

    RECEIVED = "received"  # from a peer (C-STORE, C-MOVE pull): the pipeline analyses it
    RESULT = "result"  # made by the node (SR, SC, GSPS, SEG, harmonized series): never analysed


class ConflictKind(StrEnum):
    """A disagreement between what arrived and what the index holds; recorded, shown, never overwritten."""

    PATIENT_DEMOGRAPHICS = "patient-demographics"  # same PatientID (and issuer), other name/birth date/sex
    STUDY_PATIENT = "study-patient"  # an instance names another patient than its study's first instances
    SOP_UID_ELSEWHERE = "sop-uid-elsewhere"  # a SOP Instance UID already held in another series or study
    SERIES_UID_ELSEWHERE = "series-uid-elsewhere"  # a Series Instance UID already held in another study


PATIENT_FIELDS = ("patient_name", "patient_birth_date", "patient_sex")


def patient_key(patient_id: str, issuer: str, study_uid: str) -> str:
    """The identity of a patient in the index: PatientID *and* its issuer.

    An empty PatientID identifies nobody: such a study is its own patient (keyed by its Study Instance
    UID), so two patients without an ID are never merged. A backslash cannot occur in either value (LO),
    so the key is unambiguous.
    """
    if patient_id.strip():
        return f"{issuer.strip()}\\{patient_id.strip()}"
    return f"\\study\\{study_uid}"


__all__ = [
    "CONDITION_KEYWORDS",
    "SCHEMA_VERSION",
    "ConflictKind",
    "Index",
    "InstanceMeta",
    "Origin",
    "SeriesState",
    "instance_meta_from_dataset",
    "meta_as_dict",
    "patient_key",
]


class Index:
    """The index of everything stored, shared by the node's services (a SQLite file or a PostgreSQL URL).

    An instance is identified by (study, series, SOP Instance UID) and version: the same SOP Instance UID
    arriving in another series or study is indexed there too (and the conflict recorded), so every
    acknowledged instance is found by the queries of its own study. Patient attributes are kept per study,
    from that study's own instances; the patient row (PatientID and issuer) keeps what it first saw.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.db = open_database(path, "index")
        self.lock = threading.RLock()
        conn = self.db.conn
        with self.lock:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("PRAGMA busy_timeout=30000")
            migrate(self.db)

    @property
    def dialect(self) -> Dialect:
        """``"sqlite"`` or ``"postgresql"``: which SQL the index speaks (the C-FIND matcher asks)."""
        return self.db.dialect

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A write transaction under the index lock (BEGIN IMMEDIATE … COMMIT, rolled back on error).

        Yields the connection (``sqlite3.Connection``, or ``storage.pgsql.PgConnection`` on PostgreSQL, whose
        BEGIN IMMEDIATE takes the index's advisory lock).
        """
        with self.lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def query(self, sql: str, params: Mapping[str, Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Run a read query and return rows as dicts."""
        with self.lock:
            return list(self.db.query(sql, params))

    # -- writing ------------------------------------------------------------------------------------
    def record_instance(
        self,
        meta: InstanceMeta,
        relpath: str,
        size: int,
        sha256: str,
        version: int,
        calling_ae: str = "",
        origin: Origin = Origin.RECEIVED,
        received_at: float | None = None,
    ) -> None:
        """Index one stored instance, creating or updating its patient, study and series, in one transaction.

        A new instance in a series that was already complete (or processed) reopens it: its state goes
        back to ``receiving`` so the quiet-period timer starts again. What disagrees with the index (another
        patient's demographics, a UID held elsewhere) is recorded as a conflict, never overwritten.
        """
        now = time.time() if received_at is None else received_at
        key = patient_key(meta.patient_id, meta.issuer_of_patient_id, meta.study_instance_uid)
        with self.transaction() as conn:
            self._upsert_patient(conn, meta, key, now)
            self._upsert_study(conn, meta, key, now)
            inserted = self._insert_instance(conn, meta, relpath, size, sha256, version, calling_ae, now)
            self._upsert_series(conn, meta, origin, inserted, now)

    def _conflict(self, conn: Any, kind: ConflictKind, meta: InstanceMeta, detail: str) -> None:
        """Record a conflict once per (kind, study, series, instance); ``detail`` names attributes, no values."""
        conn.execute(
            "INSERT OR IGNORE INTO conflicts (kind, study_instance_uid, series_instance_uid, sop_instance_uid,"
            " detail, created_at) VALUES (?,?,?,?,?,?)",
            (str(kind), meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid, detail, time.time()),
        )

    def _upsert_patient(self, conn: Any, meta: InstanceMeta, key: str, now: float) -> None:
        row = conn.execute(
            "SELECT patient_name, patient_birth_date, patient_sex FROM patients WHERE patient_key=?", (key,)
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO patients (patient_key, patient_id, issuer_of_patient_id, patient_name,"
                " patient_birth_date, patient_sex, updated_at) VALUES (?,?,?,?,?,?,?)",
                (key, meta.patient_id, meta.issuer_of_patient_id, *_patient_values(meta), now),
            )
            return
        differ = [f for f, old, new in zip(PATIENT_FIELDS, row, _patient_values(meta), strict=True) if old != new]
        if differ:
            self._conflict(conn, ConflictKind.PATIENT_DEMOGRAPHICS, meta, ",".join(differ))

    def _upsert_study(self, conn: Any, meta: InstanceMeta, key: str, now: float) -> None:
        row = conn.execute(
            "SELECT patient_key, patient_name, patient_birth_date, patient_sex, modalities FROM studies"
            " WHERE study_instance_uid=?",
            (meta.study_instance_uid,),
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO studies (study_instance_uid, patient_key, patient_id, issuer_of_patient_id,"
                " patient_name, patient_birth_date, patient_sex, study_date, study_time, accession_number,"
                " study_id, study_description, referring_physician_name, modalities, first_received_at,"
                " last_received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    meta.study_instance_uid,
                    key,
                    meta.patient_id,
                    meta.issuer_of_patient_id,
                    *_patient_values(meta),
                    meta.study_date,
                    meta.study_time,
                    meta.accession_number,
                    meta.study_id,
                    meta.study_description,
                    meta.referring_physician_name,
                    meta.modality,
                    now,
                    now,
                ),
            )
            return
        differ = ["patient_id"] if row[0] != key else []
        differ += [f for f, old, new in zip(PATIENT_FIELDS, row[1:4], _patient_values(meta), strict=True) if old != new]
        if differ:
            self._conflict(conn, ConflictKind.STUDY_PATIENT, meta, ",".join(differ))
        mods = set(filter(None, (row[4] or "").split("\\")))
        if meta.modality and meta.modality not in mods:
            mods.add(meta.modality)
        conn.execute(
            "UPDATE studies SET last_received_at=?, modalities=? WHERE study_instance_uid=?",
            (now, "\\".join(sorted(mods)), meta.study_instance_uid),
        )

    def _insert_instance(
        self,
        conn: Any,
        meta: InstanceMeta,
        relpath: str,
        size: int,
        sha256: str,
        version: int,
        calling_ae: str,
        now: float,
    ) -> bool:
        elsewhere = conn.execute(
            "SELECT 1 FROM instances WHERE sop_instance_uid=? AND (study_instance_uid!=? OR series_instance_uid!=?)"
            " LIMIT 1",
            (meta.sop_instance_uid, meta.study_instance_uid, meta.series_instance_uid),
        ).fetchone()
        inserted = conn.execute(
            "INSERT OR IGNORE INTO instances (study_instance_uid, series_instance_uid, sop_instance_uid, version,"
            " sop_class_uid, transfer_syntax_uid, instance_number, path, size, sha256, received_at, calling_ae,"
            " uid_elsewhere) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                meta.study_instance_uid,
                meta.series_instance_uid,
                meta.sop_instance_uid,
                version,
                meta.sop_class_uid,
                meta.transfer_syntax_uid,
                meta.instance_number,
                relpath,
                size,
                sha256,
                now,
                calling_ae,
                1 if elsewhere else 0,
            ),
        ).rowcount
        if inserted and elsewhere:
            self._conflict(conn, ConflictKind.SOP_UID_ELSEWHERE, meta, "sop_instance_uid")
        return bool(inserted)

    def _upsert_series(self, conn: Any, meta: InstanceMeta, origin: Origin, inserted: bool, now: float) -> None:
        row = conn.execute(
            "SELECT study_instance_uid FROM series WHERE series_instance_uid=?", (meta.series_instance_uid,)
        ).fetchone()
        if row is not None and row[0] != meta.study_instance_uid:
            self._conflict(conn, ConflictKind.SERIES_UID_ELSEWHERE, meta, "series_instance_uid")
        conn.execute(
            "INSERT INTO series (series_instance_uid, study_instance_uid, modality, series_number,"
            " series_description, series_date, body_part_examined, manufacturer, manufacturer_model_name,"
            " frame_of_reference_uid, condition_tags, origin, state, instance_count, first_received_at,"
            " last_received_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(series_instance_uid) DO UPDATE SET"
            " instance_count = series.instance_count + excluded.instance_count,"
            " last_received_at = excluded.last_received_at, updated_at = excluded.updated_at,"
            " state = CASE WHEN excluded.instance_count > 0 AND series.origin = 'received'"
            "   THEN 'receiving' ELSE series.state END",
            (
                meta.series_instance_uid,
                meta.study_instance_uid,
                meta.modality,
                meta.series_number,
                meta.series_description,
                meta.series_date,
                meta.body_part_examined,
                meta.manufacturer,
                meta.manufacturer_model_name,
                meta.frame_of_reference_uid,
                json.dumps(meta.extra, sort_keys=True),
                str(origin),
                str(SeriesState.RECEIVING if origin == Origin.RECEIVED else SeriesState.DONE),
                1 if inserted else 0,
                now,
                now,
                now,
            ),
        )

    def update_series(self, series_uid: str, **values: Any) -> None:
        """Set fields of a series row (JSON-encodes dicts and lists)."""
        encoded = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in values.items()}
        encoded["updated_at"] = time.time()
        with self.lock:
            self.db["series"].update(series_uid, encoded)

    # -- reading ------------------------------------------------------------------------------------
    def series(self, series_uid: str) -> dict[str, Any] | None:
        """One series row, or None."""
        rows = self.query("SELECT * FROM series WHERE series_instance_uid = ?", (series_uid,))
        return rows[0] if rows else None

    def study(self, study_uid: str) -> dict[str, Any] | None:
        """One study row joined with its patient, or None."""
        rows = self.query(
            "SELECT s.*, p.patient_name, p.patient_birth_date, p.patient_sex FROM studies s"
            " LEFT JOIN patients p ON p.patient_id = s.patient_id WHERE s.study_instance_uid = ?",
            (study_uid,),
        )
        return rows[0] if rows else None

    def instances_of_series(self, series_uid: str, latest_only: bool = True) -> list[dict[str, Any]]:
        """Instances of a series (the newest version of each SOP Instance UID by default)."""
        sql = "SELECT i.* FROM instances i WHERE series_instance_uid = ?"
        if latest_only:
            sql = (
                "SELECT i.* FROM instances i JOIN (SELECT sop_instance_uid, MAX(version) v FROM instances"
                " WHERE series_instance_uid = ? GROUP BY sop_instance_uid) m"
                " ON m.sop_instance_uid = i.sop_instance_uid AND m.v = i.version"
                " AND i.series_instance_uid = ?"
            )
        params = (series_uid, series_uid) if latest_only else (series_uid,)
        return self.query(sql + " ORDER BY i.instance_number, i.sop_instance_uid", params)

    def has_instance(self, study_uid: str, series_uid: str, sop_uid: str, version: int) -> bool:
        """True when this version of the instance is indexed in this study and series."""
        with self.lock:
            return (
                self.db.conn.execute(
                    "SELECT 1 FROM instances WHERE study_instance_uid=? AND series_instance_uid=?"
                    " AND sop_instance_uid=? AND version=?",
                    (study_uid, series_uid, sop_uid, version),
                ).fetchone()
                is not None
            )

    def versions(self, study_uid: str, series_uid: str, sop_uid: str) -> dict[str, int]:
        """The indexed versions of one instance, by sha256 of their bytes (an index lookup, not a scan)."""
        rows = self.query(
            "SELECT sha256, version FROM instances WHERE study_instance_uid=? AND series_instance_uid=?"
            " AND sop_instance_uid=?",
            (study_uid, series_uid, sop_uid),
        )
        return {r["sha256"]: r["version"] for r in rows}

    def conflicts(self) -> list[dict[str, Any]]:
        """Every recorded conflict, oldest first (UIDs and attribute names, never patient values)."""
        return self.query("SELECT * FROM conflicts ORDER BY id")

    def known_paths(self) -> set[str]:
        """Relative paths of every indexed file (startup recovery compares them with the disk)."""
        with self.lock:
            return {r[0] for r in self.db.conn.execute("SELECT path FROM instances")}

    def counts(self) -> dict[str, int]:
        """Number of patients, studies, series and instances."""
        with self.lock:
            return {t: self.db[t].count for t in ("patients", "studies", "series", "instances", "conflicts")}

    def status(self) -> dict[str, Any]:
        """Studies with their series (state, counts, condition key, rule, findings), for ``status``."""
        studies = self.query("SELECT * FROM studies ORDER BY first_received_at")
        series = self.query("SELECT * FROM series ORDER BY first_received_at")
        by_study: dict[str, list[dict[str, Any]]] = {}
        for s in series:
            for key in ("findings", "timings", "condition_tags"):
                if s.get(key):
                    try:
                        s[key] = json.loads(s[key])
                    except ValueError:
                        pass
            by_study.setdefault(s["study_instance_uid"], []).append(s)
        out = []
        for st in studies:
            out.append(
                {
                    "study_instance_uid": st["study_instance_uid"],
                    "study_date": st["study_date"],
                    "modalities": st["modalities"],
                    "series": [
                        {
                            "series_instance_uid": s["series_instance_uid"],
                            "modality": s["modality"],
                            "origin": s["origin"],
                            "state": s["state"],
                            "instance_count": s["instance_count"],
                            "condition_key": s["condition_key"],
                            "rule": s["rule_id"],
                            "rule_match": s["rule_match"],
                            "model_version": s["model_version"],
                            "findings": s["findings"] or [],
                            "timings": s["timings"] or {},
                            "error": s["error"],
                        }
                        for s in by_study.get(st["study_instance_uid"], [])
                    ],
                }
            )
        return {"studies": out}

    def close(self) -> None:
        """Close the connection."""
        with self.lock:
            self.db.conn.close()


def _patient_values(meta: InstanceMeta) -> tuple[str, str, str]:
    return meta.patient_name, meta.patient_birth_date, meta.patient_sex
