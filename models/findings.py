"""Small value objects shared by the detector, the pipeline and the result builders.

``VolumeGeometry`` maps voxel indices ``(k, j, i)`` = (slice, row, column) of a volume sorted along the
slice normal to patient coordinates in millimetres (DICOM LPS), and back. ``Finding`` is one detected
lesion in patient coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LESION_KINDS = ("aneurysm", "nodule")


@dataclass(frozen=True)
class VolumeGeometry:
    """Geometry of a volume of shape (slices, rows, columns) built from parallel single-frame slices.

    ``origin`` is ImagePositionPatient of the first slice; ``row_direction`` / ``column_direction`` are
    the two ImageOrientationPatient vectors (direction of increasing column index / row index);
    ``slice_direction`` is their cross product; ``spacing`` is (slice, row, column) spacing in mm.
    """

    origin: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    frame_of_reference_uid: str = ""

    def __post_init__(self) -> None:
        if any(s <= 0 or not np.isfinite(s) for s in self.spacing):
            raise ValueError(f"spacing must be positive and finite, got {self.spacing}")

    @property
    def slice_direction(self) -> np.ndarray:
        """Unit normal of the slices, pointing from the first slice to the last."""
        n = np.cross(np.asarray(self.row_direction, float), np.asarray(self.column_direction, float))
        return n / np.linalg.norm(n)

    def affine(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous (k, j, i, 1) voxel indices to patient (x, y, z, 1) in mm."""
        dz, dy, dx = self.spacing
        m = np.eye(4)
        m[:3, 0] = self.slice_direction * dz
        m[:3, 1] = np.asarray(self.column_direction, float) * dy
        m[:3, 2] = np.asarray(self.row_direction, float) * dx
        m[:3, 3] = self.origin
        return m

    def index_to_patient(self, kji: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """Voxel index (k, j, i), fractional allowed, shape (..., 3) → patient mm (..., 3)."""
        p = np.asarray(kji, float)
        return p @ self.affine()[:3, :3].T + self.affine()[:3, 3]

    def patient_to_index(self, xyz: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """Patient mm (..., 3) → fractional voxel index (k, j, i) (..., 3)."""
        a = self.affine()
        return (np.asarray(xyz, float) - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T


@dataclass(frozen=True)
class Finding:
    """One detected lesion, in patient coordinates."""

    kind: str  # one of LESION_KINDS
    center_mm: tuple[float, float, float]  # patient coordinates (LPS), mm
    diameter_mm: float
    probability: float
    center_index: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (k, j, i) in the sorted volume
    tracking_id: str = ""
    tracking_uid: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in LESION_KINDS:
            raise ValueError(f"finding kind must be one of {LESION_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if not self.diameter_mm > 0:
            raise ValueError(f"diameter_mm must be positive, got {self.diameter_mm}")

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (for the index and ``status --json``)."""
        return {
            "kind": self.kind,
            "center_mm": [round(float(v), 2) for v in self.center_mm],
            "diameter_mm": round(float(self.diameter_mm), 2),
            "probability": round(float(self.probability), 4),
            "tracking_id": self.tracking_id,
            "tracking_uid": self.tracking_uid,
        }
