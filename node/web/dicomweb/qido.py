"""QIDO-RS (PS3.18 10.6): studies, series and instances searched with the C-FIND SCP's own matcher.

A query's parameters become a C-FIND identifier — ``{attributeID}={value}`` are matching keys (keyword or
tag, wildcards ``*``/``?``, ``a-b`` date and time ranges, comma-separated UID lists), ``includefield`` adds
return keys (``all`` for every attribute the index holds) — and ``handlers.query.find`` answers it, so a
QIDO-RS search and a C-FIND of the same keys match the same entities. Fuzzy matching is not offered: a
request for it gets literal matching and a ``Warning`` header, as PS3.18 10.6.1.2.1 asks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from handlers.query import ATTRIBUTES, LEVELS, STUDY_ROOT, BadIdentifier, find
from storage.index import Index

MAX_LIMIT = 10_000  # one answer holds at most this many matches; ``offset`` pages through the rest
RETRIEVE_URL = 0x00081190

# Returned without being asked (PS3.18 Table 10.6.3-3), where the index holds them.
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "STUDY": (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "StudyInstanceUID",
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "SeriesDate",
        "NumberOfSeriesRelatedInstances",
    ),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "InstanceNumber"),
}
_CONTROL = frozenset({"limit", "offset", "fuzzymatching", "includefield", "orderby"})
_NOT_IN_IDENTIFIER = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})


@dataclass(frozen=True)
class Search:
    """One QIDO-RS search: its C-FIND identifier, paging and what to warn about."""

    level: str
    identifier: Dataset
    limit: int
    offset: int
    warnings: tuple[str, ...] = ()


def _keyword(attribute_id: str) -> str:
    """The keyword of a QIDO attribute ID (a keyword or eight hex digits).

    Raises
    ------
    BadIdentifier
        Not a DICOM attribute, or a sequence path (not supported).
    """
    text = attribute_id.strip()
    if "." in text:
        raise BadIdentifier(f"{text}: attribute paths into sequences are not supported")
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        keyword = keyword_for_tag(int(text, 16))
    else:
        keyword = text if tag_for_keyword(text) is not None else ""
    if not keyword:
        raise BadIdentifier(f"{text} is not a DICOM attribute")
    return keyword


def _int_param(values: list[str], name: str, default: int) -> int:
    if not values:
        return default
    try:
        value = int(values[-1])
    except ValueError as exc:
        raise BadIdentifier(f"{name} is not an integer") from exc
    if value < 0:
        raise BadIdentifier(f"{name} is negative")
    return value


def build_search(level: str, params: list[tuple[str, str]], fixed: dict[str, str]) -> Search:
    """The C-FIND identifier of a QIDO-RS request at ``level`` (``STUDY``, ``SERIES`` or ``IMAGE``).

    Parameters
    ----------
    level
        The level the resource searches.
    params
        The query string's (name, value) pairs, in order.
    fixed
        Keys the path sets (``StudyInstanceUID`` of ``/studies/{uid}/series``).

    Raises
    ------
    BadIdentifier
        An unknown attribute, a malformed value or a malformed ``limit``/``offset``.
    """
    depth = LEVELS.index(level)
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        grouped.setdefault(name if name in _CONTROL else _keyword(name), []).append(value)
    warnings: list[str] = []
    if any(v.strip().lower() == "true" for v in grouped.get("fuzzymatching", [])):
        warnings.append('299 harmonode "fuzzymatching is not supported: only literal matching was performed"')
    returned: list[str] = list(DEFAULT_KEYS[level])
    for value in grouped.get("includefield", []):
        for field in filter(None, (v.strip() for v in value.split(","))):
            if field == "all":
                returned += [k for k, a in ATTRIBUTES.items() if LEVELS.index(a.level) <= depth]
            else:
                returned.append(_keyword(field))
    matches: dict[str, list[str]] = {k: v for k, v in grouped.items() if k not in _CONTROL}
    for keyword, uid in fixed.items():
        matches[keyword] = [uid]
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in dict.fromkeys([*returned, *matches]):
        if keyword in _NOT_IN_IDENTIFIER:
            continue
        tag = tag_for_keyword(keyword)
        vr = ATTRIBUTES[keyword].vr if keyword in ATTRIBUTES else dictionary_VR(tag)
        values = matches.get(keyword, [])
        if vr == "UI":
            values = [u.strip() for v in values for u in v.split(",") if u.strip()]
        if vr == "SQ":
            identifier.add_new(tag, "SQ", [])
            continue
        try:
            identifier.add_new(tag, vr, "\\".join(values) if values else None)
        except (ValueError, TypeError, OverflowError) as exc:
            raise BadIdentifier(f"{keyword}: value cannot be read as {vr}") from exc
    limit = min(_int_param(grouped.get("limit", []), "limit", MAX_LIMIT), MAX_LIMIT)
    offset = _int_param(grouped.get("offset", []), "offset", 0)
    return Search(level, identifier, limit, offset, tuple(warnings))


def run_search(index: Index, search: Search, retrieve_url: Any) -> list[dict[str, Any]]:
    """The matches of ``search`` as dicom+json objects, each with its WADO-RS Retrieve URL.

    Parameters
    ----------
    index
        The node's index.
    search
        From ``build_search``.
    retrieve_url
        ``retrieve_url(level, study_uid, series_uid, sop_uid) -> str``.

    Raises
    ------
    BadIdentifier
        A value the matcher refuses (a malformed date range, a non-integer number).
    """
    matches = find(index, search.identifier, STUDY_ROOT)
    page = itertools.islice(matches, search.offset, search.offset + search.limit)
    out = []
    for ds in page:
        url = retrieve_url(
            search.level,
            str(ds.get("StudyInstanceUID", "")),
            str(ds.get("SeriesInstanceUID", "")),
            str(ds.get("SOPInstanceUID", "")),
        )
        del ds.QueryRetrieveLevel
        body = ds.to_json_dict()
        body.pop("00080005", None)  # the answer is JSON, always UTF-8
        body[f"{RETRIEVE_URL:08X}"] = {"vr": "UR", "Value": [url]}
        out.append(body)
    return out
