"""The index: patients, studies, series and instances in SQLite (sqlite-utils, WAL).

The file store is the source of truth; the index is rebuilt from it at startup for any stored file it
lacks (``storage.recovery``). That is why commits use ``synchronous=NORMAL``: a commit lost to a power cut
is re-indexed from the fsynced file, never lost.

One connection is shared by the node's threads behind a lock; SQLite serializes writers anyway and the
statements here are short.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlite_utils
from pydicom.dataset import Dataset

SCHEMA_VERSION = 1



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


def _text(ds: Dataset, keyword: str) -> str:
    """A header value as plain text ('' when absent); multi-valued joined with '\\' as on the wire."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element must not stop indexing of the others
        return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:
        return None


@dataclass(frozen=True)
class InstanceMeta:
    """What the index keeps of one instance's header (everything C-FIND and the pipeline need)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str = ""
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    series_date: str = ""
    body_part_examined: str = ""
    manufacturer: str = ""
    manufacturer_model_name: str = ""
    instance_number: int | None = None
    frame_of_reference_uid: str = ""
    extra: dict[str, str] = field(default_factory=dict)


# Header tags that end up in ``series.condition_tags``, for the imaging-condition key (rules/keys.py).
CONDITION_KEYWORDS = (
    "Manufacturer",
    "ManufacturerModelName",
    "ConvolutionKernel",
    "KVP",
    "CTDIvol",
    "Exposure",
    "XRayTubeCurrent",
    "ExposureTime",
    "MagneticFieldStrength",
    "ScanningSequence",
    "SequenceVariant",
    "SequenceName",
    "MRAcquisitionType",
    "ImageType",
    "SliceThickness",
    "BodyPartExamined",
)


def instance_meta_from_dataset(ds: Dataset, transfer_syntax_uid: str = "") -> InstanceMeta:
    """Read the indexed attributes from a (header-only) dataset; UIDs are returned as found, unvalidated."""
    return InstanceMeta(
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        transfer_syntax_uid=transfer_syntax_uid,
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        study_id=_text(ds, "StudyID"),
        study_description=_text(ds, "StudyDescription"),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        modality=_text(ds, "Modality"),
        series_number=_int_or_none(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        series_date=_text(ds, "SeriesDate"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        manufacturer=_text(ds, "Manufacturer"),
        manufacturer_model_name=_text(ds, "ManufacturerModelName"),
        instance_number=_int_or_none(ds, "InstanceNumber"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        extra={k: _text(ds, k) for k in CONDITION_KEYWORDS if k in ds},
    )


class Index:
    """The SQLite index of everything stored, shared by the node's services."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.lock = threading.RLock()
        with self.lock:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("PRAGMA busy_timeout=30000")
            self._create_schema()

    # -- schema -------------------------------------------------------------------------------------
    def _create_schema(self) -> None:
        """Create the index's tables and indexes where missing.

        Long because it is the schema itself, one table after another.
        """
        db = self.db
        db["patients"].create(
            {
                "patient_id": str,
                "patient_name": str,
                "patient_birth_date": str,
                "patient_sex": str,
                "updated_at": float,
            },
            pk="patient_id",
            if_not_exists=True,
        )
        db["studies"].create(
            {
                "study_instance_uid": str,
                "patient_id": str,
                "study_date": str,
                "study_time": str,
                "accession_number": str,
                "study_id": str,
                "study_description": str,
                "referring_physician_name": str,
                "modalities": str,
                "first_received_at": float,
                "last_received_at": float,
            },
            pk="study_instance_uid",
            if_not_exists=True,
        )
        db["series"].create(
            {
                "series_instance_uid": str,
                "study_instance_uid": str,
                "modality": str,
                "series_number": int,
                "series_description": str,
                "series_date": str,
                "body_part_examined": str,
                "manufacturer": str,
                "manufacturer_model_name": str,
                "frame_of_reference_uid": str,
                "condition_tags": str,  # JSON of CONDITION_KEYWORDS values
                "origin": str,  # "received" | "result" (created by the node)
                "state": str,
                "instance_count": int,
                "first_received_at": float,
                "last_received_at": float,
                "completed_at": float,
                "condition_key": str,
                "rule_id": str,
                "rule_match": str,
                "model_version": str,
                "findings": str,  # JSON list
                "timings": str,  # JSON {stage: seconds}
                "error": str,
                "updated_at": float,
            },
            pk="series_instance_uid",
            defaults={"state": SERIES_RECEIVING, "instance_count": 0, "origin": "received"},
            if_not_exists=True,
        )
        db["instances"].create(
            {
                "sop_instance_uid": str,
                "version": int,
                "series_instance_uid": str,
                "study_instance_uid": str,
                "sop_class_uid": str,
                "transfer_syntax_uid": str,
                "instance_number": int,
                "path": str,
                "size": int,
                "sha256": str,
                "received_at": float,
                "calling_ae": str,
            },
            pk=("sop_instance_uid", "version"),
            if_not_exists=True,
        )
        db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        db["meta"].upsert({"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key")
        for table, cols in (
            ("studies", ["patient_id"]),
            ("studies", ["study_date"]),
            ("series", ["study_instance_uid"]),
            ("series", ["state", "last_received_at"]),
            ("instances", ["series_instance_uid"]),
            ("instances", ["study_instance_uid"]),
            ("instances", ["path"]),
        ):
            db[table].create_index(cols, if_not_exists=True)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction under the index lock (BEGIN IMMEDIATE … COMMIT, rolled back on error)."""
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
        """Index one stored instance, creating or updating its patient, study and series.

        Long because it is one transaction of four upserts (patient, study, instance, series) whose order is
        the point.

        A new instance in a series that was already complete (or processed) reopens it: its state goes
        back to ``receiving`` so the quiet-period timer starts again.
        """
        now = time.time() if received_at is None else received_at
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO patients (patient_id, patient_name, patient_birth_date, patient_sex, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(patient_id) DO UPDATE SET"
                " patient_name=excluded.patient_name, patient_birth_date=excluded.patient_birth_date,"
                " patient_sex=excluded.patient_sex, updated_at=excluded.updated_at",
                (meta.patient_id, meta.patient_name, meta.patient_birth_date, meta.patient_sex, now),
            )
            conn.execute(
                "INSERT INTO studies (study_instance_uid, patient_id, study_date, study_time, accession_number,"
                " study_id, study_description, referring_physician_name, modalities, first_received_at,"
                " last_received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(study_instance_uid) DO UPDATE SET last_received_at=excluded.last_received_at",
                (
                    meta.study_instance_uid,
                    meta.patient_id,
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
            if meta.modality:
                row = conn.execute(
                    "SELECT modalities FROM studies WHERE study_instance_uid=?", (meta.study_instance_uid,)
                ).fetchone()
                mods = set(filter(None, (row[0] or "").split("\\")))
                if meta.modality not in mods:
                    mods.add(meta.modality)
                    conn.execute(
                        "UPDATE studies SET modalities=? WHERE study_instance_uid=?",
                        ("\\".join(sorted(mods)), meta.study_instance_uid),
                    )
            inserted = conn.execute(
                "INSERT OR IGNORE INTO instances (sop_instance_uid, version, series_instance_uid,"
                " study_instance_uid, sop_class_uid, transfer_syntax_uid, instance_number, path, size,"
                " sha256, received_at, calling_ae) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    meta.sop_instance_uid,
                    version,
                    meta.series_instance_uid,
                    meta.study_instance_uid,
                    meta.sop_class_uid,
                    meta.transfer_syntax_uid,
                    meta.instance_number,
                    relpath,
                    size,
                    sha256,
                    now,
                    calling_ae,
                ),
            ).rowcount
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
                    str(SERIES_RECEIVING if origin == Origin.RECEIVED else SERIES_DONE),
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
            )
        return self.query(sql + " ORDER BY i.instance_number, i.sop_instance_uid", (series_uid,))

    def has_instance(self, sop_uid: str, version: int) -> bool:
        """True when this version of the instance is indexed."""
        with self.lock:
            return (
                self.db.conn.execute(
                    "SELECT 1 FROM instances WHERE sop_instance_uid=? AND version=?", (sop_uid, version)
                ).fetchone()
                is not None
            )

    def known_paths(self) -> set[str]:
        """Relative paths of every indexed file (startup recovery compares them with the disk)."""
        with self.lock:
            return {r[0] for r in self.db.conn.execute("SELECT path FROM instances")}

    def counts(self) -> dict[str, int]:
        """Number of patients, studies, series and instances."""
        with self.lock:
            return {t: self.db[t].count for t in ("patients", "studies", "series", "instances")}

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


def meta_as_dict(meta: InstanceMeta) -> dict[str, Any]:
    """An InstanceMeta as a plain dict (for logs and tests; holds identity: never log it whole)."""
    return asdict(meta)
