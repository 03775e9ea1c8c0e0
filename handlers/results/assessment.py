"""Assessment SRs (IHE Radiology AI Result Assessment, AIRA): a radiologist's verdict on the node's findings.

The exact AIRA content template (its document title and assessment codes) was not available to this project,
so the node writes and reads the nearest standard structure, built with highdicom:

- a Comprehensive 3D SR, TID 1500 Measurement Report, whose document title says it is an AI result
  assessment, with a person observer (TID 1003: the radiologist's name) in its observation context;
- the assessed SR of the node in its evidence (Current Requested Procedure Evidence Sequence), by SOP
  Instance UID;
- per assessed finding one measurement group (TID 1501) with the finding's Tracking UID and identifier (as
  the node's SR has them), its finding type (the new class after a modification), a qualitative evaluation
  "AI result assessment" = accepted / rejected / modified, and for a modification of position or size the
  new diameter inferred from an ELLIPSOID around the new centre (as the node's SR writes a finding).

The title and the assessment codes are in a private coding scheme (``99HMN``, PS3.16 8.2 allows one) until
the profile's codes are adopted; ``read_assessment`` recognises a document by its title.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from handlers.results.sr import FINDING_TYPES, PROCEDURES

log = logging.getLogger(__name__)

SCHEME = "99HMN"
ASSESSMENT_TITLE = Code("AIRA-DOC", SCHEME, "AI result assessment")
ASSESSMENT = Code("AIRA-ASMT", SCHEME, "AI result assessment")
VERDICTS: dict[str, Code] = {
    "accept": Code("AIRA-ACC", SCHEME, "Accepted"),
    "reject": Code("AIRA-REJ", SCHEME, "Rejected"),
    "modify": Code("AIRA-MOD", SCHEME, "Modified"),
}
_KINDS = {(c.value, c.scheme_designator): kind for kind, c in FINDING_TYPES.items()}
_SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33")


class NotAnAssessment(ValueError):
    """An SR that is not an AI result assessment (or one the node cannot read)."""


@dataclass(frozen=True)
class FindingVerdict:
    """What the radiologist said of one finding, as an assessment SR carries it."""

    tracking_uid: str
    action: str  # accept | reject | modify
    kind: str = ""  # the finding type (the new class for a modification)
    center_mm: tuple[float, float, float] | None = None  # a modified position (patient coordinates)
    diameter_mm: float = 0.0  # a modified size
    tracking_id: str = ""

    def __post_init__(self) -> None:
        if self.action not in VERDICTS:
            raise ValueError(f"an assessment is one of {sorted(VERDICTS)}, not {self.action!r}")
        if self.kind and self.kind not in FINDING_TYPES:
            raise ValueError(f"a finding type is one of {sorted(FINDING_TYPES)}, not {self.kind!r}")
        if (self.center_mm is None) != (self.diameter_mm <= 0):
            raise ValueError("a modified position comes with its diameter (and a diameter with its centre)")


@dataclass(frozen=True)
class AssessmentDocument:
    """An assessment SR as the node reads it."""

    sop_instance_uid: str
    study_instance_uid: str
    assessed_sr_uids: tuple[str, ...]  # the SRs its evidence names
    observer: str
    verdicts: tuple[FindingVerdict, ...]


def _group(v: FindingVerdict, frame_of_reference_uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of one verdict (a modified position as a diameter inferred from an ELLIPSOID)."""
    measurements = None
    if v.center_mm is not None:
        if not frame_of_reference_uid:
            raise ValueError("a modified position needs the source series' frame of reference UID")
        centre = np.asarray(v.center_mm, float)
        axes = np.eye(3) * (v.diameter_mm / 2.0)
        ellipsoid = np.stack(
            [
                centre - axes[0],
                centre + axes[0],
                centre - axes[1],
                centre + axes[1],
                centre - axes[2],
                centre + axes[2],
            ]
        )
        measurements = [
            hd.sr.Measurement(
                name=codes.SCT.Diameter,
                value=round(float(v.diameter_mm), 3),
                unit=codes.UCUM.Millimeter,
                referenced_coordinates=[
                    hd.sr.CoordinatesForMeasurement3D(
                        graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSOID,
                        graphic_data=ellipsoid,
                        frame_of_reference_uid=frame_of_reference_uid,
                    )
                ],
            )
        ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=v.tracking_uid, identifier=(v.tracking_id or "assessed finding")[:64]
        ),
        finding_type=FINDING_TYPES[v.kind or "aneurysm"],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(ASSESSMENT, VERDICTS[v.action])],
        measurements=measurements,
    )


def write_assessment(
    assessed_sr: Dataset,
    verdicts: Sequence[FindingVerdict],
    observer: str,
    frame_of_reference_uid: str = "",
    manufacturer: str = "harmonode assessment writer",
) -> hd.sr.Comprehensive3DSR:
    """Build the assessment SR of a radiologist's verdicts on the findings of one of the node's SRs.

    Parameters
    ----------
    assessed_sr
        The node's findings SR (its study, patient and SOP Instance UID are what the assessment refers to).
    verdicts
        One per assessed finding, naming it by its Tracking UID; a finding's ``kind`` defaults to aneurysm.
    observer
        The radiologist's name (DICOM PN form, e.g. ``Reader^Ada``).
    frame_of_reference_uid
        Of the source series: needed for a modified position (SCOORD3D).
    manufacturer
        Of the writing device (a viewer).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR

    Raises
    ------
    ValueError
        No verdict, no observer, or a modified position without a frame of reference.
    """
    if not verdicts:
        raise ValueError("an assessment assesses at least one finding")
    if not observer.strip():
        raise ValueError("an assessment names its observer")
    groups = [_group(v, frame_of_reference_uid) for v in verdicts]
    person = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=observer),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=person),
        procedure_reported=PROCEDURES.get(str(assessed_sr.get("Modality", "CT")), PROCEDURES["CT"]),
        imaging_measurements=groups,
        title=ASSESSMENT_TITLE,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[assessed_sr],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=9911,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        series_description="AI result assessment",
    )


def _concept(item: Dataset) -> tuple[str, str]:
    seq = item.get("ConceptNameCodeSequence")
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)) if seq else ("", "")


def _is(item: Dataset, code: Code) -> bool:
    return _concept(item) == (code.value, code.scheme_designator)


def _items(ds: Dataset) -> list[Dataset]:
    return list(ds.get("ContentSequence", []))


def _walk(ds: Dataset) -> list[Dataset]:
    out = []
    for item in _items(ds):
        out.append(item)
        out.extend(_walk(item))
    return out


def _verdict(group: Dataset) -> FindingVerdict | None:
    uid, tracking_id, action, kind, centre, diameter = "", "", "", "", None, 0.0
    for item in _items(group):
        if _is(item, codes.DCM.TrackingUniqueIdentifier):
            uid = str(item.UID)
        elif _is(item, codes.DCM.TrackingIdentifier):
            tracking_id = str(item.TextValue)
        elif _is(item, codes.DCM.Finding) and item.get("ConceptCodeSequence"):
            value = item.ConceptCodeSequence[0]
            kind = _KINDS.get((str(value.CodeValue), str(value.CodingSchemeDesignator)), "")
        elif _is(item, ASSESSMENT) and item.get("ConceptCodeSequence"):
            value = str(item.ConceptCodeSequence[0].CodeValue)
            action = next((name for name, code in VERDICTS.items() if code.value == value), "")
        elif _is(item, codes.SCT.Diameter) and item.get("MeasuredValueSequence"):
            diameter = float(item.MeasuredValueSequence[0].NumericValue)
            for child in _items(item):
                if child.get("ValueType") == "SCOORD3D":
                    centre = tuple(float(v) for v in np.asarray(child.GraphicData, float).reshape(-1, 3).mean(axis=0))
    if not action:
        return None
    if not uid:
        raise NotAnAssessment("an assessed finding names no Tracking UID")
    return FindingVerdict(uid, action, kind, centre, diameter if centre is not None else 0.0, tracking_id)  # type: ignore[arg-type]


def read_assessment(ds: Dataset) -> AssessmentDocument:
    """Read an assessment SR: the SRs it assesses, its observer, a verdict per finding.

    Raises
    ------
    NotAnAssessment
        Not an SR, not titled an AI result assessment, or one without a verdict or Tracking UID.
    """
    if str(ds.get("SOPClassUID", "")) not in _SR_CLASSES:
        raise NotAnAssessment("not a Comprehensive 3D, Comprehensive or Enhanced SR")
    if not _is(ds, ASSESSMENT_TITLE):
        raise NotAnAssessment("its document title is not an AI result assessment")
    items = _walk(ds)
    observer = next((str(i.PersonName) for i in items if _is(i, codes.DCM.PersonObserverName)), "")
    verdicts = []
    for item in items:
        if item.get("ValueType") == "CONTAINER" and _is(item, codes.DCM.MeasurementGroup):
            try:
                verdict = _verdict(item)
            except ValueError as exc:
                raise NotAnAssessment(f"an assessed finding cannot be read: {exc}") from exc
            if verdict is not None:
                verdicts.append(verdict)
    if not verdicts:
        raise NotAnAssessment("it assesses no finding")
    assessed = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for ref in series.get("ReferencedSOPSequence", []):
                if str(ref.ReferencedSOPClassUID) in _SR_CLASSES:
                    assessed.append(str(ref.ReferencedSOPInstanceUID))
    return AssessmentDocument(
        str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), tuple(assessed), observer or "unknown", tuple(verdicts)
    )
