"""Load a stored series as a volume: slices sorted along their normal, rescaled to real values (HU).

Refuses, with a reason a radiologist can read, what cannot be one volume: a single slice, localizers,
mixed orientations or sizes, missing or zero spacing, gaps or uneven slice spacing. An Enhanced (or Legacy
Converted Enhanced) CT / MR instance is one series on its own: its frames are the slices (``models.multiframe``),
each knowing its (SOP Instance UID, frame number).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from models.findings import VolumeGeometry
from models.multiframe import MULTIFRAME_SOP_CLASSES, FrameView, MultiFrameRefused, frame_views, is_multiframe


class Modality(StrEnum):
    """The modalities the node builds volumes of."""

    CT = "CT"
    MR = "MR"


IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": Modality.CT,  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4": Modality.MR,  # MR Image Storage
    **{uid: Modality(m) for uid, m in MULTIFRAME_SOP_CLASSES.items()},  # Enhanced, Legacy Converted Enhanced
}
MIN_SLICES = 8
SPACING_TOLERANCE = 0.1  # relative deviation of one gap from the median before it is a gap


class VolumeRefused(ValueError):
    """A series cannot be analysed as one volume; the message says why, for the SR."""


@dataclass(frozen=True)
class Volume:
    """A series as a 3D array of real values with its geometry and its source datasets (same order).

    For a multi-frame instance the source datasets are ``FrameView``s, one per frame (``frame_number``).
    """

    values: np.ndarray  # float32, shape (slices, rows, columns)
    geometry: VolumeGeometry
    datasets: list[Dataset]
    modality: Modality
    stored_dtype: str
    slope: float
    intercept: float
    # the stored integers (same order), kept when every slice shares ``slope`` and ``intercept``, so a rule can
    # be applied as a lookup table over them; None when the rescale varies per slice
    stored: np.ndarray | None = None


def _vec(ds: Dataset, keyword: str, n: int) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        return None
    try:
        return np.asarray([float(v) for v in value], float)
    except (TypeError, ValueError):
        return None


def load_datasets(paths: Sequence[Path]) -> list[Dataset]:
    """Read stored files (pixels included); unreadable files raise VolumeRefused."""
    out = []
    for p in paths:
        try:
            out.append(dcmread(p))
        except Exception as exc:
            raise VolumeRefused(f"a stored instance cannot be read ({type(exc).__name__})") from exc
    return out


def build_volume(datasets: Sequence[Dataset]) -> Volume:
    """Sort, check and stack CT/MR slices into a volume: single-frame slices, or the frames of one
    Enhanced CT / MR instance.

    Long because each refusal is its own check with its own message, in the order a reader of the series would
    make them.

    Raises
    ------
    VolumeRefused
        With the reason, when the slices do not make one regular volume.
    """
    if not datasets:
        raise VolumeRefused("the series has no instances")
    sop_class = str(datasets[0].get("SOPClassUID", ""))
    if sop_class not in IMAGE_SOP_CLASSES:
        raise VolumeRefused(f"SOP class {sop_class} is not a CT or MR image")
    modality = IMAGE_SOP_CLASSES[sop_class]
    slices = _frames_of(datasets) if any(is_multiframe(ds) for ds in datasets) else []
    for ds in [] if slices else datasets:
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        if "LOCALIZER" in image_type or "SCOUT" in image_type:
            continue
        slices.append(ds)
    if not slices:
        raise VolumeRefused("the series holds only localizer images")
    if len(slices) < MIN_SLICES:
        raise VolumeRefused(f"the series has {len(slices)} slice(s); at least {MIN_SLICES} are needed")
    orientation = _vec(slices[0], "ImageOrientationPatient", 6)
    spacing = _vec(slices[0], "PixelSpacing", 2)
    if orientation is None:
        raise VolumeRefused("ImageOrientationPatient is missing")
    if spacing is None or np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise VolumeRefused("PixelSpacing is missing or not positive")
    shape = (int(slices[0].Rows), int(slices[0].Columns))
    for ds in slices:
        o = _vec(ds, "ImageOrientationPatient", 6)
        if o is None or np.max(np.abs(o - orientation)) > 1e-3:
            raise VolumeRefused("the slices have mixed orientations")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise VolumeRefused("the slices have different sizes")
        s = _vec(ds, "PixelSpacing", 2)
        if s is None or np.max(np.abs(s - spacing)) > 1e-3:
            raise VolumeRefused("the slices have different pixel spacings")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = []
    for ds in slices:
        p = _vec(ds, "ImagePositionPatient", 3)
        if p is None:
            raise VolumeRefused("ImagePositionPatient is missing on a slice")
        positions.append(float(p @ normal))
    order = np.argsort(positions, kind="stable")
    pos = np.asarray(positions)[order]
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        raise VolumeRefused("two slices share a position (duplicate or mixed acquisitions)")
    dz = float(np.median(gaps))
    if np.any(np.abs(gaps - dz) > SPACING_TOLERANCE * dz):
        raise VolumeRefused(f"slice spacing is uneven (gaps from {gaps.min():.2f} to {gaps.max():.2f} mm)")
    ordered = [slices[i] for i in order]
    slope = float(ordered[0].get("RescaleSlope", 1) or 1)
    intercept = float(ordered[0].get("RescaleIntercept", 0) or 0)
    try:
        stored = _stack(ordered)
    except Exception as exc:
        raise VolumeRefused(f"pixel data cannot be decoded ({type(exc).__name__})") from exc
    values = np.empty(stored.shape, np.float32)
    uniform = True
    for k, ds in enumerate(ordered):  # slope/intercept may differ per slice (MR, some CT)
        s = float(ds.get("RescaleSlope", 1) or 1)
        b = float(ds.get("RescaleIntercept", 0) or 0)
        uniform = uniform and s == slope and b == intercept
        np.multiply(stored[k], s, out=values[k], casting="unsafe")
        values[k] += b
    geometry = VolumeGeometry(
        origin=tuple(float(v) for v in _vec(ordered[0], "ImagePositionPatient", 3)),
        row_direction=tuple(float(v) for v in row_dir),
        column_direction=tuple(float(v) for v in col_dir),
        spacing=(dz, float(spacing[0]), float(spacing[1])),
        shape=tuple(int(v) for v in values.shape),
        frame_of_reference_uid=str(ordered[0].get("FrameOfReferenceUID", "")),
    )
    return Volume(values, geometry, ordered, modality, str(stored.dtype), slope, intercept, stored if uniform else None)


def _frames_of(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The frames of the one multi-frame instance of a series, as slices.

    A SEG over a multi-frame source references one instance's frames; a series of several multi-frame
    instances (or one mixed with single-frame slices) is refused rather than guessed at.
    """
    if len(datasets) != 1:
        raise VolumeRefused(
            f"the series holds {len(datasets)} instances with a multi-frame one among them; "
            "an Enhanced CT/MR series is analysed when it is one multi-frame instance"
        )
    if str(datasets[0].get("SOPClassUID", "")) not in MULTIFRAME_SOP_CLASSES:
        raise VolumeRefused("multi-frame instances of a single-frame SOP class are not analysed")
    try:
        return list(frame_views(datasets[0]))
    except MultiFrameRefused as exc:
        raise VolumeRefused(str(exc)) from exc


def _stack(ordered: Sequence[Dataset]) -> np.ndarray:
    """The stored pixels of the slices, in their order (a multi-frame instance decoded once)."""
    if ordered and isinstance(ordered[0], FrameView):
        frames = ordered[0].instance.pixel_array
        frames = frames.reshape(-1, *frames.shape[-2:]) if frames.ndim == 2 else frames
        return np.stack([frames[ds.frame_number - 1] for ds in ordered])  # type: ignore[attr-defined]
    return np.stack([ds.pixel_array for ds in ordered])
