"""Painting analytic shapes onto a scanner grid: the materials, the grid, and anti-aliased primitives.

Shapes (ellipsoids, layered shells, capsules, spheres, polylines) are anti-aliased over one voxel, so
sampling them at a given pixel spacing behaves like averaging a fine physical grid over the voxel. The
anatomy painted with them lives in ``simulator.phantom``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# Materials. Each has a CT value (HU at 120 kVp, before vendor calibration) and a TOF-MRA signal (0..1).
MATERIALS: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 0.0),
    "fat": (-90.0, 0.55),
    "soft": (45.0, 0.28),
    "muscle": (50.0, 0.22),
    "brain_wm": (30.0, 0.24),
    "brain_gm": (40.0, 0.30),
    "csf": (6.0, 0.08),
    "bone_cortical": (1350.0, 0.04),
    "bone_diploe": (600.0, 0.35),
    "bone_cancellous": (260.0, 0.30),
    "artery": (380.0, 1.0),
    "aneurysm": (360.0, 0.85),
    "lung": (-860.0, 0.02),
    "airway": (-1000.0, 0.0),
    "blood": (42.0, 0.3),
    "nodule_solid": (35.0, 0.3),
    "nodule_ggo": (-600.0, 0.1),
}
MATERIAL_NAMES = tuple(MATERIALS)
MATERIAL_INDEX = {name: i for i, name in enumerate(MATERIAL_NAMES)}
# Iodinated blood is bright; its HU depends on kVp more than bone does (handled in simulate.py).
CONTRAST_MATERIALS = ("artery", "aneurysm")
BONE_MATERIALS = ("bone_cortical", "bone_diploe", "bone_cancellous")


@dataclass(frozen=True)
class Grid:
    """Axial voxel centres in patient LPS mm: ``x`` (columns), ``y`` (rows), ``z`` (slices, increasing)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z), len(self.y), len(self.x))

    @classmethod
    def centred(cls, centre: tuple[float, float, float], shape: tuple[int, int, int], spacing: tuple[float, ...]):  # noqa: ANN206
        """A grid of ``shape`` (z, y, x) and ``spacing`` (dz, dy, dx) centred on ``centre`` (x, y, z)."""
        nz, ny, nx = shape
        dz, dy, dx = spacing
        axes = [
            (np.arange(n, dtype=np.float64) - (n - 1) / 2) * d + c
            for n, d, c in zip((nx, ny, nz), (dx, dy, dz), centre, strict=False)
        ]
        return cls(*(a.astype(np.float32) for a in axes), spacing=(float(dz), float(dy), float(dx)))


@dataclass
class Anatomy:
    """Rendered anatomy: one value image painted material by material (later paints win), an optional
    dominant-material label map, and the truth (lesions, landmarks)."""

    grid: Grid
    values: dict[str, float]
    image: np.ndarray = field(init=False)
    labels: np.ndarray | None = None
    lesions: list[dict] = field(default_factory=list)
    landmarks: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.image = np.full(self.grid.shape, np.float32(self.values["air"]), np.float32)

    def paint(self, material: str, occ: np.ndarray, where: tuple[slice, slice, slice] | None = None) -> None:
        """Cover what is there with ``material`` by fraction ``occ``."""
        where = where or (slice(None),) * 3
        view = self.image[where]
        view += occ * (np.float32(self.values[material]) - view)
        if self.labels is not None:
            lab = self.labels[where]
            lab[occ >= 0.5] = MATERIAL_INDEX[material]


def antialias(dist_inside: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased occupancy from a signed distance (positive inside), ramp over one voxel."""
    return np.clip(0.5 + dist_inside / np.float32(width), 0.0, 1.0)


def ellipsoid_depth(grid: Grid, centre, semi, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:  # noqa: ANN001
    """Signed depth (mm, positive inside) below the surface of an axis-aligned ellipsoid, to first order
    ``(1 - ρ) / |∇ρ|``; a semi-axis of ``inf`` makes an elliptic cylinder along that axis."""
    zs, ys, xs = box or (slice(None),) * 3
    cx, cy, cz = (np.float32(c) for c in centre)
    a, b, c = (np.float32(s) for s in semi)
    u, v, w = (grid.x[xs] - cx) / a, (grid.y[ys] - cy) / b, (grid.z[zs] - cz) / c
    rho2 = w[:, None, None] ** 2 + v[None, :, None] ** 2 + u[None, None, :] ** 2
    g2 = (w / c)[:, None, None] ** 2 + (v / b)[None, :, None] ** 2 + (u / a)[None, None, :] ** 2
    rho = np.sqrt(rho2)
    return (1.0 - rho) * rho / np.sqrt(g2 + np.float32(1e-12))


def _ellipsoid_box(grid: Grid, centre, semi, pad: float) -> tuple[slice, slice, slice] | None:  # noqa: ANN001
    lo = [c - min(s, 1e4) - pad for c, s in zip(centre, semi, strict=True)]
    hi = [c + min(s, 1e4) + pad for c, s in zip(centre, semi, strict=True)]
    return _bbox(grid, lo, hi)


def paint_ellipsoid(anat: Anatomy, material: str, centre, semi, width: float) -> None:  # noqa: ANN001
    """Paint an ellipsoid, computing only inside its bounding box."""
    box = _ellipsoid_box(anat.grid, centre, semi, width)
    if box is not None:
        anat.paint(material, antialias(ellipsoid_depth(anat.grid, centre, semi, box), width), box)


def paint_layers(anat: Anatomy, centre, semi, layers: list[tuple[float, str]], width: float, slab: int = 16) -> None:  # noqa: ANN001
    """Paint nested shells of one ellipsoid in a single pass: ``layers`` = [(depth mm, material), …] from the
    surface (depth 0) inwards; each material fills from its depth to the next. Done slab by slab to stay in cache.
    """
    box = _ellipsoid_box(anat.grid, centre, semi, width)
    if box is None:
        return
    values = [anat.values[m] for _, m in layers]
    knots_x, knots_v = [layers[0][0] - width / 2], [values[0]]
    for (depth, _), v_prev, v in zip(layers[1:], values[:-1], values[1:], strict=True):
        knots_x += [depth - width / 2, depth + width / 2]
        knots_v += [v_prev, v]
    thresholds = np.asarray([d for d, _ in layers], np.float32)
    codes = np.asarray([MATERIAL_INDEX[m] for _, m in layers], np.uint8)
    for z0 in range(box[0].start, box[0].stop, slab):
        sub = (slice(z0, min(z0 + slab, box[0].stop)), box[1], box[2])
        d = ellipsoid_depth(anat.grid, centre, semi, sub)
        layered = np.interp(d, knots_x, knots_v).astype(np.float32)
        view = anat.image[sub]
        view += antialias(d, width) * (layered - view)
        if anat.labels is not None:
            inside = d >= 0
            anat.labels[sub][inside] = codes[np.clip(np.searchsorted(thresholds, d[inside]) - 1, 0, None)]


def _bbox(grid: Grid, lo, hi) -> tuple[slice, slice, slice] | None:  # noqa: ANN001
    idx = []
    for axis, a, b in ((grid.z, lo[2], hi[2]), (grid.y, lo[1], hi[1]), (grid.x, lo[0], hi[0])):
        i0, i1 = np.searchsorted(axis, a), np.searchsorted(axis, b, side="right")
        if i1 <= i0:
            return None
        idx.append(slice(int(i0), int(i1)))
    return tuple(idx)  # type: ignore[return-value]


def paint_capsule(anat: Anatomy, material: str, p0, p1, r0: float, r1: float, width: float) -> None:  # noqa: ANN001
    """Paint a tapered capsule (vessel or airway piece) from ``p0`` to ``p1`` with radii ``r0``, ``r1``."""
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    pad = max(r0, r1) + width
    box = _bbox(anat.grid, np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
    if box is None:
        return
    g = anat.grid
    z, y, x = g.z[box[0]][:, None, None], g.y[box[1]][None, :, None], g.x[box[2]][None, None, :]
    d = p1 - p0
    dd = float(d @ d) or 1e-6
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / dd, 0.0, 1.0)
    dist = np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)
    anat.paint(material, antialias(r0 + t * (r1 - r0) - dist, width), box)


def paint_sphere(anat: Anatomy, material: str, centre, radius: float, width: float) -> None:  # noqa: ANN001
    """Paint a ball."""
    paint_capsule(anat, material, centre, centre, radius, radius, width)


def paint_polyline(anat: Anatomy, material: str, points, radii, width: float, piece_mm: float = 6.0) -> None:  # noqa: ANN001
    """Paint a vessel along a polyline, split into short capsules so each bounding box stays small."""
    pts, rad = np.asarray(points, np.float32), np.asarray(radii, np.float32)
    for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:], strict=False):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / piece_mm)))
        for s in range(n):
            t0, t1 = s / n, (s + 1) / n
            paint_capsule(
                anat, material, a + t0 * (b - a), a + t1 * (b - a), ra + t0 * (rb - ra), ra + t1 * (rb - ra), width
            )


def new_anatomy(grid: Grid, values: dict[str, float], labels: bool) -> Anatomy:
    return Anatomy(grid=grid, values=values, labels=np.zeros(grid.shape, np.uint8) if labels else None)


def mark_landmark(anat: Anatomy, name: str, xyz) -> None:  # noqa: ANN001
    anat.landmarks.append({"name": name, "center_mm": [round(float(v), 3) for v in xyz]})


# --- head -----------------------------------------------------------------------------------------------------


# Arterial tree around the circle of Willis at the origin (x left, y posterior, z superior), mm, radius mm.
# Each entry: name -> (points, radius at start, radius at end). "{s}" is +1 (left) or -1 (right).
