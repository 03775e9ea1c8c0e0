"""The DICOM SEG of the lesions: one segment per finding, a sphere of the finding's diameter, tracked with
the finding's Tracking ID and UID as the SR's groups are.

A SEG lies in the frame of reference of its source (the IOD requires one): a source without a Frame of
Reference UID gets no SEG (``can_segment``). A source with an empty Slice Thickness gets the volume's
slice spacing as the thickness of the segmentation's frames, which is what its spheres are sampled at.
Each segment recommends the GSPS's yellow as its display colour: a viewer without one picks its own and
says so (OHIF shows a warning over the image).
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from handlers.results.context import ResultContext
from handlers.results.gsps import COLOUR
from handlers.results.sr import FINDING_TYPES
from models.findings import Finding
from models.multiframe import frame_number, source_instance

log = logging.getLogger(__name__)


def sphere_mask(ctx: ResultContext, finding: Finding) -> np.ndarray:
    """Boolean mask (slices, rows, columns) of the voxels within the finding's sphere.

    Distances are computed in the sphere's bounding box only: a grid over a whole clinical CT would take
    gigabytes per finding.
    """
    geometry = ctx.volume
    shape = (len(ctx.sources), int(ctx.sources[0].Rows), int(ctx.sources[0].Columns))
    center = np.asarray(geometry.patient_to_index(finding.center_mm), float)
    spacing = np.asarray(geometry.spacing, float)
    radius = finding.diameter_mm / 2.0
    lo = [int(np.clip(np.floor(c - radius / d), 0, n)) for c, d, n in zip(center, spacing, shape, strict=True)]
    hi = [int(np.clip(np.ceil(c + radius / d) + 1, 0, n)) for c, d, n in zip(center, spacing, shape, strict=True)]
    mask = np.zeros(shape, dtype=bool)
    if all(h > low for low, h in zip(lo, hi, strict=True)):
        kk, jj, ii = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij")
        dist2 = ((kk - center[0]) * spacing[0]) ** 2 + ((jj - center[1]) * spacing[1]) ** 2
        dist2 = dist2 + ((ii - center[2]) * spacing[2]) ** 2
        mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = dist2 <= radius**2
    if not mask.any():  # smaller than a voxel: keep the centre voxel so the segment is not empty
        k, j, i = (int(np.clip(round(c), 0, n - 1)) for c, n in zip(center, shape, strict=True))
        mask[k, j, i] = True
    return mask


def can_segment(ctx: ResultContext) -> bool:
    """Whether a SEG can be built over the sources: they name a frame of reference."""
    return bool(ctx.sources[0].get("FrameOfReferenceUID"))


def _fill_slice_thickness(ctx: ResultContext, seg: Dataset) -> None:
    """Give the frames' Pixel Measures the volume's slice spacing as thickness where the source has none.

    highdicom copies the source's pixel measures (a ``pixel_measures`` argument is not used when it
    derives them from source images), so the Type 1C attribute is set on its output.
    """
    spacing = float(ctx.volume.spacing[0])
    groups = [*seg.get("SharedFunctionalGroupsSequence", []), *seg.get("PerFrameFunctionalGroupsSequence", [])]
    for group in groups:
        for measures in group.get("PixelMeasuresSequence", []):
            if measures.get("SliceThickness") in (None, ""):
                measures.SliceThickness = round(spacing, 6)


def _in_source_order(ctx: ResultContext, labels: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """The source images and the label volume as highdicom takes them.

    Single-frame slices: the slices and the labels in volume order. The frames of a multi-frame instance:
    the instance itself and the labels in its frame order (frame ``n`` is plane ``n - 1``), so that each
    segmentation frame references its source frame.
    """
    if not ctx.multiframe:
        return ctx.sources, labels
    instance = source_instance(ctx.sources[0])
    in_frame_order = np.zeros((int(instance.NumberOfFrames), *labels.shape[1:]), labels.dtype)
    for k, ds in enumerate(ctx.sources):
        in_frame_order[int(frame_number(ds)) - 1] = labels[k]  # type: ignore[arg-type]
    return [instance], in_frame_order


def build_seg(ctx: ResultContext, findings: list[Finding]) -> Dataset:
    """The segmentation of one series' findings.

    Parameters
    ----------
    ctx
        Sorted sources, geometry, algorithm.
    findings
        At least one finding.

    Returns
    -------
    pydicom.Dataset
        The SEG instance (binary, empty frames omitted).

    Raises
    ------
    ValueError
        No finding given, or sources without a frame of reference.
    """
    if not findings:
        raise ValueError("a segmentation needs at least one finding")
    if not can_segment(ctx):
        raise ValueError("a segmentation needs sources with a Frame of Reference UID")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ctx.algorithm.name[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=ctx.algorithm.version[:64],
        parameters={k: v for k, v in (p.split("=", 1) for p in ctx.algorithm.parameter_strings())},
    )
    labels = np.zeros((len(ctx.sources), int(ctx.sources[0].Rows), int(ctx.sources[0].Columns)), np.uint8)
    descriptions = []
    for number, finding in enumerate(findings, start=1):
        labels[sphere_mask(ctx, finding) & (labels == 0)] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"{finding.kind} {number}"[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=FINDING_TYPES[finding.kind],
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=ctx.tracking_uid(finding, number),
                tracking_id=ctx.tracking_id(finding, number),
                display_color=COLOUR,
            )
        )
    source_images, labels = _in_source_order(ctx, labels)
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        sop_instance_uid=ctx.uid("seg"),
        instance_number=1,
        device_serial_number=ctx.algorithm.version[:64],
        content_label="LESIONS",
        content_description=f"{ctx.algorithm.name} {ctx.algorithm.version}, {ctx.algorithm.rule_text}"[:64],
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        **ctx.common("seg"),  # type: ignore[arg-type]
    )
    _fill_slice_thickness(ctx, seg)
    log.debug("SEG with %d segment(s) built", len(descriptions))
    return seg
