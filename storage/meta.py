"""What the index keeps of one instance's header, read once from the stored (header-only) dataset."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

# VRs whose raw ASCII bytes give the text pydicom would (``_raw_text``); PN, DS and the rest go through pydicom.
_SPLIT_THEN_STRIP = frozenset({"SH", "LO"})  # pydicom strips each value (text VRs)
_STRIP_THEN_SPLIT = frozenset({"CS", "DA", "TM", "UI", "AS"})  # pydicom strips the whole value (string VRs)
_TAGS: dict[str, tuple[int, str]] = {}  # keyword -> (tag, dictionary VR)


def _raw_text(ds: Dataset, keyword: str) -> str | None:
    """``_converted_text`` read straight from the element's bytes, or None where only pydicom can say.

    Only for a value still raw (never converted), held in memory, in ASCII without an escape (so every DICOM
    character set decodes it the same), of a VR whose padding and delimiters are handled the same way here;
    the issue-24 profile had the indexed attributes' conversion as the C-STORE handler's largest cost.
    """
    if keyword not in _TAGS:
        tag = tag_for_keyword(keyword)
        _TAGS[keyword] = (tag, dictionary_VR(tag)) if tag is not None else (0, "")
    tag, vr = _TAGS[keyword]
    raw = ds.get_item(tag) if tag else None
    if not isinstance(raw, RawDataElement):
        return None
    value, vr = raw.value, raw.VR or vr
    if not isinstance(value, bytes) or not value.isascii() or b"\x1b" in value:
        return None
    text = value.decode("ascii")
    if vr in _STRIP_THEN_SPLIT:
        text = text.rstrip("\0 ")
    elif vr in _SPLIT_THEN_STRIP:
        text = "\\".join(v.rstrip("\0 ") for v in text.split("\\"))
    else:
        return None
    return text if "\\" in text else text.strip()


def _text(ds: Dataset, keyword: str) -> str:
    """A header value as plain text ('' when absent); multi-valued joined with '\\' as on the wire."""
    fast = _raw_text(ds, keyword)
    return _converted_text(ds, keyword) if fast is None else fast


def _converted_text(ds: Dataset, keyword: str) -> str:
    """``_text`` through pydicom's value conversion (any VR, any character set)."""
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
    issuer_of_patient_id: str = ""
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


# Header tags that end up in ``series.condition_tags`` (a JSON object: a new keyword needs no schema change),
# for the imaging-condition key (rules/keys.py); the last four give its body region.
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
    "ProtocolName",
    "SeriesDescription",
    "StudyDescription",
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
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
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


def series_condition_tags(row: Mapping[str, Any]) -> dict[str, str]:
    """The condition tags of an index ``series`` row, as the condition key reads them.

    A series indexed before SeriesDescription was a condition keyword gets it (and BodyPartExamined, when
    missing) from the row's own columns, so its key and its detector task see the same region.

    Parameters
    ----------
    row
        A row of the ``series`` table (``condition_tags`` JSON, ``series_description``, ``body_part_examined``).

    Returns
    -------
    dict[str, str]
        Header values by keyword; an unreadable ``condition_tags`` gives the row's columns only.
    """
    try:
        tags = json.loads(row.get("condition_tags") or "{}")
    except ValueError:
        tags = {}
    tags = tags if isinstance(tags, dict) else {}
    for keyword, column in (("SeriesDescription", "series_description"), ("BodyPartExamined", "body_part_examined")):
        if not tags.get(keyword) and row.get(column):
            tags[keyword] = str(row[column])
    return tags


def meta_as_dict(meta: InstanceMeta) -> dict[str, Any]:
    """An InstanceMeta as a plain dict (for logs and tests; holds identity: never log it whole)."""
    return asdict(meta)
