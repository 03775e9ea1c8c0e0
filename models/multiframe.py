"""The frames of an Enhanced (or Legacy Converted Enhanced) CT / MR instance as the slices of a volume.

Each frame becomes a ``FrameView``: a dataset that reads like the single-frame slice it stands for (the
instance's own attributes, functional groups included, shared, not copied; and the frame's
ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness, rescale, window and frame type
from its functional groups, per-frame over shared), and that knows the instance it comes from and its frame
number, so that results can reference (SOP Instance UID, frame number). Pixels stay in the instance and are
decoded once, when the volume is stacked.

Refuses, with a reason a radiologist can read, frames that are not slices of one acquisition: functional
groups missing, localizer frames, frames computed from a volume (MIP, MPR …).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

MULTIFRAME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2": "CT",  # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4": "MR",  # Legacy Converted Enhanced MR Image Storage
}

# Instance-level elements a frame view leaves out: the pixels. It keeps the functional groups, so that a
# builder that reads a multi-frame image itself (highdicom's GSPS, SEG, SR image library) finds them.
_LEFT_OUT = {"PixelData", "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths"}
_FRAME_TYPE_SEQUENCES = ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence")


class MultiFrameRefused(ValueError):
    """The frames of a multi-frame instance are not slices of one volume; the message says why."""


class FrameView(Dataset):
    """One frame of a multi-frame instance, read as the single-frame slice it stands for.

    ``instance`` is the multi-frame dataset (pixels, functional groups), ``frame_number`` the frame's
    number in it (1-based, as ReferencedFrameNumber counts).
    """

    instance: Dataset
    frame_number: int


def is_multiframe(ds: Dataset) -> bool:
    """Whether ``ds`` is an instance of an enhanced CT / MR class or holds more than one frame."""
    return str(ds.get("SOPClassUID", "")) in MULTIFRAME_SOP_CLASSES or int(ds.get("NumberOfFrames", 1) or 1) > 1


def frame_number(ds: Dataset) -> int | None:
    """The frame number a source slice stands for (None: a single-frame instance)."""
    return ds.frame_number if isinstance(ds, FrameView) else None


def source_instance(ds: Dataset) -> Dataset:
    """The stored instance a source slice comes from (itself for a single-frame instance)."""
    return ds.instance if isinstance(ds, FrameView) else ds


def _macro(item: Dataset, shared: Dataset, keyword: str) -> Dataset | None:
    """The first item of a functional group macro, per-frame before shared (PS3.3 C.7.6.16)."""
    for groups in (item, shared):
        seq = groups.get(keyword)
        if seq:
            return seq[0]
    return None


def _frame_type(item: Dataset, shared: Dataset) -> Dataset | None:
    for keyword in _FRAME_TYPE_SEQUENCES:
        macro = _macro(item, shared, keyword)
        if macro is not None:
            return macro
    return None


def frame_view(instance: Dataset, item: Dataset, shared: Dataset, number: int) -> FrameView:
    """The view of frame ``number`` (1-based) whose per-frame functional groups are ``item``.

    Raises
    ------
    MultiFrameRefused
        The frame has no position or orientation, or is a localizer or computed from a volume.
    """
    view = FrameView()
    for element in instance:
        if element.keyword not in _LEFT_OUT:
            view.add(element)
    if hasattr(instance, "file_meta"):
        view.file_meta = instance.file_meta
    position = _macro(item, shared, "PlanePositionSequence")
    orientation = _macro(item, shared, "PlaneOrientationSequence")
    if position is None or "ImagePositionPatient" not in position:
        raise MultiFrameRefused(f"frame {number} has no Plane Position (ImagePositionPatient)")
    if orientation is None or "ImageOrientationPatient" not in orientation:
        raise MultiFrameRefused(f"frame {number} has no Plane Orientation (ImageOrientationPatient)")
    view.ImagePositionPatient = position.ImagePositionPatient
    view.ImageOrientationPatient = orientation.ImageOrientationPatient
    measures = _macro(item, shared, "PixelMeasuresSequence")
    for keyword in ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"):
        if measures is not None and keyword in measures:
            view[keyword] = measures[keyword]
    transform = _macro(item, shared, "PixelValueTransformationSequence")
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        if transform is not None and keyword in transform:
            view[keyword] = transform[keyword]
    voi = _macro(item, shared, "FrameVOILUTSequence")
    for keyword in ("WindowCenter", "WindowWidth"):
        if voi is not None and keyword in voi:
            view[keyword] = voi[keyword]
    frame_type = _frame_type(item, shared)
    if frame_type is not None and "FrameType" in frame_type:
        values = frame_type.FrameType
        view.ImageType = list(values) if isinstance(values, MultiValue) else [values]
        technique = str(frame_type.get("VolumeBasedCalculationTechnique", "NONE") or "NONE").upper()
        if technique != "NONE":
            raise MultiFrameRefused(f"frame {number} is computed from a volume ({technique}), not an acquired slice")
    if {"LOCALIZER", "SCOUT"} & {str(v).upper() for v in view.get("ImageType", [])}:
        raise MultiFrameRefused(f"frame {number} is a localizer")
    view.instance = instance
    view.frame_number = number
    return view


def frame_views(instance: Dataset) -> list[FrameView]:
    """Every frame of a multi-frame instance as a slice, in frame order.

    Raises
    ------
    MultiFrameRefused
        The instance has no per-frame functional groups for each frame, or a frame is not an acquired
        slice (see ``frame_view``).
    """
    frames = int(instance.get("NumberOfFrames", 1) or 1)
    per_frame = instance.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        raise MultiFrameRefused("the multi-frame instance has no per-frame functional groups")
    if len(per_frame) != frames:
        raise MultiFrameRefused(f"{len(per_frame)} per-frame functional group items for {frames} frames")
    shared_seq = instance.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else Dataset()
    return [frame_view(instance, item, shared, n) for n, item in enumerate(per_frame, start=1)]
