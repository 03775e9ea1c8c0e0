"""The index's tables, and the migrations that bring an older index up to them.

Version 2 (this one) identifies an instance by (study, series, SOP Instance UID, version), keeps patient
attributes per study, keys patients by PatientID *and* issuer (an empty PatientID never merges two
patients), and records conflicts. Version 1 keyed instances by SOP Instance UID alone and patients by
PatientID alone; ``migrate`` converts such an index in place. A migration cut short (a crash in the middle)
leaves an index to delete: the file store is the truth, and startup recovery indexes every stored file again.
The same tables are made on PostgreSQL (``storage.database``); no version 1 index ever existed there.
"""

from __future__ import annotations

import logging

from storage import exports, feedback, findings, parameters
from storage.database import Database

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

_PATIENT_COLUMNS = {
    "patient_key": str,  # storage.index.patient_key: issuer and PatientID, or the study for an empty ID
    "patient_id": str,
    "issuer_of_patient_id": str,
    "patient_name": str,
    "patient_birth_date": str,
    "patient_sex": str,
}
_STUDY_COLUMNS = {
    "study_instance_uid": str,
    **_PATIENT_COLUMNS,  # the study's own patient attributes, from its first instance
    "study_date": str,
    "study_time": str,
    "accession_number": str,
    "study_id": str,
    "study_description": str,
    "referring_physician_name": str,
    "modalities": str,
    "first_received_at": float,
    "last_received_at": float,
}
_SERIES_COLUMNS = {
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
    "origin": str,  # Origin: "received" | "result" (created by the node)
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
}
_INSTANCE_COLUMNS = {
    "study_instance_uid": str,
    "series_instance_uid": str,
    "sop_instance_uid": str,
    "version": int,
    "sop_class_uid": str,
    "transfer_syntax_uid": str,
    "instance_number": int,
    "path": str,
    "size": int,
    "sha256": str,
    "received_at": float,
    "calling_ae": str,
    "uid_elsewhere": int,  # 1: this SOP Instance UID is also held in another series or study
}
_CONFLICT_COLUMNS = {
    "id": int,
    "kind": str,  # storage.index.ConflictKind
    "study_instance_uid": str,
    "series_instance_uid": str,
    "sop_instance_uid": str,
    "detail": str,  # the attribute names that disagree, never their values
    "created_at": float,
}
INSTANCE_PK = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "version")
_INDEXES = (
    ("studies", ["patient_key"]),
    ("studies", ["patient_id"]),
    ("studies", ["study_date"]),
    ("series", ["study_instance_uid"]),
    ("series", ["state", "last_received_at"]),
    ("instances", ["series_instance_uid"]),
    ("instances", ["sop_instance_uid"]),
    ("instances", ["path"]),
)


def _create(db: Database) -> None:
    db["patients"].create({**_PATIENT_COLUMNS, "updated_at": float}, pk="patient_key", if_not_exists=True)
    db["studies"].create(_STUDY_COLUMNS, pk="study_instance_uid", if_not_exists=True)
    db["series"].create(
        _SERIES_COLUMNS,
        pk="series_instance_uid",
        defaults={"state": "receiving", "instance_count": 0, "origin": "received"},
        if_not_exists=True,
    )
    db["instances"].create(_INSTANCE_COLUMNS, pk=INSTANCE_PK, defaults={"uid_elsewhere": 0}, if_not_exists=True)
    db["conflicts"].create(_CONFLICT_COLUMNS, pk="id", if_not_exists=True)
    db["conflicts"].create_index(
        ["kind", "study_instance_uid", "series_instance_uid", "sop_instance_uid"], unique=True, if_not_exists=True
    )
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    for table, cols in _INDEXES:
        db[table].create_index(cols, if_not_exists=True)
    # the learning loop's tables (each owned by its module); an index of this version without them (one
    # written before they existed) gains them here as it opens: creating them is their whole migration
    findings.create_tables(db)
    feedback.create_table(db)
    exports.create_table(db)
    parameters.create_table(db)


def schema_version(db: Database) -> int:
    """The version of an existing index (0 for an empty database)."""
    if "meta" not in db.table_names():
        return 0
    rows = list(db.query("SELECT value FROM meta WHERE key = 'schema_version'"))
    return int(rows[0]["value"]) if rows else 0


def _from_v1(db: Database) -> None:
    """Version 1 → 2: instance identity with study and series, patients by ID and issuer, per-study patients.

    SQLite only (sqlite-utils' ``transform``): no version 1 index ever existed on PostgreSQL, which came after.
    """
    conn = db.conn
    for column, kind in (("patient_key", str), ("issuer_of_patient_id", str)):
        db["patients"].add_column(column, kind)
    conn.execute("UPDATE patients SET issuer_of_patient_id = '', patient_key = '\\' || patient_id")
    for column in _PATIENT_COLUMNS:
        if column not in db["studies"].columns_dict:
            db["studies"].add_column(column, str)
    # Version 1 kept one set of demographics per PatientID: the best a study can get back is that set.
    conn.execute(
        "UPDATE studies SET issuer_of_patient_id = '',"
        " patient_key = CASE WHEN trim(patient_id) != '' THEN '\\' || patient_id"
        "   ELSE '\\study\\' || study_instance_uid END,"
        " patient_name = (SELECT p.patient_name FROM patients p WHERE p.patient_id = studies.patient_id),"
        " patient_birth_date = (SELECT p.patient_birth_date FROM patients p WHERE p.patient_id = studies.patient_id),"
        " patient_sex = (SELECT p.patient_sex FROM patients p WHERE p.patient_id = studies.patient_id)"
    )
    conn.execute(
        "INSERT INTO patients (patient_id, patient_key, issuer_of_patient_id, patient_name, patient_birth_date,"
        " patient_sex, updated_at) SELECT '', s.patient_key, '', s.patient_name, s.patient_birth_date,"
        " s.patient_sex, s.first_received_at FROM studies s WHERE trim(s.patient_id) = ''"
    )
    conn.execute("DELETE FROM patients WHERE trim(patient_id) = '' AND patient_key NOT LIKE '\\study\\%'")
    db["patients"].transform(pk="patient_key")
    db["instances"].add_column("uid_elsewhere", int, not_null_default=0)
    db["instances"].transform(pk=INSTANCE_PK)


def migrate(db: Database) -> None:
    """Create the tables of a new index, or bring an older one up to ``SCHEMA_VERSION``.

    Raises
    ------
    RuntimeError
        The index was written by a newer harmonode, or is a version 1 index on PostgreSQL (never made).
    """
    found = schema_version(db)
    if found > SCHEMA_VERSION:
        raise RuntimeError(f"index schema {found} is newer than this harmonode's {SCHEMA_VERSION}: upgrade harmonode")
    if found == 1 and getattr(db, "dialect", "sqlite") != "sqlite":
        raise RuntimeError("a version 1 index on PostgreSQL cannot be: version 1 was SQLite only")
    if found == 1:
        log.warning("index schema 1 found: migrating to %d", SCHEMA_VERSION)
        _from_v1(db)
    _create(db)
    db["meta"].upsert({"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key")
