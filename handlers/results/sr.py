"""The findings report: a Comprehensive 3D SR following TID 1500 (Measurement Report).

Two measurement groups per finding, with the same tracking identifier and UID, finding type (aneurysm,
nodule), diameter, probability and algorithm identification (TID 4019, the conversion rule as parameters):

- TID 1501: the diameter in mm inferred from an ELLIPSOID (the lesion as a sphere of its diameter) and the
  probability from the lesion centre as a 3D POINT, both SCOORD3D in the series' frame of reference;
- TID 1410: a planar region, a CIRCLE of the lesion's radius on the source slice through its centre,
  referenced by that slice's SOP Instance UID, which every viewer that reads TID 1500 draws and navigates to
  (many read no SCOORD3D).

The slices carrying a region make the report's image library (TID 1600); every source instance is its
evidence. A series with no finding gets one group (TID 1501) saying "all algorithms succeeded without
findings"; a series that could not be analysed gets one saying "no algorithms succeeded" with the reason as
a comment.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from handlers.results.context import NOT_FOR_DIAGNOSIS, ResultContext
from models.findings import Finding
from models.multiframe import frame_number

log = logging.getLogger(__name__)

FINDING_TYPES: dict[str, Code] = {
    "aneurysm": codes.SCT.Aneurysm,
    "nodule": codes.SCT.Nodule,
}
# UCUM annotations ({...}) are dimensionless units: this one reads as what the number is, where "1" reads
# as nothing; the value stays a probability in [0, 1].
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
PROCEDURES: dict[str, Code] = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": Code("25056-3", "LN", "MR unspecified body region"),
}


def _algorithm_id(ctx: ResultContext) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=ctx.algorithm.name[:64],
        version=ctx.algorithm.version[:64],
        parameters=ctx.algorithm.parameter_strings(),
    )


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _tracking(ctx: ResultContext, finding: Finding, number: int) -> hd.sr.TrackingIdentifier:
    """The finding's tracking identifier and UID, shared by its SR groups, SEG segment and GSPS graphics."""
    return hd.sr.TrackingIdentifier(uid=ctx.tracking_uid(finding, number), identifier=ctx.tracking_id(finding, number))


def _frame_of_reference(ctx: ResultContext) -> str:
    """The series' Frame of Reference UID; empty when the source names none (then no SCOORD3D is written)."""
    uid = ctx.geometry.frame_of_reference_uid if ctx.geometry is not None else ""
    return uid or str(ctx.sources[0].get("FrameOfReferenceUID", "") or "")


# What TID 1602 (Image Library Entry) states of a cross-sectional image; highdicom reads each of them.
_LIBRARY_KEYWORDS = ("PixelSpacing", "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient")


def image_library(ctx: ResultContext, findings: list[Finding]) -> list[Dataset] | None:
    """The slices of the report's image library (TID 1600): those carrying a planar region.

    None (no library, TID 1500 makes it optional) when there is no finding or a slice lacks one of the
    attributes an entry describes, such as an empty Slice Thickness: an entry does not guess them.
    """
    slices = ctx.finding_slices(findings)
    if not slices or not all(ds.get(k) not in (None, "") for ds in slices for k in _LIBRARY_KEYWORDS):
        return None
    return slices


def finding_group(ctx: ResultContext, finding: Finding, number: int) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The measurement group (TID 1501) of one finding.

    The diameter is inferred from the lesion's ELLIPSOID (a sphere: the end points of its three axes);
    the probability from the lesion's centre POINT, where the detector's patch was centred.
    """
    center = np.asarray(finding.center_mm, dtype=float)
    axes = np.eye(3) * (finding.diameter_mm / 2.0)
    ellipsoid = np.stack(
        [center - axes[0], center + axes[0], center - axes[1], center + axes[1], center - axes[2], center + axes[2]]
    )
    frame_uid = _frame_of_reference(ctx)
    tracking = _tracking(ctx, finding, number)
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Diameter,
            value=round(float(finding.diameter_mm), 3),
            unit=codes.UCUM.Millimeter,
            referenced_coordinates=[
                hd.sr.CoordinatesForMeasurement3D(
                    graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSOID,
                    graphic_data=ellipsoid,
                    frame_of_reference_uid=frame_uid,
                )
            ],
        ),
        hd.sr.Measurement(
            name=codes.DCM.Probability,
            value=round(float(finding.probability), 4),
            unit=PROBABILITY_UNIT,
            referenced_coordinates=[
                hd.sr.CoordinatesForMeasurement3D(
                    graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                    graphic_data=center.reshape(1, 3),
                    frame_of_reference_uid=frame_uid,
                )
            ],
        ),
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=FINDING_TYPES[finding.kind],
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=_algorithm_id(ctx),
        measurements=measurements,
    )


def planar_group(
    ctx: ResultContext, finding: Finding, number: int
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The planar ROI group (TID 1410) of one finding: a CIRCLE on the source slice through its centre.

    PIXEL coordinates as in PS3.3 C.18.6.1.1: (0, 0) is the top left corner of the top left pixel, so the
    centre of pixel (column i, row j) is (i + 0.5, j + 0.5); the circle's second point lies on its edge.
    """
    source = ctx.sources[ctx.slice_of(finding)]
    col, row = ctx.pixel_of(finding)
    cx = float(np.clip(col + 0.5, 0.0, float(source.Columns)))
    cy = float(np.clip(row + 0.5, 0.0, float(source.Rows)))
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
        graphic_data=np.array([[cx, cy], [cx + ctx.radius_px(finding), cy]]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
            referenced_frame_numbers=None if frame_number(source) is None else [frame_number(source)],
        ),
    )
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Diameter, value=round(float(finding.diameter_mm), 3), unit=codes.UCUM.Millimeter
        ),
        hd.sr.Measurement(
            name=codes.DCM.Probability, value=round(float(finding.probability), 4), unit=PROBABILITY_UNIT
        ),
    ]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(ctx, finding, number),
        referenced_region=region,
        finding_type=FINDING_TYPES[finding.kind],
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=_algorithm_id(ctx),
        measurements=measurements,
    )


def summary_group(ctx: ResultContext, analysed: bool, reason: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of a series without findings: no finding, or not analysed and why."""
    outcome = (
        codes.DCM.AllAlgorithmsSucceededWithoutFindings if analysed else codes.DCM.NoAlgorithmsSucceededWithoutFindings
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=ctx.uid("summary"), identifier="series summary"),
        algorithm_id=_algorithm_id(ctx),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.DCM.CADProcessingAndFindingsSummary, outcome)],
    )
    text = reason or ("no finding" if analysed else "the series could not be analysed")
    group[0].ContentSequence.append(_comment(text))
    return group


def device_observer(ctx: ResultContext) -> hd.sr.ObserverContext:
    """The detector as the device observer of a document (SR, KOS): its UID, name and version."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.uid("device"),
            name=ctx.algorithm.name[:64],
            manufacturer_name="harmonode",
            model_name=f"{ctx.algorithm.name} {ctx.algorithm.version}"[:64],
        ),
    )


def build_sr(ctx: ResultContext, findings: list[Finding], analysed: bool, reason: str = "") -> Dataset:
    """The Comprehensive 3D SR of one series.

    Parameters
    ----------
    ctx
        Sources, geometry, algorithm and UID seed of the series.
    findings
        The findings (empty: the report says there is none, or why there could be none).
    analysed
        False when the series could not be analysed.
    reason
        Why it was not analysed, or a note on the analysis (a stand-in detector says so here).

    Returns
    -------
    pydicom.Dataset
        The SR instance.
    """
    device = device_observer(ctx)
    # 3D coordinates need the series' frame of reference; a source without one gets the planar regions only.
    groups: list = (
        [finding_group(ctx, f, n) for n, f in enumerate(findings, start=1)] if _frame_of_reference(ctx) else []
    )
    groups += [planar_group(ctx, f, n) for n, f in enumerate(findings, start=1)]
    if not groups:
        groups = [summary_group(ctx, analysed, reason)]
    elif reason:
        groups[0][0].ContentSequence.append(_comment(reason))
    if ctx.algorithm.harmonization:
        groups[0][0].ContentSequence.append(_comment(f"harmonization: {ctx.algorithm.harmonization}"))
    modality = str(ctx.sources[0].get("Modality", "CT"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURES.get(modality, PROCEDURES["CT"]),
        imaging_measurements=groups,
        referenced_images=image_library(ctx, findings),
    )
    common = ctx.common("sr")
    common["series_description"] = f"{common['series_description']} {ctx.algorithm.rule_text}"[:64]
    sr = hd.sr.Comprehensive3DSR(
        evidence=ctx.instances,
        content=report[0],
        sop_instance_uid=ctx.uid("sr"),
        instance_number=1,
        is_complete=True,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        **common,
    )
    log.debug("SR with %d group(s) built (%s)", len(groups), NOT_FOR_DIAGNOSIS)
    return sr
