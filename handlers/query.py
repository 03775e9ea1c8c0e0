"""C-FIND SCP: Patient Root and Study Root queries answered from the index (SQLite, or PostgreSQL in a cluster).

Matching follows PS3.4 C.2.2.2: an empty key is universal matching (returned, not matched), a plain value
is single-value matching, ``*`` and ``?`` are wildcards, ``a-b`` / ``a-`` / ``-b`` on DA, TM and DT are
range matching, and several values (``\\``-separated, as a list of UIDs) match any of them. PN values match
case-insensitively (PS3.4 C.2.2.2.1 lets an SCP ignore case for names); every other VR is case-sensitive.
Every value becomes an SQL parameter; only column names chosen from ``ATTRIBUTES`` enter the SQL text.

The matches are the same on both dialects of the index (``Index.dialect``). SQLite: wildcards by ``GLOB``
(case-sensitive), names by ``LIKE`` and ``COLLATE NOCASE`` (ASCII case folded). PostgreSQL: wildcards by
``LIKE … ESCAPE`` (case-sensitive), names by ``ILIKE … ESCAPE``; its text columns have the ``"C"`` collation
(``storage.pgsql``), so ``ILIKE`` folds ASCII letters only, as SQLite does, and ranges compare code points.

The same matcher builds the instance list of a C-MOVE or C-GET (``handlers.retrieve``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from handlers.permissions import NOT_AUTHORIZED, Permissions, Service
from storage.index import Index

log = logging.getLogger(__name__)

# C-FIND statuses (PS3.4 C.4.1.1.4).
SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
PATIENT_ROOT = "PATIENT"
STUDY_ROOT = "STUDY"
MODEL_ROOTS = {
    str(PatientRootQueryRetrieveInformationModelFind): PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelFind): STUDY_ROOT,
}
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


class BadIdentifier(ValueError):
    """A query or retrieve identifier the node cannot answer (bad level, malformed value)."""


@dataclass(frozen=True)
class Attribute:
    """One queryable attribute: the level it belongs to, its SQL expression and VR.

    ``matchable`` is False for computed return keys (counts), which PS3.4 lets an SCP return but not match.
    """

    level: str
    sql: str
    vr: str
    matchable: bool = True
    study_sql: str = ""  # a patient attribute asked at study level or below: the study's own value

    def column(self, level: str) -> str:
        """The SQL expression of the attribute in a query at ``level``."""
        return self.study_sql if self.study_sql and level != "PATIENT" else self.sql


_STUDY_SERIES = "(SELECT COUNT(*) FROM series x WHERE x.study_instance_uid = st.study_instance_uid)"
_STUDY_INSTANCES = (
    "(SELECT COALESCE(SUM(x.instance_count), 0) FROM series x WHERE x.study_instance_uid = st.study_instance_uid)"
)
_PATIENT_STUDIES = "(SELECT COUNT(*) FROM studies y WHERE y.patient_key = p.patient_key)"
_PATIENT_SERIES = (
    "(SELECT COUNT(*) FROM series x JOIN studies y ON y.study_instance_uid = x.study_instance_uid"
    " WHERE y.patient_key = p.patient_key)"
)
_PATIENT_INSTANCES = (
    "(SELECT COALESCE(SUM(x.instance_count), 0) FROM series x JOIN studies y"
    " ON y.study_instance_uid = x.study_instance_uid WHERE y.patient_key = p.patient_key)"
)

ATTRIBUTES: dict[str, Attribute] = {
    "PatientID": Attribute("PATIENT", "p.patient_id", "LO", study_sql="st.patient_id"),
    "IssuerOfPatientID": Attribute("PATIENT", "p.issuer_of_patient_id", "LO", study_sql="st.issuer_of_patient_id"),
    "PatientName": Attribute("PATIENT", "p.patient_name", "PN", study_sql="st.patient_name"),
    "PatientBirthDate": Attribute("PATIENT", "p.patient_birth_date", "DA", study_sql="st.patient_birth_date"),
    "PatientSex": Attribute("PATIENT", "p.patient_sex", "CS", study_sql="st.patient_sex"),
    "NumberOfPatientRelatedStudies": Attribute("PATIENT", _PATIENT_STUDIES, "IS", False),
    "NumberOfPatientRelatedSeries": Attribute("PATIENT", _PATIENT_SERIES, "IS", False),
    "NumberOfPatientRelatedInstances": Attribute("PATIENT", _PATIENT_INSTANCES, "IS", False),
    "StudyInstanceUID": Attribute("STUDY", "st.study_instance_uid", "UI"),
    "StudyDate": Attribute("STUDY", "st.study_date", "DA"),
    "StudyTime": Attribute("STUDY", "st.study_time", "TM"),
    "AccessionNumber": Attribute("STUDY", "st.accession_number", "SH"),
    "StudyID": Attribute("STUDY", "st.study_id", "SH"),
    "StudyDescription": Attribute("STUDY", "st.study_description", "LO"),
    "ReferringPhysicianName": Attribute("STUDY", "st.referring_physician_name", "PN"),
    "ModalitiesInStudy": Attribute("STUDY", "st.modalities", "CS"),
    "NumberOfStudyRelatedSeries": Attribute("STUDY", _STUDY_SERIES, "IS", False),
    "NumberOfStudyRelatedInstances": Attribute("STUDY", _STUDY_INSTANCES, "IS", False),
    "SeriesInstanceUID": Attribute("SERIES", "se.series_instance_uid", "UI"),
    "Modality": Attribute("SERIES", "se.modality", "CS"),
    "SeriesNumber": Attribute("SERIES", "se.series_number", "IS"),
    "SeriesDescription": Attribute("SERIES", "se.series_description", "LO"),
    "SeriesDate": Attribute("SERIES", "se.series_date", "DA"),
    "BodyPartExamined": Attribute("SERIES", "se.body_part_examined", "CS"),
    "Manufacturer": Attribute("SERIES", "se.manufacturer", "LO"),
    "ManufacturerModelName": Attribute("SERIES", "se.manufacturer_model_name", "LO"),
    "FrameOfReferenceUID": Attribute("SERIES", "se.frame_of_reference_uid", "UI"),
    "NumberOfSeriesRelatedInstances": Attribute("SERIES", "se.instance_count", "IS", False),
    "SOPInstanceUID": Attribute("IMAGE", "i.sop_instance_uid", "UI"),
    "SOPClassUID": Attribute("IMAGE", "i.sop_class_uid", "UI"),
    "InstanceNumber": Attribute("IMAGE", "i.instance_number", "IS"),
}

# Below the patient level, patient attributes are the study's own (from its instances): no patients join.
_FROM = {
    "PATIENT": "patients p",
    "STUDY": "studies st",
    "SERIES": "series se JOIN studies st ON st.study_instance_uid = se.study_instance_uid",
    "IMAGE": "instances i JOIN series se ON se.series_instance_uid = i.series_instance_uid"
    " JOIN studies st ON st.study_instance_uid = i.study_instance_uid",
}
# Only the newest version of an instance stored twice under one SOP Instance UID in one series is visible.
_LATEST = (
    "i.version = (SELECT MAX(v.version) FROM instances v WHERE v.study_instance_uid = i.study_instance_uid"
    " AND v.series_instance_uid = i.series_instance_uid AND v.sop_instance_uid = i.sop_instance_uid)"
)

_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DT_RE = re.compile(r"^\d{4}(\d{2}){0,5}(\.\d{1,6})?([+-]\d{4})?$")
_INT_COLUMNS = {"IS"}


def _values(value: Any) -> list[str]:
    """An identifier element's value as a list of strings (one per value; [] for an empty value)."""
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        items = [str(v) for v in value]
    else:
        text = str(value)
        items = text.split("\\") if "\\" in text else [text]
    items = [v.strip() for v in items]
    return [v for v in items if v] if any(items) else []


def _check_temporal(vr: str, value: str) -> None:
    pattern = {"DA": _DATE_RE, "TM": _TIME_RE, "DT": _DT_RE}[vr]
    if not pattern.match(value):
        raise BadIdentifier(f"{vr} value is not a valid {vr}")


def _match_one(attr: Attribute, value: str, col: str, dialect: str = "sqlite") -> tuple[str, list[Any]]:
    """SQL condition and parameters for one value of one key (PS3.4 C.2.2.2), on column ``col``.

    ``dialect`` is the index's (``"sqlite"`` | ``"postgresql"``): the same matches in either's SQL.
    """
    vr = attr.vr
    pg = dialect == "postgresql"
    if value == "*":
        return "", []
    if col == "st.modalities":
        if any(c in value for c in "*?") and pg:
            return "('\\' || " + col + " || '\\') LIKE ? ESCAPE '\\'", ["%\\\\" + _like_pattern(value) + "\\\\%"]
        if any(c in value for c in "*?"):
            return "('\\' || " + col + " || '\\') GLOB ?", ["*\\" + _glob_escape(value) + "\\*"]
        position = "strpos" if pg else "instr"
        return position + "('\\' || " + col + " || '\\', ?) > 0", ["\\" + value + "\\"]
    if vr in ("DA", "TM", "DT") and "-" in value and not (vr == "DT" and _DT_RE.match(value)):
        start, _, end = value.partition("-")
        for part in (start, end):
            if part:
                _check_temporal(vr, part)
        if not start and not end:
            raise BadIdentifier(f"{vr} range has neither start nor end")
        conds, params = [f"{col} != ''"], []
        if start:
            conds.append(f"{col} >= ?")
            params.append(start)
        if end:
            # "~" sorts after digits and ".", so 1300 includes 130059.9 (the end's own precision).
            conds.append(f"{col} <= ?")
            params.append(end if vr == "DA" else end + "~")
        return " AND ".join(conds), params
    if vr in ("DA", "TM", "DT"):
        _check_temporal(vr, value)
    if vr in _INT_COLUMNS:
        try:
            return f"{col} = ?", [int(value)]
        except ValueError as exc:
            raise BadIdentifier(f"{vr} value is not an integer") from exc
    if vr != "UI" and any(c in value for c in "*?"):
        if vr == "PN":  # case-insensitive: SQLite's LIKE folds ASCII case, as ILIKE on "C" text does
            return f"{col} {'ILIKE' if pg else 'LIKE'} ? ESCAPE '\\'", [_like_pattern(value)]
        if pg:
            return f"{col} LIKE ? ESCAPE '\\'", [_like_pattern(value)]
        return f"{col} GLOB ?", [_glob_escape(value)]
    if vr == "PN":
        if pg:
            return f"{col} ILIKE ? ESCAPE '\\'", [_like_escape(value)]
        return f"{col} = ? COLLATE NOCASE", [value]
    return f"{col} = ?", [value]


def _like_escape(value: str) -> str:
    """``value`` as a LIKE pattern (``ESCAPE '\\'``) that matches itself only."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like_pattern(value: str) -> str:
    """A DICOM wildcard value as a LIKE pattern (``ESCAPE '\\'``): ``*`` → ``%``, ``?`` → ``_``, the rest literal."""
    return _like_escape(value).replace("*", "%").replace("?", "_")


def _glob_escape(value: str) -> str:
    """Keep DICOM ``*``/``?`` as GLOB wildcards and make ``[`` literal."""
    return value.replace("[", "[[]")


def match_condition(
    attr: Attribute, values: list[str], level: str = "PATIENT", dialect: str = "sqlite"
) -> tuple[str, list[Any]]:
    """The SQL condition for a key with one or more values (several values: any one matches) at ``level``.

    ``dialect``: the index's (``Index.dialect``), ``"sqlite"`` or ``"postgresql"``.
    """
    col = attr.column(level)
    parts = [_match_one(attr, v, col, dialect) for v in values]
    if any(not sql for sql, _ in parts):
        return "", []
    if len(parts) == 1:
        return parts[0]
    if attr.vr == "UI":  # list of UID matching: one IN (...) the index can use
        return f"{col} IN ({','.join('?' for _ in values)})", list(values)
    params: list[Any] = []
    for _, p in parts:
        params.extend(p)
    return "(" + " OR ".join(f"({sql})" for sql, _ in parts) + ")", params


def query_level(identifier: Dataset, root: str) -> str:
    """The Query/Retrieve Level of an identifier, checked against the information model's root.

    Raises
    ------
    BadIdentifier
        The level is missing or unknown, or PATIENT is asked of the Study Root model.
    """
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise BadIdentifier("QueryRetrieveLevel is missing or not PATIENT, STUDY, SERIES or IMAGE")
    if root == STUDY_ROOT and level == "PATIENT":
        raise BadIdentifier("the Study Root model has no PATIENT level")
    return level


def where_clause(identifier: Dataset, level: str, dialect: str = "sqlite") -> tuple[str, list[Any]]:
    """WHERE text and parameters for the matching keys of ``identifier`` at or above ``level``.

    Keys below the level and keys the index does not hold do not constrain the match. ``dialect``: the
    index's SQL (``Index.dialect``).
    """
    depth = LEVELS.index(level)
    conds: list[str] = [_LATEST] if level == "IMAGE" else []
    params: list[Any] = []
    for elem in identifier:
        attr = ATTRIBUTES.get(elem.keyword)
        if attr is None or not attr.matchable or LEVELS.index(attr.level) > depth:
            continue
        try:
            values = _values(elem.value)
        except Exception as exc:  # a value pydicom cannot convert
            raise BadIdentifier(f"{elem.keyword} cannot be read") from exc
        if not values:
            continue
        sql, p = match_condition(attr, values, level, dialect)
        if sql:
            conds.append(sql)
            params.extend(p)
    return (" WHERE " + " AND ".join(conds)) if conds else "", params


def find(index: Index, identifier: Dataset, root: str, retrieve_ae_title: str = "") -> Iterator[Dataset]:
    """The response identifiers of a C-FIND, one per match, holding the keys asked for.

    Parameters
    ----------
    index
        The node's index.
    identifier
        The request identifier.
    root
        ``PATIENT_ROOT`` or ``STUDY_ROOT``.
    retrieve_ae_title
        Returned as Retrieve AE Title when asked for.

    Yields
    ------
    Dataset
        One response identifier per matching entity.

    Raises
    ------
    BadIdentifier
        The identifier cannot be answered.
    """
    level = query_level(identifier, root)
    depth = LEVELS.index(level)
    where, params = where_clause(identifier, level, index.dialect)
    wanted: list[tuple[Any, str | None]] = []  # (element, column alias or None)
    select: list[str] = []
    for elem in identifier:
        if elem.keyword == "QueryRetrieveLevel" or elem.tag.group in (0x0000, 0x0002):
            continue
        attr = ATTRIBUTES.get(elem.keyword)
        if attr is not None and LEVELS.index(attr.level) <= depth:
            alias = f"a{len(select)}"
            select.append(f"{attr.column(level)} AS {alias}")
            wanted.append((elem, alias))
        else:
            wanted.append((elem, None))
    unique = ATTRIBUTES[UNIQUE_KEYS[level]]
    select.append(f"{unique.column(level)} AS unique_key")
    sql = f"SELECT {', '.join(select)} FROM {_FROM[level]}{where}"
    for row in index.query(sql, tuple(params)):
        yield _response(level, wanted, row, retrieve_ae_title, row["unique_key"])


def _response(
    level: str, wanted: list[tuple[Any, str | None]], row: dict[str, Any], retrieve_ae: str, unique: str
) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    non_ascii = False
    for elem, alias in wanted:
        keyword = elem.keyword
        if keyword == "SpecificCharacterSet":
            continue
        if alias is not None:
            value = row[alias]
            if value is None:
                value = ""
            elif ATTRIBUTES[keyword].vr == "IS":
                value = str(value)
            elif keyword == "ModalitiesInStudy" and "\\" in value:
                value = value.split("\\")
            non_ascii = non_ascii or (isinstance(value, str) and not value.isascii())
            ds.add_new(elem.tag, ATTRIBUTES[keyword].vr, value)
        elif keyword == "RetrieveAETitle":
            ds.RetrieveAETitle = retrieve_ae
        elif elem.VR == "SQ":
            ds.add_new(elem.tag, "SQ", [])
        else:
            ds.add_new(elem.tag, elem.VR, None)  # asked for but not held: returned empty (PS3.4 C.4.1.1.3.2)
    if UNIQUE_KEYS[level] not in ds:
        setattr(ds, UNIQUE_KEYS[level], unique)
    if non_ascii or any(e.keyword == "SpecificCharacterSet" for e, _ in wanted):
        ds.SpecificCharacterSet = "ISO_IR 192"  # the index holds decoded text: answer in UTF-8
    return ds


def handle_find(
    event: evt.Event, index: Index, ae_title: str = "", permissions: Permissions | None = None
) -> Iterator[tuple[int, Dataset | None]]:
    """EVT_C_FIND handler: pending responses per match, then success; cancel and failures as statuses.

    Parameters
    ----------
    event
        The C-FIND event.
    index
        The node's index.
    ae_title
        The node's AE title (returned as Retrieve AE Title).
    permissions
        Who may query (``NOT_AUTHORIZED`` for the others).

    Yields
    ------
    tuple[int, Dataset | None]
        ``(0xFF00, identifier)`` per match, then nothing more (pynetdicom sends success), or a failure
        or cancel status.
    """
    if permissions is not None and not permissions.check(event, Service.FIND):
        yield NOT_AUTHORIZED, None
        return
    root = MODEL_ROOTS.get(str(event.request.AffectedSOPClassUID), STUDY_ROOT)
    try:
        identifier = event.identifier
        results = find(index, identifier, root, ae_title)
        for response in results:
            if event.is_cancelled:
                log.info("C-FIND cancelled by %s", event.assoc.requestor.ae_title)
                yield CANCEL, None
                return
            yield PENDING, response
    except BadIdentifier as exc:
        log.warning("C-FIND from %s refused: %s", event.assoc.requestor.ae_title, exc)
        yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
    except Exception as exc:
        log.error("C-FIND from %s failed: %s", event.assoc.requestor.ae_title, type(exc).__name__)
        log.debug("C-FIND failure detail", exc_info=True)
        yield UNABLE_TO_PROCESS, None
